"""OCAR (Urettini & Carta 2025): Fisher-preconditioned replay, through clfast.OCAR."""
from __future__ import annotations

from ...buffer import ReservoirBuffer
from ...ocar import OCAR
from . import Plugin


class OCARPlugin(Plugin):
    name = "ocar"
    help = "replay (--buffer-size samples) with the gradient preconditioned by the replayed data's Fisher"
    conflicts = {"replay": "ocar already replays: use 'ocar', not 'ocar+replay'",
                 "si": "combine at most one of ocar / si with other methods"}

    def __init__(self, strategy, args) -> None:
        self.ocar = OCAR(strategy.model, ReservoirBuffer(args.buffer_size, generator=strategy.generator,
                                                          scope="global"),
                         optimizer=None, representation=args.ocar_representation, damping=args.ocar_damping,
                         fisher=args.ocar_fisher, refresh=args.ocar_refresh, generator=strategy.generator,
                         fisher_backend=args.fisher_backend)
        inner = strategy.forward  # the model, or its DistributedDataParallel wrapper
        strategy.forward = lambda xs: self.ocar.forward(xs, inner)

    @staticmethod
    def add_arguments(group) -> None:
        group.add_argument("--ocar-representation", choices=("kfac", "diag", "dense"), default="kfac")
        group.add_argument("--ocar-fisher", choices=("exact", "ema"), default="ema",
                           help="the Fisher of each replayed batch, or running Kronecker factors")
        group.add_argument("--ocar-damping", type=float, default=None, help="added to the Fisher before solving")
        group.add_argument("--ocar-refresh", type=int, default=10, help="ema: steps between factor inversions")

    @staticmethod
    def check(args):
        if not args.ocar_damping > 0:
            return f"--ocar-damping must be > 0, got {args.ocar_damping}"
        if args.ocar_refresh < 1:
            return f"--ocar-refresh must be >= 1, got {args.ocar_refresh}"
        return None

    def before_forward(self, strategy) -> None:
        strategy.mb_x, strategy.mb_y = self.ocar.replay(strategy.mb_x, strategy.mb_y)

    def after_backward(self, strategy) -> None:
        self.ocar.precondition_(strategy.mb_x, strategy.mb_y)

    def after_update(self, strategy) -> None:
        self.ocar.end_step(strategy.stream_x, strategy.stream_y)
