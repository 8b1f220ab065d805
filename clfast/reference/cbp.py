"""Pure-torch references of the CBP ops (schemas in csrc/ops.cpp), step by step as in Dohare et al. (Nature
2024) and the authors' GnT: the oracle for the native kernels and the fallback without them."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from ._checks import check_memory

UTILITIES = ("contribution", "zero_contribution", "adaptable_contribution")


def _check_chain(op: str, w_next: Tensor, units: int, name: str) -> int:
    if w_next.dim() < 2 or w_next.shape[0] == 0:
        raise RuntimeError(f"clfast.{op}: {name} must be a Linear or Conv2d weight, got shape {list(w_next.shape)}")
    per_row = w_next.numel() // w_next.shape[0]
    if per_row == 0 or per_row % units:
        raise RuntimeError(f"clfast.{op}: layers do not chain: {name} (shape {list(w_next.shape)}) takes {per_row} "
                           f"inputs per output, not a multiple of the layer's {units} units")
    return per_row // units


def _check_same(op: str, ref: Tensor, t, name: str) -> None:
    """csrc/cbp/cbp.cpp's check_same."""
    if not isinstance(t, Tensor):
        raise RuntimeError(f"clfast.{op}: {name} is undefined (None)")
    if t.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"clfast.{op}: {name} must be float32 or float64, got {t.dtype}")
    if t.dtype != ref.dtype:
        raise RuntimeError(f"clfast.{op}: {name} is {t.dtype} but the layer's weight is {ref.dtype}")
    if t.device != ref.device:
        raise RuntimeError(f"clfast.{op}: {name} is on {t.device} but the layer's weight is on {ref.device}")


def _check_state(op: str, ref: Tensor, t, name: str, units: int) -> None:
    _check_same(op, ref, t, name)
    if t.dim() != 1 or t.shape[0] != units:
        raise RuntimeError(f"clfast.{op}: {name} must be a vector of {units} units, got shape {list(t.shape)}")


@torch.no_grad()
def cbp_update_(utility: List[Tensor], mean: List[Tensor], age: List[Tensor], features: List[Tensor],
                w_next: List[Tensor], w_cur: List[Tensor], decay: float, utility_type: str) -> None:
    op = "cbp_update_"
    if not utility:
        raise RuntimeError(f"clfast.{op}: expected at least one layer")
    if not len(mean) == len(age) == len(features) == len(w_next) == len(w_cur) == len(utility):
        raise RuntimeError(f"clfast.{op}: utility, mean, age, features, w_next and w_cur must list the same layers")
    if utility_type not in UTILITIES:
        raise RuntimeError(f"clfast.{op}: utility must be 'contribution', 'zero_contribution' or "
                           f"'adaptable_contribution', got '{utility_type}'")
    groups = []
    for l, (u, m, a, h, wn, wc) in enumerate(zip(utility, mean, age, features, w_next, w_cur)):
        _check_same(op, w_cur[0], wc, f"w_cur[{l}]")
        if wc.dim() < 2 or wc.shape[0] == 0:
            raise RuntimeError(f"clfast.{op}: w_cur[{l}] must be a Linear or Conv2d weight with at least one "
                               f"unit, got shape {list(wc.shape)}")
        n = wc.shape[0]
        _check_state(op, wc, u, f"utility[{l}]", n)
        _check_state(op, wc, m, f"mean[{l}]", n)
        _check_state(op, wc, a, f"age[{l}]", n)
        _check_same(op, wc, h, f"features[{l}]")
        _check_same(op, wc, wn, f"w_next[{l}]")
        if h.dim() < 2 or h.shape[1] != n or h.shape[0] == 0 or h.numel() == 0:
            raise RuntimeError(f"clfast.{op}: features[{l}] must be [batch > 0, {n}, ...] (the layer's {n} "
                               f"units, non-empty), got shape {list(h.shape)}")
        groups.append(_check_chain(op, wn, n, f"w_next[{l}]"))
    check_memory(op, ("utility", utility, True), ("mean", mean, True), ("age", age, True),
                 ("features", features, False), ("w_next", w_next, False), ("w_cur", w_cur, False))
    for u, m, a, h, wn, wc, group in zip(utility, mean, age, features, w_next, w_cur, groups):
        n = wc.shape[0]
        h = h.reshape(h.shape[0], n, -1)  # [B, n, S]
        a += 1
        m.mul_(decay).add_((1 - decay) * h.mean(dim=(0, 2)))
        m_hat = m / (1 - decay ** a)
        # sum over the next layer's rows (and the unit's kernel / spatial group) of |W_next|
        out_mag = wn.reshape(wn.shape[0], n, group).abs().sum(dim=(0, 2))
        if utility_type == "contribution":
            act = h.abs().mean(dim=(0, 2))
        else:
            act = (h - m_hat[None, :, None]).abs().mean(dim=(0, 2))
        new = act * out_mag
        if utility_type == "adaptable_contribution":
            new = new / wc.reshape(n, -1).abs().mean(dim=1)
        u.mul_(decay).add_((1 - decay) * new)


