"""DAN: the per-neuron DAN implementation (a Python loop of nn.Sequential neurons) vs clfast.nn.DAN (one fused op per
layer), forward+backward and a full Adam step, at batch 64 and 1024, plus a wide layer (32 neurons, ni=256,
nf=64). ``bmm`` is clfast on its pure-torch reference (the layer written with batched torch ops); on CUDA,
``bmm_compiled`` is that version under torch.compile. ``native+fused_adam`` steps with clfast.optim.Adam (one
op for all parameters) instead of torch.optim.Adam."""
import pytest
import torch
from torch import nn

import clfast
from clfast.baselines import dan as seed
from clfast_testing import measure

pytestmark = pytest.mark.benchmark(min_rounds=10, max_time=2.0, warmup=True, warmup_iterations=3)
IMPLS = ["seed", "bmm", "bmm_compiled", "native", "native+fused_adam"]


def _model(kind, device):
    torch.manual_seed(0)
    if kind == "dan":
        ref = seed.DAN(100, 1, act=nn.ReLU())
    else:  # one wide layer
        ref = seed.DANLayer(32, 256, 64, 16, act_fn=nn.ReLU())
    ref = ref.to(device)
    fast = (clfast.nn.DAN if kind == "dan" else clfast.nn.DANLayer).from_reference(ref)
    return ref, fast


def _bench(benchmark, device, impl, kind, batch, with_step):
    if impl.startswith("native") and not clfast.native_available():
        pytest.skip("native extension not built")
    if impl == "bmm_compiled" and (device != "cuda" or batch != 64 or kind != "dan"):
        pytest.skip("the torch.compile baseline runs only on CUDA, for the three-layer DAN at batch 64")
    if impl == "native+fused_adam" and not with_step:
        pytest.skip("same as native without an optimizer step")
    ref, fast = _model(kind, device)
    model = ref if impl == "seed" else fast
    backend = "reference" if impl.startswith("bmm") else None
    ni = 100 if kind == "dan" else 256
    x = torch.randn(batch, ni, device=device)
    target = torch.randn(batch, 1 if kind == "dan" else 32 * 16, device=device)
    opt = (clfast.optim.Adam if impl == "native+fused_adam" else torch.optim.Adam)(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if impl == "bmm_compiled" else model

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(forward(x), target).backward()
        if with_step:
            opt.step()

    what = "Adam step" if with_step else "forward+backward"
    name = "DAN 100-(3,2,1 neurons)-1" if kind == "dan" else "wide DAN layer (32 neurons, 256-64-16)"
    measure(benchmark, step, device, f"{name}, {what}, batch {batch}",
            f"{benchmark.name.split('[')[0]}[{device}-seed-{batch}]", backend=backend)


@pytest.mark.parametrize("batch", [64, 1024])
@pytest.mark.parametrize("impl", IMPLS)
def test_dan_forward_backward(benchmark, device, impl, batch):
    _bench(benchmark, device, impl, "dan", batch, with_step=False)


@pytest.mark.parametrize("batch", [64, 1024])
@pytest.mark.parametrize("impl", IMPLS)
def test_dan_adam_step(benchmark, device, impl, batch):
    _bench(benchmark, device, impl, "dan", batch, with_step=True)


@pytest.mark.parametrize("batch", [64, 1024])
@pytest.mark.parametrize("impl", IMPLS)
def test_dan_wide_layer(benchmark, device, impl, batch):
    _bench(benchmark, device, impl, "wide", batch, with_step=False)
