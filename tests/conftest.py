import pytest
import torch

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


@pytest.fixture(autouse=True)
def _emulated_cuda(request, monkeypatch):
    """For the ``cuemu`` cases of device-parametrised tests: ``torch.ops.clfast`` (and so every clfast op wrapper)
    is the emulated CUDA library while the test runs, on the native backend."""
    if request.node.get_closest_marker("cuemu") is None:
        yield
        return
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("backend") == "reference":
        pytest.skip("the emulated device runs the native kernels only")
    from clfast_testing import CUEMU_NAMESPACE

    monkeypatch.setattr(torch.ops, "clfast", getattr(torch.ops, CUEMU_NAMESPACE))
    before = clfast.backend()
    clfast.set_backend("native")
    yield
    clfast.set_backend(before)
