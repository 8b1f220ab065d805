"""Fused optimizer ops (csrc/optim/): wrappers and fake kernels."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import one_device, op, registrar


def sgd_si_step_(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], omega: List[Tensor], *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, init_buffers: bool,
) -> None:
    """torch.optim.SGD's update of ``params`` (and ``momentum_buffers``); ``omega += (new - old) * (-grads)``
    when ``omega`` is non-empty."""
    if params:
        op("sgd_si_step_")(params, grads, momentum_buffers, omega, float(lr), float(momentum), float(dampening),
                            float(weight_decay), bool(nesterov), bool(init_buffers))


def adam_si_step_(
    params: List[Tensor], grads: List[Tensor], exp_avg: List[Tensor], exp_avg_sq: List[Tensor],
    omega: List[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction1: float, bias_correction2: float,
) -> None:
    """torch.optim.Adam's update of ``params`` and its moments; ``omega`` as in :func:`sgd_si_step_`."""
    if params:
        op("adam_si_step_")(params, grads, exp_avg, exp_avg_sq, omega, float(lr), float(beta1), float(beta2),
                             float(eps), float(weight_decay), float(bias_correction1), float(bias_correction2))


@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::sgd_si_step_")
    def _(params, grads, momentum_buffers, omega, lr, momentum, dampening, weight_decay, nesterov, init_buffers):
        one_device("sgd_si_step_", params, grads, momentum_buffers, omega)

    @torch.library.register_fake(f"{ns}::adam_si_step_")
    def _(params, grads, exp_avg, exp_avg_sq, omega, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
        one_device("adam_si_step_", params, grads, exp_avg, exp_avg_sq, omega)
