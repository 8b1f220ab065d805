"""DAN layers: fused op vs reference, clfast.nn modules vs the per-neuron ones, conversions, bad input, autograd,
compile, and sync_batchnorm under torch.distributed (two gloo processes on the CPU)."""
import copy
import os
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

import clfast
from clfast import ops as _ops
from clfast.nn.dan import PARAMS, STATS
from clfast.baselines import dan as seed
from clfast_distributed import WORLD, bitwise_equal, spawn
from clfast_testing import device_params, needs_native

ACTS = {"identity": nn.Identity, "tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
        "gelu_tanh": lambda: nn.GELU(approximate="tanh")}


def _layer_tensors(n, ni, nf, no, dtype, device, seed_, bias=True):
    """Random parameters (BN affine and running statistics included, never the defaults) for one layer."""
    g = torch.Generator().manual_seed(seed_)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    params = [1 + 0.3 * r(n, ni), 0.3 * r(n, ni), r(n, nf, ni) / ni ** 0.5, r(n, nf), 1 + 0.3 * r(n, nf),
              0.3 * r(n, nf), r(n, nf, nf) / nf ** 0.5, r(n, nf), r(n, no, nf) / nf ** 0.5, r(n, no)]
    if not bias:
        params[3] = params[7] = params[9] = None
    params = [None if p is None else p.to(device).requires_grad_() for p in params]
    stats = [r(n, ni), torch.rand(n, ni, generator=g, dtype=dtype) + 0.5, torch.full((n,), 3),
             r(n, nf), torch.rand(n, nf, generator=g, dtype=dtype) + 0.5, torch.full((n,), 3)]
    return params, [s.to(device) for s in stats]


def _close(a, r):
    """Equal within rounding relative to the tensor's scale (sums of many terms round at that scale)."""
    eps = 1e-5 if r.dtype == torch.float32 else 1e-12
    torch.testing.assert_close(a, r, rtol=10 * eps, atol=eps * max(1.0, r.abs().max().item()))


