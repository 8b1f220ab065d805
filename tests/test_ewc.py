"""EWC: penalties and gradients equal nngeometry's vTMv for every representation; modes; state; bad input."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast import reference
from clfast.experiments.models import BaseNet
from clfast_testing import device_params, needs_native

try:  # the kron_quadratic op tests need no nngeometry (GPU machines lack it); the rest do
    import nngeometry
    from nngeometry.metrics import FIM
    from nngeometry.object import PVector
except ImportError:
    nngeometry = None
needs_nngeometry = pytest.mark.skipif(nngeometry is None, reason="nngeometry not installed")

REPS = ["diag", "kfac", "dense", "blockdiag", "ekfac"]


def _model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 10))
    return BaseNet(num_classes=30)


def _loader(seed, n=48, with_task=True):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    tensors = (x, y, torch.zeros(n, dtype=torch.long)) if with_task else (x, y)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*tensors), batch_size=16)


def _perturb(model, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


@needs_nngeometry
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
@pytest.mark.parametrize("rep", REPS)
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_penalty_and_gradient_equal_nngeometry(backend, kind, rep, mode):
    if rep in ("dense", "blockdiag") and (kind == "mlp" or mode == "online"):
        pytest.skip("dense blocks of 12.7k parameters are slow; modes are covered by the other representations")
    model = _model(kind)
    ewc = clfast.EWC(model, rep, mode=mode, gamma=0.7)
    expected_terms = []  # (coefficient, Fisher, anchor) as nngeometry would compute them
    for task in range(2):
        _perturb(model, 10 + task)
        loader = _loader(task)
        ewc.consolidate(loader)
        fisher = ewc.fishers[-1]  # nngeometry's own object: the comparison is with its vTMv
        if rep == "diag":  # and it is the Fisher nngeometry computes for this data
            expected_fisher = FIM(model, loader, type(fisher), variant="classif_logits", device="cpu")
            torch.testing.assert_close(fisher.data, expected_fisher.data)
        anchor = PVector.from_model(model).clone().detach()
        if mode == "online":
            expected_terms = [(0.7 * c, f, anchor) for c, f, _ in expected_terms]
        expected_terms.append((1.0, fisher, anchor))
    _perturb(model, 99)
    expected = sum(c * f.vTMv(PVector.from_model(model) - a) for c, f, a in expected_terms)
    got = ewc.penalty()
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-8)
    assert float(got.detach()) > 0

    _assert_penalty_gradients(ewc, expected, ewc.parameters())


def _assert_penalty_gradients(ewc, expected, params):
    """The penalty's autograd gradient in ``params`` is ``expected``'s, and add_penalty_grad_ adds it into .grad."""
    g_expected = torch.autograd.grad(expected, params)
    for a, b in zip(torch.autograd.grad(ewc.penalty(), params), g_expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for p in params:
        p.grad = torch.ones_like(p)
    ewc.add_penalty_grad_(0.5)
    for p, b in zip(params, g_expected):
        torch.testing.assert_close(p.grad, 1 + 0.5 * b, rtol=1e-4, atol=1e-6)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kron_quadratic_matches_reference(device, dtype):
    g_ = torch.Generator().manual_seed(0)
    blocks = []
    for n, m in [(4, 7), (10, 3), (1, 1), (30, 1)]:
        a, g = torch.randn(m, m, generator=g_, dtype=dtype), torch.randn(n, n, generator=g_, dtype=dtype)
        blocks.append((a @ a.T, g @ g.T, torch.randn(n, m, generator=g_, dtype=dtype)))
    a, g, v = ([b[i].to(device) for b in blocks] for i in range(3))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    native, expected = torch.ops.clfast.kron_quadratic(a, g, v), reference.kron_quadratic(a, g, v)
    torch.testing.assert_close(native[0], expected[0], **tol)
    for x, y in zip(native[1], expected[1]):
        torch.testing.assert_close(x, y, **tol)
    scale = torch.tensor(0.75, dtype=dtype, device=device)
    for x, y in zip(torch.ops.clfast.kron_mv(scale, a, g, v), reference.kron_mv(scale, a, g, v)):
        torch.testing.assert_close(x, y, **tol)
    vv = [t.clone().requires_grad_() for t in v]
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda *xs: torch.ops.clfast.kron_quadratic(a, g, list(xs))[0], vv)


@needs_native
def test_opcheck_kron_quadratic():
    a, g, v = [torch.eye(3) * 2], [torch.eye(2) + 0.5], [torch.randn(2, 3, requires_grad=True)]
    torch.library.opcheck(torch.ops.clfast.kron_quadratic, (a, g, v))
    torch.library.opcheck(torch.ops.clfast.kron_mv, (torch.tensor(1.0), a, g, [v[0].detach()]))


@needs_nngeometry
def test_state_dict_round_trip(backend):
    model = _model("convnet")
    ewc = clfast.EWC(model, "kfac", mode="online", gamma=0.5)
    for task in range(2):
        _perturb(model, task)
        ewc.consolidate(_loader(task))
    _perturb(model, 7)
    twin = clfast.EWC(model, "kfac")
    twin.load_state_dict(copy.deepcopy(ewc.state_dict()))
    torch.testing.assert_close(twin.penalty(), ewc.penalty())
    with pytest.raises(ValueError, match="holds 'kfac' Fishers"):
        clfast.EWC(model, "diag").load_state_dict(ewc.state_dict())


@needs_nngeometry
def test_training_with_ewc_penalty_runs_and_anchors(backend):
    model = _model("mlp")
    ewc = clfast.EWC(model, "diag")
    assert float(ewc.penalty().detach()) == 0
    ewc.consolidate(_loader(0, with_task=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = next(iter(_loader(1, with_task=False)))[:2]
    for _ in range(5):
        opt.zero_grad()
        (F.cross_entropy(model(x), y) + 100 * ewc.penalty()).backward()
        opt.step()
    assert 0 < float(ewc.penalty().detach()) < 1


@needs_nngeometry
def test_bad_configuration_is_clear():
    with pytest.raises(ValueError, match="representation must be one of"):
        clfast.EWC(_model("mlp"), "full")
    with pytest.raises(ValueError, match="mode must be"):
        clfast.EWC(_model("mlp"), mode="sum")
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="BatchNorm layer '1'.*representation='diag'"):
        clfast.EWC(bn, "kfac")
    ewc = clfast.EWC(bn, "diag")  # diagonal Fishers cover BatchNorm parameters
    ds = torch.utils.data.TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
    ewc.consolidate(torch.utils.data.DataLoader(ds, batch_size=8))
    assert len(ewc.parameters()) == 6 and float(ewc.penalty().detach()) == 0


@needs_nngeometry
def test_confident_model_gets_a_finite_fisher(backend):
    # 1 - cumsum(softmax) rounds below zero for near-one-hot outputs: nngeometry's own whitening gives NaN
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 10))
    with torch.no_grad():
        model[0].weight.mul_(60)
    ds = torch.utils.data.TensorDataset(torch.randn(64, 8), torch.zeros(64, dtype=torch.long))
    loader = torch.utils.data.DataLoader(ds, batch_size=32)
    assert not bool(torch.isfinite(FIM(model, loader, nngeometry.object.PMatDiag, device="cpu").data).all())
    ewc = clfast.EWC(model, "diag")
    ewc.consolidate(loader)
    assert bool(torch.isfinite(ewc.fishers[0].data).all()) and float(ewc.fishers[0].data.sum()) > 0


@needs_nngeometry
@pytest.mark.parametrize("rep", ["diag", "dense"])
def test_empirical_fisher_is_squared_minibatch_gradients(backend, rep):
    model = _model("mlp")
    _perturb(model, 3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    loader = _loader(4)
    ewc = clfast.EWC(model, rep, variant="empirical")
    ewc.consolidate(loader)
    grads = []
    for x, y, _ in loader:  # autograd per minibatch, with the model's own .grad
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
    g = torch.stack(grads)
    expected = (g * g).mean(0) if rep == "diag" else g.t() @ g / len(grads)
    torch.testing.assert_close(ewc.fishers[0].data, expected, rtol=1e-5, atol=1e-9)
    assert float(ewc.fishers[0].data.abs().sum()) > 0
    _perturb(model, 5)
    assert float(ewc.penalty().detach()) > 0


@needs_nngeometry
def test_empirical_fisher_leaves_grads_and_refuses_what_it_cannot_be(backend):
    model = _model("mlp")
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)
    ewc = clfast.EWC(model, "diag", variant="empirical")
    ewc.consolidate(_loader(0))
    assert all(bool((p.grad == 7).all()) for p in model.parameters())
    with pytest.raises(ValueError, match="empty"):
        ewc.consolidate([])
    for rep in ("kfac", "blockdiag", "ekfac"):
        with pytest.raises(ValueError, match="variant='empirical'"):
            clfast.EWC(model, rep, variant="empirical")
    with pytest.raises(ValueError, match="variant must be one of"):
        clfast.EWC(model, "diag", variant="true")


@needs_nngeometry
@pytest.mark.parametrize("rep", ["diag", "kfac", "blockdiag"])
def test_fisher_backends_give_nngeometrys_fisher(rep):
    """The default computes the Fisher with clfast.fisher; fisher_backend='nngeometry' with nngeometry's FIM; the
    two Fishers and penalties agree, and the default's equals FIM itself."""
    model, loader = _model("convnet"), _loader(0)
    ewcs = {b: clfast.EWC(model, rep, fisher_backend=b) for b in ("auto", "clfast", "nngeometry")}
    for ewc in ewcs.values():
        ewc.consolidate(loader)
    assert ewcs["auto"]._use_clfast() and not ewcs["nngeometry"]._use_clfast()
    expected = FIM(model, loader, type(ewcs["nngeometry"].fishers[0]), variant="classif_logits", device="cpu")
    _perturb(model, 5)
    for b in ("auto", "clfast"):
        for got, want in ((ewcs[b].fishers[0].to_torch(), expected.to_torch()),
                          (ewcs[b].penalty(), ewcs["nngeometry"].penalty())):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6 * float(want.detach().abs().max()))


