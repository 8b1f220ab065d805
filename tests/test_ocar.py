"""OCAR: exact mode equals nngeometry's solve; ema factors converge to nngeometry's; training runs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast

pytest.importorskip("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag, PMatKFAC, PVector  # noqa: E402

from clfast.experiments.models import BaseNet  # noqa: E402

REPS = {"kfac": PMatKFAC, "diag": PMatDiag, "dense": PMatDense}


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 6, bias=False), nn.ReLU(),
                         nn.Linear(6, 5))


def _batch(n, seed, image=(1, 4, 4), classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *image, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("rep", list(REPS))
@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_exact_mode_equals_nngeometry_solve(backend, rep, kind):
    if kind == "convnet" and rep == "dense":
        pytest.skip("dense on the ConvNet is slow; covered on the MLP")
    model = _mlp() if kind == "mlp" else BaseNet(num_classes=30)
    shape, classes = ((1, 4, 4), 5) if kind == "mlp" else ((1, 28, 28), 30)
    x, y = _batch(24, 1, shape, classes)
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), torch.optim.SGD(model.parameters(), lr=0.0), rep,
                       damping=1e-2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    fisher = FIM(model, loader, REPS[rep], variant="classif_logits", device="cpu")
    expected = fisher.solve(PVector.from_model_grad(model), regul=1e-2).to_torch()
    ocar.precondition_(x, y)
    got = torch.cat([p.grad.reshape(-1) for p in ocar.layers.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", ["mlp", "convnet"])
def test_ema_factors_converge_to_nngeometry_factors(kind):
    model = _mlp() if kind == "mlp" else BaseNet(num_classes=30)
    x, y = _batch(32, 2) if kind == "mlp" else _batch(16, 2, (1, 28, 28), 30)
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), torch.optim.SGD(model.parameters(), lr=0.0), "kfac",
                       fisher="ema", ema_decay=0.998, generator=torch.Generator().manual_seed(0))
    for _ in range(1500):  # fixed batch and parameters: the running factors average sampled-label estimates
        ocar.forward(x)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
    exact = FIM(model, loader, PMatKFAC, variant="classif_logits", device="cpu").data
    for lid, (a, g) in exact.items():
        ema_a, ema_g = ocar.factors[lid]
        torch.testing.assert_close(ema_a, a, rtol=1e-4, atol=1e-5)  # A does not depend on labels
        assert float((ema_g - g).norm() / g.norm()) < 0.1, lid


@pytest.mark.parametrize("fisher", ["exact", "ema"])
def test_training_steps_learn_and_fill_the_buffer(backend, fisher):
    model = _mlp()
    buf = clfast.ReservoirBuffer(64, generator=torch.Generator().manual_seed(0))
    ocar = clfast.OCAR(model, buf, torch.optim.SGD(model.parameters(), lr=0.05), "kfac", fisher=fisher,
                       refresh=5, generator=torch.Generator().manual_seed(1))
    x, y = _batch(64, 3)
    losses = [float(ocar.step(x[i % 4 * 16:(i % 4 + 1) * 16], y[i % 4 * 16:(i % 4 + 1) * 16])) for i in range(40)]
    assert len(buf) == 64 and buf.num_seen == 640
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


def test_bad_configuration_is_clear():
    model, buf, opt = _mlp(), clfast.ReservoirBuffer(4), None
    with pytest.raises(ValueError, match="representation must be"):
        clfast.OCAR(model, buf, opt, "ekfac")
    with pytest.raises(ValueError, match="use representation='kfac'"):
        clfast.OCAR(model, buf, opt, "diag", fisher="ema")
    with pytest.raises(ValueError, match="damping"):
        clfast.OCAR(model, buf, opt, damping=0)
    bn = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(ValueError, match="BatchNorm layer '1'"):
        clfast.OCAR(bn, buf, opt, "kfac")


@pytest.mark.parametrize("rep", list(REPS))
def test_exact_mode_fisher_backends_agree(backend, rep):
    """The exact mode's Fisher from clfast.fisher (the default) and from nngeometry's FIM give the same step."""
    x, y = _batch(24, 3, (1, 28, 28), 30)
    grads = {}
    for fisher_backend in ("clfast", "nngeometry"):
        torch.manual_seed(0)
        model = BaseNet(num_classes=30) if rep != "dense" else _mlp()
        xb = x if rep != "dense" else x[:, :, :4, :4]
        ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), torch.optim.SGD(model.parameters(), lr=0.0), rep,
                           fisher_backend=fisher_backend)
        assert ocar._use_clfast() == (fisher_backend == "clfast")
        model.zero_grad()
        F.cross_entropy(model(xb), y % 5 if rep == "dense" else y).backward()
        ocar.precondition_(xb, y)
        grads[fisher_backend] = torch.cat([p.grad.reshape(-1) for p in ocar.layers.parameters()])
    want = grads["nngeometry"]
    torch.testing.assert_close(grads["clfast"], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("rep", list(REPS))
def test_dan_exact_mode_equals_nngeometrys_solve_of_clfast_fisher(backend, rep):
    """On DAN layers: the preconditioned gradient is nngeometry's own solve (pi-damped for KFAC) with the Fisher
    clfast.fisher gives for the union batch (in eval mode; tests/test_fisher.py checks that Fisher), written into
    the stacked parameters' .grad."""
    torch.manual_seed(0)
    model = nn.Sequential(clfast.nn.DANLayer(2, 10, 6, 4), nn.Tanh(), clfast.nn.DANLayer(1, 8, 5, 5, bias=False))
    x, y = _batch(24, 1, (10,))
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), torch.optim.SGD(model.parameters(), lr=0.0), rep,
                       damping=1e-2)
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    fisher = clfast.fisher(model, [(x,)], rep)
    expected = fisher.solvePVec(ocar.layers.pvector(ocar.layers.grads()), regul=1e-2).to_torch()
    ocar.precondition_(x, y)
    got = torch.cat([g.reshape(-1) for g in ocar.layers.grads()])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert model.training


