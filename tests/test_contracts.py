"""The contract of every op and module: it does what its reference does, or raises before it changes anything.
One test per way this can fail (crashes run in a child process, so a segfault is a failing test)."""
import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast import reference

from clfast_testing import needs_native

OPS = torch.ops.clfast if clfast.native_available() else None


def _run_child(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


# ---- crashes ------------------------------------------------------------------------------------------------------


@needs_native
def test_reservoir_draws_outside_the_unit_interval_store_nothing():
    """Draws outside [0, 1) or NaN select no slot (they once indexed far outside the storage)."""
    proc = _run_child("""
        import math, torch, clfast
        from clfast import reference
        for value in (-1e6, 1.0, 2.0, math.nan, -math.inf):
            for op in (torch.ops.clfast.reservoir_add_, reference.reservoir_add_):
                storage = [torch.zeros(4, 3)]
                op(storage, [torch.ones(6, 3)], torch.full((6,), value, dtype=torch.float64), 10)
                assert torch.equal(storage[0], torch.zeros(4, 3)), (value, storage)
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


@needs_native
def test_reservoir_stream_index_overflow_is_refused():
    proc = _run_child("""
        import torch, clfast
        from clfast import reference
        for op in (torch.ops.clfast.reservoir_add_, reference.reservoir_add_):
            storage = [torch.zeros(4, 3)]
            try:
                op(storage, [torch.ones(6, 3)], torch.rand(6, dtype=torch.float64), 2 ** 63 - 3)
                raise SystemExit("accepted")
            except RuntimeError as exc:
                assert "overflows" in str(exc), exc
            assert torch.equal(storage[0], torch.zeros(4, 3))
        buf = clfast.ReservoirBuffer(4)
        buf.add(torch.zeros(4, 3))
        state = buf.state_dict()
        state["num_seen"] = 2 ** 63 - 1
        buf.load_state_dict(state)
        try:
            buf.add(torch.ones(2, 3))
            raise SystemExit("accepted")
        except OverflowError:
            pass
        assert buf.num_seen == 2 ** 63 - 1 and torch.equal(buf.storage[0], torch.zeros(4, 3))
        print("ok")
    """)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


# ---- version counters and autograd ------------------------------------------------------------------------------


@needs_native
def test_a_step_between_forward_and_backward_is_refused_like_torch():
    x = nn.Parameter(torch.ones(4))
    y = (x * x).sum()
    OPS.sgd_si_step_([x], [torch.ones(4)], [], [], 0.5, 0, 0, 0, False, False)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


@pytest.mark.parametrize("make", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), lambda p: clfast.optim.SGD(p, lr=0.1, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=0.1), lambda p: clfast.optim.Adam(p, lr=0.1)])
def test_optimizer_step_before_a_second_backward_raises(backend, make):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = make(net.parameters())
    loss = F.cross_entropy(net(torch.randn(5, 3)), torch.tensor([0, 1, 0, 1, 1]))
    loss.backward(retain_graph=True)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_native
@pytest.mark.parametrize("changed", ["params", "importance", "prev"])
def test_si_penalty_backward_refuses_inputs_changed_after_the_forward(changed):
    imp, prev = [torch.rand(5) + 0.1], [torch.randn(5)]
    p = [nn.Parameter(torch.randn(5))]
    loss = OPS.si_penalty(imp, prev, p)
    with torch.no_grad():
        {"params": p, "importance": imp, "prev": prev}[changed][0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_si_penalty_gradients_of_every_input(backend):
    g = torch.Generator().manual_seed(0)
    imp = [(torch.rand(4, 3, generator=g, dtype=torch.float64) + 0.1).requires_grad_()]
    prev = [torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()]
    p = [torch.randn(4, 3, generator=g, dtype=torch.float64).requires_grad_()]
    clfast.ops.si_penalty(imp, prev, p).backward()
    expected = torch.autograd.grad((imp[0] * (p[0] - prev[0]) ** 2).sum(), [imp[0], prev[0], p[0]])
    for got, want in zip([imp[0].grad, prev[0].grad, p[0].grad], expected):
        torch.testing.assert_close(got, want)


def test_kron_quadratic_gradients_for_any_factors(backend):
    """General factors (not symmetric) get the general gradient, and the factors get theirs."""
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(3, 3, generator=g, dtype=torch.float64).requires_grad_()]
    gg = [torch.randn(2, 2, generator=g, dtype=torch.float64).requires_grad_()]
    v = [torch.randn(2, 3, generator=g, dtype=torch.float64).requires_grad_()]
    clfast.ops.kron_quadratic(a, gg, v).backward()
    want = torch.autograd.grad(((gg[0] @ v[0] @ a[0]) * v[0]).sum(), [a[0], gg[0], v[0]])
    for got, w in zip([a[0].grad, gg[0].grad, v[0].grad], want):
        torch.testing.assert_close(got, w)


# ---- devices, aliasing, writability ---------------------------------------------------------------------------------


def _meta_calls():
    cpu, meta = torch.zeros(3), torch.zeros(3, device="meta")
    return {
        "sgd_si_step_": lambda op: op([cpu.clone()], [meta], [], [], 0.1, 0.0, 0.0, 0.0, False, False),
        "si_accumulate_": lambda op: op([cpu.clone()], [meta], [cpu.clone()], [cpu.clone()], False),
        "reservoir_add_": lambda op: op([torch.zeros(4, 3)], [torch.ones(2, 3, device="meta")],
                                        torch.rand(2, dtype=torch.float64), 0),
        "si_penalty": lambda op: op([cpu.clone()], [meta], [cpu.clone()]),
    }


@needs_native
@pytest.mark.parametrize("name", list(_meta_calls()))
def test_a_meta_tensor_among_cpu_tensors_is_refused(name):
    for op in (getattr(OPS, name), getattr(reference, name)):
        with pytest.raises(RuntimeError, match="one device|is on meta|buffer is on"):
            _meta_calls()[name](op)


@needs_native
@pytest.mark.parametrize("case", ["same-output-twice", "overlapping-views", "output-is-input"])
def test_aliased_outputs_are_refused(case, backend):
    buf = torch.zeros(7)
    omega = {"same-output-twice": [buf[:3]] * 2, "overlapping-views": [buf[:3], buf[2:5]],
             "output-is-input": [buf[:3], buf[3:6]]}[case]
    params, ref = [torch.ones(3), torch.ones(3)], [torch.zeros(3), torch.zeros(3)]
    grads = [omega[0], torch.ones(3)] if case == "output-is-input" else [torch.ones(3), torch.ones(3)]
    with pytest.raises(RuntimeError, match="share memory"):
        clfast.ops.si_accumulate_(omega, params, ref, grads)
    assert torch.equal(buf, torch.zeros(7))


EXPANDED = {
    "si_accumulate_": lambda e, t: ([t(), e], [t(), t()], [t(), t()], [t(), t()], False),
    "si_consolidate_": lambda e, t: ([t(), t()], [t(), e], [t(), t()], [t(), t()], 1e-3),
    "si_consolidate_/omega": lambda e, t: ([t(), t()], [t(), t()], [t(), e], [t(), t()], 1e-3),
    "si_penalty_grad_": lambda e, t: ([t(), e], [t(), t()], [t(), t()], [t(), t()], 1.0),
    "sgd_si_step_": lambda e, t: ([t(), e], [t(), t()], [t(), t()], [t(), t()], 0.1, 0.9, 0.0, 0.0, False, True),
    "sgd_si_step_/buffer": lambda e, t: ([t(), t()], [t(), t()], [t(), e], [t(), t()], 0.1, 0.9, 0.0, 0.0, False,
                                         False),
    "adam_si_step_": lambda e, t: ([t(), t()], [t(), t()], [t(), t()], [t(), e], [t(), t()], 0.1, 0.9, 0.99,
                                   1e-8, 0.0, 0.1, 0.01),
}


@needs_native
@pytest.mark.parametrize("case", list(EXPANDED))
def test_unwritable_output_raises_before_anything_is_written(case, backend):
    g = torch.Generator().manual_seed(0)
    t = lambda: torch.randn(4, generator=g)  # noqa: E731
    args = EXPANDED[case](torch.randn(1, generator=g).expand(4), t)
    before = copy.deepcopy([a for a in args if isinstance(a, list)])
    with pytest.raises(RuntimeError, match="cannot be written"):
        getattr(clfast.ops, case.split("/")[0])(*args) if case.startswith("si_") else \
            getattr(OPS if backend == "native" else reference, case.split("/")[0])(*args)
    for now, was in zip([a for a in args if isinstance(a, list)], before):
        for x, y in zip(now, was):
            assert torch.equal(x, y)


# ---- optimizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_a_failed_step_changes_no_optimizer_state(backend, kind):
    """A refused step leaves the state as it was, so the next steps equal torch's."""
    torch.manual_seed(0)
    p = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))]
    twin = [nn.Parameter(t.detach().clone()) for t in p]
    if kind == "sgd":
        opt, ref = clfast.optim.SGD(p, lr=0.1, momentum=0.9), torch.optim.SGD(twin, lr=0.1, momentum=0.9)
    else:
        opt, ref = clfast.optim.Adam(p, lr=0.1), torch.optim.Adam(twin, lr=0.1)
    p[0].grad, p[1].grad = torch.ones(3), torch.ones(2)
    p[1].grad.data = torch.ones(2, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="must match"):
        opt.step()
    assert not opt.state_dict()["state"]
    for step in range(3):
        for a, b in zip(p, twin):
            a.grad = torch.full_like(a, 0.5 + step)
            b.grad = torch.full_like(b, 0.5 + step)
        opt.step()
        ref.step()
    for a, b in zip(p, twin):
        torch.testing.assert_close(a.detach(), b.detach())


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_mixed_dtype_parameter_groups_step_like_torch(backend, kind):
    torch.manual_seed(0)
    p = [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4, dtype=torch.float64)),
         nn.Parameter(torch.randn(2))]
    twin = [nn.Parameter(t.detach().clone()) for t in p]
    net = nn.Module()
    for i, t in enumerate(p):
        net.register_parameter(f"p{i}", t)
    si = clfast.SI(net)
    make = {"sgd": lambda ps, **kw: (clfast.optim.SGD(ps, lr=0.1, momentum=0.9, **kw),
                                     torch.optim.SGD(twin, lr=0.1, momentum=0.9)),
            "adam": lambda ps, **kw: (clfast.optim.Adam(ps, lr=0.1, **kw), torch.optim.Adam(twin, lr=0.1))}
    opt, ref = make[kind](p, si=si)
    for step in range(3):
        for a, b in zip(p, twin):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(p, twin):
        torch.testing.assert_close(a.detach(), b.detach())
    assert si.omega[1].dtype == torch.float64 and bool(si.omega[1].abs().sum() > 0)
    si.consolidate()  # one call per dtype, like the optimizer
    for a in p:
        a.grad = torch.randn_like(a)
    opt.step()  # away from the anchor, so the penalty is not 0
    penalty = si.penalty()
    expected = sum((imp.double() * (q.detach().double() - pv.double()) ** 2).sum()
                   for imp, pv, q in zip(si.importance, si.prev, p))
    assert penalty.dtype == torch.float64 and float(penalty.detach()) > 0 and torch.allclose(penalty.detach(), expected)