@needs_nngeometry
def test_fisher_backend_choice_is_checked():
    model = _model("mlp")
    assert not clfast.EWC(model, "ekfac")._use_clfast()  # auto: nngeometry computes what clfast.fisher cannot
    assert not clfast.EWC(model, "diag", variant="regression")._use_clfast()
    with pytest.raises(ValueError, match="fisher_backend='nngeometry'"):
        clfast.EWC(model, "ekfac", fisher_backend="clfast")
    with pytest.raises(ValueError, match="fisher_backend must be one of"):
        clfast.EWC(model, "diag", fisher_backend="backpack")
    grouped = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    assert not clfast.EWC(grouped, "diag")._use_clfast()
    with pytest.raises(ValueError, match="groups=1"):
        clfast.EWC(grouped, "diag", fisher_backend="clfast")


@needs_nngeometry
def test_auto_backend_falls_back_where_clfast_fisher_refuses_at_run_time():
    """A Linear layer used twice per forward: clfast.fisher refuses it while computing, so EWC's default takes
    nngeometry's FIM (with a warning) and fisher_backend='clfast' raises; the choice follows the model as it is
    at consolidate(); the backend name is checked for every variant."""
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.out = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.inner(torch.tanh(self.inner(x)))))

    torch.manual_seed(0)
    model = Shared()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(12, 6),
                                                                        torch.randint(0, 3, (12,))), batch_size=4)
    ewc = clfast.EWC(model, "diag")
    with pytest.warns(RuntimeWarning, match="runs more than once"):
        ewc.consolidate(loader)
    expected = FIM(model, loader, type(ewc.fishers[0]), variant="classif_logits", device="cpu")
    torch.testing.assert_close(ewc.fishers[0].data, expected.data)
    with pytest.raises(ValueError, match="runs more than once"):
        clfast.EWC(model, "diag", fisher_backend="clfast").consolidate(loader)
    converted = clfast.EWC(_model("mlp"), "diag")
    assert converted._use_clfast()
    converted.model.half()
    assert not converted._use_clfast()
    with pytest.raises(ValueError, match="fisher_backend must be one of"):
        clfast.EWC(model, "diag", variant="empirical", fisher_backend="bogus")


