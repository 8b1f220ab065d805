"""Pure-torch references of the DAN ops (schemas in csrc/ops.cpp): ``dan_layer``, one layer of N neurons on
stacked parameters computed with batched torch ops, and ``dan_bn_update_``. They are the oracle of the native
kernels and the path clfast runs when the extension is missing or the activation has no native kernel."""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._checks import check_memory

__all__ = ["dan_layer", "dan_bn_update_", "ACTIVATIONS"]

# The native op's activations by their schema names.
ACTIVATIONS = {
    "identity": lambda h: h,
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "gelu": F.gelu,
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def _batch_norm(h: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], weight: Tensor, bias: Tensor, training: bool,
                momentum: Optional[float], eps: float) -> Tensor:
    """Per-neuron BatchNorm1d of ``h`` [N, B, C] with statistics [N, C], exactly as N ``nn.BatchNorm1d``."""
    n, b, c = h.shape
    flat = h.transpose(0, 1).reshape(b, n * c)
    factor = momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:  # cumulative moving average, as nn.BatchNorm1d(momentum=None)
            factor = 1.0 / float(num_batches_tracked[0])
    out = F.batch_norm(flat, None if running_mean is None else running_mean.view(-1),
                       None if running_var is None else running_var.view(-1), weight.reshape(-1),
                       bias.reshape(-1), training, 0.0 if factor is None else factor, eps)
    return out.view(b, n, c).transpose(0, 1)


def _linear(h: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return torch.bmm(h, weight.transpose(1, 2)) if bias is None else \
        torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _check_layer(x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3, stats, training: bool, eps: float, act) -> None:
    """csrc/dan/dan.h's check_layer, in its order and with its messages; in train mode the running statistics are
    then checked as dan_bn_update_ checks them."""
    op = "clfast.dan_layer"
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError(f"{op}: expected a float32 or float64 input, got "
                           f"{x.dtype if isinstance(x, Tensor) else None}")
    params = (x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3) + tuple(stats if not training else ())
    tensors = [t for t in params if isinstance(t, Tensor)]
    if any(t.device != x.device for t in tensors) and any(t.device.type == "meta" for t in tensors):
        raise RuntimeError(f"{op}: tensors on {x.device} and meta; all tensors must be on one device")
    shape = lambda t: list(t.shape) if isinstance(t, Tensor) else []  # noqa: E731
    if not (isinstance(g1, Tensor) and g1.dim() == 2 and isinstance(g2, Tensor) and g2.dim() == 2
            and isinstance(w3, Tensor) and w3.dim() == 3):
        raise RuntimeError(f"{op}: bn1_weight must be [N, ni], bn2_weight [N, nf] and weight3 [N, no, nf], got "
                           f"{shape(g1)}, {shape(g2)} and {shape(w3)}")
    n, ni, nf, no = g1.shape[0], g1.shape[1], g2.shape[1], w3.shape[1]
    if min(n, nf, ni, no) <= 0:
        raise RuntimeError(f"{op}: empty layer (N={n}, nf={nf}, ni={ni}, no={no})")

    def param(name, t, expected, optional=False):
        if t is None and optional:
            return
        if not isinstance(t, Tensor):
            raise RuntimeError(f"{op}: {name} is undefined")
        if list(t.shape) != list(expected):
            raise RuntimeError(f"{op}: {name} must have shape {list(expected)}, got {list(t.shape)}")
        if t.dtype != x.dtype:
            raise RuntimeError(f"{op}: {name} must be {x.dtype} like the input, got {t.dtype}")
        if t.device != x.device:
            raise RuntimeError(f"{op}: {name} is on {t.device} but the input is on {x.device}")

    param("bn1_bias", b1, (n, ni))
    param("weight1", w1, (n, nf, ni))
    if not ((x.dim() == 2 and x.shape[1] == ni) or (x.dim() == 3 and x.shape[0] == n and x.shape[2] == ni)):
        raise RuntimeError(f"{op}: expected an input [B, {ni}] or [{n}, B, {ni}], got {list(x.shape)}")
    if isinstance(act, str) and act not in ACTIVATIONS:
        raise RuntimeError(f"{op}: unknown activation '{act}'; expected 'identity', 'tanh', 'relu', 'sigmoid', "
                           "'gelu' or 'gelu_tanh'")
    param("bn1_weight", g1, (n, ni))
    param("bias1", c1, (n, nf), True)
    param("bn2_weight", g2, (n, nf))
    param("bn2_bias", b2, (n, nf))
    param("weight2", w2, (n, nf, nf))
    param("bias2", c2, (n, nf), True)
    param("weight3", w3, (n, no, nf))
    param("bias3", c3, (n, no), True)
    rm1, rv1, nb1, rm2, rv2, nb2 = stats
    if not training:
        if any(t is None for t in (rm1, rv1, rm2, rv2)):
            raise RuntimeError(f"{op}: pass all four running statistics (eval mode) or none (train mode)")
        param("running_mean1", rm1, (n, ni))
        param("running_var1", rv1, (n, ni))
        param("running_mean2", rm2, (n, nf))
        param("running_var2", rv2, (n, nf))
    if not (eps == eps) or (training and not eps > 0):
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    batch = x.shape[-2]
    if training and batch <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(x.shape)}")
    if training and rm1 is not None:
        g = n if x.dim() == 3 else 1
        _check_bn_update([("first", rm1, rv1, nb1, x.new_empty(g * ni), x.new_empty(g * ni)),
                          ("second", rm2, rv2, nb2, x.new_empty(n * nf), x.new_empty(n * nf))], batch)
        check_memory("dan_bn_update_", *[(name, [t], True) for name, t in zip(
            ("running_mean1", "running_var1", "num_batches1", "running_mean2", "running_var2", "num_batches2"),
            stats)])


