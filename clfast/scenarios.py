"""Continual-learning scenarios on real Fashion-MNIST, built with continuum and materialised as tensors.

* ``split``: ``ClassIncremental`` with 2 classes per task (5 tasks), evaluated class-IL and task-IL;
* ``permuted``: continuum ``Permutations`` (pixel permutations), domain-IL;
* ``fellowship``: the seed's ``MNISTFellowship`` (MNIST, Fashion-MNIST, KMNIST: 3 tasks x 10 classes, 30
  outputs); needs continuum to download its data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from .data import load_fashion_mnist

SCENARIOS = ("split", "permuted", "fellowship")


@dataclass
class Task:
    x: Tensor        # [N, 1, 28, 28] float in [0, 1]
    y: Tensor        # [N] int64
    classes: List[int]


@dataclass
class Scenario:
    name: str
    train: List[Task]
    test: List[Task]
    num_classes: int
    task_il: bool    # whether a task-incremental evaluation (logits masked to the task's classes) makes sense


def _from_raw(taskset) -> Task:
    x, y, _ = taskset.get_raw_samples()
    x = torch.from_numpy(np.ascontiguousarray(x)).float().div_(255).unsqueeze(1)  # what continuum's ToTensor gives
    y = torch.from_numpy(np.asarray(y).astype(np.int64))
    return Task(x, y, sorted(set(y.tolist())))


def _from_loader(taskset) -> Task:
    xs, ys = [], []
    for x, y, _ in torch.utils.data.DataLoader(taskset, batch_size=4096):
        xs.append(x)
        ys.append(y.long())
    x, y = torch.cat(xs), torch.cat(ys)
    return Task(x, y, sorted(set(y.tolist())))


def _subsample(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    if fraction >= 1:
        return x, y
    keep = np.random.default_rng(seed).permutation(len(y))[: max(1, int(len(y) * fraction))]
    keep.sort()
    return x[keep], y[keep]


def build(name: str, data_dir: Optional[str] = None, tasks: int = 5, seed: int = 0,
          fraction: float = 1.0) -> Scenario:
    """The scenario ``name``; ``tasks`` applies to ``permuted``; ``fraction`` subsamples the data (tests)."""
    from continuum import ClassIncremental, Permutations
    from continuum.datasets import InMemoryDataset

    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    if name == "fellowship":
        return _fellowship(data_dir)
    x_tr, y_tr, x_te, y_te = load_fashion_mnist(data_dir)
    x_tr, y_tr = _subsample(x_tr, y_tr, fraction, seed)
    x_te, y_te = _subsample(x_te, y_te, fraction, seed + 1)
    if name == "split":
        make = lambda x, y: ClassIncremental(InMemoryDataset(x, y), increment=2)  # noqa: E731
        return Scenario(name, [_from_raw(t) for t in make(x_tr, y_tr)], [_from_raw(t) for t in make(x_te, y_te)],
                        10, True)
    if tasks < 1:
        raise ValueError("--tasks must be >= 1")
    # the same seed gives train and test the same pixel permutations
    make = lambda x, y: Permutations(InMemoryDataset(x, y), nb_tasks=tasks, seed=seed)  # noqa: E731
    return Scenario(name, [_from_loader(t) for t in make(x_tr, y_tr)], [_from_loader(t) for t in make(x_te, y_te)],
                    10, False)


def _fellowship(data_dir: Optional[str]) -> Scenario:
    from continuum import ClassIncremental
    from continuum.datasets import MNISTFellowship

    root = data_dir or "./data"
    try:
        train = MNISTFellowship(root, train=True, download=True)
        test = MNISTFellowship(root, train=False, download=True)
    except Exception as exc:  # no network, or an incomplete download
        raise FileNotFoundError(
            f"the fellowship scenario needs MNIST, Fashion-MNIST and KMNIST, which continuum downloads into {root} "
            f"and could not ({type(exc).__name__}: {exc}); run it where these can be downloaded, or use --scenario "
            "split / permuted on the installed Fashion-MNIST") from None
    make = lambda d: ClassIncremental(d, increment=10)  # noqa: E731  (as the seed: 3 tasks x 10 classes)
    return Scenario("fellowship", [_from_loader(t) for t in make(train)], [_from_loader(t) for t in make(test)],
                    30, True)