def test_sgd_with_si_and_untracked_parameters_steps_every_bucket(backend):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    si = clfast.SI([net[0].weight, net[0].bias])  # net[1] is in the optimizer but not tracked by SI
    opt = clfast.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, si=si)
    twin = copy.deepcopy(net)
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for m, o in ((net, opt), (twin, ref)):
            o.zero_grad()
            F.mse_loss(m(torch.ones(2, 3)), torch.zeros(2, 2)).backward()
            o.step()
    for a, b in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bc1, bc2", [(0.0, 0.5), (0.5, -0.1), (1.5, 0.5), (0.5, float("nan"))])
def test_adam_bias_corrections_out_of_range_are_refused(backend, bc1, bc2):
    p, g, m, v = [torch.ones(3)], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)]
    with pytest.raises(RuntimeError, match="bias_correction"):
        clfast.ops.adam_si_step_(p, g, m, v, [], lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                                  bias_correction1=bc1, bias_correction2=bc2)
    assert torch.equal(p[0], torch.ones(3)) and torch.equal(m[0], torch.zeros(3))


# ---- CBP -------------------------------------------------------------------------------------------------------------


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(6 * 4 * 4, 3))


def test_cbp_on_a_channels_last_convnet_matches_the_contiguous_one(backend):
    nets = [_convnet(), _convnet().to(memory_format=torch.channels_last)]
    cbps = [clfast.CBP(n, replacement_rate=0.2, maturity_threshold=2, generator=torch.Generator().manual_seed(3))
            for n in nets]
    g = torch.Generator().manual_seed(0)
    for _ in range(8):
        x = torch.randn(5, 1, 8, 8, generator=g)
        for net, cbp in zip(nets, cbps):
            net(x.contiguous(memory_format=torch.channels_last) if net is nets[1] else x)
            cbp.step()
    assert sum(cbps[0].stats().values()) > 0 and cbps[0].stats() == cbps[1].stats()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b)
    assert nets[1][0].weight.is_contiguous(memory_format=torch.channels_last)


