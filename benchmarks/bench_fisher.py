"""The Fisher of an MLP 784-400-400-10 on 2,000 examples in batches of 200: nngeometry 0.4's ``FIM``
(classif_logits, one backward per class) vs ``clfast.fisher`` (one batched backward per batch), diagonal and
KFAC; and BackPACK's ``DiagGGNExact`` (the same diagonal for softmax cross-entropy) where it is installed."""
import copy

import pytest
import torch
from torch import nn

import clfast
from clfast_testing import measure

pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatDiag, PMatKFAC  # noqa: E402

pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=2.0, warmup=True, warmup_iterations=1)

_CACHE = {}


def _setup(device):
    if device not in _CACHE:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(),
                              nn.Linear(400, 10)).to(device).eval()
        ds = torch.utils.data.TensorDataset(torch.rand(2000, 784, device=device),
                                            torch.randint(0, 10, (2000,), device=device))
        _CACHE[device] = model, torch.utils.data.DataLoader(ds, batch_size=200)
    return _CACHE[device]


def _backpack_diag(model, loader):
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    extended, loss_fn = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))
    total = None
    for x, y in loader:
        extended.zero_grad()
        with backpack(DiagGGNExact()):
            loss_fn(extended(x), y).backward()
        diag = torch.cat([p.diag_ggn_exact.reshape(-1) for p in extended.parameters()])
        total = diag if total is None else total.add_(diag)
    return total / len(loader.dataset)


@pytest.mark.parametrize("impl", ["nngeometry", "clfast", "backpack"])
@pytest.mark.parametrize("rep", ["diag", "kfac"])
def test_fisher(benchmark, device, rep, impl):
    model, loader = _setup(device)
    if impl == "backpack":
        if rep != "diag":
            pytest.skip("BackPACK's KFAC is a Monte-Carlo estimate, not this Fisher")
        pytest.importorskip("backpack")
    cls = {"diag": PMatDiag, "kfac": PMatKFAC}[rep]

    def step():
        if impl == "nngeometry":
            FIM(model, loader, cls, variant="classif_logits", device=device)
        elif impl == "clfast":
            clfast.fisher(model, loader, rep)
        else:
            _backpack_diag(model, loader)

    measure(benchmark, step, device, f"Fisher {rep}, MLP 784-400-400-10, 2000 examples",
            f"test_fisher[{device}-{rep}-nngeometry]")
