"""Reservoir buffer, 10k slots of 28x28 float images + labels, batches of 256: the list-based
DataBuffer (``update_buffer(list(zip(x, y)))``, ``sample(256)``) vs clfast.ReservoirBuffer. On CUDA the
list-based path also moves the batch to the host and the sample back."""
import pytest
import torch

import clfast
from clfast.buffer import ReservoirBuffer
from clfast.baselines.buffer import ListDataBuffer
from clfast_testing import measure

pytestmark = pytest.mark.benchmark(min_rounds=20, max_time=2.0, warmup=True, warmup_iterations=3)
CAPACITY, BATCH = 10_000, 256


def _batch(device, g):
    return torch.rand(BATCH, 1, 28, 28, generator=g).to(device), torch.randint(0, 10, (BATCH,), generator=g).to(device)


def _filled(impl, device):
    g = torch.Generator().manual_seed(0)
    if impl == "seed":
        buf = ListDataBuffer(CAPACITY)
        while len(buf.buffer) < CAPACITY:
            x, y = _batch("cpu", g)
            buf.update_buffer(list(zip(x, y)))
    else:
        gen = torch.Generator(device=device).manual_seed(0)
        buf = ReservoirBuffer(CAPACITY, device=device, generator=gen)
        while len(buf) < CAPACITY:
            buf.add(*_batch(device, g))
    return buf, _batch(device, g)


@pytest.mark.parametrize("impl", ["seed", "clfast"])
def test_add(benchmark, device, impl):
    if impl == "clfast" and not clfast.native_available():
        pytest.skip("native extension not built")
    buf, (x, y) = _filled(impl, device)

    def step():
        if impl == "seed":
            buf.update_buffer(list(zip(x.cpu(), y.cpu())))
        else:
            buf.add(x, y)

    measure(benchmark, step, device, "buffer add 256 into 10k", f"test_add[{device}-seed]")


@pytest.mark.parametrize("impl", ["seed", "clfast"])
def test_sample(benchmark, device, impl):
    buf, _ = _filled(impl, device)

    def step():
        x, y = buf.sample(BATCH)
        if impl == "seed":
            x, y = x.to(device), y.to(device)

    measure(benchmark, step, device, "buffer sample 256 of 10k", f"test_sample[{device}-seed]")
