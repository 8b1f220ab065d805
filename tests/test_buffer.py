"""Reservoir buffer: the batched op equals one-by-one Algorithm R, inclusion is uniform, bad input is clear; under
torch.distributed (two gloo processes on the CPU) the global scope keeps one reservoir, bitwise the same on every
rank and in one process fed the ranks' batches, and the rank scope gives each rank its own draws."""
import math

import pytest
import torch
import torch.distributed as dist

import clfast
from clfast import reference
from clfast.buffer import SCOPES, DataBuffer, ReservoirBuffer
from clfast.baselines.buffer import reservoir_add_one_by_one
from clfast_distributed import WORLD, bitwise_equal, spawn
from clfast_testing import device_params, needs_native

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


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


# -- under torch.distributed --------------------------------------------------------------------------------------
STEPS = 200


def _stream(rank, step):
    """Rank ``rank``'s batch at ``step``: 1 to 9 items, varying per step and rank (rank 1's is empty at step 7),
    four fields of different dtypes and widths; the ids say where each item came from."""
    B = 0 if (rank, step) == (1, 7) else (5 * step + 3 * rank) % 9 + 1
    ids = torch.arange(B) + 100 * (WORLD * step + rank)
    return [ids[:, None] * torch.tensor([0.5, -1.0]), ids,
            (ids[:, None] * torch.tensor([1, 7, 13]) % 251).to(torch.uint8), ids % 3 == 0]


def _asked(rank, step):
    return (step + 2 * rank) % 4  # 0 to 3 items


def _state(buf):
    return {"storage": buf.storage, "num_seen": buf.num_seen, "generator": buf.generator.get_state()}


def _global(rank, _):
    """200 adds and 66 samples in global scope; with ``rank=None`` one process (no process group) is fed the ranks'
    batches concatenated in rank order and samples the ranks' numbers of items together."""
    buf = ReservoirBuffer(40, generator=torch.Generator().manual_seed(5), scope="global")
    samples = []
    for step in range(STEPS):
        if rank is None:
            parts = [_stream(r, step) for r in range(WORLD)]
            buf.add(*[torch.cat(field) for field in zip(*parts)])
            n = sum(_asked(r, step) for r in range(WORLD))
        else:
            buf.add(*_stream(rank, step))
            n = _asked(rank, step)
        if step % 3 == 2:
            samples.append(buf.sample(n))
    return {"state": _state(buf), "samples": samples}


@needs_gloo
def test_global_scope_is_one_reservoir_the_same_on_every_rank_and_in_one_process(tmp_path):
    ranks = spawn(tmp_path, _global)
    single = _global(None, None)
    assert single["state"]["num_seen"] == sum(_stream(r, s)[0].shape[0] for r in range(WORLD) for s in range(STEPS))
    assert bitwise_equal(ranks[0]["state"], ranks[1]["state"])
    assert bitwise_equal(ranks[0]["state"], single["state"])
    assert len(single["samples"]) == STEPS // 3
    for k, expected in enumerate(single["samples"]):
        shares = [r["samples"][k] for r in ranks]
        assert [len(share[1]) for share in shares] == [_asked(r, 3 * k + 2) for r in range(WORLD)]
        assert bitwise_equal([torch.cat(field) for field in zip(*shares)], expected)  # disjoint: expected is


def _refused(rank, _):
    """Global scope with the buffer's own generator (the ranks' torch seeds differ) and batches refused on one
    rank only."""
    torch.manual_seed(rank)
    buf = ReservoirBuffer(8, scope="global")
    errors = []
    first = _stream(rank, 1)
    if rank == 1:
        first[1] = first[1].int()  # the ranks' first batches differ in a dtype
    try:
        buf.add(*first)
    except ValueError as error:
        errors.append(str(error))
    buf.add(*_stream(rank, 2))
    before = {"state": [s[:len(buf)].clone() for s in buf.storage], "num_seen": buf.num_seen,
              "own": buf._own.get_state()}  # the slots past len(buf) are not written yet
    bad = _stream(rank, 3)
    if rank == 1:
        bad[0] = bad[0][:, :1]  # wrong item shape on rank 1 only
    try:
        buf.add(*bad)
    except ValueError as error:
        errors.append(str(error))
    try:
        buf.sample(-1 if rank == 0 else 2)
    except ValueError as error:
        errors.append(str(error))
    after = {"state": [s[:len(buf)] for s in buf.storage], "num_seen": buf.num_seen, "own": buf._own.get_state()}
    return {"errors": errors, "before": before, "after": after, "sample": buf.sample(3)}