def test_cbp_refused_step_changes_no_state(backend):
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    cbp = clfast.CBP(net, replacement_rate=0.5, maturity_threshold=1)
    for _ in range(3):
        net(torch.randn(8, 4))
        cbp.step()
    before = copy.deepcopy(cbp.state_dict())
    with pytest.raises(RuntimeError):
        cbp.step({cbp.layer_names[0]: torch.randn(8, 5)})
    after = cbp.state_dict()
    assert after["steps"] == before["steps"]
    for name, layer in before["layers"].items():
        for key, value in layer.items():
            now = after["layers"][name][key]
            assert torch.equal(now, value) if isinstance(value, torch.Tensor) else now == value, key


# ---- invalid values, messages ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("training", [True, False])
def test_dan_negative_eps_raises_like_batchnorm(backend, training):
    layer = clfast.nn.DANLayer(3, 4, 5, 2, eps=-1.0).train(training)
    bn = nn.BatchNorm1d(4, eps=-1.0).train(training)
    x = torch.randn(8, 4)
    with pytest.raises(ValueError) as torch_error:
        bn(x)
    with pytest.raises(ValueError) as ours:
        layer(x)
    assert str(ours.value).split(", but got")[0] == str(torch_error.value).split(", but got")[0]
    assert int(layer.bn1_num_batches_tracked.sum()) == 0


