"""Helpers shared by clfast's tests and benchmarks (imports pytest: not for library code)."""
import glob
import os
from typing import Optional

import pytest
import torch

from clfast.ops import backend as backend_name
from clfast.ops import native_available, set_backend
from clfast.ops._backend import register_namespace

needs_native = pytest.mark.skipif(not native_available(), reason="native extension not built")


CUEMU_NAMESPACE = "clfast_cuemu"
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# CLFAST_EMU_LIBRARY names a sanitized build instead (tests/cuemu/sanitize.sh).
CUEMU_LIBRARY = os.environ.get("CLFAST_EMU_LIBRARY") or os.path.join(_ROOT, "build", "cuemu", "plain",
                                                                     CUEMU_NAMESPACE + ".so")


def _load_cuemu() -> Optional[str]:
    """Loads the emulated CUDA library built by tests/cuemu/build.py; returns why it is not loaded, or None."""
    if not native_available():
        return "native extension not built"
    if not os.path.exists(CUEMU_LIBRARY):
        return f"the emulated CUDA library is not built (python tests/cuemu/build.py)"
    sources = glob.glob(os.path.join(_ROOT, "csrc", "**", "*"), recursive=True) + \
        glob.glob(os.path.join(_ROOT, "tests", "cuemu", "*.[ch]*"))
    if max(os.path.getmtime(f) for f in sources) > os.path.getmtime(CUEMU_LIBRARY):
        return f"{CUEMU_LIBRARY} is older than csrc/ (python tests/cuemu/build.py)"
    torch.ops.load_library(CUEMU_LIBRARY)
    register_namespace(CUEMU_NAMESPACE)
    return None


CUEMU_MISSING = _load_cuemu()
if CUEMU_MISSING is not None and os.environ.get("CLFAST_REQUIRE_CUEMU", "") == "1":
    raise RuntimeError(f"CLFAST_REQUIRE_CUEMU=1 but {CUEMU_MISSING}")


def device_params(emulated: bool = True):
    """cpu always; cuda marked ``cuda`` and skipped without a GPU, so CUDA cases exist in every run; and, when
    ``emulated``, ``cuemu``: the CUDA kernels run by the emulator on CPU tensors (the value is "cpu"; the conftest
    sends ``torch.ops.clfast`` to the emulated library for these cases)."""
    params = [pytest.param("cpu", id="cpu"),
              pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                  not torch.cuda.is_available(), reason="needs a CUDA device")])]
    if emulated:
        params.append(pytest.param("cpu", id="cuemu", marks=[pytest.mark.cuemu, pytest.mark.skipif(
            CUEMU_MISSING is not None, reason=str(CUEMU_MISSING))]))
    return params


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