def _dan(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(clfast.nn.DANLayer(2, 10, 6, 4), nn.Tanh(), clfast.nn.DANLayer(1, 8, 5, 5, bias=False))


def test_dan_ema_factors_converge_to_clfast_fishers_per_neuron_kfac():
    """Sampled-label factors of every neuron's Linears (and the diagonal blocks of its BatchNorms) average to the
    exact per-neuron KFAC of clfast.fisher on a fixed batch (eval mode: BatchNorm on running statistics)."""
    model = _dan().eval()
    x, _ = _batch(32, 2, (10,))
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), None, "kfac", fisher="ema", ema_decay=0.998,
                       generator=torch.Generator().manual_seed(0))
    for _ in range(1500):
        ocar.forward(x)
    exact = clfast.fisher(model, [(x,)], "kfac").data
    assert list(ocar.factors) == list(exact)
    for lid, (a, g) in exact.items():
        ema_a, ema_g = ocar.factors[lid]
        torch.testing.assert_close(ema_a, a, rtol=1e-4, atol=1e-5)
        assert float((ema_g - g).norm() / g.norm()) < 0.1, lid


def test_dan_ema_training_forward_gives_the_fused_layers_gradients_and_statistics():
    """In train mode the recorded forward runs the rest of the network on the DAN layers' recomputation (batch
    statistics): the loss, the parameters' gradients and the running statistics are those of the plain model."""
    model, plain = _dan(), _dan()
    x, y = _batch(16, 3, (10,))
    ocar = clfast.OCAR(model, clfast.ReservoirBuffer(10), None, "kfac", fisher="ema",
                       generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(ocar.forward(x), y)
    expected = F.cross_entropy(plain(x), y)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), plain.buffers()):
        torch.testing.assert_close(b, c, msg=name)
    assert set(ocar.factors) == set(ocar.layers.modules)
