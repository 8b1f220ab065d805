"""``python -m clfast``: continual-learning experiments on real Fashion-MNIST with clfast's modules.

Trains one model per method on a continuum scenario, evaluates every task after every epoch, and writes the
accuracy matrices, curves, a summary table, ``results.json`` / CSV files and PNG plots to ``--out``. With no
arguments it runs the demo: split Fashion-MNIST (5 tasks x 2 classes), finetune / replay / ewc / si / ocar /
cbp, an MLP, one epoch per task.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import methods, models, ops, scenarios
from ._version import __version__

DEMO_METHODS = "finetune,replay,ewc,si,ocar,cbp"
PRESETS = {
    # the seed notebook's protocol: its ConvNet, plain SGD lr 0.002, batch 256, 5 epochs per task
    # (and its EWC importance 1000, OCAR regul 1e-2)
    "seed": dict(model="basenet", lr=0.002, momentum=0.0, batch_size=256, epochs=5, ewc_lambda=1000.0,
                 si_strength=1.0, ocar_damping=1e-2),
    # momentum SGD for one epoch per task; strengths that stay stable at this step size
    "demo": dict(model="mlp", lr=0.01, momentum=0.9, batch_size=128, epochs=1, ewc_lambda=100.0, si_strength=0.5,
                 ocar_damping=0.1),
}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m clfast", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenario", choices=scenarios.SCENARIOS, default="split")
    p.add_argument("--methods", default=DEMO_METHODS,
                   help=f"comma-separated; each one of {', '.join(methods.COMPONENTS)} or a '+' combination")
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="defaults for the model, optimizer, epochs and method strengths; explicit flags override them")
    p.add_argument("--model", choices=sorted(models.MODELS), default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per task")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--tasks", type=int, default=5, help="number of tasks of the permuted scenario")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--backend", choices=ops.BACKENDS, default=None, help="native kernels or pure-torch references")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    p.add_argument("--fraction", type=float, default=1.0, help="use this fraction of the data (quick runs)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--numerics", choices=("portable", "native"), default="portable",
                   help="portable: the same numbers on every x86-64 CPU with AVX2 at one thread count (MKL's "
                        "reproducible AVX2 path, ATen's and oneDNN's AVX2 kernels); native: the CPU's widest kernels")
    g = p.add_argument_group("method hyperparameters")
    g.add_argument("--buffer-size", type=int, default=1000)
    g.add_argument("--ewc-representation", choices=("diag", "kfac", "dense", "blockdiag", "ekfac"), default="diag")
    g.add_argument("--ewc-mode", choices=("separate", "online"), default="separate")
    g.add_argument("--ewc-lambda", type=float, default=None, help="EWC strength (the seed's `importance`)")
    g.add_argument("--ewc-gamma", type=float, default=1.0)
    g.add_argument("--fisher-samples", type=int, default=1000, help="samples of a task used for its Fisher")
    g.add_argument("--si-strength", type=float, default=None)
    g.add_argument("--si-epsilon", type=float, default=1e-3)
    g.add_argument("--ocar-representation", choices=("kfac", "diag", "dense"), default="kfac")
    g.add_argument("--ocar-fisher", choices=("exact", "ema"), default="ema")
    g.add_argument("--ocar-damping", type=float, default=None)
    g.add_argument("--ocar-refresh", type=int, default=10)
    g.add_argument("--cbp-rate", type=float, default=1e-4)
    g.add_argument("--cbp-maturity", type=int, default=100)
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = parser()
    args = p.parse_args(argv)
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.epochs < 1 or args.batch_size < 1 or args.lr <= 0 or args.buffer_size < 1 or args.tasks < 1:
        p.error("--epochs, --batch-size, --buffer-size and --tasks must be >= 1 and --lr > 0")
    if not 0 < args.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not args.methods:
        p.error("--methods is empty")
    for m in args.methods:
        try:
            methods.parse(m)
        except ValueError as exc:
            p.error(str(exc))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA device is available")
    return args


@torch.no_grad()
def evaluate(model, task: scenarios.Task, num_classes: int, device, task_il: bool) -> float:
    model.eval()
    correct = 0
    mask = None
    if task_il:  # only the task's own classes compete
        mask = torch.full((num_classes,), float("-inf"), device=device)
        mask[task.classes] = 0
    for i in range(0, len(task.y), 2048):
        logits = model(task.x[i:i + 2048].to(device))
        if mask is not None:
            logits = logits + mask
        correct += int((logits.argmax(1).cpu() == task.y[i:i + 2048]).sum())
    model.train()
    return correct / max(1, len(task.y))


def train_method(method: str, scenario: scenarios.Scenario, args: argparse.Namespace, progress=True) -> Dict:
    from tqdm.auto import tqdm

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = models.make_model(args.model, scenario.num_classes).to(device)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    optimizer, parts = methods.build(method, model, args, gen)
    forward = next((c.forward for c in parts if c.forward is not None), model)
    order = torch.Generator().manual_seed(args.seed)
    T = len(scenario.train)
    acc = np.zeros((T, T))
    acc_til = np.zeros((T, T))
    curves: List[List[float]] = []  # per epoch (over the whole run): accuracy on every task
    steps, train_time = 0, 0.0
    for t, task in enumerate(scenario.train):
        for epoch in range(args.epochs):
            start = time.perf_counter()
            batches = torch.randperm(len(task.y), generator=order).split(args.batch_size)
            bar = tqdm(batches, desc=f"{method} task {t + 1}/{T} epoch {epoch + 1}/{args.epochs}", leave=False,
                       disable=not progress)
            for idx in bar:
                x, y = task.x[idx].to(device), task.y[idx].to(device)
                xs, ys = x, y
                for c in parts:
                    xs, ys = c.batch(xs, ys)
                optimizer.zero_grad()
                loss = F.cross_entropy(forward(xs), ys)
                for c in parts:
                    extra = c.penalty()
                    if extra is not None:
                        loss = loss + extra
                loss.backward()
                for c in parts:
                    c.after_backward(xs, ys)
                optimizer.step()
                for c in parts:
                    c.after_step(x, y)
                steps += 1
            train_time += time.perf_counter() - start
            curves.append([evaluate(model, s, scenario.num_classes, device, False) for s in scenario.test])
        start = time.perf_counter()
        for c in parts:
            c.end_task(task.x.to(device), task.y.to(device))
        train_time += time.perf_counter() - start
        acc[t] = curves[-1]
        if scenario.task_il:
            acc_til[t] = [evaluate(model, s, scenario.num_classes, device, True) for s in scenario.test]
    result = {
        "average_accuracy": float(acc[-1].mean()),
        "bwt": float(np.mean([acc[-1, j] - acc[j, j] for j in range(T - 1)])) if T > 1 else 0.0,
        "acc_matrix": acc.tolist(),
        "curves": curves,
        "wall_time_s": train_time,
        "steps_per_s": steps / train_time if train_time else 0.0,
        "steps": steps,
    }
    if scenario.task_il:
        result["average_accuracy_task_il"] = float(acc_til[-1].mean())
        result["bwt_task_il"] = float(np.mean([acc_til[-1, j] - acc_til[j, j] for j in range(T - 1)])) if T > 1 \
            else 0.0
        result["acc_matrix_task_il"] = acc_til.tolist()
    ewc = next((c.ewc for c in parts if isinstance(c, methods.EWCComponent)), None)
    result["_fisher"] = ewc.fishers[0] if ewc is not None and ewc.fishers else None
    return result


def table(results: Dict[str, Dict], task_il: bool) -> str:
    head = f"{'method':<16}{'avg acc':>9}{'avg TIL':>9}{'BWT':>8}{'time s':>9}{'steps/s':>9}"
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        til = f"{100 * r['average_accuracy_task_il']:8.1f}%" if task_il else f"{'-':>9}"
        lines.append(f"{name:<16}{100 * r['average_accuracy']:8.1f}%{til}{100 * r['bwt']:7.1f}%"
                     f"{r['wall_time_s']:9.1f}{r['steps_per_s']:9.1f}")
    return "\n".join(lines)


def write_outputs(out: str, results: Dict[str, Dict], config: Dict, task_il: bool, plots: bool) -> None:
    os.makedirs(out, exist_ok=True)
    fishers = {name: r.pop("_fisher") for name, r in results.items()}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"config": config, "methods": results}, f, indent=1)
    for name, r in results.items():
        safe = name.replace("+", "_")
        for key in ("acc_matrix", "acc_matrix_task_il", "curves"):
            if key in r:
                with open(os.path.join(out, f"{safe}_{key}.csv"), "w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow([f"task{j}" for j in range(len(r[key][0]))])
                    w.writerows([[f"{v:.4f}" for v in row] for row in r[key]])
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(table(results, task_il) + "\n")
    if plots:
        _plots(out, results, fishers)


def _plots(out: str, results: Dict[str, Dict], fishers: Dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, r in results.items():
        ax.plot(np.arange(1, len(r["curves"]) + 1), np.mean(r["curves"], axis=1), marker="o", label=name)
    ax.set_xlabel("epoch (all tasks in sequence)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("mean accuracy over all tasks")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "mean_accuracy.png"), dpi=120)
    plt.close(fig)
    n = len(results)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3), sharey=True, squeeze=False)
    for ax, (name, r) in zip(axes[0], results.items()):
        curves = np.array(r["curves"])
        for j in range(curves.shape[1]):
            ax.plot(np.arange(1, len(curves) + 1), curves[:, j], label=f"task {j}")
        ax.set_title(name)
        ax.set_xlabel("epoch")
    axes[0][0].set_ylabel("accuracy")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "task_accuracy.png"), dpi=120)
    plt.close(fig)
    for name, fisher in fishers.items():
        if fisher is None:
            continue
        images = _fisher_images(fisher)
        fig, axes = plt.subplots(1, len(images), figsize=(4 * len(images), 3.6), squeeze=False)
        for ax, (title, img) in zip(axes[0], images):
            im = ax.imshow(img, cmap="viridis", aspect="auto")
            ax.set_title(title, fontsize=9)
            fig.colorbar(im, ax=ax)
        fig.suptitle(f"{name}: Fisher of the first task")
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"fisher_{name.replace('+', '_')}.png"), dpi=120)
        plt.close(fig)


def _fisher_images(fisher):
    """What can be drawn of a Fisher: dense when small, else its first layer's blocks."""
    data = fisher.data
    if isinstance(data, dict):  # KFAC (A, G) or block-diagonal blocks, keyed by layer
        lid, block = next(iter(data.items()))
        if isinstance(block, tuple):
            return [(f"layer {lid}: G", block[1].cpu().numpy()), (f"layer {lid}: A", block[0].cpu().numpy())]
        return [(f"layer {lid} block", block[:512, :512].cpu().numpy())]
    if isinstance(data, torch.Tensor) and data.dim() == 2:
        return [("dense", data[:1024, :1024].cpu().numpy())]
    if isinstance(data, torch.Tensor):  # diagonal: the first layer's weight entries, as its weight matrix
        lid, layer = next(iter(fisher.generator.layer_collection.layers.items()))
        w = layer.weight.size
        return [(f"layer {lid} weight diagonal", data[:int(np.prod(w))].reshape(w[0], -1).cpu().numpy())]
    return []


