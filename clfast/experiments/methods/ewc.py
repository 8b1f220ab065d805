"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) on nngeometry Fishers, through clfast.EWC."""
from __future__ import annotations

from typing import Callable, List, Optional

import torch
from torch import Tensor

from ..._fisher import FISHER_BACKENDS
from ...ewc import EWC
from . import Plugin, stable_strength


def _power(mv: Callable[[Tensor], Tensor], like: Tensor, shape, iterations: int = 200) -> float:
    """The largest eigenvalue of a symmetric PSD operator, by power iteration from a fixed start (a Rayleigh
    quotient: never above the true value), in the Fisher's own dtype, without copies of it. Its own generator
    leaves the run's random streams alone."""
    v = torch.rand(shape, generator=torch.Generator().manual_seed(0)).to(like) + 0.5
    top = 0.0
    for _ in range(iterations):
        v = v / v.norm()
        w = mv(v)
        new = float((v * w).sum())
        v = w
        if abs(new - top) <= 1e-6 * abs(new):
            return new
        top = new
    return top


def _sum(terms):
    total = None
    for term in terms:
        total = term if total is None else total.add_(term)
    return total


def largest_eigenvalue(fishers: List, coefs: List[float]) -> Optional[float]:
    """The largest eigenvalue of ``sum_t coefs[t] * fishers[t]`` (nngeometry diag, KFAC, dense or block-diagonal
    matrices; None for EKFAC), computed per layer block."""
    first = fishers[0]
    if type(first).__name__ == "PMatEKFAC":
        return None
    data = [(c, f.data) for c, f in zip(coefs, fishers)]
    if isinstance(first.data, dict):
        tops = []
        for lid, block in first.data.items():
            if isinstance(block, tuple):  # KFAC (A, G): (A (x) G) vec(V) = vec(G V A)
                kf = [(c, d[lid][0], d[lid][1]) for c, d in data]
                tops.append(_power(lambda V: _sum(c * (G @ V @ A) for c, A, G in kf), block[0],
                                   (block[1].shape[0], block[0].shape[0])))
            else:
                blocks = [(c, d[lid]) for c, d in data]
                tops.append(_power(lambda v: _sum(c * (B @ v) for c, B in blocks), block, (block.shape[0],)))
        return max(tops)
    if first.data.dim() == 1:
        return float(_sum(c * d for c, d in data).max())
    return _power(lambda v: _sum(c * (d @ v) for c, d in data), first.data, (first.data.shape[0],))


class EWCPlugin(Plugin):
    name = "ewc"
    help = "a quadratic penalty weighted by the Fisher of each past task (clfast.EWC)"

    def __init__(self, strategy, args) -> None:
        self.ewc = EWC(strategy.model, args.ewc_representation, mode=args.ewc_mode, gamma=args.ewc_gamma,
                       fisher_backend=args.fisher_backend)
        self.strength, self.fisher_samples = args.ewc_lambda, args.fisher_samples

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--ewc-representation", choices=("diag", "kfac", "dense", "blockdiag", "ekfac"),
                           default="diag", help="the Fisher's nngeometry representation")
        group.add_argument("--ewc-mode", choices=("separate", "online"), default="separate",
                           help="one penalty per past task, or one running Fisher")
        group.add_argument("--ewc-lambda", type=float, default=None, help="EWC strength (the penalty's weight)")
        group.add_argument("--ewc-gamma", type=float, default=1.0, help="online mode: decay of the running Fisher")
        group.add_argument("--fisher-samples", type=int, default=1000, help="samples of a task used for its Fisher")
        group.add_argument("--fisher-backend", choices=FISHER_BACKENDS, default="auto",
                           help="who computes the Fisher of EWC and of OCAR's exact mode: clfast.fisher where it "
                                "can (auto), or always clfast / nngeometry")

    @staticmethod
    def check(args):
        if not args.ewc_lambda >= 0:
            return f"--ewc-lambda must be >= 0, got {args.ewc_lambda}"
        if not 0 <= args.ewc_gamma <= 1:
            return f"--ewc-gamma must be in [0, 1], got {args.ewc_gamma}"
        if args.fisher_samples < 1:
            return f"--fisher-samples must be >= 1, got {args.fisher_samples}"
        return None

    def before_backward(self, strategy) -> None:
        if self.ewc.fishers:
            strategy.loss = strategy.loss + self.strength * self.ewc.penalty()

    def after_training_exp(self, strategy) -> None:
        task = strategy.experience
        n = min(len(task.y), self.fisher_samples)
        # each rank its share of the samples (all of them when there are fewer than ranks): EWC averages the ranks'
        # Fishers weighted by their examples, which is the Fisher of the n samples
        part = strategy.shard(n) if n >= strategy.world else slice(0, n)
        data = torch.utils.data.TensorDataset(task.inputs(part, strategy.device), task.y[part].to(strategy.device))
        self.ewc.consolidate(torch.utils.data.DataLoader(data, batch_size=256))
        if strategy.task_index == 0:  # what the Fisher figure draws
            strategy.report("fisher", self.ewc.fishers[0])
        top = largest_eigenvalue(self.ewc.fishers, self.ewc.coefficients)
        if top is not None:  # the penalty strength * sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)
            self.strength = stable_strength(strategy, 2 * self.strength * top, "EWC's penalty", "--ewc-lambda",
                                            self.strength)
