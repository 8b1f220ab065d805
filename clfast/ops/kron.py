"""Kronecker-factored quadratic forms (csrc/kron/): wrappers, fake kernels and the autograd of
kron_quadratic."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import list_flags, one_device, op, registrar


def kron_quadratic(a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``sum_i <g_i v_i a_i, v_i>`` for symmetric factors, differentiable in ``v``."""
    return op("kron_quadratic")(list(a), list(g), list(v))[0]


def kron_mv(scale: Tensor, a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> List[Tensor]:
    """``scale * g_i v_i a_i`` per block (``scale`` a 0-dim tensor)."""
    return op("kron_mv")(scale, list(a), list(g), list(v))


def check_symmetric(factors: Sequence[Tensor]) -> bool:
    """Whether every factor is exactly symmetric, which lets ``kron_quadratic``'s backward reuse the forward's
    products (the general gradient costs two GEMMs more per block). The verdict is kept on each factor while its
    version counter stays: a module with persistent factors (EWC) calls this when it stores them, outside the
    training step, and the backwards then read no value. Unknown factors cost one host read for all of them.
    Under tracing no value can be read, so the general gradient is traced."""
    if torch.compiler.is_compiling() or torch._guards.detect_fake_mode(list(factors)) is not None:
        return False
    unknown = []
    for f in factors:
        known = getattr(f, "_clfast_symmetric", None)  # (version counter, verdict)
        if known is None or f.is_inference() or known[0] != f._version:
            unknown.append(f)
        elif not known[1]:
            return False
    if unknown:
        verdicts = torch.stack([(f == f.mT).all() for f in unknown]).tolist()
        for f, verdict in zip(unknown, verdicts):
            if not f.is_inference():  # an inference tensor keeps no version counter
                f._clfast_symmetric = (f._version, verdict)
        return all(verdicts)
    return True


@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::kron_quadratic")
    def _(a, g, v):
        one_device("kron_quadratic", a, g, v)
        return v[0].new_empty(()), [torch.empty_like(x, memory_format=torch.contiguous_format) for x in v]

    @torch.library.register_fake(f"{ns}::kron_mv")
    def _(scale, a, g, v):
        one_device("kron_mv", scale, a, g, v)
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in v]

    def _kron_setup(ctx, inputs, output):
        a, g, v = inputs
        ctx.n = len(v)
        ctx.mark_non_differentiable(*output[1])
        ctx.save_for_backward(*a, *g, *v, *output[1])


    def _kron_backward(ctx, grad, _grad_products):
        n = ctx.n
        saved = ctx.saved_tensors
        a, g, v, products = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        needs_a, needs_g, needs_v = (list_flags(f, n) for f in ctx.needs_input_grad)
        grad_a = grad_g = grad_v = [None] * n  # one entry per tensor of each list argument
        if any(needs_v):
            # d/dv tr(v^T g v a) = g v a + g^T v a^T: twice the forward's product when the factors are symmetric.
            if check_symmetric(list(a) + list(g)):
                grad_v = [t * (2 * grad) if k else None for t, k in zip(products, needs_v)]
            else:
                grad_v = [(t + gi.mT @ vi @ ai.mT) * grad if k else None
                          for t, ai, gi, vi, k in zip(products, a, g, v, needs_v)]
        if any(needs_a):
            grad_a = [vi.mT @ gi.mT @ vi * grad if k else None for gi, vi, k in zip(g, v, needs_a)]  # v^T g^T v
        if any(needs_g):
            grad_g = [vi @ ai.mT @ vi.mT * grad if k else None for ai, vi, k in zip(a, v, needs_g)]  # v a^T v^T
        return grad_a, grad_g, grad_v

    torch.library.register_autograd(f"{ns}::kron_quadratic", _kron_backward, setup_context=_kron_setup)
