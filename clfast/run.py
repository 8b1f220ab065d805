"""``python -m clfast``: Synaptic Intelligence on a two-task split of real Fashion-MNIST.

Trains an MLP on classes 0-4, then 5-9 (a continuum ``ClassIncremental`` scenario), once plainly (finetune)
and once with SI through clfast's fused SGD+SI step; prints the accuracy on each task after each task
(task-incremental: logits masked to the task's classes; class-incremental: all 10 classes), and times one
training step of hypnettorch's SI functions around ``torch.optim.SGD`` against clfast's fused step.
"""
from __future__ import annotations

import argparse
import time
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import _ops
from .data import load_fashion_mnist
from .optim import SGD
from .reference import si_hypnettorch
from .si import SI


def make_mlp(hidden: int = 256, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, 10))


def two_task_split(data_dir: str | None) -> Tuple[list, list]:
    """[(x [N, 1, 28, 28] float in 0..1, y [N], classes)] for train and test, via continuum."""
    from continuum import ClassIncremental
    from continuum.datasets import InMemoryDataset

    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir)
    out = []
    for x, y in ((x_tr, y_tr), (x_te, y_te)):
        scenario = ClassIncremental(InMemoryDataset(x, y), increment=5)
        tasks = []
        for taskset in scenario:
            xs, ys, _ = taskset.get_raw_samples()
            tasks.append((torch.from_numpy(np.ascontiguousarray(xs)).float().div_(255).unsqueeze(1),
                          torch.from_numpy(ys.astype(np.int64)), sorted(set(ys.tolist()))))
        out.append(tasks)
    return out[0], out[1]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: Sequence[int] | None) -> float:
    logits = torch.cat([model(x[i:i + 2000]) for i in range(0, len(x), 2000)])
    if classes is not None:  # task-incremental: only the task's own classes compete
        mask = torch.full((logits.shape[1],), float("-inf"))
        mask[list(classes)] = 0
        logits = logits + mask
    return float((logits.argmax(1) == y).float().mean())


def train(train_tasks, test_tasks, strength: float, epochs: int, lr: float, batch: int, seed: int):
    """Returns (task-IL matrix, class-IL matrix): row t = accuracy on every task after training task t."""
    model = make_mlp(seed=seed)
    si = SI(model, strength=strength) if strength > 0 else None
    opt = SGD(model.parameters(), lr=lr, momentum=0.9, si=si)
    g = torch.Generator().manual_seed(seed)
    til, cil = [], []
    for x, y, _ in train_tasks:
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=g).split(batch):
                opt.zero_grad()
                loss = F.cross_entropy(model(x[idx]), y[idx])
                if si is not None:
                    loss = loss + si.penalty()
                loss.backward()
                opt.step()
        if si is not None:
            si.consolidate()
        til.append([accuracy(model, xt, yt, c) for xt, yt, c in test_tasks])
        cil.append([accuracy(model, xt, yt, None) for xt, yt, c in test_tasks])
    return til, cil


def time_si_step(hidden: int, batch: int, steps: int = 20) -> Tuple[float, float]:
    """Seconds per SGD step with SI bookkeeping: hypnettorch's pre/post around torch.optim.SGD, and clfast's
    fused step. The forward/backward is excluded: both sides start from the same gradients."""
    results = []
    for fused in (False, True):
        model = make_mlp(hidden)
        params = list(model.parameters())
        x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
        F.cross_entropy(model(x), y).backward()
        if fused:
            opt = SGD(params, lr=1e-3, si=SI(model))
            step = opt.step
        else:
            opt = torch.optim.SGD(params, lr=1e-3)

            def step():
                si_hypnettorch.si_pre_optim_step(model, params)
                opt.step()
                si_hypnettorch.si_post_optim_step(model, params)
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        results.append((time.perf_counter() - t0) / steps)
    return results[0], results[1]


def _print_matrix(name: str, m: List[List[float]]) -> None:
    print(f"  {name:<10}" + "".join(f"  task{j}" for j in range(len(m[0]))))
    for t, row in enumerate(m):
        print(f"  after t{t}  " + "".join(f"  {100 * a:5.1f}" for a in row))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clfast", description=__doc__.split("\n")[0])
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--epochs", type=int, default=1, help="epochs per task (default 1)")
    p.add_argument("--strength", type=float, default=3.0, help="SI strength c (default 3)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", choices=_ops.BACKENDS, default=None, help="force native or reference ops")
    args = p.parse_args(argv)
    if args.epochs < 1 or args.batch < 1 or args.lr <= 0 or args.strength < 0:
        p.error("--epochs and --batch must be >= 1, --lr > 0 and --strength >= 0")
    if args.backend:
        _ops.set_backend(args.backend)
    try:
        train_tasks, test_tasks = two_task_split(args.data_dir)
    except FileNotFoundError as exc:
        p.exit(2, f"error: {exc}\n")
    print(f"clfast SI demo: Fashion-MNIST, tasks {[t[2] for t in train_tasks]}, MLP 784-256-256-10, "
          f"{args.epochs} epoch(s) per task, backend={_ops.backend()}")
    for name, strength in (("finetune", 0.0), (f"SI c={args.strength:g}", args.strength)):
        t0 = time.perf_counter()
        til, cil = train(train_tasks, test_tasks, strength, args.epochs, args.lr, args.batch, args.seed)
        print(f"{name}  ({time.perf_counter() - t0:.1f} s)  final average: task-IL {100 * np.mean(til[-1]):.1f}%"
              f", class-IL {100 * np.mean(cil[-1]):.1f}%")
        _print_matrix("task-IL", til)
        _print_matrix("class-IL", cil)
    seed_s, fused_s = time_si_step(hidden=2000, batch=128)
    print(f"SI step on a 784-2000-2000-10 MLP (SGD update + SI accumulation, per step): hypnettorch "
          f"pre+SGD+post {1e3 * seed_s:.1f} ms, clfast fused {1e3 * fused_s:.1f} ms -> {seed_s / fused_s:.1f}x")
    return 0
