"""The Fisher ops (csrc/fisher/): wrappers and fake kernels."""
from __future__ import annotations

import torch
from torch import Tensor

from ._backend import one_device, op, registrar


def fisher_diag_(out: Tensor, x: Tensor, gy: Tensor, bias: bool) -> None:
    """A Linear layer's Fisher diagonal summed into ``out`` (see csrc/ops.cpp)."""
    op("fisher_diag_")(out, x, gy, bool(bias))


def fisher_factor_(out: Tensor, x: Tensor, scale: float, bias: bool) -> None:
    """``out += scale * [x, 1]^T [x, 1]``, exactly symmetric (see csrc/ops.cpp)."""
    op("fisher_factor_")(out, x, float(scale), bool(bias))


@registrar
def _register(ns: str) -> None:
    """Fake kernels of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::fisher_diag_")
    def _(out, x, gy, bias):
        one_device("fisher_diag_", out, x, gy)

    @torch.library.register_fake(f"{ns}::fisher_factor_")
    def _(out, x, scale, bias):
        one_device("fisher_factor_", out, x)
