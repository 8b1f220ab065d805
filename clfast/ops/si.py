"""SI ops (csrc/si/): wrappers, fake kernels and the autograd of si_penalty."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import list_flags, one_device, op, registrar


def si_accumulate_(
    omega: Sequence[Tensor], params: Sequence[Tensor], ref: Sequence[Tensor], grads: Sequence[Tensor],
    ref_is_delta: bool = False,
) -> None:
    """``omega_i += (params_i - ref_i) * (-grads_i)``, or ``omega_i += ref_i * (-grads_i)`` if ``ref_is_delta``."""
    if len(params):
        op("si_accumulate_")(list(omega), list(params), list(ref), list(grads), ref_is_delta)


def si_consolidate_(
    importance: Sequence[Tensor], prev: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
    epsilon: float,
) -> None:
    """``importance_i += clamp(omega_i / ((params_i - prev_i)^2 + epsilon), min=0)``; ``prev_i = params_i``;
    ``omega_i = 0``."""
    if len(params):
        op("si_consolidate_")(list(importance), list(prev), list(omega), list(params), float(epsilon))


def si_penalty(importance: Sequence[Tensor], prev: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``sum_i sum(importance_i * (params_i - prev_i)^2)`` as a 0-dim tensor, differentiable in ``params``."""
    if not len(params):
        return torch.zeros(())
    return op("si_penalty")(list(importance), list(prev), list(params))


def si_penalty_grad_(
    grads: Sequence[Tensor], importance: Sequence[Tensor], prev: Sequence[Tensor], params: Sequence[Tensor],
    scale: float,
) -> None:
    """``grads_i += scale * 2 * importance_i * (params_i - prev_i)`` with no autograd graph."""
    if len(params):
        op("si_penalty_grad_")(list(grads), list(importance), list(prev), list(params), float(scale))


@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::si_accumulate_")
    def _(omega, params, ref, grads, ref_is_delta):
        one_device("si_accumulate_", omega, params, ref, grads)

    @torch.library.register_fake(f"{ns}::si_consolidate_")
    def _(importance, prev, omega, params, epsilon):
        one_device("si_consolidate_", importance, prev, omega, params)

    @torch.library.register_fake(f"{ns}::si_penalty")
    def _(importance, prev, params):
        one_device("si_penalty", importance, prev, params)
        return params[0].new_empty(())

    @torch.library.register_fake(f"{ns}::si_penalty_backward")
    def _(grad_out, importance, prev, params):
        one_device("si_penalty_backward", grad_out, importance, prev, params)
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    @torch.library.register_fake(f"{ns}::si_penalty_grad_")
    def _(grads, importance, prev, params, scale):
        one_device("si_penalty_grad_", grads, importance, prev, params)

    # The backward reads the forward's inputs through saved tensors, so autograd refuses it when one of them was
    # changed in place in between (as torch does for the tensors its own formula saves).
    def _si_penalty_setup(ctx, inputs, output):
        importance, prev, params = inputs
        ctx.n = len(params)
        ctx.save_for_backward(*importance, *prev, *params)

    def _si_penalty_backward(ctx, grad):
        n = ctx.n
        saved = ctx.saved_tensors
        importance, prev, params = saved[:n], saved[n:2 * n], saved[2 * n:]
        # one flag per tensor of each list argument
        needs_imp, needs_prev, needs_params = (list_flags(f, n) for f in ctx.needs_input_grad)
        grad_imp = grad_prev = grad_params = [None] * n  # one entry per tensor of each list argument
        if any(needs_params) or any(needs_prev):
            d = getattr(torch.ops, ns).si_penalty_backward(grad, list(importance), list(prev), list(params))
            grad_params = [t if k else None for t, k in zip(d, needs_params)]
            grad_prev = [-t if k else None for t, k in zip(d, needs_prev)]
        if any(needs_imp):
            grad_imp = [grad * (p - pv) ** 2 if k else None for p, pv, k in zip(params, prev, needs_imp)]
        return grad_imp, grad_prev, grad_params

    torch.library.register_autograd(f"{ns}::si_penalty", _si_penalty_backward, setup_context=_si_penalty_setup)