def dan_layer(x: Tensor, bn1_weight: Tensor, bn1_bias: Tensor, weight1: Tensor, bias1: Optional[Tensor],
              bn2_weight: Tensor, bn2_bias: Tensor, weight2: Tensor, bias2: Optional[Tensor], weight3: Tensor,
              bias3: Optional[Tensor], running_mean1: Optional[Tensor], running_var1: Optional[Tensor],
              num_batches1: Optional[Tensor], running_mean2: Optional[Tensor], running_var2: Optional[Tensor],
              num_batches2: Optional[Tensor], training: bool, momentum: Optional[float], eps: float,
              act: Union[str, Callable[[Tensor], Tensor]]) -> Tensor:
    """One DAN layer of N neurons on stacked parameters.

    x [B, ni] (every neuron reads it) or [N, B, ni] (one input per neuron); bn1_* [N, ni]; weight1 [N, nf, ni];
    bias1 [N, nf]; bn2_* [N, nf]; weight2 [N, nf, nf]; bias2 [N, nf]; weight3 [N, no, nf]; bias3 [N, no];
    running stats [N, ni] / [N, nf] and batch counters [N] (updated in place when training, like
    ``nn.BatchNorm1d``). ``act``: a module / function, or the native op's activation name ('identity',
    'tanh', 'relu', 'sigmoid', 'gelu', 'gelu_tanh'). Returns [B, N * no], the neurons' outputs concatenated.
    """
    _check_layer(x, bn1_weight, bn1_bias, weight1, bias1, bn2_weight, bn2_bias, weight2, bias2, weight3, bias3,
                 (running_mean1, running_var1, num_batches1, running_mean2, running_var2, num_batches2), training,
                 eps, act)
    if isinstance(act, str):
        act = ACTIVATIONS[act]
    n = weight1.shape[0]
    # The statistics are updated on copies and written back only once the whole layer has run, so an input or
    # activation that raises leaves them as they were.
    stats = [running_mean1, running_var1, num_batches1, running_mean2, running_var2, num_batches2]
    work = [None if t is None or not training else t.clone() for t in stats]
    rm1, rv1, nb1, rm2, rv2, nb2 = [w if training else t for w, t in zip(work, stats)]

    def activate(h: Tensor) -> Tensor:  # on [N * B, C], the [batch, features] layout the per-neuron act sees
        return act(h.reshape(-1, h.shape[-1])).view(h.shape)

    h = x.unsqueeze(0).expand(n, *x.shape) if x.dim() == 2 else x
    h = _batch_norm(h, rm1, rv1, nb1, bn1_weight, bn1_bias, training, momentum, eps)
    h = activate(_linear(h, weight1, bias1))
    h = _batch_norm(h, rm2, rv2, nb2, bn2_weight, bn2_bias, training, momentum, eps)
    h = activate(_linear(h, weight2, bias2))
    y = _linear(h, weight3, bias3)  # [N, B, no]
    if training:
        with torch.no_grad():
            for t, w in zip(stats, work):
                if t is not None:
                    t.copy_(w)
    return y.transpose(0, 1).reshape(y.shape[1], y.shape[0] * y.shape[2])


