"""Continual-learning metrics of an accuracy matrix ``R`` (``R[i, j]``: accuracy on task j after training task i).

The definitions are the published ones; the tests check each against continuum's implementation
(``continuum.metrics``), from the per-sample predictions continuum takes. continuum 1.2.7's
``backward_transfer``, ``forgetting`` and ``forward_transfer`` leave out the last task pair (continuum issue
#291; fixed on its main branch, unreleased), so the numbers here are computed from ``R`` and the tests pin
down how they relate to that release's.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Optional, Sequence

import numpy as np


def average_accuracy(R: np.ndarray) -> float:
    """Mean accuracy over all tasks after the last one (continuum's ``accuracy`` on equal-sized tasks)."""
    return float(np.mean(R[-1]))


def seen_accuracy(R: np.ndarray) -> np.ndarray:
    """After each task i, the mean accuracy over the tasks seen so far, ``mean_{j<=i} R[i, j]``."""
    return np.array([np.mean(R[i, :i + 1]) for i in range(len(R))])


def backward_transfer(R: np.ndarray) -> float:
    """BWT of Lopez-Paz & Ranzato (GEM, 2017): ``mean_{j<T-1} R[T-1, j] - R[j, j]``; negative is forgetting."""
    T = len(R)
    return float(np.mean([R[-1, j] - R[j, j] for j in range(T - 1)])) if T > 1 else 0.0


def forgetting(R: np.ndarray) -> float:
    """Average forgetting of Chaudhry et al. (RWalk, 2018, eq. 3): ``mean_{j<T-1} max_{j<=l<T-1} R[l, j] -
    R[T-1, j]``."""
    T = len(R)
    return float(np.mean([R[j:T - 1, j].max() - R[-1, j] for j in range(T - 1)])) if T > 1 else 0.0


def forward_transfer(R: np.ndarray, base: Sequence[float]) -> float:
    """FWT of Lopez-Paz & Ranzato (GEM, 2017): ``mean_{j>0} R[j-1, j] - b[j]``, ``b`` the accuracies of the
    untrained model: what training earlier tasks gives a task not trained yet."""
    T = len(R)
    return float(np.mean([R[j - 1, j] - base[j] for j in range(1, T)])) if T > 1 else 0.0


def summary(R: np.ndarray, base: Sequence[float]) -> Dict[str, float]:
    return {"average_accuracy": average_accuracy(R), "bwt": backward_transfer(R), "forgetting": forgetting(R),
            "fwt": forward_transfer(R, base)}


def mean_std(values: Iterable[float]) -> Optional[Dict[str, float]]:
    """``{"mean", "std", "n"}`` over runs; ``std`` is the sample standard deviation (0 for one run)."""
    v = [float(x) for x in values]
    if not v:
        return None
    std = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
    return {"mean": float(np.mean(v)), "std": std if math.isfinite(std) else 0.0, "n": len(v)}
