"""Continual-learning scenarios built with continuum, held as uint8 tensors and converted to float per batch.

* ``split``: ``ClassIncremental`` (``--tasks`` tasks of equal class counts), evaluated class-IL and task-IL;
* ``permuted``: continuum ``Permutations`` (pixel permutations, the first task unpermuted), domain-IL;
* ``fellowship``: continuum's ``MNISTFellowship`` (MNIST, Fashion-MNIST, KMNIST: 3 tasks x 10 classes, 30
  outputs), from files on disk.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch import Tensor

from . import data

SCENARIOS = ("split", "permuted", "fellowship")


@dataclass
class Task:
    x: Tensor        # [N, C, H, W] uint8
    y: Tensor        # [N] int64
    classes: List[int]
    # a pixel permutation over the flattened [C, H, W] image, applied per batch (permuted tasks share x)
    perm: Optional[Tensor] = None

    def inputs(self, index, device) -> Tensor:
        """The float images ``index`` selects, in [0, 1] as continuum's ToTensor gives them, on ``device``."""
        x = self.x[index]
        if self.perm is not None:
            x = x.flatten(1)[:, self.perm].view(x.shape)
        return x.to(device, non_blocking=True).float().div_(255)


@dataclass
class Scenario:
    name: str
    dataset: str
    train: List[Task]
    test: List[Task]
    num_classes: int
    task_il: bool    # whether a task-incremental evaluation (logits masked to the task's classes) makes sense

    @property
    def input_shape(self):
        return tuple(self.train[0].x.shape[1:])


def _task(x: Tensor, y: np.ndarray) -> Task:
    y = torch.from_numpy(np.asarray(y).astype(np.int64))
    return Task(x, y, sorted(set(y.tolist())))


def _from_raw(taskset) -> Task:
    x, y, _ = taskset.get_raw_samples()
    return _task(_as_tensor(x), y)


def _as_tensor(x: np.ndarray) -> Tensor:
    x = torch.from_numpy(np.require(x, requirements=["C", "W"]))  # a copy of a read-only buffer
    return x.permute(0, 3, 1, 2).contiguous() if x.dim() == 4 else x.unsqueeze(1)


def _permuted(tasks, x: np.ndarray, y: np.ndarray) -> List[Task]:
    """continuum's ``Permutations`` of (x, y) as one shared uint8 copy and one pixel permutation per task: each
    task's transform, applied to an image of pixel indices, gives the permutation it applies after ToTensor."""
    base = _task(_as_tensor(x), y)
    shape = tuple(base.x.shape[1:])
    index = torch.arange(int(np.prod(shape))).reshape(shape)
    out = []
    for transform in tasks.inc_trsf:
        perm = transform(index).reshape(-1)
        out.append(Task(base.x, base.y, base.classes, None if torch.equal(perm, index.reshape(-1)) else perm))
    return out


def _subsample(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    if fraction >= 1:
        return x, y
    keep = np.random.default_rng(seed).permutation(len(y))[: max(1, int(len(y) * fraction))]
    keep.sort()
    return x[keep], y[keep]


def build(name: str, dataset: str = "fashion-mnist", data_dir: Optional[str] = None, tasks: int = 5, seed: int = 0,
          fraction: float = 1.0) -> Scenario:
    """The scenario ``name`` on ``dataset``; ``tasks`` applies to ``split`` and ``permuted``; ``fraction``
    subsamples the data (quick runs)."""
    from continuum import ClassIncremental, Permutations
    from continuum.datasets import Fellowship, InMemoryDataset

    if name not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose from {SCENARIOS}")
    if name == "fellowship":  # continuum's MNISTFellowship, on the arrays read from disk
        # Fashion-MNIST from data_dir when it is there, else from its default folder (Debian's package)
        fmnist_dir = data_dir if data_dir and data._find_idx("fashion-mnist", data_dir) else None
        parts = [data.load(d, fmnist_dir if d == "fashion-mnist" else data_dir)
                 for d in ("mnist", "fashion-mnist", "kmnist")]
        sets = []
        for train in (True, False):
            arrays = [_subsample(p[0] if train else p[2], p[1] if train else p[3], fraction, seed + (not train))
                      for p in parts]
            sets.append(ClassIncremental(Fellowship([InMemoryDataset(x, y) for x, y in arrays]), increment=10))
        return Scenario(name, "mnist+fashion-mnist+kmnist", [_from_raw(t) for t in sets[0]],
                        [_from_raw(t) for t in sets[1]], 30, True)
    x_tr, y_tr, x_te, y_te = data.load(dataset, data_dir)
    x_tr, y_tr = _subsample(x_tr, y_tr, fraction, seed)
    x_te, y_te = _subsample(x_te, y_te, fraction, seed + 1)
    if x_tr.shape[-1] == 1:  # grey images as [N, H, W], as continuum's MNIST datasets hold them
        x_tr, x_te = x_tr[..., 0], x_te[..., 0]
    classes = data.NUM_CLASSES[dataset]
    if name == "split":
        if classes % tasks:
            raise ValueError(f"--tasks {tasks} does not divide {dataset}'s {classes} classes")
        make = lambda x, y: ClassIncremental(InMemoryDataset(x, y), increment=classes // tasks)  # noqa: E731
        return Scenario(name, dataset, [_from_raw(t) for t in make(x_tr, y_tr)],
                        [_from_raw(t) for t in make(x_te, y_te)], classes, True)
    # the same seed gives train and test the same pixel permutations
    make = lambda x, y: _permuted(Permutations(InMemoryDataset(x, y), nb_tasks=tasks, seed=seed), x, y)  # noqa: E731
    return Scenario(name, dataset, make(x_tr, y_tr), make(x_te, y_te), classes, False)