def _dan(seed=0):
    """Two clfast.nn DAN layers (2 neurons, then 1 without biases) on 10 features, 5 classes."""
    torch.manual_seed(seed)
    return nn.Sequential(clfast.nn.DANLayer(2, 10, 6, 4), nn.Tanh(), clfast.nn.DANLayer(1, 8, 5, 5, bias=False))


def _dan_loader(seed, n=30):
    g = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(n, 10, generator=g), torch.randint(0, 5, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=12)


@needs_nngeometry
@pytest.mark.parametrize("rep", ["diag", "kfac", "dense", "blockdiag"])
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_dan_penalty_and_gradient_equal_nngeometrys_vtmv(backend, rep, mode):
    """On DAN layers (per-neuron blocks, views of the stacked parameters): the penalty equals nngeometry's vTMv of
    each stored Fisher, its autograd gradient reaches the stacked parameters, and add_penalty_grad_ adds the same
    gradient into their .grad."""
    model = _dan()
    ewc = clfast.EWC(model, rep, mode=mode, gamma=0.7)
    layers, terms = ewc.layers, []
    for task in range(2):
        _perturb(model, 10 + task)
        ewc.consolidate(_dan_loader(task))
        anchor = [p.detach().clone() for p in layers.parameters()]
        terms = [(0.7 * c if mode == "online" else c, f, anchor if mode == "online" else a) for c, f, a in terms]
        terms.append((1.0, ewc.fishers[-1], anchor))
    model.train()
    _perturb(model, 99)
    expected = sum(c * f.vTMv(layers.pvector([p - q for p, q in zip(layers.parameters(), a)])) for c, f, a in terms)
    got = ewc.penalty()
    torch.testing.assert_close(got, expected.to(got.dtype), rtol=1e-5, atol=1e-8)
    assert float(got.detach()) > 0
    _assert_penalty_gradients(ewc, expected, list(model.parameters()))  # the stacked parameters
    state = ewc.state_dict()
    other = clfast.EWC(model, rep, mode=mode)
    other.load_state_dict(state)
    torch.testing.assert_close(other.penalty(), got)


