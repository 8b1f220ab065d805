"""Pure-torch references of the fused optimizer steps: torch.optim.SGD / Adam's single-tensor updates
followed by the SI accumulation ``omega += (new - old) * (-grad)`` that hypnettorch's SI computes around a step."""
from __future__ import annotations

import math
from typing import List

import torch
from torch import Tensor

from ._checks import check_lists, check_memory


@torch.no_grad()
def sgd_si_step_(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], omega: List[Tensor],
                 lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                 init_buffers: bool) -> None:
    check_lists("sgd_si_step_", ("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers),
                ("omega", omega), optional=("momentum_buffers", "omega"))
    if momentum != 0 and not momentum_buffers:
        raise RuntimeError("clfast.sgd_si_step_: momentum != 0 needs one momentum buffer per parameter")
    check_memory("sgd_si_step_", ("params", params, True),
                 ("momentum_buffers", momentum_buffers if momentum != 0 else [], True), ("omega", omega, True),
                 ("grads", grads, False))
    for i, (p, g) in enumerate(zip(params, grads)):
        old = p.clone() if omega else None
        d_p = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        if momentum != 0:
            buf = momentum_buffers[i]
            if init_buffers:
                buf.copy_(d_p)
            else:
                buf.mul_(momentum).add_(d_p, alpha=1 - dampening)
            d_p = d_p.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d_p, alpha=-lr)
        if omega:
            omega[i] += (p - old) * (-g)


@torch.no_grad()
def adam_si_step_(params: List[Tensor], grads: List[Tensor], exp_avg: List[Tensor], exp_avg_sq: List[Tensor],
                  omega: List[Tensor], lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                  bias_correction1: float, bias_correction2: float) -> None:
    check_lists("adam_si_step_", ("params", params), ("grads", grads), ("exp_avg", exp_avg),
                ("exp_avg_sq", exp_avg_sq), ("omega", omega), optional=("omega",))
    for name, value in (("bias_correction1", bias_correction1), ("bias_correction2", bias_correction2)):
        if not 0 < value <= 1:
            raise RuntimeError(f"clfast.adam_si_step_: {name} must be 1 - beta{name[-1]}^step, in (0, 1], got "
                               f"{value:g}")
    check_memory("adam_si_step_", ("params", params, True), ("exp_avg", exp_avg, True),
                 ("exp_avg_sq", exp_avg_sq, True), ("omega", omega, True), ("grads", grads, False))
    step_size = lr / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avg, exp_avg_sq)):
        old = p.clone() if omega else None
        d_p = g.add(p, alpha=weight_decay) if weight_decay != 0 else g
        m.lerp_(d_p, 1 - beta1)
        v.mul_(beta2).addcmul_(d_p, d_p, value=1 - beta2)
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.addcdiv_(m, denom, value=-step_size)
        if omega:
            omega[i] += (p - old) * (-g)
