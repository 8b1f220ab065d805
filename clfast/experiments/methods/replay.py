"""Experience replay: a reservoir buffer of the stream's samples, joined to every minibatch."""
from __future__ import annotations

import torch

from ...buffer import ReservoirBuffer
from . import Plugin


class ReplayPlugin(Plugin):
    name = "replay"
    help = "reservoir replay (--buffer-size samples), as many replayed as new per step"

    def __init__(self, strategy, args) -> None:
        # under torch.distributed one reservoir of the global stream, replicated on every rank, each rank replaying
        # its share of the global batch's sample: what one process would train on
        self.buffer = ReservoirBuffer(args.buffer_size, generator=strategy.generator, scope="global")

    def before_forward(self, strategy) -> None:
        if len(self.buffer):
            xb, yb = self.buffer.sample(strategy.mb_x.shape[0])
            strategy.mb_x, strategy.mb_y = torch.cat([strategy.mb_x, xb]), torch.cat([strategy.mb_y, yb])

    def after_update(self, strategy) -> None:
        self.buffer.add(strategy.stream_x, strategy.stream_y)
