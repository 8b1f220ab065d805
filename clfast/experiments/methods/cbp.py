"""Continual Backpropagation (Dohare et al. 2024): clfast.CBP's generate-and-test after every update."""
from __future__ import annotations

from ...cbp import CBP
from . import Plugin


class CBPPlugin(Plugin):
    name = "cbp"
    help = "replaces low-utility mature hidden units with fresh ones after each update"

    def __init__(self, strategy, args) -> None:
        self.args = args

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--cbp-rate", type=float, default=1e-4, help="units replaced per layer per step")
        group.add_argument("--cbp-maturity", type=int, default=100, help="steps before a unit can be replaced")
        group.add_argument("--cbp-decay", type=float, default=0.99, help="decay of the running utilities")

    @staticmethod
    def check(args):
        if not 0 <= args.cbp_rate <= 1:
            return f"--cbp-rate must be in [0, 1], got {args.cbp_rate}"
        if args.cbp_maturity < 0:
            return f"--cbp-maturity must be >= 0, got {args.cbp_maturity}"
        if not 0 <= args.cbp_decay < 1:
            return f"--cbp-decay must be in [0, 1), got {args.cbp_decay}"
        return None

    def before_training(self, strategy) -> None:  # CBP resets the optimizer's state of the units it replaces
        self.cbp = CBP(strategy.model, replacement_rate=self.args.cbp_rate, maturity_threshold=self.args.cbp_maturity,
                       utility_decay_rate=self.args.cbp_decay, optimizer=strategy.optimizer,
                       generator=strategy.generator)

    def after_update(self, strategy) -> None:
        self.cbp.step()