def _run(backend, x, params, stats, training, act, momentum=0.1):
    """Output, gradients (of x and every parameter) and updated statistics on one backend."""
    before = clfast.backend()
    clfast.set_backend(backend)
    try:
        stats = [s.clone() for s in stats]
        out = _ops.dan_layer(x, params, stats, training, momentum, 1e-5, act)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype).to(out.device)
        leaves = [t for t in [x] + params if t is not None]
        grads = torch.autograd.grad((out * w).sum(), leaves)
        return out.detach(), grads, stats
    finally:
        clfast.set_backend(before)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("act", ["identity", "tanh", "relu", "sigmoid", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("per_neuron", [False, True], ids=["shared_input", "per_neuron_input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_op_matches_reference(device, dtype, act, per_neuron, training):
    n, ni, nf, no, b = 3, 7, 5, 4, 33
    seed_ = 10 * ["identity", "tanh", "relu", "sigmoid", "gelu", "gelu_tanh"].index(act) + per_neuron
    params, stats = _layer_tensors(n, ni, nf, no, dtype, device, seed_)
    g = torch.Generator().manual_seed(seed_)
    x = torch.randn((n, b, ni) if per_neuron else (b, ni), generator=g, dtype=dtype).to(device).requires_grad_()
    native = _run("native", x, params, stats, training, act)
    ref = _run("reference", x, params, stats, training, act)
    for a, r in zip((native[0], *native[1], *native[2]), (ref[0], *ref[1], *ref[2])):
        _close(a, r)
    if training:
        assert not torch.equal(native[2][0], stats[0])  # the running statistics moved


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_op_without_biases_and_wide_layer(device):
    for (n, ni, nf, no, b, bias) in [(2, 6, 4, 3, 5, False), (32, 256, 64, 8, 70, True), (2, 9, 128, 3, 33, True)]:
        params, stats = _layer_tensors(n, ni, nf, no, torch.float32, device, n, bias)
        x = torch.randn(b, ni, generator=torch.Generator().manual_seed(n)).to(device).requires_grad_()
        native, ref = _run("native", x, params, stats, True, "tanh"), _run("reference", x, params, stats, True, "tanh")
        for a, r in zip((native[0], *native[1], *native[2]), (ref[0], *ref[1], *ref[2])):
            _close(a, r)


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_batch_statistics_of_a_large_mean(device):
    """Inputs 1000 +- 1 in float64: a variance from the sums of x and x^2 would lose six of its digits."""
    params, stats = _layer_tensors(2, 3, 4, 2, torch.float64, device, 13)
    x = (1e3 + torch.randn(9, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64)).to(device)
    x.requires_grad_()
    native, ref = _run("native", x, params, stats, True, "tanh"), _run("reference", x, params, stats, True, "tanh")
    for a, r in zip((native[0], *native[1], *native[2]), (ref[0], *ref[1], *ref[2])):
        _close(a, r)


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_more_neurons_than_one_launch_grid(device):
    """65,572 one-input neurons: the CUDA column passes take at most 65,535 neurons per launch (grid y), so blocks
    loop over a second neuron and reuse their shared arrays."""
    n, b = 65535 + 37, 8  # float64: with this many neurons some have a batch variance float32 resolves poorly
    params, stats = _layer_tensors(n, 1, 1, 1, torch.float64, device, 11)
    x = torch.randn(n, b, 1, generator=torch.Generator().manual_seed(12), dtype=torch.float64).to(device)
    x.requires_grad_()
    native, ref = _run("native", x, params, stats, True, "tanh"), _run("reference", x, params, stats, True, "tanh")
    for a, r in zip((native[0], *native[1], *native[2]), (ref[0], *ref[1], *ref[2])):
        _close(a, r)


@needs_native
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("per_neuron", [False, True])
def test_gradcheck_float64(training, per_neuron):
    params, stats = _layer_tensors(2, 3, 4, 2, torch.float64, "cpu", 3)
    x = torch.randn((2, 5, 3) if per_neuron else (5, 3), dtype=torch.float64, requires_grad=True)

    def f(x, *params):
        return _ops.dan_layer(x, list(params), [s.clone() for s in stats], training, 0.1, 1e-5, "tanh")

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-6)


def _op_args(training, per_neuron=False, device="cpu"):
    params, stats = _layer_tensors(3, 6, 5, 4, torch.float32, device, 5)
    x = torch.randn((3, 8, 6) if per_neuron else (8, 6), device=device)
    running = [None] * 4 if training else [stats[0], stats[1], stats[3], stats[4]]
    return x, [p.detach() for p in params], running, stats


@needs_native
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("per_neuron", [False, True])
def test_opcheck(training, per_neuron):
    x, params, running, stats = _op_args(training, per_neuron)
    torch.library.opcheck(torch.ops.clfast.dan_layer_forward, (x, *params, *running, 1e-5, "tanh"))
    params_g = [p.requires_grad_() for p in params]
    torch.library.opcheck(torch.ops.clfast.dan_layer_forward, (x, *params_g, *running, 1e-5, "gelu"))
    out, saved = torch.ops.clfast.dan_layer_forward(x, *params, *running, 1e-5, "tanh")
    p = [t.detach() for t in params]
    torch.library.opcheck(torch.ops.clfast.dan_layer_backward,
                          (torch.randn_like(out), x, p[0], p[1], p[2], p[4], p[5], p[6], p[8], *running, saved, 1e-5, "tanh",
                           True))
    if training:
        torch.library.opcheck(torch.ops.clfast.dan_bn_update_, (*stats, *saved[7:], 0.1, x.shape[-2]))
    torch.library.opcheck(torch.ops.clfast.dan_layer, (x, *params, *[s.clone() for s in stats], training, 0.1, 1e-5, "sigmoid"))


def _seed_and_fast(act, bias=True, ni=12, classes=3):
    torch.manual_seed(0)
    ref = seed.DAN(ni, classes, act=act)
    if not bias:  # the per-neuron DAN has no bias switch: rebuild its layers without biases
        ref.dan1 = seed.DANLayer(3, ni, 50, 100, act_fn=act, bias=False)
        ref.dan2 = seed.DANLayer(2, 100, 50, 25, p_neurons=3, act_fn=act, bias=False)
        ref.dan3 = seed.DANLayer(1, 25, 10, classes, p_neurons=2, act_fn=act, bias=False)
    return ref, clfast.nn.DAN.from_reference(ref)


def _compare_modules(fast, ref, rtol=1e-4, atol=1e-5):
    back = fast.to_reference().state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(back[k], v, rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("bias", [True, False])
def test_dan_training_matches_seed(backend, device, act, bias):
    """Outputs, gradients of every parameter, SGD steps and BatchNorm state (train and eval) equal the per-neuron
    DAN's."""
    ref, fast = _seed_and_fast(ACTS[act](), bias)
    ref, fast = ref.to(device), fast.to(device)
    opt_r, opt_f = torch.optim.SGD(ref.parameters(), 0.05), torch.optim.SGD(fast.parameters(), 0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(4):
        x, y = torch.randn(16, 12, generator=g).to(device), torch.randn(16, 3, generator=g).to(device)
        for m, o in ((ref, opt_r), (fast, opt_f)):
            o.zero_grad()
            m.out = m(x)
            nn.functional.mse_loss(m.out, y).backward()
        torch.testing.assert_close(fast.out, ref.out, rtol=1e-4, atol=1e-5)
        grads_r = {k: v.grad for k, v in ref.named_parameters()}
        for name, p in fast.named_parameters():  # gradients, in the per-neuron layout
            layer, pname = name.split(".")
            for i in range(getattr(fast, layer)._n):
                index, attr = clfast.nn.dan._SEED_NAMES[pname]
                torch.testing.assert_close(p.grad[i], grads_r[f"{layer}.neurons.{i}.core.{index}.{attr}"],
                                           rtol=1e-4, atol=1e-5)
        opt_r.step()
        opt_f.step()
    _compare_modules(fast, ref)
    ref.eval()
    fast.eval()
    x = torch.randn(5, 12, generator=g).to(device)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch", [2, 3, 64, 4096])
def test_batch_sizes(backend, batch):
    ref, fast = _seed_and_fast(nn.ReLU())
    x = torch.randn(batch, 12)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
    _compare_modules(fast, ref)
    ref.eval()
    fast.eval()
    torch.testing.assert_close(fast(x[:1]), ref(x[:1]), rtol=1e-4, atol=1e-4)  # batch 1 is fine in eval


def test_same_initial_parameters_as_seed():
    torch.manual_seed(42)
    ref = seed.DAN(100, 1, act=nn.ReLU())
    after_ref = torch.rand(3)
    torch.manual_seed(42)
    fast = clfast.nn.DAN(100, 1, act=nn.ReLU())
    after_fast = torch.rand(3)
    _compare_modules(fast, ref, rtol=0, atol=0)
    assert torch.equal(after_ref, after_fast)  # the same number of draws
    state = torch.random.get_rng_state()
    clfast.nn.DAN.from_reference(ref)
    assert torch.equal(state, torch.random.get_rng_state())  # conversion draws nothing


def test_state_dict_layouts():
    ref, fast = _seed_and_fast(nn.Tanh())
    fast(torch.randn(8, 12))  # move the running statistics
    # per-neuron layout -> clfast (strict), clfast -> per-neuron, and a Neuron's own state dict
    other = clfast.nn.DAN(12, 3)
    other.load_state_dict(ref.state_dict())
    _compare_modules(other, ref, rtol=0, atol=0)
    fresh = seed.DAN(12, 3)
    fresh.load_state_dict(fast.to_reference().state_dict())  # clfast -> per-neuron layout, into its own class
    fresh.eval()
    fast.eval()
    x = torch.randn(6, 12)
    torch.testing.assert_close(fresh(x), fast(x), rtol=1e-5, atol=1e-6)
    fast.train()
    neuron_ref = seed.Neuron(5, 4, 2)
    neuron = clfast.nn.Neuron(5, 4, 2)
    neuron.load_state_dict(neuron_ref.state_dict())
    x = torch.randn(6, 5)
    torch.testing.assert_close(neuron(x), neuron_ref(x))
    # round trip through our own layout
    again = clfast.nn.DAN(12, 3)
    again.load_state_dict(fast.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), fast.state_dict().values()))
    with pytest.raises(RuntimeError):
        clfast.nn.DAN(13, 3).load_state_dict(ref.state_dict())  # wrong shapes are still refused


def test_unknown_activation_falls_back_to_reference():
    ref, fast = _seed_and_fast(nn.LeakyReLU(0.1))
    x = torch.randn(8, 12)
    clfast.nn.dan._warned.discard("activation LeakyReLU")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fast(x)
    torch.testing.assert_close(out, ref(x), rtol=1e-4, atol=1e-5)
    _compare_modules(fast, ref)
    assert any("LeakyReLU" in str(w.message) for w in caught)


def test_momentum_none_matches_seed(backend):
    ref, fast = _seed_and_fast(nn.Tanh())
    for m in ref.modules():
        if isinstance(m, nn.BatchNorm1d):
            m.momentum = None
    fast = clfast.nn.DAN.from_reference(ref)
    for _ in range(3):
        x = torch.randn(10, 12)
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
    _compare_modules(fast, ref)


def test_bad_input_is_refused_and_changes_nothing(backend):
    layer = clfast.nn.DANLayer(3, 4, 5, 2)
    state = copy.deepcopy(layer.state_dict())
    with pytest.raises(ValueError, match=r"input dimension \(5\) do not match neuron input dimension \(4\)"):
        layer(torch.randn(8, 5))
    with pytest.raises(TypeError, match="float32"):
        layer(torch.randn(8, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="float32"):
        layer(torch.ones(8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        layer(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\[3, batch, 4\]"):
        layer(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match="Tensor"):
        layer([[1.0] * 4])
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert layer.eval()(torch.randn(0, 4)).shape == (0, 6)  # an empty batch is fine in eval mode
    with pytest.raises(ValueError, match="neurons must be a positive int"):
        clfast.nn.DANLayer(0, 4, 5, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        clfast.nn.DANLayer(1, 4, 5, 2, act_fn=torch.tanh)


@needs_native
def test_native_op_refuses_bad_shapes_and_dtypes():
    x, params, running, _ = _op_args(True)
    with pytest.raises(RuntimeError, match="weight2 must have shape"):
        torch.ops.clfast.dan_layer_forward(x, *params[:6], params[6][:, :2], *params[7:], *running, 1e-5, "tanh")
    with pytest.raises(RuntimeError, match="float32 or float64"):
        torch.ops.clfast.dan_layer_forward(x.half(), *params, *running, 1e-5, "tanh")
    with pytest.raises(RuntimeError, match="bn1_bias must be Double"):
        torch.ops.clfast.dan_layer_forward(x.double(), *[p.double() for p in params[:1]], *params[1:], *running,
                                           1e-5, "tanh")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.clfast.dan_layer_forward(x, *params, *running, 1e-5, "swish")


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shared", [True, False], ids=["shared_stats", "per_neuron_stats"])
def test_bn_update_matches_batchnorm(device, shared):
    """dan_bn_update_ moves running statistics as nn.BatchNorm1d does, from C (shared input) or N * C batch
    statistics, and counts the batch."""
    n, c1, c2, batch = 3, 37, 21, 9  # 37 and 21: not multiples of any SIMD width
    g = torch.Generator().manual_seed(3)
    stats = [torch.randn(n, c1, generator=g), torch.rand(n, c1, generator=g) + 0.5, torch.full((n,), 4),
             torch.randn(n, c2, generator=g), torch.rand(n, c2, generator=g) + 0.5, torch.full((n,), 4)]
    stats = [s.to(device) for s in stats]
    h1 = torch.randn(1 if shared else n, batch, c1, generator=g).to(device)
    h2 = torch.randn(n, batch, c2, generator=g).to(device)
    expected = []
    for h, rm, rv in ((h1, stats[0], stats[1]), (h2, stats[3], stats[4])):
        bn = nn.BatchNorm1d(rm.shape[1], momentum=0.3).to(device)
        means, variances = [], []
        for i in range(n):
            bn.running_mean.copy_(rm[i])
            bn.running_var.copy_(rv[i])
            bn(h[i if h.shape[0] > 1 else 0])
            means.append(bn.running_mean.clone())
            variances.append(bn.running_var.clone())
        expected += [torch.stack(means), torch.stack(variances)]
    batch_stats = []
    for h in (h1, h2):
        batch_stats += [h.mean(1).reshape(-1), h.var(1, unbiased=False).reshape(-1)]
    torch.ops.clfast.dan_bn_update_(*stats, *batch_stats, 0.3, batch)
    for got, want in zip([stats[0], stats[1], stats[3], stats[4]], expected):
        torch.testing.assert_close(got, want)
    assert stats[2].tolist() == [5] * n and stats[5].tolist() == [5] * n


@needs_native
def test_bn_update_refuses_bad_input_before_writing():
    n, c = 2, 5
    stats = [torch.randn(n, c), torch.rand(n, c) + 0.5, torch.zeros(n, dtype=torch.long)] * 2
    stats = [s.clone() for s in stats]
    before = [s.clone() for s in stats]
    good = [torch.randn(n * c), torch.rand(n * c)]
    with pytest.raises(RuntimeError, match="second running statistics must be"):
        torch.ops.clfast.dan_bn_update_(*stats[:3], stats[3], stats[4][:, :2], stats[5], *good, *good, 0.1, 8)
    with pytest.raises(RuntimeError, match="batch statistics must hold C or N \\* C"):
        torch.ops.clfast.dan_bn_update_(*stats, *good, good[0][:3], good[1][:3], 0.1, 8)
    with pytest.raises(RuntimeError, match="batch of more than 1"):
        torch.ops.clfast.dan_bn_update_(*stats, *good, *good, 0.1, 1)
    with pytest.raises(RuntimeError, match="contiguous"):
        torch.ops.clfast.dan_bn_update_(*stats[:3], stats[3].t().contiguous().t(), *stats[4:], *good, *good, 0.1, 8)
    with pytest.raises(RuntimeError, match="one dtype, float32 or float64"):
        torch.ops.clfast.dan_bn_update_(*stats, *good, good[0].double(), good[1], 0.1, 8)
    half = [s.half() if s.is_floating_point() else s.clone() for s in stats[3:]]
    with pytest.raises(RuntimeError, match="one dtype, float32 or float64"):  # the second BN: nothing written
        torch.ops.clfast.dan_bn_update_(*stats[:3], *half, *good, *[g.half() for g in good], 0.1, 8)
    for s, b in zip(stats, before):
        assert torch.equal(s, b)


@pytest.mark.parametrize("backend", ["native", "reference"])
def test_non_contiguous_output_gradient(backend):
    """The backward reads each neuron's block of the output gradient in place: a transposed or strided gradient
    gives the same gradients as a contiguous one."""
    if backend == "native" and not clfast.native_available():
        pytest.skip("native extension not built")
    params, stats = _layer_tensors(3, 7, 5, 4, torch.float64, "cpu", 11)
    x = torch.randn(9, 7, dtype=torch.float64, requires_grad=True)
    out = _ops.dan_layer(x, params, [s.clone() for s in stats], True, 0.1, 1e-5, "tanh")
    leaves = [x] + params
    g = torch.randn(2 * out.shape[1], out.shape[0], dtype=torch.float64)[::2].t()  # [B, N * no], strided
    assert not g.is_contiguous()
    got = torch.autograd.grad(out, leaves, g, retain_graph=True)
    want = torch.autograd.grad(out, leaves, g.contiguous())
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_parametrized_weights():
    """Parametrizations (here weight normalisation of weight2) replace a parameter by a computed attribute; the
    layer still reads it and the result equals the layer holding the computed weight as a plain parameter."""
    torch.manual_seed(0)
    layer = clfast.nn.DANLayer(2, 6, 5, 3, act_fn=nn.ReLU())
    plain = copy.deepcopy(layer)
    nn.utils.parametrizations.weight_norm(layer, "weight2")
    with torch.no_grad():
        plain.weight2.copy_(layer.weight2)
    x = torch.randn(8, 6)
    torch.testing.assert_close(layer(x), plain(x))
    layer(x).sum().backward()
    assert layer.parametrizations.weight2.original0.grad is not None


@needs_native
def test_double_backward_is_refused():
    params, stats = _layer_tensors(2, 3, 4, 2, torch.float64, "cpu", 3)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    out = _ops.dan_layer(x, params, stats, True, 0.1, 1e-5, "tanh")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.square().sum(), x, create_graph=True)


@needs_native
def test_input_modified_after_forward_is_fine_in_train_mode():
    params, stats = _layer_tensors(2, 3, 4, 2, torch.float32, "cpu", 3)
    x = torch.randn(5, 3)
    out = _ops.dan_layer(x, params, stats, True, 0.1, 1e-5, "tanh")
    x.add_(1.0)  # the backward reads its own normalised copy
    out.sum().backward()
    assert params[2].grad is not None and torch.isfinite(params[2].grad).all()


@pytest.mark.parametrize("device", device_params())
def test_device_moves(device):
    ref, fast = _seed_and_fast(nn.GELU())
    ref, fast = ref.to(device), fast.to(device)
    x = torch.randn(8, 12, device=device)
    torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-5)
    if device == "cuda":
        with pytest.raises(ValueError, match="is on cpu but the layer is on cuda"):
            fast(x.cpu())


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_torch_compile(device):
    ref, fast = _seed_and_fast(nn.Tanh())
    fast = fast.to(device)
    eager = copy.deepcopy(fast)
    compiled = torch.compile(fast, fullgraph=True)
    x = torch.randn(16, 12, device=device)
    out_c, out_e = compiled(x), eager(x)
    torch.testing.assert_close(out_c, out_e)
    out_c.square().sum().backward()
    out_e.square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), eager.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for a, b in zip(fast.buffers(), eager.buffers()):
        torch.testing.assert_close(a, b)


def test_shared_phenotype_layer(backend):
    layer = clfast.nn.DANLayer(4, 3, 5, 2, shared=True)
    assert layer.weight1.shape == (1, 5, 3)
    x = torch.randn(4, 10, 3)  # one input per neuron
    layer(x).sum().backward()
    expanded = clfast.nn.DANLayer(4, 3, 5, 2)
    with torch.no_grad():
        for k in PARAMS:
            getattr(expanded, k).copy_(getattr(layer, k).expand_as(getattr(expanded, k)))
    expanded(x).sum().backward()
    for k in PARAMS:  # the shared parameters' gradient is the sum over neurons
        torch.testing.assert_close(getattr(layer, k).grad[0], getattr(expanded, k).grad.sum(0), rtol=1e-4, atol=1e-5)
    for k in STATS:
        torch.testing.assert_close(getattr(layer, k), getattr(expanded, k))
    ref = layer.to_reference()  # the phenotype is copied into every per-neuron neuron
    assert torch.equal(ref.neurons[3].core[1].weight, layer.weight1[0])


def test_vecdan_trains_only_synapses_when_frozen(backend):
    torch.manual_seed(0)
    net = clfast.nn.VECDAN(1, 1, neurons=(3, 2), n_channels=2, n_nf=8, n_nout=2)
    x, y = torch.randn(32, 1), torch.randn(32, 1)
    net.freeze_phenotype()
    before = [p.clone() for p in net.phenotype_parameters()]
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], 0.1)
    loss0 = nn.functional.mse_loss(net(x), y)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, net.phenotype_parameters()))
    assert nn.functional.mse_loss(net(x), y) < loss0
    assert {id(p) for p in net.synapse_parameters()}.isdisjoint(id(p) for p in net.phenotype_parameters())


@needs_native
def test_vecdan_native_matches_reference():
    torch.manual_seed(0)
    net = clfast.nn.VECDAN(3, 2, neurons=(4, 3), n_channels=3, n_nf=6, n_nout=2, act_fn=nn.ReLU())
    twin = copy.deepcopy(net)
    x = torch.randn(20, 3)
    out = net(x)
    out.sum().backward()
    before = clfast.backend()
    clfast.set_backend("reference")
    try:
        out_r = twin(x)
        out_r.sum().backward()
    finally:
        clfast.set_backend(before)
    torch.testing.assert_close(out, out_r, rtol=1e-4, atol=1e-5)
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


def test_conversions_are_exact_and_leave_the_rng_alone():
    torch.manual_seed(3)
    ref = seed.DAN(12, 3).double()
    with torch.no_grad():
        for t in ref.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))  # float64 values that float32 cannot hold
    state = torch.random.get_rng_state()
    fast = clfast.nn.DAN.from_reference(ref)
    back = fast.to_reference()
    neuron = clfast.nn.Neuron.from_reference(ref.dan3.neurons[0])
    neuron_back = neuron.to_reference()
    assert torch.equal(state, torch.random.get_rng_state())
    assert fast.dan1.weight1.dtype == torch.float64
    for k, v in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    for k, v in ref.dan3.neurons[0].state_dict().items():
        assert torch.equal(neuron_back.state_dict()[k], v), k
    assert isinstance(neuron, clfast.nn.Neuron) and isinstance(neuron_back, seed.Neuron)
    x = torch.randn(7, 50, dtype=torch.float64)
    torch.testing.assert_close(neuron(x), ref.dan3.neurons[0](x))


