"""The bad-input suite (tests/bad_input.py) with each op family in its own process: a crash is a failing test,
and every case must end as same-result or same-error (equal results, or the same exception on both backends with
every argument unchanged)."""
import json
import os
import subprocess
import sys

import pytest

from bad_input import DEFECTS, FAMILIES

import clfast
from clfast_testing import needs_native

HERE = os.path.dirname(os.path.abspath(__file__))
# The child imports the clfast this process imported.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(
    [os.path.dirname(os.path.dirname(os.path.abspath(clfast.__file__)))] +
    ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))


@needs_native
@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input(family):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "bad_input.py"), family], capture_output=True,
                          text=True, timeout=600, env=ENV)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0, (f"the {family} cases crashed (exit {proc.returncode}) after "
                                  f"{rows[-1]['case'] if rows else 'no case'}:\n{proc.stderr[-2000:]}")
    defects = [f"{r['op']} {r['case']}: {r['outcome']} ({r.get('detail') or r.get('message', '')})" for r in rows
               if r["outcome"] in DEFECTS]
    assert rows and not defects, "\n".join(defects[:40])
