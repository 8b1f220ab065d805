"""The Fisher of an MLP 784-400-400-10 and of Base_Net on 2,000 examples in batches of 200: nngeometry 0.4's
``FIM`` (classif_logits, one backward per class) vs ``clfast.fisher`` (one batched backward per batch), diagonal
and KFAC; on the MLP BackPACK's ``DiagGGNExact`` (the same diagonal for softmax cross-entropy); and the
``clfast.nn.DAN(784, 10)`` of the runner against nngeometry's ``FIM`` of its per-neuron model (``to_reference()``),
which is the same matrix (for KFAC nngeometry's covers the Linears only: it has no factors for BatchNorm)."""
import copy

import pytest
import torch
from torch import nn

import clfast
from clfast.experiments.models import BaseNet
from clfast_testing import measure

pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatDiag, PMatKFAC  # noqa: E402

pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=2.0, warmup=True, warmup_iterations=1)

_CACHE = {}


def _setup(device, kind="mlp"):
    if (device, kind) not in _CACHE:
        torch.manual_seed(0)
        if kind == "mlp":
            model = nn.Sequential(nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU(), nn.Linear(400, 10))
        elif kind == "dan":
            model = clfast.nn.DAN(784, 10)
        else:
            model = BaseNet(num_classes=10)
        ds = torch.utils.data.TensorDataset(torch.rand(2000, *((1, 28, 28) if kind == "basenet" else (784,)),
                                                       device=device), torch.randint(0, 10, (2000,), device=device))
        _CACHE[device, kind] = model.to(device).eval(), torch.utils.data.DataLoader(ds, batch_size=200)
    return _CACHE[device, kind]


def _nngeometry_model(device, kind):
    """What nngeometry computes the Fisher of, and its layer collection: a DAN as its per-neuron modules (for KFAC
    their Linears)."""
    from nngeometry.layercollection import LayerCollection

    model, _ = _setup(device, kind)
    if kind != "dan":
        return model, None
    if ("reference", device) not in _CACHE:
        ref = model.to_reference().eval()
        linears = LayerCollection()
        for mod in ref.modules():
            if isinstance(mod, nn.Linear):
                linears.add_layer_from_model(ref, mod)
        _CACHE["reference", device] = ref, linears
    return _CACHE["reference", device]


def _backpack(device):
    """The benchmark's model extended for BackPACK once, outside the timed rounds."""
    from backpack import extend

    key = ("backpack", device)
    if key not in _CACHE:
        model, _ = _setup(device)
        _CACHE[key] = extend(copy.deepcopy(model)), extend(nn.CrossEntropyLoss(reduction="sum"))
    return _CACHE[key]


def _backpack_diag(extended, loss_fn, loader):
    from backpack import backpack
    from backpack.extensions import DiagGGNExact

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
@pytest.mark.parametrize("kind", ["mlp", "basenet", "dan"])
def test_fisher(benchmark, device, kind, rep, impl):
    model, loader = _setup(device, kind)
    if impl == "backpack":
        if rep != "diag":
            pytest.skip("BackPACK's KFAC is a Monte-Carlo estimate, not this Fisher")
        if kind == "dan":
            pytest.skip("BackPACK does not know DAN layers, and the per-neuron model is no Sequential")
        if kind != "mlp":
            pytest.skip("BackPACK's second-order extensions need a Sequential of modules; Base_Net's forward "
                        "reuses one ReLU and reshapes between modules")
        pytest.importorskip("backpack")
        extended, loss_fn = _backpack(device)
    cls = {"diag": PMatDiag, "kfac": PMatKFAC}[rep]
    if impl == "nngeometry":
        theirs, linears = _nngeometry_model(device, kind)
        collection = linears if rep == "kfac" else None

    def step():
        if impl == "nngeometry":
            FIM(theirs, loader, cls, variant="classif_logits", device=device, layer_collection=collection)
        elif impl == "clfast":
            clfast.fisher(model, loader, rep)
        else:
            _backpack_diag(extended, loss_fn, loader)

    name = {"mlp": "MLP 784-400-400-10", "basenet": "Base_Net", "dan": "DAN(784, 10)"}[kind]
    measure(benchmark, step, device, f"Fisher {rep}, {name}, 2000 examples",
            f"test_fisher[{device}-{kind}-{rep}-nngeometry]")
