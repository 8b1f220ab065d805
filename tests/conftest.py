import pytest
import torch

import clfast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """cpu always; cuda marked, and skipped without a GPU, so the CUDA tests exist in every run."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device")])]


needs_native = pytest.mark.skipif(not clfast.native_available(), reason="native extension not built")


@pytest.fixture(params=["native", "reference"])
def backend(request):
    """Runs a test on each backend and restores the previous one."""
    if request.param == "native" and not clfast.native_available():
        pytest.skip("native extension not built")
    before = clfast.backend()
    clfast.set_backend(request.param)
    yield request.param
    clfast.set_backend(before)
