"""Kronecker-factored quadratic forms (csrc/kron/): wrappers, fake kernels and the autograd of
kron_quadratic."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from ._backend import native_available, one_device, op


def kron_quadratic(a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``sum_i <g_i v_i a_i, v_i>`` for symmetric factors, differentiable in ``v``."""
    return op("kron_quadratic")(list(a), list(g), list(v))[0]


def kron_mv(scale: Tensor, a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> List[Tensor]:
    """``scale * g_i v_i a_i`` per block (``scale`` a 0-dim tensor)."""
    return op("kron_mv")(scale, list(a), list(g), list(v))


if native_available():

    @torch.library.register_fake("clfast::kron_quadratic")
    def _(a, g, v):
        one_device("kron_quadratic", a, g, v)
        return v[0].new_empty(()), [torch.empty_like(x, memory_format=torch.contiguous_format) for x in v]

    @torch.library.register_fake("clfast::kron_mv")
    def _(scale, a, g, v):
        one_device("kron_mv", scale, a, g, v)
        return [torch.empty_like(x, memory_format=torch.contiguous_format) for x in v]

    def _kron_setup(ctx, inputs, output):
        a, g, v = inputs
        ctx.n = len(v)
        ctx.mark_non_differentiable(*output[1])
        ctx.save_for_backward(*a, *g, *v, *output[1])

    def _symmetric(factors) -> bool:
        """Whether every factor is exactly symmetric: one host read for all of them (the general gradient costs two
        GEMMs more per block). Under tracing no value can be read, so the general gradient is traced."""
        if torch.compiler.is_compiling() or torch._guards.detect_fake_mode(factors) is not None:
            return False
        return bool(torch.stack([(f == f.mT).all() for f in factors]).all())

    def _kron_backward(ctx, grad, _grad_products):
        n = ctx.n
        saved = ctx.saved_tensors
        a, g, v, products = saved[:n], saved[n:2 * n], saved[2 * n:3 * n], saved[3 * n:]
        needs_a, needs_g, needs_v = ctx.needs_input_grad
        grad_a = grad_g = grad_v = None
        if needs_v:
            # d/dv tr(v^T g v a) = g v a + g^T v a^T: twice the forward's product when the factors are symmetric.
            if _symmetric(list(a) + list(g)):
                grad_v = [t * (2 * grad) for t in products]
            else:
                grad_v = [(t + gi.mT @ vi @ ai.mT) * grad for t, ai, gi, vi in zip(products, a, g, v)]
        if needs_a:
            grad_a = [vi.mT @ gi.mT @ vi * grad for gi, vi in zip(g, v)]  # d/da = v^T g^T v
        if needs_g:
            grad_g = [vi @ ai.mT @ vi.mT * grad for ai, vi in zip(a, v)]  # d/dg = v a^T v^T
        return grad_a, grad_g, grad_v

    torch.library.register_autograd("clfast::kron_quadratic", _kron_backward, setup_context=_kron_setup)