@needs_nngeometry
def test_dan_models_need_clfast_fisher():
    model = _dan()
    for kwargs in (dict(fisher_backend="nngeometry"), dict(representation="ekfac"),
                   dict(variant="classif_binary_logits")):
        with pytest.raises(ValueError, match="nngeometry's FIM cannot hook clfast.nn DAN layers"):
            clfast.EWC(model, **kwargs)
    ewc = clfast.EWC(model, "diag", variant="empirical")  # squared minibatch gradients need no Fisher backend
    loader = _dan_loader(0)
    ewc.consolidate(loader)
    total = 0
    model.eval()  # as consolidate() computes it
    for x, y in loader:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
        total = total + torch.cat([g.reshape(-1) for g in ewc.layers.of(list(grads))]) ** 2
    torch.testing.assert_close(ewc.fishers[0].data, total / len(loader))


@needs_nngeometry
@pytest.mark.parametrize("kind, rep", [("DAN", "diag"), ("small", "dense"), ("small", "blockdiag")])
def test_dan_training_with_ewc_follows_the_per_neuron_model_with_nngeometrys_fim(backend, kind, rep):
    """Three tasks of SGD with the EWC penalty: a clfast DAN with clfast.fisher's Fisher and its per-neuron
    model (``to_reference()``) with nngeometry's FIM keep the same parameters, Fishers and penalties."""
    torch.manual_seed(0)
    if kind == "DAN":
        dan = clfast.nn.DAN(10, 5)
        ref = dan.to_reference()
    else:
        dan = _dan()
        ref = nn.Sequential(*[m.to_reference() if isinstance(m, clfast.nn.DANLayer) else m for m in dan])
    runs = []
    for model, fisher_backend in ((dan, "clfast"), (ref, "nngeometry")):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        ewc = clfast.EWC(model, rep, fisher_backend=fisher_backend)
        penalties, fishers = [], []
        for task in range(3):
            x, y = _dan_loader(task).dataset.tensors
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x + task, y), batch_size=12)
            model.train()
            for xb, yb in loader:
                loss = F.cross_entropy(model(xb), yb) + 10.0 * ewc.penalty()
                opt.zero_grad()
                loss.backward()
                opt.step()
            ewc.consolidate(loader)
            penalties.append(float(ewc.penalty().detach()))
            fishers.append(ewc.fishers[-1].get_diag())
        runs.append((penalties, fishers, torch.cat([p.detach().reshape(-1) for p in ewc.parameters()])))
    (p1, f1, w1), (p2, f2, w2) = runs
    assert p1[1] > 0
    torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-9)
    for a, b in zip(f1, f2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-6)
