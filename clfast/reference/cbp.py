"""Pure-torch references of the CBP ops (schemas in csrc/ops.cpp), step by step as in Dohare et al. (Nature
2024) and the authors' GnT: the oracle for the native kernels and the fallback without them."""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

UTILITIES = ("contribution", "zero_contribution", "adaptable_contribution")


def _check_chain(op: str, w_next: Tensor, units: int, name: str) -> int:
    per_row = w_next.numel() // max(w_next.shape[0], 1) if w_next.dim() >= 2 else 0
    if per_row == 0 or per_row % units:
        raise RuntimeError(f"clfast.{op}: layers do not chain: {name} (shape {list(w_next.shape)}) takes {per_row} "
                           f"inputs per output, not a multiple of the layer's {units} units")
    return per_row // units


@torch.no_grad()
def cbp_update_(utility: List[Tensor], mean: List[Tensor], age: List[Tensor], features: List[Tensor],
                w_next: List[Tensor], w_cur: List[Tensor], decay: float, utility_type: int) -> None:
    if not utility:
        raise RuntimeError("clfast.cbp_update_: expected at least one layer")
    if not 0 <= utility_type < len(UTILITIES):
        raise RuntimeError(f"clfast.cbp_update_: unknown utility type {utility_type}")
    for l, (u, m, a, h, wn, wc) in enumerate(zip(utility, mean, age, features, w_next, w_cur)):
        n = wc.shape[0]
        if wc.dim() < 2 or n == 0:
            raise RuntimeError(f"clfast.cbp_update_: w_cur[{l}] must be a Linear or Conv2d weight with at least one "
                               f"unit, got shape {list(wc.shape)}")
        if h.dim() < 2 or h.shape[1] != n or h.shape[0] == 0 or h.numel() == 0:
            raise RuntimeError(f"clfast.cbp_update_: features[{l}] must be [batch > 0, {n}, ...] (the layer's {n} "
                               f"units, non-empty), got shape {list(h.shape)}")
        group = _check_chain("cbp_update_", wn, n, f"w_next[{l}]")
        h = h.reshape(h.shape[0], n, -1)  # [B, n, S]
        a += 1
        m.mul_(decay).add_((1 - decay) * h.mean(dim=(0, 2)))
        m_hat = m / (1 - decay ** a)
        # sum over the next layer's rows (and the unit's kernel / spatial group) of |W_next|
        out_mag = wn.reshape(wn.shape[0], n, group).abs().sum(dim=(0, 2))
        if utility_type == 0:
            act = h.abs().mean(dim=(0, 2))
        else:
            act = (h - m_hat[None, :, None]).abs().mean(dim=(0, 2))
        new = act * out_mag
        if utility_type == 2:
            new = new / wc.reshape(n, -1).abs().mean(dim=1)
        u.mul_(decay).add_((1 - decay) * new)


@torch.no_grad()
def cbp_replace_(w_cur: Tensor, b_cur: Optional[Tensor], w_next: Tensor, b_next: Optional[Tensor], utility: Tensor,
                 mean: Tensor, age: Tensor, new_weights: Tensor, decay: float, maturity_threshold: int) -> Tensor:
    n = w_cur.shape[0]
    group = _check_chain("cbp_replace_", w_next, n, "w_next")
    k = new_weights.shape[0] if new_weights.dim() == 2 else -1
    if new_weights.dim() != 2 or k > n or new_weights.shape[1] != w_cur.numel() // n:
        raise RuntimeError(f"clfast.cbp_replace_: new_weights must be [k <= {n}, {w_cur.numel() // n}] (one row per "
                           f"replaced unit), got {list(new_weights.shape)}")
    # lowest bias-corrected utility among mature units; stable sort: ties by index, immature units last
    mature = age > maturity_threshold
    score = torch.where(mature, utility / (1 - decay ** age), torch.zeros_like(utility))
    score = torch.nan_to_num(score, nan=math.inf)  # NaN ranks last
    by_score = torch.sort(score, stable=True).indices
    index = by_score[torch.sort((~mature[by_score]).to(torch.uint8), stable=True).indices][:k]
    if k == 0:
        return index
    m_hat = mean[index] / (1 - decay ** age[index])
    wn = w_next.view(w_next.shape[0], n, group)
    if b_next is not None:  # the next layer keeps its mean input: the unit's mean output moves into the bias
        b_next += (wn[:, index, :] * m_hat[None, :, None]).sum(dim=(1, 2))
    wn[:, index, :] = 0
    w_cur.view(n, -1)[index] = new_weights
    if b_cur is not None:
        b_cur[index] = 0
    utility[index] = 0
    mean[index] = 0
    age[index] = 0
    return index