@needs_native
def test_messages_name_the_argument():
    n, ni, nf, no = 2, 3, 4, 2
    x = torch.randn(5, ni)
    params = [torch.ones(n, ni), torch.zeros(n, ni), torch.randn(n, nf, ni + 1), None, torch.ones(n, nf),
              torch.zeros(n, nf), torch.randn(n, nf, nf), None, torch.randn(n, no, nf), None]
    with pytest.raises(RuntimeError, match=r"weight1 must have shape \[2, 4, 3\]"):
        OPS.dan_layer(x, *params, *[torch.zeros(n, ni), torch.ones(n, ni), torch.zeros(n, dtype=torch.long),
                                    torch.zeros(n, nf), torch.ones(n, nf), torch.zeros(n, dtype=torch.long)],
                      True, 0.1, 1e-5, "tanh")
    with pytest.raises(RuntimeError, match=r"g\[1\] is Double but v\[0\] is Float"):
        OPS.kron_quadratic([torch.eye(2)] * 2, [torch.eye(2), torch.eye(2).double()], [torch.ones(2, 2)] * 2)
    with pytest.raises(RuntimeError, match=r"storage\[0\] must be contiguous \(rows are written in place\)"):
        OPS.reservoir_add_([torch.zeros(3, 4).t()], [torch.ones(2, 3)], torch.rand(2, dtype=torch.float64), 0)
    with pytest.raises(RuntimeError, match="expected at least one tensor, got only empty lists"):
        OPS.si_accumulate_([], [], [], [], False)