# --numerics portable. Each library reads its variable when it first computes, so they are set before the data
# loads; one the user has set is kept. Without them MKL, ATen and oneDNN pick their kernels by CPU, and the
# demo's accuracies differed between an AVX-512 and an AVX2 CPU. MKL honours AVX2 on Intel CPUs only (elsewhere
# it picks by CPU); MKL_CBWR=COMPATIBLE is the same on every vendor, at about twice the GEMM time.
PORTABLE_NUMERICS = {"MKL_CBWR": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def _portable_numerics() -> Dict[str, Optional[str]]:
    """Sets PORTABLE_NUMERICS where unset (x86-64 only); returns the previous values, for _restore."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    before = {k: os.environ.get(k) for k in PORTABLE_NUMERICS}
    for k, v in PORTABLE_NUMERICS.items():
        os.environ.setdefault(k, v)
    return before


def _cpu() -> str:
    """The CPU's vendor and model, as results.json records them (reproducibility depends on the vendor)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                info.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return " ".join(v for v in (info.get("vendor_id"), info.get("model name")) if v) or platform.processor()


def _restore(before: Dict[str, Optional[str]]) -> None:
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    before = _portable_numerics() if args.numerics == "portable" else {}
    try:
        return _main(args)
    finally:  # the libraries have read them by now; a caller's environment is left as it was
        _restore(before)


def _main(args: argparse.Namespace) -> int:
    if args.backend:
        ops.set_backend(args.backend)
    try:
        scenario = scenarios.build(args.scenario, args.data_dir, tasks=args.tasks, seed=args.seed,
                                   fraction=args.fraction)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    config = {k: v for k, v in vars(args).items()}
    config.update(version=__version__, backend=ops.backend(), num_tasks=len(scenario.train),
                  classes_per_task=[t.classes for t in scenario.train],
                  cpu_capability=torch.backends.cpu.get_cpu_capability(), num_threads=torch.get_num_threads(),
                  numerics_env={k: os.environ.get(k) for k in PORTABLE_NUMERICS}, cpu=_cpu())
    print(f"clfast {__version__}: {args.scenario} Fashion-MNIST, {len(scenario.train)} tasks, model {args.model}, "
          f"{args.epochs} epoch(s) per task, SGD lr {args.lr} momentum {args.momentum}, batch {args.batch_size}, "
          f"backend {ops.backend()}, device {args.device}, numerics {args.numerics} "
          f"({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)")
    results, failed = {}, {}
    for method in args.methods:
        try:
            r = train_method(method, scenario, args, progress=sys.stderr.isatty())
        except (ValueError, FloatingPointError) as exc:  # e.g. a regulariser too stiff for the step size
            failed[method] = f"{type(exc).__name__}: {exc}"
            print(f"  {method:<14} failed: {failed[method]}", flush=True)
            continue
        results[method] = r
        til = f", task-IL {100 * r['average_accuracy_task_il']:.1f}%" if scenario.task_il else ""
        print(f"  {method:<14} average accuracy {100 * r['average_accuracy']:.1f}%{til}, BWT {100 * r['bwt']:.1f}%, "
              f"{r['wall_time_s']:.1f} s", flush=True)
    config["failed"] = failed
    if not results:
        print("error: every method failed", file=sys.stderr)
        return 1
    print()
    print(table(results, scenario.task_il))
    write_outputs(args.out, results, config, scenario.task_il, plots=not args.no_plots)
    print(f"\nresults, CSV files and plots in {os.path.abspath(args.out)}")
    return 1 if failed else 0
