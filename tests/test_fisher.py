"""clfast.fisher: nngeometry's FIM for every representation (from one batched backward per batch), the empirical
variant, the fallback without vmap, and bad input."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

nngeometry = pytest.importorskip("nngeometry")
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatBlockDiag, PMatDense, PMatDiag, PMatKFAC  # noqa: E402

import clfast  # noqa: E402
from clfast._nngeometry import fim  # noqa: E402
from clfast_testing import device_params, needs_native  # noqa: E402
from clfast.experiments.models import BaseNet  # noqa: E402
from clfast import fisher  # noqa: E402

CLASSES = {"diag": PMatDiag, "kfac": PMatKFAC, "dense": PMatDense, "blockdiag": PMatBlockDiag}
SHAPES = {"mlp": (12,), "basenet": (1, 28, 28), "bn1d": (12,), "bn2d": (2, 9, 9)}


@pytest.fixture(autouse=True)
def _float64():
    """nngeometry's classif_logits builds its triangular matrix in the default dtype (metrics.py:178), so it runs
    float64 models only with a float64 default."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def _model(kind, seed=0):
    torch.manual_seed(seed)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    if kind == "basenet":
        return BaseNet(num_classes=6).double()
    if kind == "bn1d":  # the in-place ReLU rewrites BatchNorm's output; no bias on the last layer
        model = nn.Sequential(nn.Linear(12, 10), nn.BatchNorm1d(10), nn.ReLU(inplace=True),
                              nn.Linear(10, 4, bias=False))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                              nn.Conv2d(4, 3, 3, dilation=2, bias=False), nn.Flatten(), nn.Linear(3, 5))
    with torch.no_grad():  # BatchNorm away from the identity
        for mod in model.modules():
            if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
                mod.running_mean.normal_()
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.normal_()
                mod.bias.normal_()
    return model.eval()


def _data(kind, n=20, seed=1):
    torch.manual_seed(seed)
    return torch.randn(n, *SHAPES[kind]), torch.randint(0, 4, (n,))


def _loader(kind, n=20, batch_size=7):  # 20 = 7 + 7 + 6: a ragged last batch
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*_data(kind, n)), batch_size=batch_size)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _assert_same(ours, ref, rep):
    assert type(ours) is CLASSES[rep]
    assert ours.to_torch().shape == ref.to_torch().shape
    assert _rel(ours.to_torch(), ref.to_torch()) <= 1e-6
    if rep == "kfac":
        assert list(ours.data) == list(ref.data)
        for (a, g), (ra, rg) in zip(ours.data.values(), ref.data.values()):
            assert a.shape == ra.shape and g.shape == rg.shape
            assert _rel(a, ra) <= 1e-6 and _rel(g, rg) <= 1e-6
    elif rep == "blockdiag":
        assert list(ours.data) == list(ref.data)
        for b, rb in zip(ours.data.values(), ref.data.values()):
            assert _rel(b, rb) <= 1e-6
    else:
        assert ours.data.shape == ref.data.shape and _rel(ours.data, ref.data) <= 1e-6


@pytest.mark.parametrize("kind", ["mlp", "basenet", "bn1d", "bn2d"])
@pytest.mark.parametrize("rep", list(CLASSES))
def test_equals_nngeometry_fim(kind, rep):
    """nngeometry's own classif_logits FIM (a model far from confident, so it is finite), with chunks of any
    size; the nngeometry class as representation gives the same."""
    if rep == "kfac" and kind.startswith("bn"):
        pytest.skip("no Kronecker factors for BatchNorm")
    model, loader = _model(kind), _loader(kind)
    ref = FIM(model, loader, CLASSES[rep])
    assert torch.isfinite(ref.to_torch()).all()
    _assert_same(fisher(model, loader, rep), ref, rep)
    _assert_same(fisher(model, loader, CLASSES[rep], chunk_size=3, device="cpu"), ref, rep)


@pytest.mark.parametrize("rep", ["diag", "kfac", "dense"])
def test_layer_collection_subset_and_frozen_layer(rep):
    """Only the layers of the collection (a frozen one included, as nngeometry includes it), any iterable of
    batches, any default dtype."""
    model = _model("mlp")
    model[0].requires_grad_(False)
    collection = LayerCollection()
    for mod in (model[0], model[4]):
        collection.add_layer_from_model(model, mod)
    ref = FIM(model, _loader("mlp"), CLASSES[rep], layer_collection=collection)
    batches = list(_loader("mlp"))
    _assert_same(fisher(model, batches, rep, layer_collection=collection), ref, rep)
    torch.set_default_dtype(torch.float32)
    _assert_same(fisher(model, batches, rep, layer_collection=collection), ref, rep)


