"""hypnettorch's Synaptic Intelligence functions (Zenke et al. 2017, as in van de Ven et al. 2019, A.2.3),
re-implemented step by step with the original's semantics: per-parameter torch expressions, state kept as
module buffers under the original names, a fresh pre-step clone every step. This is the baseline clfast.si
is tested and benchmarked against; use clfast.si in real code."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..si import si_buffer_names


def si_pre_optim_step(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                      no_pre_step_ckpt: bool = False) -> None:
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        _, prev_name, _, pre_name = si_buffer_names(i, params_name)
        if not hasattr(net, prev_name):  # first call: theta at the start of the first task
            net.register_buffer(prev_name, p.detach().clone())
        if not no_pre_step_ckpt:
            net.register_buffer(pre_name, p.detach().clone())


def si_post_optim_step(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                       delta_params: Optional[Sequence[Tensor]] = None) -> None:
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        _, _, running_name, pre_name = si_buffer_names(i, params_name)
        if p.grad is None:
            raise ValueError('Function "si_post_optim_step" expects that gradients wrt the loss have been '
                             'computed.')
        running = getattr(net, running_name, None)
        if running is None:
            running = torch.zeros_like(p).to(p.device)
        if delta_params is None:
            pre = getattr(net, pre_name, None)
            if pre is None:
                raise ValueError('Function "si_post_optim_step" requires that function "si_pre_optim_step" '
                                 'has been called or "delta_params" was set.')
            delta = p.detach() - pre
            setattr(net, pre_name, None)
        else:
            delta = delta_params[i]
        running += delta * (-p.grad)
        net.register_buffer(running_name, running)


def si_compute_importance(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                          epsilon: float = 1e-3) -> None:
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        omega_name, prev_name, running_name, _ = si_buffer_names(i, params_name)
        if not hasattr(net, prev_name):
            raise ValueError('SI importance weights can only be computed if function "si_pre_optim_step" has '
                             'been called at the beginning of training the first task.')
        if not hasattr(net, running_name):
            raise ValueError('SI importance weights can only be computed if function "si_post_optim_step" has '
                             'been correctly used during training.')
        prev, running = getattr(net, prev_name), getattr(net, running_name)
        omega = getattr(net, omega_name) if hasattr(net, omega_name) else torch.zeros_like(p).to(p.device)
        change = p.detach() - prev
        omega += torch.clamp(running / (change ** 2 + epsilon), min=0)  # only positive importances
        net.register_buffer(omega_name, omega)
        net.register_buffer(prev_name, p.detach().clone())
        setattr(net, running_name, None)  # the next task starts a fresh running estimate


def si_regularizer(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None):
    reg = 0.0
    for i, p in enumerate(params):
        if not p.requires_grad:
            continue
        omega_name, prev_name, _, _ = si_buffer_names(i, params_name)
        if not hasattr(net, omega_name) or not hasattr(net, prev_name):
            raise ValueError('Function "si_regularizer" can only be used after function '
                             '"si_compute_importance" has been called at least once.')
        reg += (getattr(net, omega_name) * (p - getattr(net, prev_name)) ** 2).sum()
    return reg
