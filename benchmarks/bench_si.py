"""SI per training step on a 784-2000-2000-2000-10 MLP (9.6M parameters), CPU and CUDA:

* ``seed_pre_post`` / ``clfast_pre_post``: hypnettorch's si_pre_optim_step + si_post_optim_step vs clfast.si's;
* ``seed_step`` / ``clfast_functional_step`` / ``clfast_fused_step``: pre + torch.optim.SGD.step() + post, the
  same with clfast.si's functions, and clfast.optim.SGD(si=...) doing both in one pass;
* each fused kernel beside a plain copy of the same tensors, to express it as a multiple of the memory
  bandwidth bound (bytes it must move / bandwidth of the copy).

Run with ``make bench``; the closing table prints the ratios (``CLFAST_BENCH_SUMMARY=path`` writes them).
"""
import pytest
import torch
from torch import nn

import clfast
from clfast import si as csi
from clfast.baselines import si_hypnettorch as seed

from clfast_testing import measure, needs_native

pytestmark = [pytest.mark.benchmark(min_rounds=20, max_time=2.0, warmup=True, warmup_iterations=3), needs_native]

SIZES = (784, 2000, 2000, 2000, 10)


def _mlp(device):
    torch.manual_seed(0)
    layers = []
    for a, b in zip(SIZES[:-1], SIZES[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    net = nn.Sequential(*layers[:-1]).to(device)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return net


def _numel(net):
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("impl", ["seed", "clfast"])
def test_pre_post(benchmark, device, impl):
    net = _mlp(device)
    params = list(net.parameters())
    api = seed if impl == "seed" else csi
    api.si_pre_optim_step(net, params)

    def step():
        api.si_pre_optim_step(net, params)
        api.si_post_optim_step(net, params)

    measure(benchmark, step, device, "si pre+post", f"test_pre_post[{device}-seed]")


@pytest.mark.parametrize("impl", ["seed", "clfast_functional", "clfast_fused"])
def test_step(benchmark, device, impl):
    net = _mlp(device)
    params = list(net.parameters())
    if impl == "clfast_fused":
        opt = clfast.optim.SGD(params, lr=1e-4, si=clfast.SI(net))
        run_step = opt.step
    else:
        api = seed if impl == "seed" else csi
        opt = torch.optim.SGD(params, lr=1e-4)
        api.si_pre_optim_step(net, params)

        def run_step():
            api.si_pre_optim_step(net, params)
            opt.step()
            api.si_post_optim_step(net, params)

    measure(benchmark, run_step, device, "SGD step + SI", f"test_step[{device}-seed]")


# bytes each kernel must move, in parameter-sized float32 arrays (reads + writes)
ARRAYS = {"copy": 2, "si_accumulate_": 5, "si_consolidate_": 7, "si_penalty": 3, "si_penalty_grad_": 5,
          "sgd_si_step_": 5, "adam_si_step_": 9}


@pytest.mark.parametrize("kernel", list(ARRAYS))
def test_kernel(benchmark, device, kernel):
    net = _mlp(device)
    p = [q.detach() for q in net.parameters()]
    g = [q.grad for q in net.parameters()]
    mk = lambda: [torch.rand_like(q) for q in p]  # noqa: E731
    a, b, c = mk(), mk(), mk()
    ops = torch.ops.clfast
    calls = {
        "copy": lambda: torch._foreach_copy_(a, p),
        "si_accumulate_": lambda: ops.si_accumulate_(a, p, b, g, False),
        "si_consolidate_": lambda: ops.si_consolidate_(a, b, c, p, 1e-3),
        "si_penalty": lambda: ops.si_penalty(a, b, p),
        "si_penalty_grad_": lambda: ops.si_penalty_grad_(g, a, b, p, 1e-9),
        "sgd_si_step_": lambda: ops.sgd_si_step_(p, g, [], a, 1e-9, 0.0, 0.0, 0.0, False, False),
        "adam_si_step_": lambda: ops.adam_si_step_(p, g, b, c, a, 1e-9, 0.9, 0.999, 1e-8, 0.0, 0.1, 0.001),
    }
    measure(benchmark, calls[kernel], device, "fused kernels, 9.6M params", bytes=ARRAYS[kernel] * 4 * _numel(net),
            copy=f"test_kernel[{device}-copy]")