def test_activation_with_parameters_and_non_elementwise_activation():
    """PReLU (a parameter, shared by every neuron and layer as in the per-neuron modules) and Softmax(dim=1) run on
    the reference path and match the per-neuron modules, gradients of the activation's parameter included."""
    for act in (nn.PReLU(), nn.Softmax(dim=1)):
        ref, fast = _seed_and_fast(act)
        assert fast.dan1.act_fn is fast.dan3.act_fn and fast.dan1.act_fn is not ref.dan1.neurons[0].core[2]
        x = torch.randn(10, 12)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fast(x)
        out_ref = ref(x)
        torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
        out.sum().backward()
        out_ref.sum().backward()
        if isinstance(act, nn.PReLU):
            torch.testing.assert_close(fast.dan1.act_fn.weight.grad, ref.dan1.neurons[0].core[2].weight.grad,
                                       rtol=1e-4, atol=1e-5)
        _compare_modules(fast, ref)


def test_seed_settings_clfast_cannot_hold_are_refused():
    ref = seed.DANLayer(2, 4, 3, 2)
    ref.neurons[1].core[3].momentum = 0.5
    with pytest.raises(ValueError, match="share one momentum and eps"):
        clfast.nn.DANLayer.from_reference(ref)
    shared = clfast.nn.DANLayer(2, 4, 3, 2, shared=True)
    with pytest.raises(RuntimeError, match="neurons differ"):
        shared.load_state_dict(seed.DANLayer(2, 4, 3, 2).state_dict())


