"""Fused SGD / Adam + SI steps: parameters equal torch.optim's, importances equal hypnettorch's around a
torch step, on both backends; native kernels equal the references."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast import reference
from clfast.baselines import si_hypnettorch as seed

from clfast_testing import device_params, needs_native
from test_si import SHAPES, _clone, _close, _mlp, _rand, _tasks

SGD_CONFIGS = [dict(), dict(momentum=0.9), dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
               dict(momentum=0.5, dampening=0.3, weight_decay=1e-2)]
ADAM_CONFIGS = [dict(), dict(betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-2), dict(betas=(0.3, 0.9))]


def _run(opt_factory, with_si, tasks, device="cpu"):
    """Trains on the tasks; with_si: 'seed' = hypnettorch functions around the step, 'fused' = clfast.SI
    inside the optimizer. Returns (params, importances)."""
    net = _mlp().to(device)
    params = list(net.parameters())
    si = clfast.SI(net) if with_si == "fused" else None
    opt = opt_factory([p for p in params if p.requires_grad], si)
    for x, y in tasks:
        x, y = x.to(device), y.to(device)
        for s in range(10):
            opt.zero_grad()
            F.cross_entropy(net(x[s * 8:(s + 1) * 8]), y[s * 8:(s + 1) * 8]).backward()
            if with_si == "seed":
                seed.si_pre_optim_step(net, params)
            opt.step()
            if with_si == "seed":
                seed.si_post_optim_step(net, params)
        if with_si == "seed":
            seed.si_compute_importance(net, params)
        elif with_si == "fused":
            si.consolidate()
    if with_si == "seed":
        imp = [getattr(net, seed.si_buffer_names(i)[0]) for i, p in enumerate(params) if p.requires_grad]
    else:
        imp = si.importance if si is not None else []
    return [p.detach() for p in params], imp


@pytest.mark.parametrize("config", SGD_CONFIGS, ids=str)
def test_sgd_matches_torch_and_seed_si(backend, config):
    tasks = _tasks(2)
    torch_p, seed_imp = _run(lambda ps, si: torch.optim.SGD(ps, lr=0.05, **config), "seed", tasks)
    ours_p, _ = _run(lambda ps, si: clfast.optim.SGD(ps, lr=0.05, **config), None, tasks)
    fused_p, fused_imp = _run(lambda ps, si: clfast.optim.SGD(ps, lr=0.05, si=si, **config), "fused", tasks)
    _close(ours_p, torch_p, torch.float32)
    _close(fused_p, torch_p, torch.float32)
    for a, b in zip(fused_imp, seed_imp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert sum(float(i.sum()) for i in fused_imp) > 0


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_matches_torch_and_seed_si(backend, config):
    tasks = _tasks(2)
    torch_p, seed_imp = _run(lambda ps, si: torch.optim.Adam(ps, lr=1e-2, **config), "seed", tasks)
    fused_p, fused_imp = _run(lambda ps, si: clfast.optim.Adam(ps, lr=1e-2, si=si, **config), "fused", tasks)
    _close(fused_p, torch_p, torch.float32)
    for a, b in zip(fused_imp, seed_imp):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["mixed", "empty", "chunk_edges", "many", "large"])
def test_fused_steps_match_reference(device, dtype, case):
    shapes = SHAPES[case]
    p, g, buf, om = (_rand(shapes, device, dtype, s, noncontig=(s == 1)) for s in (1, 2, 3, 4))
    for init in (True, False):
        for with_si in (True, False):
            a, b = [_clone(p), _clone(buf), _clone(om)], [_clone(p), _clone(buf), _clone(om)]
            args = (0.1, 0.9, 0.1, 1e-2, False, init)
            torch.ops.clfast.sgd_si_step_(a[0], g, a[1], a[2] if with_si else [], *args)
            reference.sgd_si_step_(b[0], g, b[1], b[2] if with_si else [], *args)
            for x, y in zip(a, b):
                _close(x, y, dtype)
    m, v = _rand(shapes, device, dtype, 5), _rand(shapes, device, dtype, 6, positive=True)
    a, b = [_clone(p), _clone(m), _clone(v), _clone(om)], [_clone(p), _clone(m), _clone(v), _clone(om)]
    args = (1e-3, 0.9, 0.999, 1e-8, 1e-2, 1 - 0.9 ** 3, 1 - 0.999 ** 3)
    torch.ops.clfast.adam_si_step_(a[0], g, *a[1:], *args)
    reference.adam_si_step_(b[0], g, *b[1:], *args)
    for x, y in zip(a, b):
        _close(x, y, dtype)


def test_state_moves_between_torch_and_clfast_optimizers(backend):
    tasks = _tasks(1)
    for ours_cls, torch_cls, kw in [(clfast.optim.Adam, torch.optim.Adam, {}),
                                    (clfast.optim.SGD, torch.optim.SGD, dict(momentum=0.9))]:
        nets = [_mlp(), _mlp()]
        opts = [torch_cls(nets[0].parameters(), lr=1e-2, **kw), ours_cls(nets[1].parameters(), lr=1e-2, **kw)]
        x, y = tasks[0]
        for step in range(6):
            for k, (net, opt) in enumerate(zip(nets, opts)):
                opt.zero_grad()
                F.cross_entropy(net(x), y).backward()
                opt.step()
            if step == 2:  # swap optimizer states half way: torch's into ours and ours into torch's
                s0, s1 = opts[0].state_dict(), opts[1].state_dict()
                opts[1].load_state_dict(s0)
                opts[0].load_state_dict(s1)
        _close(list(nets[1].parameters()), list(nets[0].parameters()), torch.float32)


def test_optimizer_input_errors():
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="learning rate"):
        clfast.optim.SGD(p, lr=-1)
    with pytest.raises(ValueError, match="Nesterov"):
        clfast.optim.SGD(p, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="beta"):
        clfast.optim.Adam(p, betas=(1.0, 0.9))
    with pytest.raises(TypeError, match="clfast.SI"):
        clfast.optim.SGD(p, lr=0.1, si=object())
    # a gradient that does not match its parameter raises before any parameter of any bucket moves
    q = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2).double())]
    opt = clfast.optim.SGD(q, lr=0.1, momentum=0.9)
    q[0].grad, q[1].grad = torch.ones(3), torch.ones(2).double()
    q[1].grad.data = torch.ones(2)  # torch only checks on assignment: .data swaps the dtype underneath
    before = [t.detach().clone() for t in q]
    with pytest.raises(RuntimeError, match="must match"):
        opt.step()
    assert all(torch.equal(t.detach(), b) for t, b in zip(q, before)) and not opt.state_dict()["state"]


def test_params_without_grad_are_skipped(backend):
    net = _mlp()
    si = clfast.SI(net)
    opt = clfast.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, si=si)
    x, y = _tasks(1)[0]
    F.cross_entropy(net(x), y).backward()
    net[4].weight.grad = None
    frozen = net[4].weight.detach().clone()
    opt.step()
    assert torch.equal(net[4].weight.detach(), frozen)
    assert "momentum_buffer" not in opt.state[net[4].weight]