def _check_bn_update(groups, batch: int) -> None:
    """csrc/dan/dan.h's check_bn_batch and check_bn_update, for (which, running_mean, running_var, num_batches,
    mean, var) per BatchNorm."""
    op = "clfast.dan_bn_update_"
    if batch <= 1:
        raise RuntimeError(f"{op}: expected a batch of more than 1, got {batch}")
    device = groups[0][1].device if isinstance(groups[0][1], Tensor) else None
    for which, rm, rv, nb, mean, var in groups:
        for t in (rm, rv, nb, mean, var):
            if not isinstance(t, Tensor):
                raise RuntimeError(f"{op}: undefined tensor ({which} BatchNorm)")
            if t.device != device:
                raise RuntimeError(f"{op}: tensors on {device} and {t.device}; all tensors must be on one device"
                                   if "meta" in (t.device.type, device.type) else
                                   f"{op}: {which} BatchNorm's statistics are on {t.device} but running_mean1 is on "
                                   f"{device}")
        if rm.dim() != 2 or rv.shape != rm.shape or nb.dim() != 1 or nb.shape[0] != rm.shape[0]:
            raise RuntimeError(f"{op}: {which} running statistics must be [N, C] with counters [N], got "
                               f"{list(rm.shape)}, {list(rv.shape)}, {list(nb.shape)}")
        c = rm.shape[1]
        if mean.numel() != var.numel() or c == 0 or mean.numel() % c or mean.numel() not in (c, rm.numel()):
            raise RuntimeError(f"{op}: {which} batch statistics must hold C or N * C values, got {mean.numel()}")
        if not all(t.is_contiguous() for t in (rm, rv, nb, mean, var)):
            raise RuntimeError(f"{op}: expected contiguous tensors ({which} BatchNorm)")
        if (rm.dtype not in (torch.float32, torch.float64) or not rv.dtype == mean.dtype == var.dtype == rm.dtype
                or nb.dtype != torch.long):
            raise RuntimeError(f"{op}: expected running and batch statistics of one dtype, float32 or float64, and "
                               f"int64 counters ({which} BatchNorm), got {rm.dtype}, {rv.dtype}, {mean.dtype}, "
                               f"{var.dtype}, {nb.dtype}")


@torch.no_grad()
def dan_bn_update_(running_mean1: Tensor, running_var1: Tensor, num_batches1: Tensor, running_mean2: Tensor,
                   running_var2: Tensor, num_batches2: Tensor, mean1: Tensor, var1: Tensor, mean2: Tensor,
                   var2: Tensor, momentum: float, batch: int) -> None:
    """nn.BatchNorm1d's running-statistics update of both BatchNorms of a layer (running [N, C], counters [N];
    batch statistics of C or N * C values, biased variance), both BatchNorms checked before either is written."""
    groups = [("first", running_mean1, running_var1, num_batches1, mean1, var1),
              ("second", running_mean2, running_var2, num_batches2, mean2, var2)]
    _check_bn_update(groups, batch)
    check_memory("dan_bn_update_", *[(n, [t], True) for n, t in (
        ("running_mean1", running_mean1), ("running_var1", running_var1), ("num_batches1", num_batches1),
        ("running_mean2", running_mean2), ("running_var2", running_var2), ("num_batches2", num_batches2))],
        *[(n, [t], False) for n, t in (("mean1", mean1), ("var1", var1), ("mean2", mean2), ("var2", var2))])
    unbias = batch / (batch - 1)
    for _, rm, rv, nb, mean, var in groups:
        c = rm.shape[1]
        rm.mul_(1 - momentum).add_(mean.view(-1, c), alpha=momentum)
        rv.mul_(1 - momentum).add_(var.view(-1, c), alpha=momentum * unbias)
        nb.add_(1)
