"""Pure-torch reference of the EWC quadratic-form ops (schemas in csrc/ops.cpp)."""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor


def _check(op: str, a: List[Tensor], g: List[Tensor], v: List[Tensor]) -> None:
    """csrc/kron/kron.cpp's check_blocks."""
    if not v:
        raise RuntimeError(f"clfast.{op}: expected at least one block")
    if not len(a) == len(g) == len(v):
        raise RuntimeError(f"clfast.{op}: a, g and v must list the same blocks, got {len(a)}, {len(g)} and {len(v)}")
    first = v[0]
    if not isinstance(first, Tensor) or first.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"clfast.{op}: v[0] must be float32 or float64, got "
                           f"{first.dtype if isinstance(first, Tensor) else None}")
    for i, (ai, gi, vi) in enumerate(zip(a, g, v)):
        for name, t in (("a", ai), ("g", gi), ("v", vi)):
            if not isinstance(t, Tensor):
                raise RuntimeError(f"clfast.{op}: {name}[{i}] is undefined (None)")
            if t.dtype != first.dtype:
                raise RuntimeError(f"clfast.{op}: {name}[{i}] is {t.dtype} but v[0] is {first.dtype}; all blocks must "
                                   "share one dtype")
            if t.device != first.device:
                raise RuntimeError(f"clfast.{op}: {name}[{i}] is on {t.device} but v[0] is on {first.device}")
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
    if scale.numel() != 1 or scale.device != v[0].device:
        raise RuntimeError(f"clfast.kron_mv: scale must be one element on {v[0].device}, got shape {list(scale.shape)} "
                           f"on {scale.device}")
    return [gi @ vi @ ai * scale for ai, gi, vi in zip(a, g, v)]
