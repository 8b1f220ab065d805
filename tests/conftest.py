import pytest

import clfast


@pytest.fixture(params=["native", "reference"])
def backend(request):
    """Runs a test on each backend and restores the previous one."""
    if request.param == "native" and not clfast.native_available():
        pytest.skip("native extension not built")
    before = clfast.backend()
    clfast.set_backend(request.param)
    yield request.param
    clfast.set_backend(before)
