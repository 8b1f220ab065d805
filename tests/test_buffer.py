"""Reservoir buffer: the batched op equals one-by-one Algorithm R, inclusion is uniform, bad input is clear."""
import math

import pytest
import torch

import clfast
from clfast import reference
from clfast.buffer import DataBuffer, ReservoirBuffer
from clfast.baselines.buffer import reservoir_add_one_by_one
from clfast_testing import device_params, needs_native


def _batch(B, start, device="cpu"):
    ids = torch.arange(start, start + B)
    images = (ids[:, None, None, None] * 7 % 251).to(torch.uint8).expand(B, 1, 4, 4).contiguous()
    return [images.to(device), ids.to(device), (ids[:, None] * torch.tensor([0.5, -1.0, 2.0])).to(device)]


def _empty(capacity, device="cpu"):
    return [torch.zeros(capacity, 1, 4, 4, dtype=torch.uint8, device=device),
            torch.full((capacity,), -1, dtype=torch.long, device=device), torch.zeros(capacity, 3, device=device)]


@pytest.mark.parametrize("device", device_params())
def test_batched_op_equals_one_by_one(backend, device):
    capacity, g = 20, torch.Generator().manual_seed(0)
    batched, serial = _empty(capacity, device), _empty(capacity, device)
    seen = 0
    for B in (7, 13, 1, 64, 0, 5, 300, 9):  # fills, overflows, collisions inside large batches
        batch = _batch(B, seen, device)
        draws = torch.rand(B, dtype=torch.float64, generator=g).to(device)
        clfast.ops.reservoir_add_(batched, batch, draws, seen)
        reservoir_add_one_by_one(serial, batch, draws.cpu(), seen)
        seen += B
        for a, b in zip(batched, serial):
            assert torch.equal(a, b)
    assert len(set(batched[1].tolist())) == capacity  # distinct items, all from the stream


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_native_equals_reference(device):
    capacity, g = 50, torch.Generator().manual_seed(1)
    native, ref = _empty(capacity, device), _empty(capacity, device)
    seen = 0
    for B in (30, 30, 200, 17):
        batch = _batch(B, seen, device)
        draws = torch.rand(B, dtype=torch.float64, generator=g).to(device)
        torch.ops.clfast.reservoir_add_(native, batch, draws, seen)
        reference.reservoir_add_(ref, batch, draws, seen)
        seen += B
        for a, b in zip(native, ref):
            assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_many_items_of_a_batch_on_one_slot(device):
    """Most of a 600-item batch lands on slot 3 (the last of them must win), over ten fields: more than one copy
    launch's field table, rows longer than a block's threads."""
    capacity, B, seen = 8, 600, 8
    g = torch.Generator().manual_seed(3)
    m = torch.arange(seen, seen + B, dtype=torch.float64)
    draws = torch.rand(B, dtype=torch.float64, generator=g)
    on_three = torch.rand(B, generator=g) < 0.8
    draws = torch.where(on_three, 3.5 / (m + 1), draws)  # floor(draw * (m + 1)) == 3
    shapes = [(), (3,), (1000,), (2, 2), (7,), (1,), (4, 5), (300,), (2,), (9,)]
    dtypes = [torch.long, torch.float32, torch.uint8, torch.float64, torch.int32, torch.int16, torch.float32,
              torch.float64, torch.int8, torch.float32]
    batch = [torch.randint(0, 100, (B, *s), generator=g).to(dt).to(device) for s, dt in zip(shapes, dtypes)]
    native = [torch.zeros(capacity, *s, dtype=dt, device=device) for s, dt in zip(shapes, dtypes)]
    ref = [t.clone() for t in native]
    torch.ops.clfast.reservoir_add_(native, batch, draws.to(device), seen)
    reference.reservoir_add_(ref, batch, draws.to(device), seen)
    last = int(torch.nonzero(on_three).max())
    assert torch.equal(native[0][3], batch[0][last])
    for a, b in zip(native, ref):
        assert torch.equal(a, b)