@needs_gloo
def test_a_batch_refused_on_one_rank_is_refused_on_every_rank(tmp_path):
    ranks = spawn(tmp_path, _refused)
    for r in ranks:
        assert len(r["errors"]) == 3
        assert "same fields" in r["errors"][0]
        assert "rank(s) [1]" in r["errors"][1]
        assert "n must be an integer >= 0 on every rank" in r["errors"][2]
        assert bitwise_equal(r["before"], r["after"])
    assert "this rank's: ReservoirBuffer.add: field 0 is torch.float32 [1]" in ranks[1]["errors"][1]
    assert ranks[0]["after"]["num_seen"] == sum(_stream(r, 2)[0].shape[0] for r in range(WORLD))
    assert bitwise_equal(ranks[0]["after"], ranks[1]["after"])  # the first rank's seed, on both
    assert not set(ranks[0]["sample"][1].tolist()) & set(ranks[1]["sample"][1].tolist())


def _per_rank_run(distributed):
    torch.manual_seed(0)
    seeded = torch.get_rng_state()
    buf = ReservoirBuffer(16, distributed=distributed)
    for step in range(30):
        buf.add(*_stream(0, step))  # the same data on every rank
    sample = buf.sample(4)
    return {"storage": buf.storage, "sample": sample, "global_rng_used": not torch.equal(torch.get_rng_state(), seeded)}


def _per_rank(rank, _):
    return {"synced": _per_rank_run(None), "again": _per_rank_run(None), "alone": _per_rank_run(False)}


@needs_gloo
def test_rank_scope_draws_differently_on_each_rank_reproducibly(tmp_path):
    ranks = spawn(tmp_path, _per_rank)
    assert not bitwise_equal(ranks[0]["synced"]["storage"], ranks[1]["synced"]["storage"])
    assert bitwise_equal(ranks[0]["alone"], ranks[1]["alone"])  # torch's generator, seeded alike: the same draws
    for r in ranks:
        assert bitwise_equal(r["synced"], r["again"])
        assert not r["synced"]["global_rng_used"] and r["alone"]["global_rng_used"]


def test_global_scope_without_a_process_group_is_the_rank_scope(backend):
    bufs = [ReservoirBuffer(10, generator=torch.Generator().manual_seed(1), scope=scope) for scope in SCOPES]
    for step in range(6):
        for buf in bufs:
            buf.add(*_stream(0, step))
    assert bitwise_equal(bufs[0].sample(4), bufs[1].sample(4))
    assert bitwise_equal(_state(bufs[0]), _state(bufs[1]))


def test_distributed_options_are_checked():
    with pytest.raises(ValueError, match="scope must be one of"):
        ReservoirBuffer(4, scope="world")
    with pytest.raises(ValueError, match="distributed must be None"):
        ReservoirBuffer(4, distributed="yes")
    with pytest.raises(TypeError):
        ReservoirBuffer(4, None, None, True)  # keyword-only
    buf = ReservoirBuffer(4, distributed=True, scope="global")  # no process group in this process
    with pytest.raises(RuntimeError, match="distributed=True needs an initialised torch.distributed process group"):
        buf.add(*_batch(3, 0))
    assert buf.num_seen == 0 and not buf.storage
    ranked = ReservoirBuffer(4)
    ranked.add(*_batch(3, 0))
    with pytest.raises(ValueError, match="scope 'rank', this buffer's is 'global'"):
        ReservoirBuffer(4, scope="global").load_state_dict(ranked.state_dict())
