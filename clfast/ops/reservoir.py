"""The reservoir op (csrc/reservoir/): wrapper and fake kernel."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import native_available, one_device, op


def reservoir_add_(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Algorithm R for a whole batch into preallocated storage (see csrc/ops.cpp)."""
    op("reservoir_add_")(storage, batch, draws, int(num_seen))


if native_available():

    @torch.library.register_fake("clfast::reservoir_add_")
    def _(storage, batch, draws, num_seen):
        one_device("reservoir_add_", storage, batch, draws)
