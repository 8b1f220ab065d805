"""SI: native ops vs the pure-torch references, hypnettorch parity, state dicts, bad input, opcheck."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast import ops, reference
from clfast import si as csi
from clfast.baselines import si_hypnettorch as seed

from clfast_testing import device_params, needs_native

SHAPES = {
    "mixed": [(7, 5), (13,), (3, 4, 5), (1,)],
    "empty": [(0,), (4, 0), (6,)],
    "tiny": [(1,)],
    "chunk_edges": [(32768,), (32769,), (16383,), (16385, 1)],
    "many": [(i % 5 + 1, 3) for i in range(75)],  # more tensors than one CUDA launch holds
    "large": [(1 << 20) + 3, (2000, 600)],
    "spans_launches": [(3,), (5 * (1 << 20) + 70_000,), (5,)],  # one tensor over a CUDA launch's 320 x 16384
}


def _rand(shapes, device, dtype, seed_=0, positive=False, noncontig=False):
    g = torch.Generator().manual_seed(seed_)
    out = []
    for s in shapes:
        s = (s,) if isinstance(s, int) else s
        t = torch.rand(s, generator=g, dtype=dtype) if positive else torch.randn(s, generator=g, dtype=dtype)
        if noncontig and t.dim() >= 2:
            t = t.transpose(0, 1).contiguous().transpose(0, 1)  # same values, transposed strides
        out.append(t.to(device))
    return out


def _clone(ts):
    return [t.clone() for t in ts]


def _close(a, b, dtype):
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, **tol)


def _native(name):
    return getattr(torch.ops.clfast, name)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(SHAPES))
@pytest.mark.parametrize("noncontig", [False, True])
def test_si_ops_match_reference(device, dtype, case, noncontig):
    if case in ("large", "spans_launches") and (dtype == torch.float64 or noncontig):
        pytest.skip("one large case is enough")
    shapes = SHAPES[case]
    params = _rand(shapes, device, dtype, 1, noncontig=noncontig)
    pre = _rand(shapes, device, dtype, 2)
    grads = _rand(shapes, device, dtype, 3, noncontig=noncontig)
    omega = _rand(shapes, device, dtype, 4)
    prev = _rand(shapes, device, dtype, 5)
    imp = _rand(shapes, device, dtype, 6, positive=True, noncontig=noncontig)

    for is_delta in (False, True):
        a, b = _clone(omega), _clone(omega)
        _native("si_accumulate_")(a, params, pre, grads, is_delta)
        reference.si_accumulate_(b, params, pre, grads, is_delta)
        _close(a, b, dtype)
        assert not torch.equal(torch.cat([x.flatten() for x in a]).cpu(), torch.cat([x.flatten() for x in omega]).cpu()) or sum(x.numel() for x in a) == 0

    na, ra = [_clone(imp), _clone(prev), _clone(omega)], [_clone(imp), _clone(prev), _clone(omega)]
    _native("si_consolidate_")(*na, params, 1e-3)
    reference.si_consolidate_(*ra, params, 1e-3)
    for x, y in zip(na, ra):
        _close(x, y, dtype)
    _close(na[1], params, dtype)  # prev = params
    assert all(float(o.abs().sum()) == 0 for o in na[2])  # omega reset

    torch.testing.assert_close(_native("si_penalty")(imp, prev, params),
                               reference.si_penalty(imp, prev, params).to(dtype),
                               rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-5)

    for scale in (0.5, -3.0):
        a, b = _clone(grads), _clone(grads)
        _native("si_penalty_grad_")(a, imp, prev, params, scale)
        reference.si_penalty_grad_(b, imp, prev, params, scale)
        _close(a, b, dtype)
    assert a[0].stride() == grads[0].stride()  # written back into the caller's (possibly strided) tensors


@needs_native
@pytest.mark.parametrize("device", device_params())
def test_si_penalty_autograd_matches_reference(device):
    shapes = SHAPES["mixed"]
    imp, prev = _rand(shapes, device, torch.float32, 1, positive=True), _rand(shapes, device, torch.float32, 2)
    x = [p.requires_grad_() for p in _rand(shapes, device, torch.float32, 3)]
    y = [p.detach().clone().requires_grad_() for p in x]
    (3.0 * _native("si_penalty")(imp, prev, x)).backward()
    (3.0 * reference.si_penalty(imp, prev, y)).backward()
    _close([p.grad for p in x], [p.grad for p in y], torch.float32)


@needs_native
def test_si_penalty_gradcheck_float64():
    shapes = [(3, 2), (4,)]
    imp, prev = _rand(shapes, "cpu", torch.float64, 1, positive=True), _rand(shapes, "cpu", torch.float64, 2)
    params = [p.requires_grad_() for p in _rand(shapes, "cpu", torch.float64, 3)]
    assert torch.autograd.gradcheck(lambda *ps: _native("si_penalty")(imp, prev, list(ps)), params)


@needs_native
def test_opcheck_every_op():
    shapes = [(5, 3), (4,)]
    p, r, g = (_rand(shapes, "cpu", torch.float32, s) for s in (1, 2, 3))
    o, imp, prev = _rand(shapes, "cpu", torch.float32, 4), _rand(shapes, "cpu", torch.float32, 5, True), \
        _rand(shapes, "cpu", torch.float32, 6)
    m, v = _rand(shapes, "cpu", torch.float32, 7), _rand(shapes, "cpu", torch.float32, 8, True)
    x = [t.clone().requires_grad_() for t in p]
    cases = [
        ("si_accumulate_", (o, p, r, g, False)),
        ("si_consolidate_", (imp, prev, o, p, 1e-3)),
        ("si_penalty", (imp, prev, x)),
        ("si_penalty_backward", (torch.tensor(2.0), imp, prev, p)),
        ("si_penalty_grad_", (g, imp, prev, p, 0.5)),
        ("sgd_si_step_", (p, g, m, o, 0.1, 0.9, 0.0, 1e-4, False, False)),
        ("adam_si_step_", (p, g, m, v, o, 1e-3, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001)),
    ]
    for name, args in cases:
        torch.library.opcheck(_native(name), args)


# ---- hypnettorch parity over a real multi-task training run ------------------------------------------------


def _mlp(seed_=0):
    torch.manual_seed(seed_)
    net = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    net[2].bias.requires_grad_(False)  # a frozen parameter is skipped but keeps its index
    return net


def _tasks(n_tasks=3, n=96, seed_=0):
    g = torch.Generator().manual_seed(seed_)
    out = []
    for t in range(n_tasks):
        x = torch.randn(n, 20, generator=g) + t
        w = torch.randn(20, 4, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def _train(net, api, tasks, strength=0.5, delta=False, steps=12):
    """hypnettorch's usage: pre / step / post each batch, importance after each task, regulariser after."""
    params = list(net.parameters())
    opt = torch.optim.SGD([p for p in params if p.requires_grad], lr=0.05, momentum=0.9)
    for t, (x, y) in enumerate(tasks):
        for s in range(steps):
            xb, yb = x[s * 8:(s + 1) * 8], y[s * 8:(s + 1) * 8]
            opt.zero_grad()
            loss = F.cross_entropy(net(xb), yb)
            if t > 0:
                loss = loss + strength * api.si_regularizer(net, params)
            loss.backward()
            api.si_pre_optim_step(net, params, no_pre_step_ckpt=delta)
            if delta:
                before = [p.detach().clone() for p in params]
                opt.step()
                api.si_post_optim_step(net, params, delta_params=[p.detach() - b for p, b in zip(params, before)])
            else:
                opt.step()
                api.si_post_optim_step(net, params)
        api.si_compute_importance(net, params, epsilon=1e-3)
    return net