def test_confident_model_uses_the_robust_whitening():
    """Where nngeometry's whitening rounds to NaN, the result is clfast._nngeometry.fim's clamped one."""
    model = _model("mlp")
    with torch.no_grad():
        model[4].weight.mul_(1000)
    loader = _loader("mlp")
    assert torch.isnan(FIM(model, loader, PMatDiag).data).any()  # why the clamping exists
    for rep in ("diag", "kfac"):
        ref = fim(model, loader, CLASSES[rep], "classif_logits", "cpu", None)
        ours = fisher(model, loader, rep)
        assert torch.isfinite(ours.to_torch()).all()
        _assert_same(ours, ref, rep)


class _ScalarBackward(torch.autograd.Function):
    """x^2 whose backward reads a Python number, which vmap cannot batch."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if not float(grad.abs().sum()) >= 0:
            raise FloatingPointError("not finite")
        return 2 * x * grad


class _NoVmap(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(12, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(_ScalarBackward.apply(self.a(x)))


@pytest.mark.parametrize("rep", ["diag", "kfac", "blockdiag"])
def test_backward_without_vmap_falls_back_to_replicated_batches(rep):
    torch.manual_seed(0)
    model, loader = _NoVmap(), _loader("mlp")
    with pytest.warns(RuntimeWarning, match="replicated"):
        ours = fisher(model, loader, rep)
    _assert_same(ours, FIM(model, loader, CLASSES[rep]), rep)


@pytest.mark.parametrize("kind", ["mlp", "bn2d"])
@pytest.mark.parametrize("rep", ["diag", "dense"])
def test_empirical_is_the_mean_squared_minibatch_gradient(kind, rep):
    model, loader = _model(kind), _loader(kind)
    params = list(model.parameters())
    expected, batches = 0, 0
    for x, y in loader:
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(F.cross_entropy(model(x), y), params)])
        expected = expected + (g * g if rep == "diag" else torch.outer(g, g))
        batches += 1
    ours = fisher(model, loader, rep, variant="empirical")
    assert type(ours) is CLASSES[rep]
    assert _rel(ours.data, expected / batches) <= 1e-12


def test_modes_grads_and_hooks_are_left_alone():
    model = _model("bn1d")
    model.train()
    model[1].eval()  # a mixed state, restored module by module
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    before = fisher(model, _loader("bn1d"), "diag")  # in eval mode: BatchNorm uses its running statistics
    assert [m.training for m in model.modules()] == [True, True, False, True, True]
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 3.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    assert _rel(fisher(model, _loader("bn1d"), "diag").data, before.data) == 0


class _Scaled(nn.Module):
    """A parameter nngeometry skips silently: outside any layer it knows."""

    def __init__(self):
        super().__init__()
        self.lin, self.scale = nn.Linear(12, 4), nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.scale * self.lin(x)


def test_bad_input():
    model, loader = _model("mlp"), _loader("mlp")
    for kwargs, match in [(dict(representation="lowrank"), "representation"),
                          (dict(representation="ekfac"), "computes representations"),
                          (dict(variant="regression"), "variant"),
                          (dict(representation="kfac", variant="empirical"), "empirical"),
                          (dict(chunk_size=0), "chunk_size")]:
        with pytest.raises(ValueError, match=match):
            fisher(model, loader, **kwargs)
    with pytest.raises(ValueError, match="BatchNorm"):
        fisher(_model("bn1d"), _loader("bn1d"), "kfac")
    for empty in ([], _loader("mlp", n=0)):
        with pytest.raises(ValueError, match="no examples"):
            fisher(model, empty)
    with pytest.raises(ValueError, match="Conv1d"):
        fisher(nn.Sequential(nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(20, 3)), [(torch.randn(4, 1, 12),)])
    with pytest.raises(ValueError, match="cannot handle"):
        fisher(nn.Sequential(nn.Linear(12, 4), nn.PReLU()), loader)
    with pytest.raises(ValueError, match="does not cover"):
        fisher(_Scaled(), loader)
    with pytest.raises(ValueError, match="classes >= 2"):
        fisher(nn.Sequential(nn.Linear(12, 1)), loader)
    shared = nn.Linear(12, 12)
    with pytest.raises(ValueError, match="more than once"):
        fisher(nn.Sequential(shared, nn.Tanh(), shared), loader)
    model.train()
    sequence = nn.Sequential(nn.Linear(12, 4), nn.Flatten())
    with pytest.raises(ValueError, match=r"inputs \[batch, features\]"):
        fisher(sequence, [(torch.randn(2, 3, 12),)])
    assert not sequence[0]._forward_hooks and sequence.training and model.training


class _ConstantBranch(nn.Module):
    """A layer fed by a constant [1, 12] row: its first dimension is not the batch."""

    def __init__(self):
        super().__init__()
        self.lin, self.const, self.out = nn.Linear(12, 12), nn.Linear(12, 12), nn.Linear(12, 4)
        self.register_buffer("row", torch.randn(1, 12))

    def forward(self, x):
        return self.out(torch.tanh(self.lin(x) + self.const(self.row)))


class _Tuple(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(12, 4)

    def forward(self, x):
        return self.lin(x), x


def test_more_bad_input_raises_value_errors():
    loader = _loader("mlp")
    for chunk in (2.0, float("inf")):
        with pytest.raises(ValueError, match="chunk_size"):
            fisher(_model("mlp"), loader, chunk_size=chunk)
    for rep in ("diag", "dense"):
        with pytest.raises(ValueError, match="first dimension"):
            fisher(_ConstantBranch(), loader, rep)
    with pytest.raises(ValueError, match="logits tensor"):
        fisher(_Tuple(), loader)
    with pytest.raises(ValueError, match="batches must be tensors"):
        fisher(_model("mlp"), [{"x": torch.randn(4, 12)}])
    half = _model("mlp").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 or float64"):
        fisher(half, [(torch.randn(4, 12, dtype=torch.bfloat16),)])
    assert not clfast.EWC(half, "diag")._use_clfast()  # EWC's default then takes nngeometry's FIM


def test_frozen_first_layer_on_an_input_without_gradient():
    """Integer images cast inside the model and a frozen first layer: its output has no gradient, yet its
    parameters have a Fisher, as nngeometry computes it from float inputs."""
    class Cast(nn.Module):
        def forward(self, x):
            return x.to(torch.get_default_dtype()) / 4

    model = _model("mlp")
    model[0].requires_grad_(False)
    wrapped = nn.Sequential(Cast(), *model)
    torch.manual_seed(2)
    x = torch.randint(0, 8, (20, 12))
    y = torch.zeros(20, dtype=torch.long)
    ref = FIM(wrapped, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x.double(), y), batch_size=7),
              PMatDiag)
    got = fisher(wrapped, [(x[:7], y[:7]), (x[7:14], y[7:14]), (x[14:], y[14:])], "diag")
    assert float(got.get_diag()[:12 * 16].sum()) > 0
    torch.testing.assert_close(got.get_diag(), ref.get_diag(), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("rep", list(CLASSES))
def test_outputs_and_examples_in_small_groups_give_the_same_fisher(rep, monkeypatch):
    """A tiny memory bound: one whitened output per backward and one example per chunk."""
    import clfast._fisher as impl

    model = _model("basenet")
    expected = fisher(model, _loader("basenet"), rep)
    monkeypatch.setattr(impl, "_CHUNK_BYTES", 1)
    monkeypatch.setattr(impl, "_GROUP_BYTES", 1)
    got = fisher(model, _loader("basenet"), rep)
    torch.testing.assert_close(got.to_torch(), expected.to_torch(), rtol=1e-10, atol=1e-14)


def _on_the_reference_ops(compute):
    clfast.set_backend("reference")
    try:
        return compute()
    finally:
        clfast.set_backend("native")


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("rep", ["diag", "kfac", "dense", "blockdiag"])
def test_native_kernels_match_the_reference_ops(rep, device):
    """clfast.fisher on the native kernels (CPU, or the CUDA ones on the emulator) against the reference ops, on a
    model whose factors take the CPU product's several blocks, and the KFAC factors exactly symmetric."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(150, 140), nn.ReLU(), nn.Linear(140, 7))
    loader = [(torch.randn(40, 150), None), (torch.randn(13, 150), None)]
    if rep in ("dense", "blockdiag"):
        model = nn.Sequential(nn.Linear(20, 9), nn.ReLU(), nn.Linear(9, 4))
        loader = [(torch.randn(11, 20), None)]
    model, loader = model.to(device), [(x.to(device), None) for x, _ in loader]
    got = fisher(model, loader, rep)
    expected = _on_the_reference_ops(lambda: fisher(model, loader, rep))
    if rep == "kfac":
        for (a, g), (ea, eg) in zip(got.data.values(), expected.data.values()):
            assert torch.equal(a, a.mT) and torch.equal(g, g.mT)
            torch.testing.assert_close(a, ea, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(g, eg, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(got.to_torch(), expected.to_torch(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("conv", [dict(kernel_size=3), dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2),
                                                             dilation=(2, 3))])
def test_patches_are_unfolds_columns(conv):
    from clfast._fisher import _patches

    mod, x = nn.Conv2d(3, 4, **conv), torch.randn(2, 3, 9, 8)
    expected = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
    assert torch.equal(_patches(mod, x), expected.transpose(1, 2))


# ---- clfast.nn DAN layers: per-neuron blocks laid out as nngeometry lays out the per-neuron model ----------------

def _dan_model(seed=0, act=None):
    """A Linear, two DAN layers (3 and 2 neurons, the second without biases) and an in-place ReLU between them,
    BatchNorm away from the identity."""
    from clfast.nn import DANLayer

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), DANLayer(3, 8, 5, 4, act_fn=act), nn.ReLU(inplace=True),
                          DANLayer(2, 12, 4, 3, bias=False))
    with torch.no_grad():
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if "running_mean" in name or name.split(".")[-1] in ("bn1_weight", "bn1_bias", "bn2_weight", "bn2_bias"):
                t.normal_()
            elif "running_var" in name:
                t.uniform_(0.5, 2.0)
    return model.eval()


