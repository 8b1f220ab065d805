"""The README's Python examples run as written."""
import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_readme_examples_run():
    pytest.importorskip("nngeometry")  # the EWC example
    blocks = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)
    assert blocks
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
