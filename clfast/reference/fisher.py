"""Pure-torch references of the Fisher ops (schemas in csrc/ops.cpp)."""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ._checks import check_memory


def _check_out(op: str, out: Tensor) -> None:
    if not isinstance(out, Tensor) or out.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"clfast.{op}: out must be float32 or float64, got "
                           f"{out.dtype if isinstance(out, Tensor) else 'None'}")
    if not out.is_contiguous():
        raise RuntimeError(f"clfast.{op}: out must be contiguous (it is summed into in place), got strides "
                           f"{list(out.stride())}")


def _check_tensor(op: str, name: str, t: Tensor, out: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise RuntimeError(f"clfast.{op}: {name} is undefined (None)")
    if t.dtype != out.dtype:
        raise RuntimeError(f"clfast.{op}: {name} is {t.dtype} but out is {out.dtype}")
    if t.device != out.device:
        raise RuntimeError(f"clfast.{op}: {name} is on {t.device} but out is on {out.device}")


@torch.no_grad()
def fisher_diag_(out: Tensor, x: Tensor, gy: Tensor, bias: bool) -> None:
    """``out[o * in + i] += sum_{b,k} gy[b,k,o]^2 x[b,i]^2``, then the bias ``sum_{b,k} gy[b,k,o]^2``."""
    op = "fisher_diag_"
    _check_out(op, out)
    _check_tensor(op, "x", x, out)
    _check_tensor(op, "gy", gy, out)
    if x.dim() != 2 or gy.dim() != 3 or gy.shape[0] != x.shape[0]:
        raise RuntimeError(f"clfast.{op}: expected x [B, in] and gy [B, K, out], got x {list(x.shape)} and gy "
                           f"{list(gy.shape)}")
    o, i = gy.shape[2], x.shape[1]
    if out.dim() != 1 or out.shape[0] != o * i + (o if bias else 0):
        raise RuntimeError(f"clfast.{op}: out must be [{o} * {i}{f' + {o}' if bias else ''}] (weight then bias), got "
                           f"{list(out.shape)}")
    check_memory(op, ("out", [out], True), ("x", [x], False), ("gy", [gy], False))
    g2 = (gy * gy).sum(1)
    parts = [(g2.t() @ (x * x)).reshape(-1)] + ([g2.sum(0)] if bias else [])
    out.add_(torch.cat(parts))


@torch.no_grad()
def fisher_factor_(out: Tensor, x: Tensor, scale: float, bias: bool) -> None:
    """``out += scale * [x, 1]^T [x, 1]`` (the column of ones with ``bias``) on and above the diagonal, mirrored
    below it."""
    op = "fisher_factor_"
    _check_out(op, out)
    _check_tensor(op, "x", x, out)
    if x.dim() != 2:
        raise RuntimeError(f"clfast.{op}: expected x [rows, n], got {list(x.shape)}")
    n = x.shape[1] + (1 if bias else 0)
    if out.dim() != 2 or tuple(out.shape) != (n, n):
        raise RuntimeError(f"clfast.{op}: out must be [{n}, {n}] for x {list(x.shape)}"
                           f"{' and a bias' if bias else ''}, got {list(out.shape)}")
    single = out.dtype == torch.float32
    lo, hi = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max) if single else (0.0, math.inf)
    if not (math.isfinite(scale) and abs(scale) > 0 and lo <= abs(scale) <= hi):
        raise RuntimeError(f"clfast.{op}: scale must be finite, non-zero and a normal number of out's dtype "
                           f"({out.dtype}), got {scale}")
    check_memory(op, ("out", [out], True), ("x", [x], False))
    if bias:
        x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
    upper = torch.add(out, x.t() @ x, alpha=scale).triu()
    out.copy_(upper + upper.triu(1).t())