def test_train_mode_refuses_empty_batches(backend):
    layer = clfast.nn.DANLayer(3, 4, 5, 2)
    with pytest.raises(ValueError, match="empty batch"):
        layer(torch.randn(0, 4))
    assert int(layer.bn1_num_batches_tracked[0]) == 0


def test_failures_on_the_reference_path_change_nothing():
    class Boom(nn.Module):
        def forward(self, h):
            raise RuntimeError("boom")

    layer = clfast.nn.DANLayer(2, 4, 3, 2, act_fn=Boom())
    state = copy.deepcopy(layer.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="boom"):
            layer(torch.randn(6, 4))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    half = clfast.nn.DANLayer(2, 4, 3, 2).to(torch.bfloat16)
    with pytest.raises(TypeError, match="float32 or float64"):
        half(torch.randn(6, 4, dtype=torch.bfloat16))


def test_per_neuron_parameter_count():
    assert sum(p.numel() for p in clfast.nn.DAN(100, 1, act=nn.ReLU()).parameters()) == 78901


def test_vecdan_state_dict_and_parameter_split():
    torch.manual_seed(0)
    net = clfast.nn.VECDAN(2, 1, neurons=(3, 2), n_channels=2, n_nf=4, n_nout=2, act_fn=nn.PReLU())
    split = [id(p) for p in net.phenotype_parameters()] + [id(p) for p in net.synapse_parameters()]
    assert sorted(split) == sorted(id(p) for p in net.parameters())  # every parameter, once
    net(torch.randn(8, 2))  # move the running statistics
    twin = clfast.nn.VECDAN(2, 1, neurons=(3, 2), n_channels=2, n_nf=4, n_nout=2, act_fn=nn.PReLU())
    twin.load_state_dict(net.state_dict())
    net.eval()
    twin.eval()
    x = torch.randn(5, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(twin(x), net(x))
    with pytest.raises(ValueError, match=r"expected an input \[batch, 2\]"):
        net(torch.randn(5, 3))
    with pytest.raises(TypeError, match="float32"):
        net(torch.randn(5, 2, dtype=torch.float64))
    net.train()
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        net(torch.randn(1, 2))


def _torch_exports_blas(name: str) -> bool:
    """Whether the loaded libtorch_cpu (where the CPU kernels look, csrc/common/blas.h) exports BLAS ``name``."""
    import ctypes

    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libtorch_cpu" in line.split()[-1]}
    return any(hasattr(ctypes.CDLL(path), name) for path in paths)


@needs_native
@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_neuron", [False, True], ids=["shared_input", "per_neuron_input"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_gemms_skip_aten_where_blas_is_reachable(dtype, per_neuron, training):
    """The CPU layer calls BLAS itself (csrc/common/blas.h) when libtorch exports it, and ATen's GEMMs when not, or
    when CLFAST_DIRECT_BLAS=0 (test_cpu_aten_gemm_path runs the parity tests that way)."""
    params, stats = _layer_tensors(3, 7, 5, 4, dtype, "cpu", 1)
    x = torch.randn((3, 9, 7) if per_neuron else (9, 7), dtype=dtype, requires_grad=True)
    with torch.profiler.profile() as prof:
        _run("native", x, params, stats, training, "tanh")
    gemms = sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    blas = "sgemm_" if dtype == torch.float32 else "dgemm_"
    if os.environ.get("CLFAST_DIRECT_BLAS") == "0" or not _torch_exports_blas(blas):
        assert gemms > 0
    else:
        assert gemms == 0


@needs_native
def test_cpu_aten_gemm_path():
    """With the direct BLAS calls off, the CPU kernels' ATen GEMM path passes the same parity tests."""
    import subprocess
    import sys

    env = dict(os.environ, CLFAST_DIRECT_BLAS="0")
    selected = ("(op_matches_reference and cpu) or without_biases_and_wide_layer or gradcheck or "
                "non_contiguous_output_gradient or skip_aten or dan_training_matches_seed")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", selected],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and " failed" not in run.stdout


# ---- sync_batchnorm: the BatchNorms of DAN layers on the global batch under torch.distributed ----

needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _sync_batch(rank, step):
    """Rank ``rank``'s examples at ``step``: 12, except rank 1's at every 5th step (7, or 20 at every 10th)."""
    size = 12 if rank == 0 or step % 5 else (20 if step % 10 == 0 else 7)
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = 1 + 2 * torch.randn(size, 20, generator=g, dtype=torch.float64)
    return x, (x[:, 0] > 1).long() + (x[:, 1] > 1.5).long()


def _sync_dan(rank, option):
    """``option`` = (sync_batchnorm, steps): a float64 DAN trained by DDP (rank) or by one process on the ranks'
    batches concatenated (rank None), with the same gradient: the mean over ranks of each rank's mean loss."""
    sync, steps = option
    torch.manual_seed(0)
    model = clfast.nn.DAN(20, 3, sync_batchnorm=sync).double()
    # broadcast_buffers=False: DDP's own copy of rank 0's buffers would hide running statistics that differ
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) if rank is not None else model
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        parts = [_sync_batch(r, step) for r in (range(WORLD) if rank is None else [rank])]
        out = ddp(torch.cat([x for x, _ in parts]))
        loss = sum(nn.functional.cross_entropy(o, y) for o, (_, y) in
                   zip(out.split([len(y) for _, y in parts]), parts)) / len(parts)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