@pytest.mark.parametrize("delta", [False, True])
def test_functional_api_matches_hypnettorch(backend, delta):
    tasks = _tasks()
    ours, theirs = _train(_mlp(), csi, tasks, delta=delta), _train(_mlp(), seed, tasks, delta=delta)
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert sorted(sd_ours) == sorted(sd_theirs)
    assert any(k.startswith("si_omega_weights_") for k in sd_ours) and "si_omega_weights_3" not in sd_ours
    for k in sd_theirs:
        torch.testing.assert_close(sd_ours[k], sd_theirs[k], rtol=1e-4, atol=1e-6, msg=k)
    assert float(sd_ours["si_omega_weights_0"].sum()) > 0
    params = list(ours.parameters())
    torch.testing.assert_close(csi.si_regularizer(ours, params),
                               seed.si_regularizer(theirs, list(theirs.parameters())), rtol=1e-4, atol=1e-7)


def test_state_dict_moves_between_seed_and_clfast(backend):
    tasks = _tasks(2)
    trained = _train(_mlp(), seed, tasks)
    # A module set up by clfast's functions loads the state trained with hypnettorch's, and vice versa.
    target = _train(_mlp(1), csi, tasks[:1])
    target.load_state_dict(trained.state_dict())
    params = list(target.parameters())
    torch.testing.assert_close(csi.si_regularizer(target, params),
                               seed.si_regularizer(trained, list(trained.parameters())))
    back = _train(_mlp(2), seed, tasks[:1])
    back.load_state_dict(target.state_dict())
    # The SI class reads a module's state_dict and writes the same names.
    si = clfast.SI(_mlp(0))
    si.load_state_dict(trained.state_dict())
    for k, v in si.state_dict().items():
        if k in trained.state_dict():
            torch.testing.assert_close(v, trained.state_dict()[k])


