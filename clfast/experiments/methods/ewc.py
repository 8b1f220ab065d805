"""Elastic Weight Consolidation (Kirkpatrick et al. 2017) on nngeometry Fishers, through clfast.EWC."""
from __future__ import annotations

import torch

from ...ewc import EWC
from . import Plugin


class EWCPlugin(Plugin):
    name = "ewc"
    help = "a quadratic penalty weighted by the Fisher of each past task (clfast.EWC)"

    def __init__(self, strategy, args) -> None:
        self.ewc = EWC(strategy.model, args.ewc_representation, mode=args.ewc_mode, gamma=args.ewc_gamma)
        self.strength, self.fisher_samples = args.ewc_lambda, args.fisher_samples

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--ewc-representation", choices=("diag", "kfac", "dense", "blockdiag", "ekfac"),
                           default="diag", help="the Fisher's nngeometry representation")
        group.add_argument("--ewc-mode", choices=("separate", "online"), default="separate",
                           help="one penalty per past task, or one running Fisher")
        group.add_argument("--ewc-lambda", type=float, default=None, help="EWC strength (the seed's `importance`)")
        group.add_argument("--ewc-gamma", type=float, default=1.0, help="online mode: decay of the running Fisher")
        group.add_argument("--fisher-samples", type=int, default=1000, help="samples of a task used for its Fisher")

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
        data = torch.utils.data.TensorDataset(task.inputs(slice(0, n), strategy.device), task.y[:n].to(strategy.device))
        self.ewc.consolidate(torch.utils.data.DataLoader(data, batch_size=256))
        if strategy.task_index == 0:  # what the Fisher figure draws
            strategy.report("fisher", self.ewc.fishers[0])
