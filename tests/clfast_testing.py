"""Helpers shared by clfast's tests and benchmarks (imports pytest: not for library code)."""
from typing import Optional

import pytest
import torch

from clfast.ops import backend as backend_name
from clfast.ops import native_available, set_backend

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


def measure(benchmark, step, device: str, group: str, baseline: Optional[str] = None,
            backend: Optional[str] = None, **extra_info) -> None:
    """Times ``step()`` and a device sync with pytest-benchmark, in group ``"<group> [<device>]"``, naming the
    benchmark of the same run it is compared with (``baseline``; benchmarks/conftest.py prints the ratios),
    on ``backend`` if given (the previous one is restored)."""
    def run():
        step()
        sync(device)

    benchmark.group = f"{group} [{device}]"
    if baseline is not None:
        benchmark.extra_info["baseline"] = baseline
    benchmark.extra_info.update(extra_info)
    before = backend_name()
    set_backend(backend or before)
    try:
        benchmark(run)
    finally:
        set_backend(before)
