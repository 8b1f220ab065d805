"""The runner's figures, drawn from results.json (so a resumed run draws them too), as PNG files in --out.

* ``acc_matrix_<method>.png``: the accuracy matrix, mean over seeds, annotated;
* ``average_accuracy.png``: after each task, the mean accuracy over the tasks seen so far, with std bands;
* ``task_accuracy.png``: each task's accuracy after every epoch, task boundaries marked;
* ``fisher_<method>.png``: the first task's Fisher of an EWC run, on a log scale (drawn when the run ends).
"""
from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from . import metrics
from .io import safe

DPI = 150


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(doc: Dict) -> Dict[str, Dict]:
    return {name: e for name, e in doc["methods"].items() if e["status"] == "ok"}


def _stack(entry: Dict, key: str) -> np.ndarray:
    return np.array([r[key] for r in entry["runs"]], dtype=float)


def draw(out: str, doc: Dict) -> List[str]:
    """Every figure of ``doc`` into ``out``; returns the file names."""
    methods = _ok(doc)
    if not methods:
        return []
    plt = _plt()
    files = []
    for name, e in methods.items():
        files.append(_heatmap(plt, out, name, e))
    files.append(_average(plt, out, methods))
    files.append(_tasks(plt, out, methods, doc))
    return files


def _heatmap(plt, out: str, name: str, e: Dict) -> str:
    R = _stack(e, "acc_matrix").mean(0)
    T = len(R)
    panels = [("class-IL", R)]
    if "acc_matrix_task_il" in e["runs"][0]:
        panels.append(("task-IL", _stack(e, "acc_matrix_task_il").mean(0)))
    size = max(3.2, 0.55 * T + 1.6)
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels) + 0.8, size), squeeze=False,
                             constrained_layout=True)
    for ax, (title, M) in zip(axes[0], panels):
        im = ax.imshow(M, vmin=0, vmax=1, cmap="viridis")
        if T <= 12:
            for i in range(T):
                for j in range(T):
                    ax.text(j, i, f"{100 * M[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="black" if M[i, j] > 0.6 else "white")
        ax.set_xticks(range(T), [str(j + 1) for j in range(T)])
        ax.set_yticks(range(T), [str(i + 1) for i in range(T)])
        ax.set_xlabel("evaluated on task")
        ax.set_ylabel("after training task")
        ax.set_title(f"{name}, {title}" + (f" (mean of {len(e['runs'])} seeds)" if len(e["runs"]) > 1 else ""),
                     fontsize=10)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    path = f"acc_matrix_{safe(name)}.png"
    fig.savefig(os.path.join(out, path), dpi=DPI)
    plt.close(fig)
    return path


def _average(plt, out: str, methods: Dict[str, Dict]) -> str:
    keys = [("acc_matrix", "class-IL")]
    if all("acc_matrix_task_il" in e["runs"][0] for e in methods.values()):
        keys.append(("acc_matrix_task_il", "task-IL"))
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.8), squeeze=False, constrained_layout=True)
    for ax, (key, title) in zip(axes[0], keys):
        for name, e in methods.items():
            seen = np.array([metrics.seen_accuracy(np.array(R)) for R in _stack(e, key)])
            x = np.arange(1, seen.shape[1] + 1)
            mean = seen.mean(0)
            line, = ax.plot(x, 100 * mean, marker="o", ms=4, label=name)
            if len(seen) > 1:
                std = seen.std(0, ddof=1)
                ax.fill_between(x, 100 * (mean - std), 100 * (mean + std), color=line.get_color(), alpha=0.2, lw=0)
        ax.set_xlabel("tasks trained")
        ax.set_xticks(x)
        ax.set_ylabel("accuracy on the tasks seen (%)")
        ax.set_ylim(0, 100)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    n = len(next(iter(methods.values()))["runs"])
    axes[0][-1].legend(fontsize=8, title=f"mean ± std, {n} seeds" if n > 1 else None, title_fontsize=8)
    path = "average_accuracy.png"
    fig.savefig(os.path.join(out, path), dpi=DPI)
    plt.close(fig)
    return path


