"""Pure-torch references of the SI ops (schemas in csrc/ops.cpp). They are the tests' oracle and the
fallback when the native extension is not built; each computes what the hypnettorch SI functions compute,
with the same float32 operation order."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ._checks import check_lists


@torch.no_grad()
def si_accumulate_(omega: List[Tensor], params: List[Tensor], ref: List[Tensor], grads: List[Tensor],
                   ref_is_delta: bool) -> None:
    check_lists("si_accumulate_", ("params", params), ("omega", omega), ("ref", ref), ("grads", grads))
    for o, p, r, g in zip(omega, params, ref, grads):
        delta = r if ref_is_delta else p - r
        o += delta * (-g)


@torch.no_grad()
def si_consolidate_(importance: List[Tensor], prev: List[Tensor], omega: List[Tensor], params: List[Tensor],
                    epsilon: float) -> None:
    check_lists("si_consolidate_", ("params", params), ("importance", importance), ("prev", prev),
                ("omega", omega))
    for imp, pv, o, p in zip(importance, prev, omega, params):
        imp += torch.clamp(o / ((p - pv) ** 2 + epsilon), min=0)
        pv.copy_(p)
        o.zero_()


def si_penalty(importance: List[Tensor], prev: List[Tensor], params: List[Tensor]) -> Tensor:
    check_lists("si_penalty", ("params", params), ("importance", importance), ("prev", prev))
    total = None
    for imp, pv, p in zip(importance, prev, params):
        term = (imp * (p - pv) ** 2).sum()
        total = term if total is None else total + term
    return total


@torch.no_grad()
def si_penalty_backward(grad_out: Tensor, importance: List[Tensor], prev: List[Tensor],
                        params: List[Tensor]) -> List[Tensor]:
    check_lists("si_penalty_backward", ("params", params), ("importance", importance), ("prev", prev))
    return [grad_out * 2 * imp * (p - pv) for imp, pv, p in zip(importance, prev, params)]


@torch.no_grad()
def si_penalty_grad_(grads: List[Tensor], importance: List[Tensor], prev: List[Tensor], params: List[Tensor],
                     scale: float) -> None:
    check_lists("si_penalty_grad_", ("params", params), ("grads", grads), ("importance", importance),
                ("prev", prev))
    for g, imp, pv, p in zip(grads, importance, prev, params):
        g += scale * 2 * imp * (p - pv)
