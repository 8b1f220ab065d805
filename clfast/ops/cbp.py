"""CBP ops (csrc/cbp/): wrappers and fake kernels."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import one_device, op, registrar


def cbp_update_(utility: List[Tensor], mean: List[Tensor], age: List[Tensor], features: List[Tensor],
                w_next: List[Tensor], w_cur: List[Tensor], decay: float, utility_type: str) -> None:
    """Per layer and unit: age, running activation mean and utility EMA (see csrc/ops.cpp); ``utility_type`` is
    ``"contribution"``, ``"zero_contribution"`` or ``"adaptable_contribution"``."""
    if utility:
        op("cbp_update_")(utility, mean, age, features, w_next, w_cur, float(decay), str(utility_type))


def cbp_replace_(w_cur: Tensor, b_cur: Optional[Tensor], w_next: Tensor, b_next: Optional[Tensor],
                 utility: Tensor, mean: Tensor, age: Tensor, new_weights: Tensor, decay: float,
                 maturity_threshold: int) -> Tensor:
    """Selects and replaces ``new_weights.shape[0]`` units of one layer; returns their indices (csrc/ops.cpp)."""
    return op("cbp_replace_")(w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights, float(decay),
                               int(maturity_threshold))


@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::cbp_update_")
    def _(utility, mean, age, features, w_next, w_cur, decay, utility_type):
        one_device("cbp_update_", utility, mean, age, features, w_next, w_cur)

    @torch.library.register_fake(f"{ns}::cbp_replace_")
    def _(w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights, decay, maturity_threshold):
        one_device("cbp_replace_", w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights)
        return utility.new_empty((new_weights.shape[0],), dtype=torch.long)
