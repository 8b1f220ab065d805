"""Pure-torch reference of the EWC quadratic-form ops (schemas in csrc/ops.cpp)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def _check(op: str, a: List[Tensor], g: List[Tensor], v: List[Tensor]) -> None:
    if not v:
        raise RuntimeError(f"clfast.{op}: expected at least one block")
    if not len(a) == len(g) == len(v):
        raise RuntimeError(f"clfast.{op}: a, g and v must list the same blocks, got {len(a)}, {len(g)} and {len(v)}")
    for i, (ai, gi, vi) in enumerate(zip(a, g, v)):
        if vi.dim() != 2 or tuple(gi.shape) != (vi.shape[0],) * 2 or tuple(ai.shape) != (vi.shape[1],) * 2:
            raise RuntimeError(f"clfast.{op}: block {i} needs g [n, n], v [n, m], a [m, m]; got g {list(gi.shape)}, "
                               f"v {list(vi.shape)}, a {list(ai.shape)}")


def kron_quadratic(a: List[Tensor], g: List[Tensor], v: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
    _check("kron_quadratic", a, g, v)
    products = [gi @ vi @ ai for ai, gi, vi in zip(a, g, v)]
    return sum((t * vi).sum() for t, vi in zip(products, v)), [t.detach() for t in products]


@torch.no_grad()
def kron_mv(scale: Tensor, a: List[Tensor], g: List[Tensor], v: List[Tensor]) -> List[Tensor]:
    _check("kron_mv", a, g, v)
    return [gi @ vi @ ai * scale for ai, gi, vi in zip(a, g, v)]