def test_ewc_names_a_model_converted_after_consolidate(backend):
    pytest.importorskip("nngeometry")
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    ewc = clfast.EWC(net, "diag")
    ewc.consolidate(DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8))
    net.double()
    with pytest.raises(RuntimeError, match="now torch.float64 on cpu, but the Fisher was computed for torch.float32"):
        ewc.penalty()


# ---- compatibility ---------------------------------------------------------------------------------------------------


def _train_si(step_fn, consolidate_fn, net, tasks):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    for t in range(tasks):
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(torch.randn(6, 4, generator=g)), torch.randint(0, 3, (6,), generator=g)).backward()
            step_fn(opt)
        consolidate_fn()


@pytest.mark.parametrize("finish", ["consolidated", "mid-task"])
def test_si_state_dict_loads_strictly_into_a_hypnettorch_module(backend, finish):
    hyp = pytest.importorskip("hypnettorch.utils.si_regularizer")
    torch.manual_seed(0)
    net_h = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    net_c = copy.deepcopy(net_h)
    params_h = list(net_h.parameters())

    def step_h(opt):
        hyp.si_pre_optim_step(net_h, params_h)
        opt.step()
        hyp.si_post_optim_step(net_h, params_h)

    _train_si(step_h, lambda: hyp.si_compute_importance(net_h, params_h), net_h, 2)
    si = clfast.SI(net_c)

    def step_c(opt):
        si.before_step()
        opt.step()
        si.after_step()

    _train_si(step_c, si.consolidate, net_c, 2)
    if finish == "mid-task":
        _train_si(step_h, lambda: None, net_h, 1)
        _train_si(step_c, lambda: None, net_c, 1)
    target = copy.deepcopy(net_h)
    state = {**dict(net_c.state_dict()), **si.state_dict()}
    target.load_state_dict(state, strict=True)
    for key, value in net_h.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)
    back = clfast.SI(copy.deepcopy(net_c))
    back.load_state_dict(net_h.state_dict())
    assert set(back.state_dict()) == set(si.state_dict())


def test_databuffer_keeps_the_list_buffers_items_under_the_same_random_seed():
    import random
    from clfast.baselines.buffer import ListDataBuffer
    items = [(torch.full((3,), float(i)), torch.tensor(i % 7)) for i in range(300)]
    random.seed(123)
    seed = ListDataBuffer(40)
    for k in range(0, 300, 25):
        seed.update_buffer(items[k:k + 25])
    seed_sample = seed.sample(16)
    seed_next = random.random()
    random.seed(123)
    ours = clfast.DataBuffer(40)
    for k in range(0, 300, 25):
        ours.update_buffer(items[k:k + 25])
    ours_sample = ours.sample(16)
    assert random.random() == seed_next  # the same draws, no more, no fewer
    assert ours.num_seen_examples == seed.num_seen_examples == 300
    assert [int(y) for _, y in ours.buffer] == [int(y) for _, y in seed.buffer]
    assert torch.equal(torch.stack([x for x, _ in ours.buffer]), torch.stack([x for x, _ in seed.buffer]))
    assert torch.equal(ours_sample[0], seed_sample[0]) and torch.equal(ours_sample[1], seed_sample[1])
    small = clfast.DataBuffer(10)
    small.update_buffer(items[:4])
    assert torch.equal(small.sample(8)[1], torch.stack([y for _, y in items[:4]]))  # fewer than n: all, in order


