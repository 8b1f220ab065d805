"""The emulated CUDA device (tests/cuemu): the emulator's own semantics and checks, and that the emulated suite
launches every CUDA kernel of csrc/."""
import glob
import os
import re
import subprocess
import sys

import pytest
import torch

from clfast_testing import CUEMU_MISSING, CUEMU_NAMESPACE

# Marked cuemu: the sanitizer runs (tests/cuemu/sanitize.sh) take these too.
pytestmark = [pytest.mark.cuemu, pytest.mark.skipif(CUEMU_MISSING is not None, reason=str(CUEMU_MISSING))]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _selftest(case, n=0):
    return getattr(torch.ops, CUEMU_NAMESPACE).emu_selftest(case, n)


def test_barrier_votes_count_every_thread_of_the_block():
    out = _selftest("votes", 70)  # three warps, the last one partial
    k = len(range(0, 70, 3))
    assert torch.equal(out[..., 0], torch.ones(2, 70, dtype=torch.long))
    assert torch.equal(out[..., 1], torch.zeros(2, 70, dtype=torch.long))
    assert torch.equal(out[..., 2], torch.full((2, 70), k, dtype=torch.long))


def test_shared_memory_is_shared_by_a_block_and_ordered_by_its_barrier():
    out = _selftest("neighbours", 256)
    t = torch.arange(256)
    assert torch.equal(out, torch.stack([b * 1000 + (t + 1) % 256 for b in range(3)]))


def test_warp_shuffles_and_votes():
    out = _selftest("warp_ops", 64)
    lane = torch.arange(64) % 32
    down = torch.where(lane < 31, (lane + 1) * 10, lane * 10)
    up = torch.where(lane > 0, (lane - 1) * 10, lane * 10)
    assert torch.equal(out[:, 0], down) and torch.equal(out[:, 1], up)
    assert torch.equal(out[:, 2], (lane ^ 3) * 10) and torch.equal(out[:, 3], torch.full((64,), 50))
    assert torch.equal(out[:, 4], torch.full((64,), 0xAAAAAAAA)) and out[:, 5].eq(1).all() and out[:, 6].eq(0).all()


@pytest.mark.parametrize("mode", ["forward", "reverse", "shuffle"])
def test_block_order(monkeypatch, mode):
    monkeypatch.setenv("CLFAST_EMU_BLOCK_ORDER", mode)
    out = _selftest("order", 40)
    if mode == "forward":
        assert out.tolist() == list(range(40))
    elif mode == "reverse":
        assert out.tolist() == list(range(39, -1, -1))
    else:
        assert sorted(out.tolist()) == list(range(40)) and out.tolist() != list(range(40))


@pytest.mark.parametrize("mode", ["forward", "reverse", "shuffle"])
def test_thread_order(monkeypatch, mode):
    monkeypatch.setenv("CLFAST_EMU_THREAD_ORDER", mode)
    out = _selftest("thread_order", 100).tolist()
    if mode == "forward":
        assert out == list(range(100))
    elif mode == "reverse":
        assert out == list(range(99, -1, -1))
    else:
        assert sorted(out) == list(range(100)) and out != list(range(100))


def test_an_unknown_order_is_an_error(monkeypatch):
    monkeypatch.setenv("CLFAST_EMU_THREAD_ORDER", "backwards")
    with pytest.raises(RuntimeError, match="CLFAST_EMU_THREAD_ORDER must be forward, reverse or shuffle"):
        _selftest("thread_order", 4)


@pytest.mark.parametrize("mode", ["forward", "reverse", "shuffle"])
def test_block_sum_twice_in_one_kernel(monkeypatch, mode):
    """csrc's block_sum may be called again in the same kernel: its first barrier keeps the second call's writes
    of the warp sums after the first call's reads (a race TSan reports without it, in the sanitizer runs)."""
    monkeypatch.setenv("CLFAST_EMU_THREAD_ORDER", mode)
    out = _selftest("block_sum_twice", 3)
    t = torch.arange(256, dtype=torch.float64)
    expected = torch.stack([torch.stack([(t + 1).sum(), (2 * t + b).sum()]) for b in range(3)])
    assert torch.equal(out, expected)


def test_atomics_from_every_thread():
    assert _selftest("count_all", 37).item() == 37 * 128