@needs_gloo
def test_sync_batchnorm_ranks_stay_identical_and_equal_one_process_on_the_global_batch(tmp_path):
    ranks = spawn(tmp_path, _sync_dan, (True, 200))
    assert bitwise_equal(ranks[0], ranks[1])  # parameters and every buffer, num_batches_tracked included
    single = _sync_dan(None, (False, 200))
    assert list(single) == list(ranks[0])
    for name, expected in single.items():
        torch.testing.assert_close(ranks[0][name], expected, rtol=1e-9, atol=1e-12, msg=name)
    assert int(single["dan1.bn1_num_batches_tracked"][0]) == 200


@needs_gloo
def test_without_sync_batchnorm_the_ranks_running_statistics_differ(tmp_path):
    ranks = spawn(tmp_path, _sync_dan, (False, 10))
    stats = [k for k in ranks[0] if "running" in k]
    assert len(stats) == 12
    assert all(not torch.equal(ranks[0][k], ranks[1][k]) for k in stats)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if k not in stats)  # DDP's parameters


def _sync_models(sync):
    """A float64 VECDAN (a shared phenotype, one input per neuron) and a DANLayer with a cumulative average
    (momentum=None) and PReLU, both on the reference path when not synchronised."""
    torch.manual_seed(5)
    vec = clfast.nn.VECDAN(3, 2, neurons=(4, 3), n_channels=3, n_nf=6, n_nout=2, sync_batchnorm=sync).double()
    layer = clfast.nn.DANLayer(3, 4, 5, 2, act_fn=nn.PReLU(), momentum=None, sync_batchnorm=sync).double()
    return vec, layer


