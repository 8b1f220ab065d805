"""Pure-torch references of the SI ops (schemas in csrc/ops.cpp). They are the tests' oracle and the
fallback when the native extension is not built; each computes what the hypnettorch SI functions compute,
with the same float32 operation order."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ._checks import check_lists, check_memory


@torch.no_grad()
def si_accumulate_(omega: List[Tensor], params: List[Tensor], ref: List[Tensor], grads: List[Tensor],
                   ref_is_delta: bool) -> None:
    check_lists("si_accumulate_", ("params", params), ("omega", omega), ("ref", ref), ("grads", grads))
    check_memory("si_accumulate_", ("omega", omega, True), ("params", params, False), ("ref", ref, False),
                 ("grads", grads, False))
    for o, p, r, g in zip(omega, params, ref, grads):
        delta = r if ref_is_delta else p - r
        o += delta * (-g)


@torch.no_grad()
def si_consolidate_(importance: List[Tensor], prev: List[Tensor], omega: List[Tensor], params: List[Tensor],
                    epsilon: float) -> None:
    check_lists("si_consolidate_", ("params", params), ("importance", importance), ("prev", prev),
                ("omega", omega))
    check_memory("si_consolidate_", ("importance", importance, True), ("prev", prev, True), ("omega", omega, True),
                 ("params", params, False))
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
    if grad_out.numel() != 1 or grad_out.device != params[0].device:
        raise RuntimeError(f"clfast.si_penalty_backward: grad_out must be one element on {params[0].device}, got "
                           f"shape {list(grad_out.shape)} on {grad_out.device}")
    return [grad_out * 2 * imp * (p - pv) for imp, pv, p in zip(importance, prev, params)]


@torch.no_grad()
def si_penalty_grad_(grads: List[Tensor], importance: List[Tensor], prev: List[Tensor], params: List[Tensor],
                     scale: float) -> None:
    check_lists("si_penalty_grad_", ("params", params), ("grads", grads), ("importance", importance),
                ("prev", prev))
    check_memory("si_penalty_grad_", ("grads", grads, True), ("importance", importance, False),
                 ("prev", prev, False), ("params", params, False))
    for g, imp, pv, p in zip(grads, importance, prev, params):
        g += scale * 2 * imp * (p - pv)