def test_threads_that_exit_do_not_hold_a_barrier():
    out = _selftest("barrier_after_exit", 40)
    assert out.tolist() == [0] * 40 + [1] * 24


@pytest.mark.parametrize("case, n, message", [
    ("divergent_barrier", 20, r"waits at the barrier at .*selftest.cpp:\d+ while other threads wait at .*selftest"),
    ("shuffle_after_exit", 8, r"can never finish: thread \(8, 0, 0\) waits at __shfl_down_sync"),
    ("mask_without_caller", 0, r"lane (1[6-9]|2[0-9]|3[01]) calls __shfl_sync at .* with a mask that excludes it"),
    ("read_outside_mask", 0, r"lane 15 of warp 0 reads lane 16 in __shfl_down_sync at .*, which is not in the mask"),
    ("block_too_large", 2048, r"launch of count_all: the block exceeds 1024 threads"),
    ("grid_y_too_large", 70000, r"launch of count_all: the grid exceeds"),
    ("params_too_large", 0, r"launch of big_params: 50\d\d bytes of kernel parameters \(the limit is 4 KB\)"),
])
def test_errors_are_clear_and_never_hang(case, n, message):
    with pytest.raises(RuntimeError, match=message):
        _selftest(case, n)
    assert _selftest("count_all", 2).item() == 256  # the device works again after a failed launch


def _sanitized(kind):
    """The sanitized library this run loads (tests/cuemu/sanitize.sh), if it is a ``kind`` one."""
    lib = os.environ.get("CLFAST_EMU_LIBRARY", "")
    return lib if lib.endswith(f"_{kind}.so") else None


def _child(case, n):
    """Runs one selftest case in a fresh process with this run's sanitizer; returns (exit code, stderr)."""
    code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); import clfast_testing, torch; "
            f"torch.ops.{CUEMU_NAMESPACE}.emu_selftest({case!r}, {n})")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return run.returncode, run.stderr


@pytest.mark.skipif(_sanitized("thread") is None, reason="ThreadSanitizer runs only (tests/cuemu/sanitize.sh)")
def test_tsan_reports_a_missing_barrier():
    """The barrier annotations give TSan exactly the order a barrier gives: with the barrier the kernel is clean
    (test_shared_memory_is_shared_by_a_block_and_ordered_by_its_barrier), without it TSan reports the race."""
    rc, err = _child("racy_neighbours", 64)
    assert rc != 0 and "ThreadSanitizer: data race" in err and "racy_neighbours" in err, err[-2000:]


@pytest.mark.skipif(_sanitized("address") is None, reason="AddressSanitizer runs only (tests/cuemu/sanitize.sh)")
def test_ubsan_reports_a_shared_index_out_of_bounds():
    assert _child("shared_out_of_bounds", 0)[0] == 0
    rc, err = _child("shared_out_of_bounds", 1)
    assert rc != 0 and "out of bounds" in err and "selftest.cpp" in err, err[-2000:]


def _global_functions():
    names = set()
    for path in glob.glob(os.path.join(ROOT, "csrc", "**", "*.cu*"), recursive=True):
        text = open(path).read()
        names.update(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text))
    return names


def _launched(trace):
    return {re.match(r"\w+", line).group(0) for line in open(trace).read().splitlines() if line}


def test_every_cuda_kernel_is_launched_by_the_emulated_suite(tmp_path):
    """Every __global__ function of csrc/ was launched on the emulated device: by this session, which traces its
    launches (tests/conftest.py) and runs this test last, when it ran the whole emulated suite; else by a run of
    the emulated suite in a subprocess."""
    kernels = _global_functions()
    assert len(kernels) >= 14, kernels
    session = os.environ.get("CLFAST_EMU_TRACE", "")
    if session and os.path.exists(session) and kernels <= _launched(session):
        return
    trace = tmp_path / "trace.txt"
    env = dict(os.environ, CLFAST_EMU_TRACE=str(trace))
    run = subprocess.run([sys.executable, "-m", "pytest", os.path.join(ROOT, "tests"), "-q", "-p", "no:cacheprovider",
                          "-m", "cuemu", "-k", "not every_cuda_kernel", "-x"], env=env, capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    launched = _launched(trace)
    assert kernels <= launched, f"never launched on the emulated device: {sorted(kernels - launched)}"