@torch.no_grad()
def cbp_replace_(w_cur: Tensor, b_cur: Optional[Tensor], w_next: Tensor, b_next: Optional[Tensor], utility: Tensor,
                 mean: Tensor, age: Tensor, new_weights: Tensor, decay: float, maturity_threshold: int) -> Tensor:
    op = "cbp_replace_"
    _check_same(op, w_cur, w_cur, "w_cur")
    if w_cur.dim() < 2 or w_cur.shape[0] == 0 or w_cur.numel() == 0:
        raise RuntimeError(f"clfast.{op}: w_cur must be a non-empty Linear or Conv2d weight, got shape "
                           f"{list(w_cur.shape)}")
    n = w_cur.shape[0]
    fan_in = w_cur.numel() // n
    if b_cur is not None:
        _check_state(op, w_cur, b_cur, "b_cur", n)
    _check_same(op, w_cur, w_next, "w_next")
    group = _check_chain(op, w_next, n, "w_next")
    if b_next is not None:
        _check_state(op, w_cur, b_next, "b_next", w_next.shape[0])
    _check_state(op, w_cur, utility, "utility", n)
    _check_state(op, w_cur, mean, "mean", n)
    _check_state(op, w_cur, age, "age", n)
    _check_same(op, w_cur, new_weights, "new_weights")
    if new_weights.dim() != 2 or new_weights.shape[0] > n or new_weights.shape[1] != fan_in:
        raise RuntimeError(f"clfast.{op}: new_weights must be [k <= {n}, {fan_in}] (one row per replaced unit), got "
                           f"{list(new_weights.shape)}")
    check_memory(op, ("w_cur", [w_cur], True), ("b_cur", [b_cur] if b_cur is not None else [], True),
                 ("w_next", [w_next], True), ("b_next", [b_next] if b_next is not None else [], True),
                 ("utility", [utility], True), ("mean", [mean], True), ("age", [age], True),
                 ("new_weights", [new_weights], False))
    k = new_weights.shape[0]
    # lowest bias-corrected utility among mature units; stable sort: ties by index, immature units last
    mature = age > maturity_threshold
    score = torch.where(mature, utility / (1 - decay ** age), torch.zeros_like(utility))
    score = torch.nan_to_num(score, nan=math.inf)  # NaN ranks last
    by_score = torch.sort(score, stable=True).indices
    index = by_score[torch.sort((~mature[by_score]).to(torch.uint8), stable=True).indices][:k]
    if k == 0:
        return index
    m_hat = mean[index] / (1 - decay ** age[index])
    # the kernels' row-major layout: a channels_last weight is updated in a copy and written back
    wn_work = w_next if w_next.is_contiguous() else w_next.contiguous()
    wc_work = w_cur if w_cur.is_contiguous() else w_cur.contiguous()
    wn = wn_work.view(w_next.shape[0], n, group)
    if b_next is not None:  # the next layer keeps its mean input: the unit's mean output moves into the bias
        b_next += (wn[:, index, :] * m_hat[None, :, None]).sum(dim=(1, 2))
    wn[:, index, :] = 0
    wc_work.view(n, -1)[index] = new_weights
    if wn_work is not w_next:
        w_next.copy_(wn_work)
    if wc_work is not w_cur:
        w_cur.copy_(wc_work)
    if b_cur is not None:
        b_cur[index] = 0
    utility[index] = 0
    mean[index] = 0
    age[index] = 0
    return index
