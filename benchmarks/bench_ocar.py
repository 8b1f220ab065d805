"""OCAR on the small ConvNet (BaseNet, 30 outputs) with batches of 256 current + 256 replayed images:

* ``test_kfac_solve``: preconditioning the gradient, nngeometry's ``F.solve`` (a least-squares solve per layer
  per call) vs clfast's exact mode (damped inverses + ``kron_mv``) vs ema mode (``kron_mv`` on cached inverses);
* ``test_step``: the nngeometry OCAR step (three nngeometry Fishers, solve, list buffer) vs OCAR's exact step with
  its Fisher from nngeometry's ``FIM`` (``fisher_backend="nngeometry"``) or from ``clfast.fisher`` (the default),
  and vs an OCAR ema step."""
import pytest
import torch
from torch import nn

import clfast
from clfast.experiments.models import BaseNet
from clfast.baselines.buffer import ListDataBuffer
from clfast.baselines.ocar import seed_ours_step
from clfast_testing import measure

pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatKFAC, PVector  # noqa: E402

pytestmark = pytest.mark.benchmark(min_rounds=5, max_time=2.0, warmup=True, warmup_iterations=1)


def _data(device, n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g).to(device), torch.randint(0, 30, (n,), generator=g).to(device)


@pytest.mark.parametrize("impl", ["nngeometry", "clfast_exact", "clfast_ema"])
def test_kfac_solve(benchmark, device, impl):
    torch.manual_seed(0)
    model = BaseNet(num_classes=30).to(device)
    x, y = _data(device, 512)
    nn.functional.cross_entropy(model(x), y).backward()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=256)
    fisher = FIM(model, loader, PMatKFAC, variant="classif_logits", device=device)
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), torch.optim.SGD(model.parameters(), lr=0.0), "kfac")
    factors = [fisher.data[lid] for lid in ocar.layers.modules]
    ocar._invert(factors)
    grads = [p.grad.clone() for p in model.parameters()]

    def step():
        if impl == "nngeometry":
            fisher.solve(PVector.from_model_grad(model), regul=1e-2)
        else:
            for p, g in zip(model.parameters(), grads):
                p.grad.copy_(g)
            if impl == "clfast_exact":
                ocar._invert(factors)
            ocar._apply_kfac(ocar.layers.grads(), *ocar._inverses)

    measure(benchmark, step, device, "OCAR KFAC solve, Base_Net", f"test_kfac_solve[{device}-nngeometry]")


@pytest.mark.parametrize("impl", ["seed_ours", "clfast_exact_nngeometry", "clfast_exact", "clfast_ema"])
def test_step(benchmark, device, impl):
    torch.manual_seed(0)
    model = BaseNet(num_classes=30).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=2e-3)
    x, y = _data(device)
    if impl == "seed_ours":
        buf = ListDataBuffer(1000)
        buf.update_buffer(list(zip(*(t.cpu() for t in _data("cpu", 1000, 1)))))
        step = lambda: seed_ours_step(model, opt, buf, x, y, PMatKFAC)  # noqa: E731
    else:
        buf = clfast.ReservoirBuffer(1000, device=device, generator=torch.Generator(device=device).manual_seed(0))
        buf.add(*_data(device, 1000, 1))
        if impl == "clfast_ema":
            ocar = clfast.OCAR(model, buf, opt, "kfac", fisher="ema", refresh=10,
                               generator=torch.Generator(device=device).manual_seed(0))
        else:
            ocar = clfast.OCAR(model, buf, opt, "kfac", fisher="exact",
                               fisher_backend="nngeometry" if impl == "clfast_exact_nngeometry" else "clfast")
        step = lambda: ocar.step(x, y)  # noqa: E731

    measure(benchmark, step, device, "OCAR training step, Base_Net, 256 + 256 replayed",
            f"test_step[{device}-seed_ours]")
