"""clfast's Avalanche plugins against Avalanche 0.6's own and against plain ``Naive``, CPU, in one run.

An MLP 784-2000-2000-10 (5.6M parameters), batch 128, two experiences of 2,560 examples. Each strategy trains the
first experience (untimed), is set up for the second as ``train`` would set it up (``_before_training_exp``:
its data loader, the plugins' hooks), and then one epoch on it is timed, ``training_epoch()``; so the penalties
have a Fisher or importances to use and the buffers hold samples:

* ``epoch[naive]``: plain Naive with ``torch.optim.SGD``, the baseline of every epoch;
* ``epoch[naive_clfast_sgd]``: the same with ``clfast.optim.SGD``;
* ``epoch[<method>_avalanche]`` / ``epoch[<method>_clfast]`` for SI, replay (1,000 samples, 128 replayed per step)
  and EWC (diag): Avalanche's plugin with ``torch.optim.SGD``, clfast's with ``clfast.optim.SGD``;
* ``consolidate[...]``: the end of an experience for EWC (the Fisher on the experience's 2,560 examples):
  Avalanche's (squared minibatch gradients), clfast's default (nngeometry's per-example ``FIM``) and clfast's
  ``variant="empirical"`` (Avalanche's Fisher); the baseline is Avalanche's.

With ``--benchmark-disable`` (the smoke run of ``make test``) the same code runs once on a small MLP.
"""
import warnings

import pytest
import torch
from torch import nn

import clfast

from clfast_testing import needs_native

warnings.filterwarnings("ignore", module="avalanche")
avalanche = pytest.importorskip("avalanche")
from avalanche.benchmarks import nc_benchmark  # noqa: E402
from avalanche.training import Naive  # noqa: E402
from avalanche.training import plugins as av  # noqa: E402

from clfast import avalanche as cl  # noqa: E402

pytestmark = [needs_native]

BATCH, PER_EXPERIENCE, LR = 128, 2560, 0.01


@pytest.fixture(scope="module")
def small(request):
    return request.config.getoption("benchmark_disable")


@pytest.fixture(scope="module")
def bench(small):
    n = 256 if small else PER_EXPERIENCE
    g = torch.Generator().manual_seed(0)

    def dataset(size):
        y = torch.arange(size) % 4
        data = torch.utils.data.TensorDataset(torch.randn(4, 784, generator=g)[y] + torch.randn(size, 784, generator=g),
                                              y)
        data.targets = y.tolist()
        return data

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return nc_benchmark(dataset(2 * n), dataset(64), n_experiences=2, task_labels=False,
                            fixed_class_order=[0, 1, 2, 3])


def _mlp(small):
    torch.manual_seed(0)
    hidden = 64 if small else 2000
    return nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _strategy(bench, small, plugins, fused):
    """A Naive strategy that has trained the first experience and is set up for the second."""
    model = _mlp(small)
    optimizer = (clfast.optim.SGD if fused else torch.optim.SGD)(model.parameters(), lr=LR)
    strategy = Naive(model=model, optimizer=optimizer, train_mb_size=BATCH, train_epochs=1, device="cpu",
                     plugins=plugins, evaluator=av.EvaluationPlugin(loggers=[]))
    strategy.train(bench.train_stream[0])
    strategy.is_training = True
    strategy.experience = bench.train_stream[1]
    strategy._before_training_exp()
    return strategy


EPOCHS = {
    "naive": (lambda: [], False),
    "naive_clfast_sgd": (lambda: [], True),
    "si_avalanche": (lambda: [av.SynapticIntelligencePlugin(1.0)], False),
    "si_clfast": (lambda: [cl.SIPlugin(1.0, eps=1e-3)], True),
    "replay_avalanche": (lambda: [av.ReplayPlugin(mem_size=1000)], False),
    "replay_clfast": (lambda: [cl.ReplayPlugin(mem_size=1000, seed=0)], True),
    "ewc_avalanche": (lambda: [av.EWCPlugin(10.0)], False),
    "ewc_clfast": (lambda: [cl.EWCPlugin(10.0)], True),
}


@pytest.mark.parametrize("config", list(EPOCHS))
def test_epoch(benchmark, bench, small, config):
    plugins, fused = EPOCHS[config]
    strategy = _strategy(bench, small, plugins(), fused)
    benchmark.group = "avalanche Naive epoch [cpu]"
    if config != "naive":
        benchmark.extra_info["baseline"] = "test_epoch[naive]"
    benchmark.pedantic(strategy.training_epoch, rounds=3, iterations=1, warmup_rounds=1)


CONSOLIDATIONS = {
    "avalanche": lambda: av.EWCPlugin(10.0),
    "clfast": lambda: cl.EWCPlugin(10.0),
    "clfast_empirical": lambda: cl.EWCPlugin(10.0, variant="empirical"),
}


@pytest.mark.parametrize("config", list(CONSOLIDATIONS))
def test_consolidate(benchmark, bench, small, config):
    plugin = CONSOLIDATIONS[config]()
    strategy = _strategy(bench, small, [plugin], config != "avalanche")
    benchmark.group = "avalanche EWC consolidation [cpu]"
    if config != "avalanche":
        benchmark.extra_info["baseline"] = "test_consolidate[avalanche]"
    benchmark.pedantic(plugin.after_training_exp, args=(strategy,), rounds=1, iterations=1)
