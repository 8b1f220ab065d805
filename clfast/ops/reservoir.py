"""The reservoir op (csrc/reservoir/): wrapper and fake kernel."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import one_device, op, registrar


def reservoir_add_(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Algorithm R for a whole batch into preallocated storage (see csrc/ops.cpp)."""
    op("reservoir_add_")(storage, batch, draws, int(num_seen))


@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::reservoir_add_")
    def _(storage, batch, draws, num_seen):
        one_device("reservoir_add_", storage, batch, draws)
