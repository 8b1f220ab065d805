"""CBP step (utility update + replacement) on a 784-2000-2000-2000-10 MLP with a batch of 256 activations:
clfast (native) vs clfast on the pure-torch references vs a CLArena-style step. Hyperparameters make every
step replace units (replacement_rate 1e-3, maturity_threshold 0), so the timings include the replacement."""
import pytest
import torch
from torch import nn

import clfast
from clfast.baselines.cbp_clarena import CLArenaCBP
from clfast_testing import measure

pytestmark = pytest.mark.benchmark(min_rounds=10, max_time=2.0, warmup=True, warmup_iterations=2)
SIZES = (784, 2000, 2000, 2000, 10)


def _setup(device):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1]).to(device)
    acts = {str(2 * i): torch.relu(torch.randn(256, n, device=device)) for i, n in enumerate(SIZES[1:-1])}
    return net, acts


@pytest.mark.parametrize("impl", ["clarena", "reference", "native"])
def test_cbp_step(benchmark, device, impl):
    if impl == "native" and not clfast.native_available():
        pytest.skip("native extension not built")
    net, acts = _setup(device)
    if impl == "clarena":
        hidden = [net[0], net[2], net[4], net[6]]
        base = CLArenaCBP([(str(2 * i), hidden[i], hidden[i + 1]) for i in range(3)], 1e-3, 0, 0.99)
        step = lambda: base.on_train_batch_end(acts)  # noqa: E731
    else:
        cbp = clfast.CBP(net, replacement_rate=1e-3, maturity_threshold=0)
        step = lambda: cbp.step(acts)  # noqa: E731
    measure(benchmark, step, device, "CBP step, 784-2000-2000-2000-10, batch 256", f"test_cbp_step[{device}-clarena]",
            backend="reference" if impl == "reference" else None)