# Per call: (model index, each rank's batch size): ranks of 1 and 0 examples among them.
_SYNC_CALLS = [(0, (7, 1)), (0, (4, 6)), (1, (5, 3)), (1, (4, 0))]


def _sync_inputs(call, rank):
    """The model, input ([B, 3] for the VECDAN, [3, B, 4] for the layer) and output weights of ``call`` on
    ``rank``."""
    model, sizes = _SYNC_CALLS[call]
    g = torch.Generator().manual_seed(100 * call + rank)
    b = sizes[rank]
    x = torch.randn(*((b, 3) if model == 0 else (3, b, 4)), generator=g, dtype=torch.float64)
    return model, x, torch.randn(b, 2 if model == 0 else 6, generator=g, dtype=torch.float64)


def _sync_forward_backward(rank, _):
    """One rank's share of the calls in _SYNC_CALLS (loss: the output weighted by ``w``, summed), after a call
    whose whole group has a single example."""
    models = _sync_models(True)
    try:
        models[1](torch.randn(3, 1 - rank, 4, dtype=torch.float64))
        error = None
    except ValueError as e:
        error = str(e)
    outs = []
    for call in range(len(_SYNC_CALLS)):
        model, x, w = _sync_inputs(call, rank)
        out = models[model](x)
        (out * w).sum().backward()
        outs.append(out.detach())
    return {"error": error, "outs": outs, "grads": [[p.grad for p in m.parameters()] for m in models],
            "buffers": [list(m.buffers()) for m in models]}