def _dan_loader(n=20, batch_size=7, device="cpu"):
    torch.manual_seed(1)
    x = torch.randn(n, 6, device=device)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(n, device=device)),
                                       batch_size=batch_size)


def _per_neuron(model):
    """The same network with each DAN layer as the per-neuron modules nngeometry knows."""
    return nn.Sequential(*[m.to_reference() if isinstance(m, clfast.nn.DANLayer) else m for m in model]).eval()


@pytest.mark.parametrize("rep", list(CLASSES))
def test_dan_fisher_equals_nngeometrys_on_the_per_neuron_model(rep):
    """The per-neuron model's layer ids, order and matrix from nngeometry's FIM; with KFAC, its factors of every
    neuron's Linears, and each BatchNorm weight and bias a column whose G is that part of the exact diagonal."""
    model, loader = _dan_model(), _dan_loader()
    reference = _per_neuron(model)
    ours = fisher(model, loader, rep)
    assert type(ours) is CLASSES[rep]
    if rep != "kfac":
        _assert_same(ours, fim(reference, loader, CLASSES[rep], "classif_logits", "cpu",
                               LayerCollection.from_model(reference)), rep)
        return
    linears = LayerCollection()
    for mod in reference.modules():
        if isinstance(mod, nn.Linear):
            linears.add_layer_from_model(reference, mod)
    ref = fim(reference, loader, PMatKFAC, "classif_logits", "cpu", linears)
    diag = fisher(model, loader, "diag")
    positions = diag.generator.layer_collection.p_pos
    for lid, (a, g) in ours.data.items():
        if lid in ref.data:
            assert _rel(a, ref.data[lid][0]) <= 1e-6 and _rel(g, ref.data[lid][1]) <= 1e-6
            continue
        bn, part = lid.rsplit(".", 1)  # core.0.weight: the first half of the BatchNorm's diagonal entries
        c = g.shape[0]
        start = positions[bn] + (c if part == "bias" else 0)
        assert torch.equal(a, torch.ones(1, 1)) and torch.equal(g, torch.diag(torch.diagonal(g)))
        assert _rel(torch.diagonal(g), diag.data[start:start + c]) <= 1e-12
    assert len(ours.data) == len(ref.data) + 2 * 2 * (3 + 2)


