import os
import shutil
import tempfile

import pytest
import torch

import clfast

# The session traces its emulated launches (before the emulated library loads: it reads this once), so that the
# coverage test, run last, can check them instead of running the emulated suite again.
_trace_dir = None
if not os.environ.get("CLFAST_EMU_TRACE"):
    _trace_dir = tempfile.mkdtemp(prefix="clfast-cuemu-")
    os.environ["CLFAST_EMU_TRACE"] = os.path.join(_trace_dir, "trace.txt")


def pytest_sessionfinish(session, exitstatus):
    if _trace_dir is not None:
        shutil.rmtree(_trace_dir, ignore_errors=True)


def pytest_collection_modifyitems(session, config, items):
    """The coverage test of the emulated device runs after everything else."""
    last = [i for i in items if i.name.startswith("test_every_cuda_kernel_is_launched")]
    items[:] = [i for i in items if i not in last] + last


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