@needs_gloo
def test_sync_batchnorm_forward_backward_equals_the_global_batch(tmp_path):
    """VECDAN (shared phenotype) and a DANLayer with one input per neuron, momentum=None and PReLU: each rank's
    outputs are its rows of one process's on the concatenated batch, the ranks' gradients add up to its
    gradients, and every rank's running statistics are its own, with ranks of 1 and 0 examples."""
    ranks = spawn(tmp_path, _sync_forward_backward)
    for r in ranks:
        assert "expected more than 1 value per channel when training, got 1 in the whole process group" in r["error"]
    assert bitwise_equal(ranks[0]["buffers"], ranks[1]["buffers"])
    models = _sync_models(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # momentum=None and PReLU run on the reference
        for call in range(len(_SYNC_CALLS)):
            parts = [_sync_inputs(call, r) for r in range(WORLD)]
            dim = parts[0][1].dim() - 2
            out = models[parts[0][0]](torch.cat([x for _, x, _ in parts], dim))
            (out * torch.cat([w for _, _, w in parts])).sum().backward()
            torch.testing.assert_close(torch.cat([r["outs"][call] for r in ranks]), out.detach(), rtol=1e-9,
                                       atol=1e-12)
    for m, model in enumerate(models):
        for i, p in enumerate(model.parameters()):
            torch.testing.assert_close(ranks[0]["grads"][m][i] + ranks[1]["grads"][m][i], p.grad, rtol=1e-9,
                                       atol=1e-12)
        for got, expected in zip(ranks[0]["buffers"][m], model.buffers()):
            torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_sync_batchnorm_without_a_process_group_is_the_fused_path(backend):
    """Without a process group sync_batchnorm=True changes nothing: the same outputs, gradients and buffers,
    bitwise (train and eval)."""
    assert not dist.is_available() or not dist.is_initialized()
    pairs = []
    for sync in (False, True):
        torch.manual_seed(0)
        pairs.append([clfast.nn.DAN(12, 3, sync_batchnorm=sync),
                      clfast.nn.VECDAN(3, 2, neurons=(3, 2), n_channels=2, n_nf=5, sync_batchnorm=sync)])
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        xs = [torch.randn(9, 12, generator=g), torch.randn(9, 3, generator=g)]
        results = []
        for models in pairs:
            outs = []
            for m, x in zip(models, xs):
                m.train(step < 2)
                out = m(x)
                out.square().sum().backward()
                outs.append(out.detach())
            results.append([outs, [[p.grad for p in m.parameters()] for m in models],
                            [m.state_dict() for m in models]])
        assert bitwise_equal(results[0], results[1])


def test_sync_batchnorm_option():
    assert "sync_batchnorm=True" in repr(clfast.nn.DAN(4, 2, sync_batchnorm=True).dan2)
    assert "sync_batchnorm" not in repr(clfast.nn.DAN(4, 2))
    assert "sync_batchnorm=True" in repr(clfast.nn.VECDAN(2, 1, sync_batchnorm=True))
    assert clfast.nn.Neuron(3, 4, 2, sync_batchnorm=True).sync_batchnorm
    for make in (lambda s: clfast.nn.DANLayer(2, 3, 4, 2, sync_batchnorm=s),
                 lambda s: clfast.nn.DAN(4, 2, sync_batchnorm=s), lambda s: clfast.nn.VECDAN(2, 1, sync_batchnorm=s)):
        with pytest.raises(ValueError, match="sync_batchnorm must be True or False, got 'yes'"):
            make("yes")
        with pytest.raises(ValueError, match="got None"):
            make(None)
