"""clfast.avalanche: each plugin in Avalanche's Naive equals clfast's module driven by hand on the same minibatches;
the SI and empirical-EWC plugins equal Avalanche's own plugins where their definitions agree; replay beats Naive."""
import copy
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import clfast
from clfast.avalanche import CBPPlugin, EWCPlugin, OCARPlugin, ReplayPlugin, SIPlugin

warnings.filterwarnings("ignore", module="avalanche")
from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.core import SupervisedPlugin  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training.plugins import EvaluationPlugin  # noqa: E402
from avalanche.training.plugins import EWCPlugin as AvalancheEWC  # noqa: E402
from avalanche.training.plugins import SynapticIntelligencePlugin  # noqa: E402

CLASSES, DIM, MB, LR = 6, 24, 32, 0.02


def _dataset(n, generator):
    y = torch.arange(n) % CLASSES
    centres = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    x = centres[y] + torch.randn(n, DIM, generator=generator)
    data = torch.utils.data.TensorDataset(x, y)
    data.targets = y.tolist()
    return data


@pytest.fixture(scope="module")
def bench():
    """Three experiences of two classes each, from tensors."""
    g = torch.Generator().manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nc_benchmark(_dataset(720, g), _dataset(360, g), n_experiences=3, task_labels=False, seed=0,
                            fixed_class_order=list(range(CLASSES)))


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(DIM, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, CLASSES))


class Recorder(SupervisedPlugin):
    """The minibatches Avalanche's loop hands to the plugins, per experience, before any plugin changes them."""

    def __init__(self):
        super().__init__()
        self.experiences = []

    def before_training_exp(self, strategy, **kwargs):
        self.experiences.append([])

    def before_training_iteration(self, strategy, **kwargs):
        self.experiences[-1].append([t.clone() for t in strategy.mbatch])


