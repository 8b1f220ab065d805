"""CBP: native ops vs references, the algorithm's invariants, the CBP module end to end, plasticity."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast import reference
from clfast_testing import device_params, needs_native

# (features shape, w_next shape, w_cur shape): Linear -> Linear, Conv2d -> Conv2d, Conv2d -> flatten -> Linear
CASES = {
    "linear": ((24, 16), (7, 16), (16, 9)),
    "conv": ((5, 6, 4, 4), (3, 6, 3, 3), (6, 2, 3, 3)),
    "conv_flatten": ((5, 6, 3, 3), (4, 54), (6, 2, 3, 3)),
}


def _rand(shape, device, dtype, seed, positive=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(shape, generator=g, dtype=dtype) if positive else torch.randn(shape, generator=g, dtype=dtype)
    return t.to(device)


def _state(n, device, dtype, seed):
    return [_rand((n,), device, dtype, seed, True), _rand((n,), device, dtype, seed + 1),
            torch.randint(1, 50, (n,), generator=torch.Generator().manual_seed(seed)).to(device, dtype)]


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("utility_type", ["contribution", "zero_contribution", "adaptable_contribution"])
def test_cbp_update_matches_reference(device, dtype, utility_type):
    feats, w_next, w_cur, states = [], [], [], []
    for k, (hs, wns, wcs) in enumerate(CASES.values()):
        feats.append(_rand(hs, device, dtype, 10 * k + 1))
        w_next.append(_rand(wns, device, dtype, 10 * k + 2))
        w_cur.append(_rand(wcs, device, dtype, 10 * k + 3))
        states.append(_state(wcs[0], device, dtype, 10 * k + 4))
    native = copy.deepcopy(states)
    torch.ops.clfast.cbp_update_([s[0] for s in native], [s[1] for s in native], [s[2] for s in native], feats,
                                 w_next, w_cur, 0.9, utility_type)
    reference.cbp_update_([s[0] for s in states], [s[1] for s in states], [s[2] for s in states], feats, w_next,
                          w_cur, 0.9, utility_type)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for a, b in zip(native, states):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, **tol)


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_cbp_replace_matches_reference(device, case, bias, k):
    _, wns, wcs = CASES[case]
    n = wcs[0]
    tensors = [_rand(wcs, device, torch.float32, 1), _rand((n,), device, torch.float32, 2) if bias else None,
               _rand(wns, device, torch.float32, 3), _rand((wns[0],), device, torch.float32, 4) if bias else None,
               *_state(n, device, torch.float32, 5)]
    tensors[6][1] = 3.0  # one immature unit (maturity 5): never chosen while mature ones remain
    new = _rand((k, torch.tensor(wcs[1:]).prod().item()), device, torch.float32, 9)
    native = [t.clone() if t is not None else None for t in tensors]
    chosen = torch.ops.clfast.cbp_replace_(*native, new, 0.95, 5)
    expected = reference.cbp_replace_(*tensors, new, 0.95, 5)
    assert chosen.tolist() == expected.tolist() and len(set(chosen.tolist())) == k and 1 not in chosen.tolist()
    for a, b in zip(native, tensors):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if k:
        wn = tensors[2].reshape(wns[0], n, -1)
        kept = [i for i in range(n) if i not in chosen.tolist()]
        assert float(wn[:, chosen].abs().sum()) == 0 and float(wn[:, kept].abs().sum()) > 0  # only those columns
        assert torch.equal(tensors[0].reshape(n, -1)[chosen], new) and float(tensors[6][chosen].abs().sum()) == 0


def test_selection_takes_the_lowest_mature_utilities(backend):
    n = 10
    w_cur, w_next = torch.randn(n, 3), torch.randn(4, n)
    utility = torch.tensor([5.0, 1.0, 0.5, 9.0, 0.1, 2.0, 0.2, 7.0, 0.3, 4.0])
    age = torch.tensor([50.0, 50.0, 50.0, 50.0, 2.0, 50.0, 50.0, 50.0, 50.0, 50.0])  # unit 4 is immature
    chosen = clfast.ops.cbp_replace_(w_cur, None, w_next, None, utility, torch.zeros(n), age, torch.zeros(3, 3),
                                      0.9, 10)
    assert chosen.tolist() == [6, 8, 2]
    utility = torch.tensor([5.0, 1.0, 0.5, 9.0, 0.1, 2.0, float("nan"), 7.0, 0.3, 4.0])  # unit 6 diverged
    age = torch.tensor([50.0, 50.0, 50.0, 50.0, 2.0, 50.0, 50.0, 50.0, 50.0, 50.0])
    chosen = clfast.ops.cbp_replace_(w_cur, None, w_next, None, utility, torch.zeros(n), age, torch.zeros(3, 3),
                                      0.9, 10)  # NaN ranks last, on every backend
    assert chosen.tolist() == [8, 2, 1]


@needs_native
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selection_with_ties_and_nan_matches_reference(device, dtype):
    """1000 units (more than one selection block's threads) whose utilities take five values and NaN: ties go to
    the lower index, NaN ranks last, immature units after every mature one."""
    n, k = 1000, 40
    g = torch.Generator().manual_seed(7)
    values = torch.tensor([0.5, 0.25, float("nan"), 1.0, 0.125, 2.0], dtype=dtype)
    utility = values[torch.randint(0, len(values), (n,), generator=g)]
    utility[torch.randperm(n, generator=g)[: n - 30]] = float("nan")  # fewer finite utilities than k
    age = torch.randint(1, 50, (n,), generator=g).to(dtype)
    tensors = [torch.randn(n, 3, generator=g, dtype=dtype), None, torch.randn(4, n, generator=g, dtype=dtype), None,
               utility, torch.randn(n, generator=g, dtype=dtype), age]
    tensors = [t.to(device) if t is not None else None for t in tensors]
    native = [t.clone() if t is not None else None for t in tensors]
    new = torch.randn(k, 3, generator=g, dtype=dtype).to(device)
    chosen = torch.ops.clfast.cbp_replace_(*native, new, 0.95, 10)
    expected = reference.cbp_replace_(*tensors, new, 0.95, 10)
    assert chosen.tolist() == expected.tolist() and len(set(chosen.tolist())) == k
    for a, b in zip(native, tensors):
        if a is not None:
            torch.testing.assert_close(a, b, equal_nan=True)


def test_empty_layers_are_rejected(backend):
    with pytest.raises(RuntimeError, match="non-empty|at least one unit"):
        clfast.ops.cbp_update_([torch.zeros(4)], [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(3, 4, 0)],
                                [torch.zeros(2, 4)], [torch.zeros(4, 3)], 0.9, "contribution")


def test_bias_correction_keeps_the_next_layers_mean_output(backend):
    torch.manual_seed(0)
    n, decay = 8, 0.9
    h = torch.randn(64, n) + 2.0
    nxt = nn.Linear(n, 5)
    cur = nn.Linear(3, n)
    age = torch.full((n,), 30.0)
    # running mean whose bias-corrected value equals this batch's mean activation
    mean = h.mean(0) * (1 - decay ** age)
    before = nxt(h).mean(0).detach()
    chosen = clfast.ops.cbp_replace_(cur.weight.detach(), cur.bias.detach(), nxt.weight.detach(), nxt.bias.detach(),
                                      torch.rand(n), mean, age, torch.zeros(2, 3), decay, 10)
    torch.testing.assert_close(nxt(h).mean(0), before, rtol=1e-5, atol=1e-5)
    assert float(nxt.weight.detach()[:, chosen].abs().sum()) == 0 and float(cur.bias.detach()[chosen].abs().sum()) == 0


def _net(conv=False, seed=0):
    torch.manual_seed(seed)
    if conv:
        return nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 8, 3), nn.ReLU(),
                             nn.Flatten(), nn.Linear(8 * 4 * 4, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 3))


def _train(net, cbp_kwargs, steps=60, conv=False, seed=0, opt_cls=torch.optim.Adam):
    opt = opt_cls(net.parameters(), lr=1e-2)
    cbp = clfast.CBP(net, optimizer=opt, generator=torch.Generator().manual_seed(seed), **cbp_kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x = torch.randn(16, 1, 8, 8, generator=g) if conv else torch.randn(16, 12, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        cbp.step()
    return cbp, opt


@needs_native
@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("utility", ["contribution", "zero_contribution", "adaptable_contribution"])
def test_native_and_reference_replace_the_same_units(conv, utility):
    kw = dict(replacement_rate=0.05, maturity_threshold=10, utility=utility)
    nets = [_net(conv), _net(conv)]
    results = []
    for backend, net in zip(("native", "reference"), nets):
        clfast.set_backend(backend)
        try:
            results.append(_train(net, kw, conv=conv)[0])
        finally:
            clfast.set_backend("native")
    assert results[0].stats() == results[1].stats() and sum(results[0].stats().values()) > 0
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for a, b in zip(results[0].ages, results[1].ages):
        assert torch.equal(a, b)


def test_counts_follow_the_accumulated_rate_and_device_ages(backend):
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=1e-2, momentum=0.9)
    cbp = clfast.CBP(net, replacement_rate=0.07, maturity_threshold=5, optimizer=opt)
    accumulated = {name: 0.0 for name in cbp.layer_names}
    for step in range(40):
        x = torch.randn(8, 12)
        opt.zero_grad()
        F.cross_entropy(net(x), torch.randint(0, 3, (8,))).backward()
        opt.step()
        # expected count from the device ages, computed here with host syncs the module avoids
        expected = {}
        for name, age in zip(cbp.layer_names, cbp.ages):
            eligible = int(((age + 1) > 5).sum())
            if eligible:
                accumulated[name] += 0.07 * eligible
            expected[name] = min(int(accumulated[name]), eligible)
            accumulated[name] -= expected[name]
        before = cbp.stats()
        cbp.step()
        assert {k: cbp.stats()[k] - before[k] for k in before} == expected
    assert sum(cbp.stats().values()) > 0
    # replaced units start over: their age is below the steps taken, and their momentum is zero
    for age in cbp.ages:
        assert float(age.min()) < 40


def test_optimizer_state_and_norm_reset():
    torch.manual_seed(0)
    net = _net(conv=True)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    cbp = clfast.CBP(net, replacement_rate=0.2, maturity_threshold=3, optimizer=opt,
                     generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
        opt.step()
        cbp.step()
    net[1].running_mean.fill_(5.0)
    opt.zero_grad()
    F.cross_entropy(net(torch.randn(8, 1, 8, 8)), torch.randint(0, 3, (8,))).backward()
    opt.step()
    ages_before = [a.clone() for a in cbp.ages]
    cbp.step()
    replaced = (cbp.ages[0] == 0).nonzero().flatten()
    assert len(replaced) >= 1 and bool((ages_before[0][replaced] + 1 > 3).all())  # only mature units
    assert float(opt.state[net[0].weight]["exp_avg"][replaced].abs().sum()) == 0
    assert float(opt.state[net[3].weight]["exp_avg_sq"][:, replaced].abs().sum()) == 0
    rows = (cbp.ages[1] != 0).nonzero().flatten()  # rows of the next conv not re-drawn by its own replacement
    assert float(net[3].weight.detach()[rows][:, replaced].abs().sum()) == 0
    assert bool((net[1].running_mean[replaced] == 0).all()) and bool((net[1].running_var[replaced] == 1).all())
    kept = (cbp.ages[0] != 0).nonzero().flatten()
    assert bool((net[1].running_mean[kept] != 0).all())


def test_state_dict_round_trip(backend):
    net = _net()
    cbp, opt = _train(net, dict(replacement_rate=0.05, maturity_threshold=10), steps=30)
    twin_net = copy.deepcopy(net)
    twin = clfast.CBP(twin_net, replacement_rate=0.05, maturity_threshold=10, generator=torch.Generator())
    twin.load_state_dict(cbp.state_dict())
    h = {name: torch.rand(4, L.weight.shape[0]) for name, L in zip(cbp.layer_names, (net[0], net[2]))}
    for _ in range(25):
        cbp.step(h)
        twin.step(h)
    assert cbp.stats() == twin.stats()
    for a, b in zip(cbp.utilities + cbp.ages, twin.utilities + twin.ages):
        torch.testing.assert_close(a, b)


def test_bad_input_is_clear_and_leaves_state_alone():
    with pytest.raises(ValueError, match="at least one Linear/Conv2d hidden layer"):
        clfast.CBP(nn.Sequential(nn.Linear(3, 2)))
    bad = nn.Sequential(nn.Conv2d(1, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(25, 2))
    with pytest.raises(ValueError, match="do not chain"):
        clfast.CBP(bad)
    for kwargs, msg in [(dict(utility="magic"), "utility must be one of"), (dict(init="he"), "init must be"),
                        (dict(replacement_rate=2), "replacement_rate"), (dict(maturity_threshold=-1), "maturity")]:
        with pytest.raises(ValueError, match=msg):
            clfast.CBP(_net(), **kwargs)
    cbp = clfast.CBP(_net())
    with pytest.raises(RuntimeError, match="no activations"):
        cbp.step()
    state = copy.deepcopy(cbp.state_dict())
    with pytest.raises(RuntimeError, match=r"features\[0\] must be \[batch > 0, 32"):
        cbp.step({"0": torch.rand(4, 31), "2": torch.rand(4, 24)})
    with pytest.raises(ValueError, match="must be a tensor of shape"):
        cbp.load_state_dict({**state, "layers": {**state["layers"], "0": {**state["layers"]["0"],
                                                                            "age": torch.zeros(3)}}})
    for a, b in zip(cbp.ages, [state["layers"][n]["age"] for n in cbp.layer_names]):
        assert torch.equal(a, b)


@needs_native
def test_opcheck_cbp_ops():
    feats, w_next, w_cur = _rand((6, 5), "cpu", torch.float32, 1), _rand((3, 5), "cpu", torch.float32, 2), \
        _rand((5, 4), "cpu", torch.float32, 3)
    u, m, a = _state(5, "cpu", torch.float32, 4)
    torch.library.opcheck(torch.ops.clfast.cbp_update_, ([u], [m], [a], [feats], [w_next], [w_cur], 0.9, "zero_contribution"))
    torch.library.opcheck(torch.ops.clfast.cbp_replace_,
                          (w_cur, _rand((5,), "cpu", torch.float32, 5), w_next, _rand((3,), "cpu", torch.float32, 6),
                           u, m, a, _rand((2, 4), "cpu", torch.float32, 7), 0.9, 3))


def test_clarena_baseline_runs():
    from clfast.baselines.cbp_clarena import CLArenaCBP

    net = _net()
    base = CLArenaCBP([("0", net[0], net[2]), ("2", net[2], net[4])], 0.5, 2, 0.9)
    for _ in range(6):
        base.on_train_batch_end({"0": torch.rand(8, 32), "2": torch.rand(8, 24)})
    assert float(base.age["0"].max()) == 6 and float(base.contribution_utility["0"].sum()) > 0
    assert float(base.age["0"].min()) == 0  # replaced units restart


def _plasticity(replacement_rate, tasks=24, seed=0):
    """Per-task training accuracy on a sequence of tasks, each a fresh random labelling of one input set."""
    torch.manual_seed(seed)
    x = torch.randn(128, 16)
    net = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    cbp = clfast.CBP(net, replacement_rate=replacement_rate, maturity_threshold=50, optimizer=opt,
                     generator=torch.Generator().manual_seed(seed)) if replacement_rate else None
    accs = []
    for _ in range(tasks):
        y = torch.randint(0, 4, (128,))
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
            if cbp is not None:
                cbp.step()
        accs.append(float((net(x).argmax(1) == y).float().mean()))
    return accs


def test_cbp_keeps_plasticity_where_backprop_loses_it():
    plain, cbp = _plasticity(0.0), _plasticity(1e-3)
    # early tasks: both memorise; late tasks: plain backprop has lost the ability, CBP has not
    assert min(plain[:4]) > 0.95 and min(cbp[:4]) > 0.95
    late_plain, late_cbp = sum(plain[-6:]) / 6, sum(cbp[-6:]) / 6
    assert late_cbp > 0.95 and late_cbp - late_plain > 0.2, (plain, cbp)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_steps_never_synchronise():
    net = _net(conv=True).cuda()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    cbp = clfast.CBP(net, replacement_rate=0.1, maturity_threshold=2, optimizer=opt,
                     generator=torch.Generator(device="cuda").manual_seed(0))
    x, y = torch.randn(16, 1, 8, 8, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    for _ in range(3):  # warm-up (allocations, lazy initialisation)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
        cbp.step()
    opt.zero_grad()
    F.cross_entropy(net(x), y).backward()
    opt.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            net(x)
            cbp.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert sum(cbp.stats().values()) > 0