def test_si_class_matches_functional(backend):
    tasks = _tasks()
    reference_net = _train(_mlp(), seed, tasks)
    net = _mlp()
    si = clfast.SI(net, strength=0.5)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for t, (x, y) in enumerate(tasks):
        for s in range(12):
            opt.zero_grad()
            loss = F.cross_entropy(net(x[s * 8:(s + 1) * 8]), y[s * 8:(s + 1) * 8]) + si.penalty()
            loss.backward()
            si.before_step()
            opt.step()
            si.after_step()
        si.consolidate()
    expected = reference_net.state_dict()
    for k, v in si.state_dict().items():
        if k.startswith("si_running_omega"):
            assert float(v.abs().sum()) == 0
        else:
            torch.testing.assert_close(v, expected[k], rtol=1e-4, atol=1e-6, msg=k)


def test_add_penalty_grad_equals_autograd(backend):
    net = _mlp()
    si = clfast.SI(net, strength=0.7)
    with torch.no_grad():
        for imp, p in zip(si.importance, si.params):
            imp.copy_(torch.rand_like(imp))
            p.add_(torch.randn_like(p) * 0.1)
    x, y = _tasks(1)[0]
    F.cross_entropy(net(x), y).backward()
    si.add_penalty_grad()
    fused = [p.grad.clone() for p in si.params]
    net.zero_grad()
    (F.cross_entropy(net(x), y) + si.penalty()).backward()
    _close(fused, [p.grad for p in si.params], torch.float32)


# ---- bad input: clear errors, state untouched ---------------------------------------------------------------


def test_seed_errors_are_kept(backend):
    net = _mlp()
    params = list(net.parameters())
    with pytest.raises(ValueError, match="si_pre_optim_step"):
        csi.si_compute_importance(net, params)
    with pytest.raises(ValueError, match="si_compute_importance"):
        csi.si_regularizer(net, params)
    csi.si_pre_optim_step(net, params)
    with pytest.raises(ValueError, match="gradients wrt the loss"):
        csi.si_post_optim_step(net, params)
    x, y = _tasks(1)[0]
    F.cross_entropy(net(x), y).backward()
    csi.si_post_optim_step(net, params)
    with pytest.raises(ValueError, match='"si_pre_optim_step" has been called or "delta_params"'):
        csi.si_post_optim_step(net, params)


