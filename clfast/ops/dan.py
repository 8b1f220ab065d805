"""DAN layer ops (csrc/dan/): wrapper and fake kernels (the autograd of dan_layer_forward is C++)."""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from .. import reference
from ._backend import one_device, op, registrar



def dan_layer(x: Tensor, params: Sequence[Optional[Tensor]], stats: Sequence[Tensor], training: bool,
              momentum: Optional[float], eps: float, act: Union[str, Callable[[Tensor], Tensor]]) -> Tensor:
    """One DAN layer of N neurons (see ``clfast.reference.dan.dan_layer`` for shapes): ``params`` = (bn1_weight,
    bn1_bias, weight1, bias1, bn2_weight, bn2_bias, weight2, bias2, weight3, bias3), ``stats`` = (running_mean1,
    running_var1, num_batches1, running_mean2, running_var2, num_batches2), updated in place when training.
    ``act`` is a native activation name ('identity', 'tanh', 'relu', 'sigmoid', 'gelu', 'gelu_tanh'), or any
    module / function: that and ``momentum=None`` (a cumulative
    average) have no native kernel and run on the reference on every backend."""
    if isinstance(act, str) and momentum is not None:
        return op("dan_layer")(x, *params, *stats, bool(training), float(momentum), float(eps), act)
    return reference.dan_layer(x, *params, *stats, bool(training), momentum, float(eps), act)


# dan_layer_forward's saved tensors, in its schema's order (csrc/dan/dan.h: DanSaved).
SAVED = ("u1", "s1", "u2", "z2", "a2", "Weff1", "Weff2", "mean1", "var1", "mean2", "var2")

@registrar
def _register(ns: str) -> None:
    """Fake kernels and autograd of the ops in namespace ``ns``."""

    @torch.library.register_fake(f"{ns}::dan_layer_forward")
    def _(x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3, rm1, rv1, rm2, rv2, eps, act):
        one_device("dan_layer", x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3, rm1, rv1, rm2, rv2)
        (n, nf, ni), no, batch, training = w1.shape, w3.shape[1], x.shape[-2], rm1 is None
        stats = lambda c: x.new_empty((c,) if training else (0,))  # noqa: E731
        g = n if x.dim() == 3 else 1
        z1 = x.new_empty((n, batch, nf) if x.dim() == 3 else (batch, n * nf))
        z2 = x.new_empty((n, batch, nf) if act in ("gelu", "gelu_tanh") else (0,))  # kept for GELU's backward only
        saved = dict(u1=x.new_empty(x.shape if training else (0,)), s1=z1, u2=x.new_empty((n, batch, nf)), z2=z2,
                     a2=x.new_empty((n, batch, nf)), Weff1=x.new_empty((n, nf, ni)), Weff2=x.new_empty((n, nf, nf)),
                     mean1=stats(g * ni), var1=stats(g * ni), mean2=stats(n * nf), var2=stats(n * nf))
        saved = [saved[name] for name in SAVED]
        return x.new_empty((batch, n * no)), saved

    @torch.library.register_fake(f"{ns}::dan_layer_backward")
    def _(grad_out, x, g1, b1, w1, g2, b2, w2, w3, rm1, rv1, rm2, rv2, saved, eps, act, input_grad):
        one_device("dan_layer_backward", grad_out, x, g1, b1, w1, g2, b2, w2, w3, rm1, rv1, rm2, rv2, saved)
        n, nf = w1.shape[:2]
        return [x.new_empty(x.shape if input_grad else (0,)), torch.empty_like(g1), torch.empty_like(b1),
                torch.empty_like(w1), x.new_empty((n, nf)), torch.empty_like(g2), torch.empty_like(b2),
                torch.empty_like(w2), x.new_empty((n, nf)), torch.empty_like(w3), x.new_empty((n, w3.shape[1]))]

    @torch.library.register_fake(f"{ns}::dan_bn_update_")
    def _(rm1, rv1, nb1, rm2, rv2, nb2, mean1, var1, mean2, var2, momentum, batch):
        one_device("dan_bn_update_", rm1, rv1, nb1, rm2, rv2, nb2, mean1, var1, mean2, var2)

    # dan_layer_forward's autograd is registered in C++ (csrc/dan/dan.cpp).