@pytest.mark.parametrize("act", [nn.GELU(), nn.ReLU(inplace=True)], ids=["gelu", "relu_inplace"])
def test_dan_fisher_equals_autograd_per_example_gradients(act):
    """``1/n sum_i J_i^T (diag(p_i) - p_i p_i^T) J_i`` with each example's logit Jacobian taken by autograd through
    the model's own forward and backward (the fused DAN op's), in the layout of the layer collection; an in-place
    activation does not overwrite the recomputed layer's parts."""
    from clfast._nngeometry import Layers

    model, loader = _dan_model(act=act), _dan_loader(n=9)
    layers = Layers(model)
    leaves = layers.leaves()
    x = torch.cat([b for b, _ in loader])
    expected = 0
    for i in range(len(x)):
        logits = model(x[i:i + 1])[0]
        jac = torch.stack([torch.cat([g.reshape(-1) for g in layers.of(list(torch.autograd.grad(
            logits[c], leaves, retain_graph=True, allow_unused=True)))]) for c in range(len(logits))])
        p = torch.softmax(logits.detach(), 0)
        expected = expected + jac.T @ (torch.diag(p) - torch.outer(p, p)) @ jac
    expected = expected / len(x)
    dense = fisher(model, loader, "dense").data
    assert _rel(dense, expected) <= 1e-10
    assert _rel(fisher(model, loader, "diag").data, torch.diagonal(expected)) <= 1e-10
    torch.testing.assert_close(fisher(model, loader, "dense", chunk_size=2).data, dense, rtol=1e-12, atol=1e-14)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("rep", ["diag", "kfac"])