@pytest.mark.parametrize("bad", ["shape", "dtype", "count"])
def test_op_rejects_mismatched_state_and_leaves_it_untouched(backend, bad):
    params = _rand(SHAPES["mixed"], "cpu", torch.float32, 1)
    omega = _rand(SHAPES["mixed"], "cpu", torch.float32, 2)
    before = _clone(omega)
    ref, grads = _clone(params), _rand(SHAPES["mixed"], "cpu", torch.float32, 3)
    if bad == "shape":
        grads[2] = grads[2].reshape(-1)
        msg = r"grads\[2\] has shape \[60\] but params\[2\] has shape \[3, 4, 5\]"
    elif bad == "dtype":
        omega[1] = omega[1].half()
        before[1] = omega[1].clone()
        msg = r"omega\[1\] must be float32 or float64, got (Half|torch.float16)"
    else:
        ref = ref[:-1]
        msg = "'ref' has 3 tensors but 'params' has 4"
    with pytest.raises(RuntimeError, match=msg):
        ops.si_accumulate_(omega, params, ref, grads)
    for o, b in zip(omega, before):
        assert torch.equal(o, b)


def test_float16_params_rejected_clearly(backend):
    net = _mlp().half()
    params = list(net.parameters())
    csi.si_pre_optim_step(net, params)
    for p in params:
        p.grad = torch.ones_like(p)
    with pytest.raises(RuntimeError, match="must be float32 or float64"):
        csi.si_post_optim_step(net, params)


def test_consolidate_rejects_nan_and_keeps_state(backend):
    net = _mlp()
    si = clfast.SI(net)
    x, y = _tasks(1)[0]
    F.cross_entropy(net(x), y).backward()
    si.before_step()
    with torch.no_grad():
        for p in si.params:
            p.sub_(0.01 * p.grad)
    si.after_step()
    snapshot = {k: v.clone() for k, v in si.state_dict().items()}
    si.omega[1][0] = float("nan")
    snapshot["si_running_omega_weights_1"][0] = float("nan")
    with pytest.raises(ValueError, match=r"omega\[1\] contains NaN"):
        si.consolidate()
    for k, v in si.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], equal_nan=True)


def test_si_class_input_errors():
    with pytest.raises(TypeError, match="single tensor"):
        clfast.SI(torch.zeros(3, requires_grad=True))
    with pytest.raises(ValueError, match="requires grad"):
        clfast.SI([torch.zeros(3)])
    with pytest.raises(ValueError, match="epsilon"):
        clfast.SI(_mlp(), epsilon=0.0)
    si = clfast.SI(_mlp())
    with pytest.raises(ValueError, match="needs a .grad"):
        si.after_step()
    for p in si.params:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match="before_step"):
        si.after_step()
    sd = si.state_dict()
    before = copy.deepcopy(sd)
    bad = dict(sd, si_prev_theta_weights_0=torch.zeros(2, 2))
    with pytest.raises(ValueError, match="si_prev_theta_weights_0"):
        si.load_state_dict({k: v + 1 for k, v in bad.items()})
    for k, v in si.state_dict().items():
        assert torch.equal(v, before[k])


def test_empty_and_frozen_params():
    net = nn.Linear(3, 2)
    for p in net.parameters():
        p.requires_grad_(False)
    params = list(net.parameters())
    csi.si_pre_optim_step(net, params)
    csi.si_post_optim_step(net, params)
    csi.si_compute_importance(net, params)
    assert csi.si_regularizer(net, params) == 0.0
    assert len(net.state_dict()) == 2


# ---- backend selection ----------------------------------------------------------------------------------------


def test_set_backend_validates():
    with pytest.raises(ValueError, match="backend must be one of"):
        clfast.set_backend("fast")
    assert clfast.backend() in ("native", "reference")


def test_fallback_warns_once_and_env_forces_reference(tmp_path):
    import subprocess
    import sys

    block = ("import sys\nclass B:\n    def find_spec(self, name, *a):\n"
             "        if name == 'clfast._C': raise ImportError('blocked for the test')\n"
             "sys.meta_path.insert(0, B())\n")
    code = block + ("import warnings\nwarnings.simplefilter('always')\n"
                    "with warnings.catch_warnings(record=True) as w:\n"
                    "    import clfast, clfast.si, clfast.optim\n"
                    "print(clfast.backend(), len(w), 'blocked for the test' in str(w[0].message))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["reference", "1", "True"]
    env = dict(__import__("os").environ, CLFAST_BACKEND="reference")
    code = "import warnings\nwarnings.simplefilter('error')\nimport clfast\nprint(clfast.backend())\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "reference"
