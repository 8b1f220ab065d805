"""What keeping clfast's state identical on every rank costs: per training step of each component, the
collectives clfast itself makes (count and bytes, besides DDP's own gradient all-reduce), and the step time of
two gloo processes with one thread each against one process with two threads, on the same global batch.

    python benchmarks/distributed_cost.py [--steps 60] [--repeats 3]

The model is the runner's MLP (784-256-256-10; the three-layer DAN for ``dan``), the global batch 128 random
images; times are medians over the steps after a warm-up, one line per repeat (this machine is noisy).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import clfast

BATCH, WARMUP = 128, 10
COMPONENTS = ["ddp", "si", "ewc", "ocar-ema", "ocar-exact", "cbp", "replay", "dan"]
COLLECTIVES = ["all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "broadcast_object_list",
               "all_gather_object"]


def _count_collectives(counts: Counter) -> None:
    """Wraps torch.distributed's Python collectives (what clfast calls; DDP's reducer runs in C++ and is not seen)
    to add their calls and tensor bytes to ``counts``."""
    for name in COLLECTIVES:
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            if counts.get("on"):
                counts[_name] += 1
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                tensors += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                counts["bytes"] += sum(t.numel() * t.element_size() for t in tensors[:1])
            return _original(*args, **kwargs)
        setattr(dist, name, wrapped)


def _model(component: str) -> nn.Module:
    torch.manual_seed(0)
    if component == "dan":
        return nn.Sequential(nn.Flatten(), clfast.nn.DAN(784, 10, sync_batchnorm=True))
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _batches(rank: int, world: int, steps: int):
    g = torch.Generator().manual_seed(0)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for _ in range(steps):
        x, y = torch.rand(BATCH, 784, generator=g), torch.randint(0, 10, (BATCH,), generator=g)
        yield x[share], y[share]


def _run(component: str, rank: int, world: int, steps: int) -> dict:
    """Median step time (s) and clfast's collectives per step of ``component``."""
    counts: Counter = Counter()
    if world > 1:
        _count_collectives(counts)
    model = _model(component)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    hooks = {}
    if component == "si":
        si = clfast.SI(model, strength=0.1)
        opt = clfast.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, si=si)
    elif component == "ewc":
        ewc = clfast.EWC(model, "diag")
        x, y = next(_batches(rank, world, 1))
        ewc.consolidate(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64))
        hooks["after_backward"] = lambda: ewc.add_penalty_grad_(1.0)
    elif component == "cbp":
        cbp = clfast.CBP(model, replacement_rate=1e-3, maturity_threshold=5, optimizer=opt,
                         generator=torch.Generator().manual_seed(1))
        hooks["after_step"] = cbp.step
    elif component == "replay":
        buffer = clfast.ReservoirBuffer(1000, generator=torch.Generator().manual_seed(1), scope="global")
    elif component.startswith("ocar"):
        ocar = clfast.OCAR(model, clfast.ReservoirBuffer(1000, generator=torch.Generator().manual_seed(1),
                                                         scope="global"),
                           opt, "kfac", damping=0.1, fisher=component.split("-")[1], refresh=10,
                           generator=torch.Generator().manual_seed(2))
    times = []
    for step, (x, y) in enumerate(_batches(rank, world, steps + WARMUP)):
        counts["on"] = step >= WARMUP
        start = time.perf_counter()
        xs, ys = x, y  # what is trained on: the stream's batch and what is replayed
        if component == "replay" and len(buffer):
            xb, yb = buffer.sample(len(y))
            xs, ys = torch.cat([x, xb]), torch.cat([y, yb])
        if component.startswith("ocar"):
            xs, ys = ocar.replay(x, y)
            out = ocar.forward(xs, net)
        else:
            out = net(xs)
        opt.zero_grad()
        F.cross_entropy(out, ys).backward()
        if "after_backward" in hooks:
            hooks["after_backward"]()
        if component.startswith("ocar"):
            ocar.precondition_(xs, ys)
        opt.step()
        if "after_step" in hooks:
            hooks["after_step"]()
        if component.startswith("ocar"):
            ocar.end_step(x, y)
        elif component == "replay":
            buffer.add(x, y)
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    counts.pop("on")
    return {"time": statistics.median(times), "collectives": {k: v / steps for k, v in counts.items()}}


def _worker(rank: int, component: str, steps: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=2)
    try:
        torch.save(_run(component, rank, 2, steps), f"{folder}/{rank}.pt")
    finally:
        dist.destroy_process_group()
    # no interpreter teardown, where gloo's threads sometimes abort a finished process
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--components", default=",".join(COMPONENTS))
    args = p.parse_args()
    param_bytes = {c: sum(q.numel() * q.element_size() for q in _model(c).parameters()) for c in ("ddp", "dan")}
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; DDP all-reduces the gradients each step: "
          f"{param_bytes['ddp']} bytes (MLP), {param_bytes['dan']} bytes (DAN)")
    print("component    | clfast's collectives per step (bytes)       | 1 process, 2 threads | 2 ranks, 1 thread "
          "each | 2 ranks / 1")
    for component in args.components.split(","):
        for _ in range(args.repeats):
            torch.set_num_threads(2)
            one = _run(component, 0, 1, args.steps)
            with tempfile.TemporaryDirectory() as folder:
                mp.spawn(_worker, args=(component, args.steps, folder), nprocs=2, join=True)
                two = [torch.load(f"{folder}/{r}.pt") for r in range(2)]
            c = two[0]["collectives"]
            calls = ", ".join(f"{v:g} {k}" for k, v in sorted(c.items()) if k != "bytes") or "none"
            t2 = max(r["time"] for r in two)
            print(f"{component:<12} | {calls} ({c.get('bytes', 0):.0f} B)".ljust(60)
                  + f" | {1e3 * one['time']:8.2f} ms | {1e3 * t2:8.2f} ms | {t2 / one['time']:.2f}x", flush=True)


if __name__ == "__main__":
    sys.exit(main())