def _tasks(plt, out: str, methods: Dict[str, Dict], doc: Dict) -> str:
    n = len(methods)
    cols = min(3, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows + 0.6), sharey=True, squeeze=False,
                             constrained_layout=True)
    epochs = doc["config"]["epochs"]
    for ax, (name, e) in zip(axes.flat, methods.items()):
        curves = _stack(e, "curves")  # [seeds, epochs over the run, tasks]
        mean = curves.mean(0)
        x = np.arange(1, len(mean) + 1) / epochs
        for j in range(mean.shape[1]):
            line, = ax.plot(x, 100 * mean[:, j], lw=1.4, label=f"task {j + 1}")
            if len(curves) > 1:
                std = curves[:, :, j].std(0, ddof=1)
                ax.fill_between(x, 100 * (mean[:, j] - std), 100 * (mean[:, j] + std), color=line.get_color(),
                                alpha=0.15, lw=0)
        for b in range(1, mean.shape[1]):
            ax.axvline(b, color="0.6", lw=0.8, ls="--")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("tasks trained")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("class-IL accuracy (%)")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(10, len(labels)), fontsize=8)
    path = "task_accuracy.png"
    fig.savefig(os.path.join(out, path), dpi=DPI)
    plt.close(fig)
    return path


def fisher(out: str, name: str, seed: int, fisher) -> str:
    """The first task's Fisher of an EWC run: its first layer's blocks (or the dense matrix), magnitudes on a log
    colour scale."""
    from matplotlib.colors import LogNorm

    plt = _plt()
    images = _fisher_images(fisher)
    fig, axes = plt.subplots(1, len(images), figsize=(4.6 * len(images), 4.0), squeeze=False,
                             constrained_layout=True)
    for ax, (title, img, xlabel, ylabel) in zip(axes[0], images):
        mag, k = _pool(np.abs(img))
        if k > 1:
            title += f" (max over {k}x{k} blocks)"
        positive = mag[mag > 0]
        top = positive.max() if positive.size else 1.0
        low = max(positive.min() if positive.size else top * 1e-8, top * 1e-8)
        extent = (-0.5, img.shape[1] - 0.5, img.shape[0] - 0.5, -0.5)  # axes in the matrix's own indices
        im = ax.imshow(np.where(mag > 0, mag, low), cmap="magma", aspect="auto", interpolation="nearest",
                       norm=LogNorm(vmin=low, vmax=top), extent=extent)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        fig.colorbar(im, ax=ax, label="|entry| (log scale)")
    fig.suptitle(f"{name} (seed {seed}): Fisher after the first task", fontsize=10)
    path = f"fisher_{safe(name)}.png"
    fig.savefig(os.path.join(out, path), dpi=DPI)
    plt.close(fig)
    return path


def _pool(mag: np.ndarray, size: int = 256):
    """``mag`` max-pooled to at most ``size`` rows and columns (a figure shows no more), and the block side."""
    k = max(1, -(-max(mag.shape) // size))
    if k == 1:
        return mag, 1
    rows, cols = -(-mag.shape[0] // k) * k, -(-mag.shape[1] // k) * k
    padded = np.zeros((rows, cols), dtype=mag.dtype)
    padded[:mag.shape[0], :mag.shape[1]] = mag
    return padded.reshape(rows // k, k, cols // k, k).max(axis=(1, 3)), k


def _fisher_images(fisher):
    """(title, matrix, x label, y label) of what can be drawn of an nngeometry Fisher."""
    data = fisher.data
    if isinstance(data, dict):  # KFAC (A, G) or block-diagonal blocks, keyed by layer
        lid, block = next(iter(data.items()))
        if isinstance(block, tuple):
            return [(f"{lid}: G, output-gradient factor", block[1].cpu().numpy(), "output unit", "output unit"),
                    (f"{lid}: A, input factor", block[0].cpu().numpy(), "input unit (+ bias)", "input unit (+ bias)")]
        return [(f"{lid}: block (first 512 parameters)", block[:512, :512].cpu().numpy(), "parameter",
                 "parameter")]
    if data.dim() == 2:
        return [("dense (first 1024 parameters)", data[:1024, :1024].cpu().numpy(), "parameter", "parameter")]
    lid, layer = next(iter(fisher.generator.layer_collection.layers.items()))
    w = layer.weight.size
    diag = data[:int(np.prod(w))].reshape(w[0], -1).cpu().numpy()
    return [(f"{lid}: diagonal of the weight's Fisher", diag, "input unit", "output unit")]