def test_dan_fisher_native_kernels_match_the_reference_ops(rep, device):
    model, loader = _dan_model().to(device), _dan_loader(device=device)
    got = fisher(model, loader, rep)
    expected = _on_the_reference_ops(lambda: fisher(model, loader, rep))
    torch.testing.assert_close(got.to_torch(), expected.to_torch(), rtol=1e-12, atol=1e-12)


def test_dan_models_it_cannot_take_are_refused_clearly():
    from clfast.nn import VECDAN, DANLayer
    from clfast._nngeometry import Layers

    with pytest.raises(ValueError, match="does not cover .*not a shared phenotype"):
        fisher(nn.Sequential(DANLayer(3, 4, 5, 2, shared=True)), _dan_loader(), "diag")
    with pytest.raises(ValueError, match="cannot handle this model .*_Phenotype"):
        fisher(VECDAN(6, 3, neurons=(2,)), _dan_loader(), "diag")
    model = _dan_model()
    collection = LayerCollection()
    collection.add_layer("1.neurons.7.core.1", Layers(model).collection.layers["1.neurons.0.core.1"])
    with pytest.raises(ValueError, match="names no module of the model"):
        fisher(model, _dan_loader(), "diag", layer_collection=collection)
    collection = LayerCollection()  # a subset of a DAN layer's blocks: those blocks only
    full = Layers(model).collection.layers
    for lid in ("0", "3.neurons.1.core.4", "1.neurons.2.core.0"):
        collection.add_layer(lid, full[lid])
    sub = fisher(model, _dan_loader(), "diag", layer_collection=collection)
    whole = fisher(model, _dan_loader(), "diag")
    pos = whole.generator.layer_collection.p_pos
    expected = torch.cat([whole.data[pos[lid]:pos[lid] + full[lid].numel()] for lid in collection.layers])
    assert _rel(sub.data, expected) <= 1e-12
    bad = LayerCollection()  # a DAN id described as another layer
    bad.add_layer("1.neurons.0.core.1", full["1.neurons.0.core.4"])
    with pytest.raises(ValueError, match="describes '1.neurons.0.core.1' as"):
        fisher(model, _dan_loader(), "diag", layer_collection=bad)
    with pytest.raises(ValueError, match="as two diagonal blocks, '1.neurons.2.core.0.weight'"):
        fisher(model, _dan_loader(), "kfac", layer_collection=collection)
    with pytest.raises(ValueError, match="examples must be on the first dimension"):  # [N, B, ni] model input
        fisher(DANLayer(3, 4, 5, 2).eval(), [(torch.randn(3, 9, 4),)], "diag")
    parametrized = _dan_model()
    torch.nn.utils.parametrize.register_parametrization(parametrized[1], "weight1", nn.Identity())
    with pytest.raises(ValueError, match="does not cover 10 .*not parametrized"):
        fisher(parametrized, _dan_loader(), "diag")
    twice = DANLayer(2, 8, 5, 4)  # 8 -> 8, applied twice
    with pytest.raises(ValueError, match="runs more than once"):
        fisher(nn.Sequential(nn.Linear(6, 8), twice, nn.Tanh(), twice), _dan_loader(), "diag")


class _Square(nn.Module):  # an activation whose backward refuses vmap
    def forward(self, x):
        return _ScalarBackward.apply(x)


@pytest.mark.parametrize("rep", ["diag", "blockdiag"])
def test_dan_fisher_without_vmap_falls_back_to_replicated_batches(rep):
    model, loader = _dan_model(act=_Square()), _dan_loader()
    with pytest.warns(RuntimeWarning, match="replicated"):
        ours = fisher(model, loader, rep)
    reference = _per_neuron(model)
    _assert_same(ours, fim(reference, loader, CLASSES[rep], "classif_logits", "cpu",
                           LayerCollection.from_model(reference)), rep)
