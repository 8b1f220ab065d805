"""Synaptic Intelligence (Zenke et al. 2017): clfast.SI, its accumulation fused into the SGD step."""
from __future__ import annotations

from ...si import SI
from . import Plugin, stable_strength


class SIPlugin(Plugin):
    name = "si"
    help = "path-integral importances, accumulated inside clfast.optim.SGD's fused step"
    conflicts = {"ocar": "combine at most one of ocar / si with other methods"}

    def __init__(self, strategy, args) -> None:
        self.si = SI(strategy.model, strength=args.si_strength, epsilon=args.si_epsilon)
        self.optimizer_options = {"si": self.si}

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--si-strength", type=float, default=None, help="SI's c")
        group.add_argument("--si-epsilon", type=float, default=1e-3, help="SI's damping xi")

    @staticmethod
    def check(args):
        if not args.si_strength >= 0:
            return f"--si-strength must be >= 0, got {args.si_strength}"
        if not args.si_epsilon > 0:
            return f"--si-epsilon must be > 0, got {args.si_epsilon}"
        return None

    def before_backward(self, strategy) -> None:
        penalty = self.si.penalty()
        if penalty is not None:
            strategy.loss = strategy.loss + penalty

    def after_training_exp(self, strategy) -> None:
        self.si.consolidate()
        top = max(float(omega.max()) for omega in self.si.importance)  # strength * sum Omega (theta - theta')^2
        self.si.strength = stable_strength(strategy, 2 * self.si.strength * top, "SI's penalty", "--si-strength",
                                           self.si.strength)
