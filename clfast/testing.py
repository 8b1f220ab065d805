"""Helpers shared by clfast's tests and benchmarks (imports pytest: not for library code)."""
import pytest
import torch

from ._ops import native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native extension not built")


def device_params():
    """cpu always; cuda marked ``cuda`` and skipped without a GPU, so CUDA cases exist in every run."""
    return [pytest.param("cpu", id="cpu"),
            pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                not torch.cuda.is_available(), reason="needs a CUDA device")])]


def sync(device: str) -> None:
    """Wait for queued kernels, so a benchmark times the work and not its launch."""
    if device == "cuda":
        torch.cuda.synchronize()