def _dan(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(clfast.nn.DANLayer(2, DIM, 8, 6), nn.Tanh(), clfast.nn.DANLayer(1, 12, 6, CLASSES))


def _avalanche(bench, plugins, optimizer=clfast.optim.SGD, epochs=1, eval_every=-1, device="cpu", momentum=0.5,
               make=_model):
    model = make()
    recorder = Recorder()
    strategy = Naive(model=model, optimizer=optimizer(model.parameters(), lr=LR, momentum=momentum),
                     train_mb_size=MB, train_epochs=epochs, eval_mb_size=256, device=device,
                     plugins=[recorder, *plugins], evaluator=EvaluationPlugin(loggers=[]), eval_every=eval_every)
    torch.manual_seed(1)
    for exp in bench.train_stream:
        strategy.train(exp, eval_streams=[bench.test_stream] if eval_every >= 0 else None)
    return model, recorder.experiences, strategy


def _accuracy(model, bench):
    model.eval()
    with torch.no_grad():
        correct = total = 0
        for exp in bench.test_stream:
            for x, y, _ in torch.utils.data.DataLoader(exp.dataset, batch_size=512):
                correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
    return correct / total


def _equal(a, b, exact=True):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def _assert_trained(model):
    assert not torch.equal(model[0].weight, _model()[0].weight)


# ---- each plugin against clfast's module driven by hand --------------------------------------------------------


@pytest.mark.parametrize("eval_every", [-1, 1])
@pytest.mark.parametrize("fused", [True, False])
def test_si_plugin_equals_clfast_si_by_hand(bench, fused, eval_every):
    opt_class = clfast.optim.SGD if fused else torch.optim.SGD
    lam = 0.5
    model, stream, strategy = _avalanche(bench, [SIPlugin(lam)], opt_class, eval_every=eval_every)
    _assert_trained(model)
    ref = _model()
    si = clfast.SI(ref, strength=lam / 2, epsilon=1e-7)
    opt = clfast.optim.SGD(ref.parameters(), lr=LR, momentum=0.5, si=si) if fused else \
        torch.optim.SGD(ref.parameters(), lr=LR, momentum=0.5)
    for t, batches in enumerate(stream):
        for x, y, _ in batches:
            opt.zero_grad()
            loss = F.cross_entropy(ref(x), y) + (si.penalty() if t else 0)
            loss.backward()
            if not fused:
                si.before_step()
            opt.step()
            if not fused:
                si.after_step()
        si.consolidate()
    _equal(model, ref)
    if fused:
        assert strategy.optimizer.si is strategy.plugins[1].si  # attached, and kept by make_optimizer


def test_si_plugin_equals_avalanche_si_without_its_clip(bench, monkeypatch):
    """Avalanche's SI is the same path integral with lambda / 2, clipped at 0.001. Two fixes make it comparable:
    no clip, and copies of the weights (on a CPU model, Avalanche 0.6 keeps views of the live parameters as its
    'old' weights, so every step's update reads as zero and it regularises nothing). Then the two agree but for
    one more difference: clfast never lets a task lower an importance."""
    naive, _, _ = _avalanche(bench, [], torch.optim.SGD)
    as_is = SynapticIntelligencePlugin(0.5)
    unfixed, _, _ = _avalanche(bench, [as_is], torch.optim.SGD)
    assert not as_is.ewc_data[1]["0.weight"].data.any()  # no importance at all
    _equal(unfixed, naive)

    @torch.no_grad()
    def extract_weights(model, target, excluded_parameters):
        for name, param in SynapticIntelligencePlugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().cpu().flatten().clone()

    monkeypatch.setattr(SynapticIntelligencePlugin, "extract_weights", staticmethod(extract_weights))

    class Unclipped(SynapticIntelligencePlugin):
        def after_training_exp(self, strategy, **kwargs):
            self.update_ewc_data(strategy.model, self.ewc_data, self.syn_data, float("inf"), self.excluded_parameters,
                                 1, eps=self.eps)

    class Snapshots(SupervisedPlugin):
        def __init__(self, importance):
            super().__init__()
            self.importance, self.taken = importance, []

        def after_training_exp(self, strategy, **kwargs):
            self.taken.append(([p.clone() for p in strategy.model.parameters()], self.importance().clone()))

    plugin, unclipped = SIPlugin(0.5), Unclipped(0.5)
    ours_at = Snapshots(lambda: plugin.si.importance[0].flatten())
    theirs_at = Snapshots(lambda: unclipped.ewc_data[1]["0.weight"].data)
    ours, stream, _ = _avalanche(bench, [plugin, ours_at], torch.optim.SGD)
    theirs, stream2, _ = _avalanche(bench, [unclipped, theirs_at], torch.optim.SGD)
    assert all(torch.equal(a[0], b[0]) for e, f in zip(stream, stream2) for a, b in zip(e, f))
    (p0, ours0), (p1, ours1) = ours_at.taken[:2]
    (q0, theirs0), (q1, theirs1) = theirs_at.taken[:2]
    # the first task's importances agree; the second task trains with them to the same weights
    torch.testing.assert_close(ours0, theirs0, rtol=1e-5, atol=0)
    for a, b in zip(p1, q1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # Each task adds omega / (delta^2 + eps) to the importances; clfast (as hypnettorch) adds it clamped at 0 from
    # below, Avalanche adds it as it is.
    assert (theirs1 - theirs0).min() < 0
    torch.testing.assert_close(ours1, ours0 + (theirs1 - theirs0).clamp_min(0), rtol=1e-4, atol=1e-4)
    clip = SynapticIntelligencePlugin(0.5)
    clipped, _, _ = _avalanche(bench, [clip], torch.optim.SGD)
    at_clip = (clip.ewc_data[1]["0.weight"].data == 1e-3).double().mean()
    assert at_clip > 0.9, at_clip  # the clip binds on nearly every first-layer weight
    assert not torch.allclose(ours[0].weight, clipped[0].weight, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("eval_every", [-1, 1])
@pytest.mark.parametrize("representation,mode", [("diag", "separate"), ("kfac", "online"), ("dense", "separate")])
def test_ewc_plugin_equals_clfast_ewc_by_hand(bench, representation, mode, eval_every):
    lam, decay = 20.0, (0.8 if mode == "online" else None)
    plugin = EWCPlugin(lam, mode=mode, decay_factor=decay, representation=representation)
    model, stream, _ = _avalanche(bench, [plugin], eval_every=eval_every)
    _assert_trained(model)
    assert len(plugin.ewc.fishers) == 3
    ref = _model()
    ewc = clfast.EWC(ref, representation, mode=mode, gamma=decay or 1.0)
    opt = clfast.optim.SGD(ref.parameters(), lr=LR, momentum=0.5)
    for t, batches in enumerate(stream):
        for x, y, _ in batches:
            opt.zero_grad()
            loss = F.cross_entropy(ref(x), y) + (lam * ewc.penalty() if t else 0)
            loss.backward()
            opt.step()
        ewc.consolidate(torch.utils.data.DataLoader(bench.train_stream[t].dataset, batch_size=MB))
    _equal(model, ref)


def test_ewc_plugin_empirical_equals_avalanche_ewc(bench):
    """variant='empirical' is Avalanche's Fisher (squared minibatch gradients); the penalty is the same."""
    ours, stream, _ = _avalanche(bench, [EWCPlugin(20.0, variant="empirical")])
    theirs, stream2, _ = _avalanche(bench, [AvalancheEWC(20.0)])
    assert all(torch.equal(a[0], b[0]) for e, f in zip(stream, stream2) for a, b in zip(e, f))
    _equal(ours, theirs, exact=False)
    online, _, _ = _avalanche(bench, [EWCPlugin(20.0, "online", 0.5, variant="empirical")])
    theirs_online, _, _ = _avalanche(bench, [AvalancheEWC(20.0, "online", 0.5)])
    _equal(online, theirs_online, exact=False)


@pytest.mark.parametrize("eval_every", [-1, 1])
def test_replay_plugin_equals_reservoir_by_hand(bench, eval_every):
    plugin = ReplayPlugin(mem_size=64, batch_size_mem=16, seed=3)
    model, stream, _ = _avalanche(bench, [plugin], eval_every=eval_every)
    assert plugin.buffer.num_seen == 720 and plugin.buffer.storage[0].device == torch.device("cpu")
    ref = _model()
    buffer = clfast.ReservoirBuffer(64, generator=torch.Generator().manual_seed(3))
    opt = clfast.optim.SGD(ref.parameters(), lr=LR, momentum=0.5)
    for batches in stream:
        for fields in batches:
            x, y, _ = fields
            if len(buffer):
                xb, yb, _ = buffer.sample(16)
                x, y = torch.cat([x, xb]), torch.cat([y, yb])
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
            buffer.add(*fields)
    _equal(model, ref)
    for a, b in zip(plugin.buffer.storage, buffer.storage):
        assert torch.equal(a, b)


@pytest.mark.parametrize("eval_every", [-1, 1])
def test_cbp_plugin_equals_clfast_cbp_by_hand(bench, eval_every):
    options = dict(replacement_rate=0.02, maturity_threshold=5, utility_decay_rate=0.9)
    plugin = CBPPlugin(**options, seed=4)
    model, stream, _ = _avalanche(bench, [plugin], eval_every=eval_every)
    assert sum(plugin.cbp.stats().values()) > 10  # units were replaced
    ref = _model()
    opt = clfast.optim.SGD(ref.parameters(), lr=LR, momentum=0.5)
    cbp = clfast.CBP(ref, **options, optimizer=opt, generator=torch.Generator().manual_seed(4))
    for batches in stream:
        for x, y, _ in batches:
            opt.zero_grad()
            F.cross_entropy(ref(x), y).backward()
            opt.step()
            cbp.step()
    assert cbp.stats() == plugin.cbp.stats()
    _equal(model, ref)


@pytest.mark.parametrize("eval_every", [-1, 1])
@pytest.mark.parametrize("fisher", ["exact", "ema"])
def test_ocar_plugin_equals_clfast_ocar_by_hand(bench, fisher, eval_every):
    plugin = OCARPlugin(mem_size=48, damping=0.1, fisher=fisher, refresh=3, seed=5)
    model, stream, _ = _avalanche(bench, [plugin], momentum=0.0, eval_every=eval_every)
    _assert_trained(model)
    ref = _model()
    g = torch.Generator().manual_seed(5)
    opt = clfast.optim.SGD(ref.parameters(), lr=LR)
    ocar = clfast.OCAR(ref, clfast.ReservoirBuffer(48, generator=g), opt, damping=0.1, fisher=fisher, refresh=3,
                       generator=g)
    for batches in stream:
        for x, y, _ in batches:
            ocar.step(x, y)
    _equal(model, ref)


@pytest.mark.parametrize("fisher", ["exact", "ema"])
def test_ewc_and_ocar_plugins_on_a_dan_equal_clfast_driven_by_hand(bench, fisher):
    """A DAN's Fisher blocks hold views of its stacked parameters: the plugins still recognise the strategy's
    model at every experience, and train it as clfast's modules do by hand."""
    plugin = EWCPlugin(ewc_lambda=10.0, representation="kfac")
    model, stream, _ = _avalanche(bench, [plugin], momentum=0.0, make=_dan)
    assert len(plugin.ewc.fishers) == 3
    ref = _dan()
    opt = clfast.optim.SGD(ref.parameters(), lr=LR)
    ewc = clfast.EWC(ref, "kfac")
    for batches in stream:
        ref.train()
        for x, y, _ in batches:
            opt.zero_grad()
            (F.cross_entropy(ref(x), y) + 10.0 * ewc.penalty()).backward()
            opt.step()
        ewc.consolidate([(x, y) for x, y, _ in batches])
    _equal(model, ref, exact=False)

    plugin = OCARPlugin(mem_size=48, damping=0.1, fisher=fisher, refresh=3, seed=5)
    model, stream, _ = _avalanche(bench, [plugin], momentum=0.0, make=_dan)
    ref = _dan()
    g = torch.Generator().manual_seed(5)
    ocar = clfast.OCAR(ref, clfast.ReservoirBuffer(48, generator=g), clfast.optim.SGD(ref.parameters(), lr=LR),
                       damping=0.1, fisher=fisher, refresh=3, generator=g)
    for batches in stream:
        for x, y, _ in batches:
            ocar.step(x, y)
    assert not torch.equal(model[0].weight1, _dan()[0].weight1)
    _equal(model, ref, exact=False)


# ---- behaviour -----------------------------------------------------------------------------------------------------


def test_replay_beats_naive_in_class_incremental_accuracy(bench):
    naive, _, _ = _avalanche(bench, [], epochs=3)
    replay, _, _ = _avalanche(bench, [ReplayPlugin(mem_size=120, seed=0)], epochs=3)
    acc_naive, acc_replay = _accuracy(naive, bench), _accuracy(replay, bench)
    assert acc_naive < 0.5  # mostly the last experience's classes: forgetting
    assert acc_replay > acc_naive + 0.2, (acc_naive, acc_replay)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_plugins_follow_the_strategy_device(bench, device):
    device = torch.device(device)
    replay, ocar = ReplayPlugin(mem_size=32), OCARPlugin(mem_size=32, fisher="ema")
    for plugins in ([replay], [ocar], [SIPlugin(1.0), CBPPlugin()], [EWCPlugin(1.0)]):
        _avalanche(bench, plugins, device=device)
    assert replay.buffer.storage[0].device.type == device.type
    assert ocar.ocar.buffer.storage[0].device.type == device.type


def test_default_seed_follows_torch_manual_seed(bench):
    runs = []
    for _ in range(2):
        plugin = ReplayPlugin(mem_size=32)
        runs.append(_avalanche(bench, [plugin])[0])
    _equal(runs[0], runs[1])


def test_combined_plugins_run(bench):
    model, _, _ = _avalanche(bench, [ReplayPlugin(mem_size=64, seed=0), CBPPlugin(seed=0), SIPlugin(0.1)])
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,match", [
    (lambda: SIPlugin(-1.0), "si_lambda"),
    (lambda: SIPlugin(1.0, eps=0), "eps"),
    (lambda: EWCPlugin(1.0, mode="online"), "decay_factor"),
    (lambda: EWCPlugin(1.0, decay_factor=0.5), "decay_factor"),
    (lambda: EWCPlugin(1.0, mode="both"), "mode"),
    (lambda: EWCPlugin(1.0, representation="kfac", variant="empirical"), "empirical"),
    (lambda: EWCPlugin(1.0, representation="full"), "representation"),
    (lambda: EWCPlugin(1.0, variant="classif"), "variant"),
    (lambda: EWCPlugin(1.0, fisher_samples=0), "fisher_samples"),
    (lambda: ReplayPlugin(0), "capacity"),
    (lambda: ReplayPlugin(10, task_balanced_dataloader=True), "task_balanced"),
    (lambda: ReplayPlugin(10, storage_policy=object()), "storage_policy"),
    (lambda: ReplayPlugin(10, batch_size_mem=0), "batch_size_mem"),
    (lambda: CBPPlugin(replacement_rate=2.0), "replacement_rate"),
    (lambda: CBPPlugin(utility="magic"), "utility"),
    (lambda: OCARPlugin(mem_size=0), "capacity"),
    (lambda: OCARPlugin(damping=0), "damping"),
    (lambda: OCARPlugin(representation="diag", fisher="ema"), "ema"),
])
def test_bad_arguments_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_replay_batch_size_other_than_the_strategy_raises(bench):
    with pytest.raises(ValueError, match="train_mb_size"):
        _avalanche(bench, [ReplayPlugin(10, batch_size=MB + 1)])


def test_si_device_other_than_the_strategy_raises(bench):
    with pytest.raises(ValueError, match="as_strategy"):
        _avalanche(bench, [SIPlugin(1.0, device="meta")])


def test_si_plugin_refuses_an_optimizer_with_another_si(bench):
    model = _model()
    other = clfast.SI(model)
    strategy = Naive(model=model, optimizer=clfast.optim.SGD(model.parameters(), lr=LR, si=other), train_mb_size=MB,
                     plugins=[SIPlugin(1.0)], evaluator=EvaluationPlugin(loggers=[]))
    with pytest.raises(ValueError, match="another clfast.SI"):
        strategy.train(bench.train_stream[0])


def test_a_replaced_model_is_refused(bench):
    plugin = SIPlugin(1.0)
    _, _, strategy = _avalanche(bench, [plugin])
    strategy.model = _model(1)
    strategy.optimizer = torch.optim.SGD(strategy.model.parameters(), lr=LR)
    with pytest.raises(ValueError, match="no longer holds"):
        strategy.train(bench.train_stream[0])


def test_import_error_names_the_extra():
    code = "import sys; sys.modules['avalanche'] = None; import clfast.avalanche"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode != 0
    assert "ImportError" in result.stderr and "clfast[avalanche]" in result.stderr
