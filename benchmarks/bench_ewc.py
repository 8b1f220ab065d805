"""EWC penalty + gradient on a 784-1000-1000-10 MLP (1.8M parameters), one consolidated task: nngeometry's
``F.vTMv(PVector.from_model(model) - v0)`` + autograd (an nngeometry EWC penalty) vs clfast.EWC's ``penalty()``
+ autograd and its graph-free ``add_penalty_grad_``; diagonal and KFAC Fishers."""
import pytest
import torch
from torch import nn

import clfast
from clfast_testing import measure

pytest.importorskip("nngeometry")
from nngeometry.object import PVector  # noqa: E402

pytestmark = pytest.mark.benchmark(min_rounds=10, max_time=2.0, warmup=True, warmup_iterations=2)


_CACHE = {}


def _setup(device, rep):
    if (device, rep) not in _CACHE:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1000), nn.ReLU(), nn.Linear(1000, 1000), nn.ReLU(),
                              nn.Linear(1000, 10)).to(device)
        ds = torch.utils.data.TensorDataset(torch.rand(64, 784, device=device), torch.zeros(64, device=device))
        ewc = clfast.EWC(model, rep)
        ewc.consolidate(torch.utils.data.DataLoader(ds, batch_size=32))
        v0 = PVector.from_model(model).clone().detach()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        _CACHE[device, rep] = model, ewc, v0
    return _CACHE[device, rep]


@pytest.mark.parametrize("impl", ["nngeometry", "clfast_autograd", "clfast_add_grad"])
@pytest.mark.parametrize("rep", ["diag", "kfac"])
def test_penalty_grad(benchmark, device, rep, impl):
    if impl != "nngeometry" and not clfast.native_available():
        pytest.skip("native extension not built")
    model, ewc, v0 = _setup(device, rep)
    fisher = ewc.fishers[0]
    params = list(model.parameters())

    def step():
        for p in params:
            p.grad = None
        if impl == "nngeometry":
            fisher.vTMv(PVector.from_model(model) - v0).backward()
        elif impl == "clfast_autograd":
            ewc.penalty().backward()
        else:
            ewc.add_penalty_grad_(1.0)

    measure(benchmark, step, device, f"EWC {rep} penalty + gradient, 1.8M params",
            f"test_penalty_grad[{device}-{rep}-nngeometry]")
