"""clfast under torch.distributed: two gloo processes on the CPU, each training one DDP replica on its own data.
With synchronisation the ranks' parameters and continual-learning state stay bitwise equal (and, where the method
is deterministic, equal to one process on the concatenated batches); without it CBP's ranks diverge, which shows
the check can fail."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import clfast
from clfast_distributed import WORLD, bitwise_equal, flat, spawn

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

STEPS, BATCH = 200, 16


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 3))


def _batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(BATCH, 10, generator=g)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()


def _cbp(rank, distributed):
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model) if rank is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cbp = clfast.CBP(model, replacement_rate=0.02, maturity_threshold=20, optimizer=opt,
                     generator=torch.Generator().manual_seed(1), distributed=distributed)
    for step in range(STEPS):
        x, y = _batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x), y).backward()
        opt.step()
        cbp.step()
    return {"params": [p.detach() for p in model.parameters()], "utilities": cbp.utilities, "means": cbp.means,
            "ages": cbp.ages, "replaced": cbp.stats()}


def _si(rank, _):
    """SI through the fused SGD: omega is accumulated from the gradient DDP has already averaged."""
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model) if rank is not None else model
    si = clfast.SI(model, strength=1.0, epsilon=1e-3)
    opt = clfast.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, si=si)
    for step in range(STEPS):
        if rank is None:  # one process on both ranks' batches
            parts = [_batch(r, step) for r in range(WORLD)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            x, y = _batch(rank, step)
        opt.zero_grad()
        (F.cross_entropy(ddp(x), y) + si.penalty()).backward()
        opt.step()
        if step == STEPS // 2:
            si.consolidate()
    return {"params": [p.detach() for p in model.parameters()], "si": si.state_dict()}


def _consolidation_data(rank):
    """48 examples on rank 0 and 32 on rank 1 (the ranks' Fishers are weighted by these), or both together."""
    if rank is None:
        parts = [_consolidation_data(r) for r in range(WORLD)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x, y = zip(*[_batch(rank, 10_000 + i) for i in range(3 - rank)])
    return torch.cat(x), torch.cat(y)


def _ewc(rank, representation):
    """EWC with the penalty gradient added after DDP's all-reduce (add_penalty_grad_)."""
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model) if rank is not None else model
    ewc = clfast.EWC(model, representation)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        if rank is None:
            parts = [_batch(r, step) for r in range(WORLD)]
            x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        else:
            x, y = _batch(rank, step)
        opt.zero_grad()
        F.cross_entropy(ddp(x + (step >= STEPS // 2)), y).backward()
        ewc.add_penalty_grad_(5.0)
        opt.step()
        if step == STEPS // 2 - 1:
            ewc.consolidate(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_consolidation_data(rank)),
                                                        batch_size=20))
    return {"params": [p.detach() for p in model.parameters()], "fisher": ewc.state_dict()["fishers"]}


def _ocar(rank, fisher):
    """OCAR in a loop that runs the DDP model itself (record_forward / recorded / precondition_)."""
    model = _mlp()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(64, generator=torch.Generator().manual_seed(rank)), opt, "kfac",
                       damping=0.1, fisher=fisher, refresh=5, generator=torch.Generator().manual_seed(10 + rank))
    for step in range(STEPS):
        xs, ys = ocar.replay(*_batch(rank, step))
        ocar.record_forward()
        out = ddp(xs)
        ocar.recorded(out)
        opt.zero_grad()
        F.cross_entropy(out, ys).backward()
        ocar.precondition_(xs, ys)
        opt.step()
        ocar.end_step(*_batch(rank, step))
    return {"params": [p.detach() for p in model.parameters()], "factors": ocar.factors}


def test_cbp_ranks_replace_the_same_units_and_stay_identical(tmp_path):
    ranks = spawn(tmp_path, _cbp, None)
    assert sum(ranks[0]["replaced"].values()) > 5
    assert bitwise_equal(ranks[0], ranks[1])


def test_cbp_ranks_diverge_without_synchronisation(tmp_path):
    ranks = spawn(tmp_path, _cbp, False)
    assert sum(ranks[0]["replaced"].values()) > 5
    assert not all(torch.equal(p, q) for p, q in zip(ranks[0]["params"], ranks[1]["params"]))


def test_si_ranks_stay_identical_and_equal_one_process_on_the_global_batch(tmp_path):
    ranks = spawn(tmp_path, _si)
    assert bitwise_equal(ranks[0], ranks[1])
    single = _si(None, None)
    for got, expected in zip(flat(ranks[0]), flat(single)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert any(k.startswith("si_omega") for k in ranks[0]["si"])


def test_the_option_is_checked():
    with pytest.raises(ValueError, match="distributed must be None"):
        clfast.CBP(_mlp(), distributed="yes")
    cbp = clfast.CBP(_mlp(), distributed=True)  # no process group in this process
    model = cbp.model
    model(torch.randn(4, 10))
    with pytest.raises(RuntimeError, match="distributed=True needs an initialised torch.distributed process group"):
        cbp.step()
    assert cbp.steps == 0


@pytest.mark.parametrize("representation", ["diag", "kfac"])
def test_ewc_ranks_share_the_fisher_of_all_their_examples_and_equal_one_process(tmp_path, representation):
    ranks = spawn(tmp_path, _ewc, representation)
    assert bitwise_equal(ranks[0], ranks[1])
    single = _ewc(None, representation)
    for got, expected in zip(flat(ranks[0]), flat(single)):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fisher", ["ema", "exact"])
def test_ocar_ranks_precondition_with_the_same_fisher(tmp_path, fisher):
    ranks = spawn(tmp_path, _ocar, fisher)
    assert bitwise_equal(ranks[0], ranks[1])
    if fisher == "ema":
        assert len(ranks[0]["factors"]) == 3