def test_cbp_with_an_optimizer_on_a_channels_last_convnet(backend):
    net = _convnet().to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    cbp = clfast.CBP(net, replacement_rate=0.3, maturity_threshold=1, optimizer=opt)
    for _ in range(4):
        opt.zero_grad()
        net(torch.randn(5, 1, 8, 8).contiguous(memory_format=torch.channels_last)).sum().backward()
        opt.step()
        cbp.step()
    assert sum(cbp.stats().values()) > 0


def test_reservoir_buffer_takes_a_batch_read_from_its_own_storage(backend):
    buf = clfast.ReservoirBuffer(4, generator=torch.Generator().manual_seed(0))
    buf.add(torch.arange(12.).view(6, 2))
    buf.add(buf.storage[0][:3])  # a view of the storage: copied before the op reads it
    assert buf.num_seen == 9


def test_penalty_backwards_differentiate_only_what_requires_grad(backend):
    imp = [torch.rand(4) + 0.1, (torch.rand(3) + 0.1).requires_grad_()]
    prev = [torch.randn(4), torch.randn(3)]
    p = [torch.randn(4, requires_grad=True), torch.randn(3)]
    clfast.ops.si_penalty(imp, prev, p).backward()
    assert p[0].grad is not None and imp[1].grad is not None
    assert imp[0].grad is None and prev[0].grad is None and p[1].grad is None


def test_kron_quadratic_rechecks_a_factor_changed_in_place(backend):
    g = torch.Generator().manual_seed(2)
    a = [torch.eye(3, dtype=torch.float64)]
    gg = [torch.eye(2, dtype=torch.float64)]
    for step in range(2):
        v = [torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)]
        clfast.ops.kron_quadratic(a, gg, v).backward()
        want = torch.autograd.grad(((gg[0] @ v[0] @ a[0]) * v[0]).sum(), v[0])[0]
        torch.testing.assert_close(v[0].grad, want)
        with torch.no_grad():
            gg[0][0, 1] += 1.0  # no longer symmetric: the next backward takes the general gradient


@pytest.mark.parametrize("representation", ["kfac", "dense"])
def test_ewc_checks_its_factors_at_consolidation_not_in_the_backward(backend, representation, monkeypatch):
    pytest.importorskip("nngeometry")
    from torch.utils.data import DataLoader, TensorDataset
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    ewc = clfast.EWC(net, representation)
    ewc.consolidate(DataLoader(TensorDataset(torch.randn(16, 4), torch.randint(0, 3, (16,))), batch_size=8))
    with torch.no_grad():
        net[0].weight.add_(0.1)
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append(1) or real(self))
    ewc.penalty().backward()
    assert not reads and net[0].weight.grad is not None


@needs_native
def test_fisher_ops_refuse_what_they_cannot_do_as_the_reference_does():
    """A zero scale (BLAS would skip a product whose inf * 0 the reference turns into NaN), a scale no float32
    holds, and sizes whose product overflows int64: refused by both backends, before anything is written."""
    from clfast import reference

    x = torch.randn(5, 3)
    x[0, 0] = math.inf
    cases = [(OPS.fisher_factor_, reference.fisher_factor_, lambda: (torch.eye(4), x, 0.0, True)),
             (OPS.fisher_factor_, reference.fisher_factor_, lambda: (torch.eye(4), x, 1e300, True)),
             (OPS.fisher_factor_, reference.fisher_factor_, lambda: (torch.eye(4), x, 1e-40, True)),
             (OPS.fisher_diag_, reference.fisher_diag_,
              lambda: (torch.zeros(4), torch.empty(0, 1).expand(0, 2 ** 62), torch.zeros(0, 2, 4), True))]
    for native, ref, args in cases:
        for fn in (native, ref):
            a = args()
            before = a[0].clone()
            with pytest.raises(RuntimeError):
                fn(*a)
            assert torch.equal(a[0], before)
    out = torch.eye(4, dtype=torch.float64)  # float64 takes a scale float32 cannot hold
    OPS.fisher_factor_(out, torch.randn(5, 3, dtype=torch.float64), 1e-300, True)