def test_every_item_survives_with_probability_capacity_over_n(backend):
    N, capacity, trials = 1000, 50, 400
    counts = torch.zeros(N)
    for t in range(trials):
        buf = ReservoirBuffer(capacity, generator=torch.Generator().manual_seed(t))
        for start in range(0, N, 64):
            ids = torch.arange(start, min(N, start + 64))
            buf.add(ids.float()[:, None], ids)
        assert len(buf) == capacity and buf.num_seen == N
        counts[buf.storage[1]] += 1
    expected = trials * capacity / N
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    df = N - 1  # chi-square with N-1 degrees of freedom: mean df, sd sqrt(2 df)
    assert abs(chi2 - df) < 5 * math.sqrt(2 * df), chi2
    early, late = counts[: N // 2].sum(), counts[N // 2:].sum()  # no bias towards early or late items
    assert abs(float(early - late)) < 5 * math.sqrt(trials * capacity)


def test_sample_without_replacement(backend):
    buf = ReservoirBuffer(30, generator=torch.Generator().manual_seed(0))
    buf.add(*_batch(10, 0))
    x, y, z = buf.sample(25)  # fewer stored than asked: all of them
    assert len(y) == 10 and sorted(y.tolist()) == list(range(10))
    buf.add(*_batch(100, 10))
    x, y, z = buf.sample(12)
    assert len(set(y.tolist())) == 12 and x.shape == (12, 1, 4, 4) and x.dtype == torch.uint8
    assert torch.equal(z, y[:, None] * torch.tensor([0.5, -1.0, 2.0]))  # fields stay aligned


def test_bad_batches_leave_the_buffer_unchanged(backend):
    buf = ReservoirBuffer(10, generator=torch.Generator().manual_seed(0))
    buf.add(*_batch(12, 0))
    snapshot = [s.clone() for s in buf.storage]
    bad = [
        ([torch.zeros(3, 1, 4, 5, dtype=torch.uint8), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3)],
         "per item"),
        ([torch.zeros(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3, 3)], "torch.float32"),
        ([torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.long), torch.zeros(3, 3)],
         "same leading batch"),
        ([torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long)], "stores 3 fields"),
    ]
    for fields, msg in bad:
        with pytest.raises(ValueError, match=msg):
            buf.add(*fields)
    assert buf.num_seen == 12 and all(torch.equal(a, b) for a, b in zip(buf.storage, snapshot))
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(0)
    with pytest.raises(RuntimeError, match="empty"):
        ReservoirBuffer(3).sample(1)


def test_state_dict_round_trip(backend):
    a = ReservoirBuffer(16, generator=torch.Generator().manual_seed(3))
    a.add(*_batch(40, 0))
    b = ReservoirBuffer(16, generator=torch.Generator())
    b.load_state_dict(a.state_dict())
    for buf in (a, b):
        buf.add(*_batch(40, 40))
    assert a.num_seen == b.num_seen == 80 and all(torch.equal(x, y) for x, y in zip(a.storage, b.storage))
    with pytest.raises(ValueError, match="capacity"):
        ReservoirBuffer(8).load_state_dict(a.state_dict())


def test_data_buffer_keeps_the_seed_interface(backend):
    buf = DataBuffer(5)
    x, y = buf.sample(3)
    assert x.numel() == 0 and y.numel() == 0
    buf.update_buffer([(torch.full((2, 2), float(i)), torch.tensor(i)) for i in range(3)])
    x, y = buf.sample(10)
    assert x.shape == (3, 2, 2) and sorted(y.tolist()) == [0, 1, 2] and buf.num_seen_examples == 3
    buf.update_buffer([(torch.full((2, 2), float(i)), torch.tensor(i)) for i in range(3, 50)])
    x, y = buf.sample(4)
    assert x.shape == (4, 2, 2) and len(buf.buffer) == 5 and buf.num_seen_examples == 50
    assert torch.equal(x[:, 0, 0].long(), y)


@needs_native
def test_opcheck_reservoir():
    torch.library.opcheck(torch.ops.clfast.reservoir_add_,
                          (_empty(8), _batch(12, 0), torch.rand(12, dtype=torch.float64), 0))
