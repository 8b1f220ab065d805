"""SGD and Adam whose step also performs SI's accumulation, in one fused pass over memory.

``torch.optim.SGD`` + ``SI.before_step()`` / ``after_step()`` reads and writes the parameters several times
and keeps a pre-step copy; these optimizers compute the update and ``omega += (new - old) * (-grad)`` per
element in one kernel. Parameter values equal torch's optimizers' within float rounding, and after
``si.consolidate()`` the importances equal what hypnettorch's pre/post functions give around torch's step.

State dicts use torch's keys (``momentum_buffer``; ``step``, ``exp_avg``, ``exp_avg_sq``), so state moves
between these and ``torch.optim`` either way.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import ops
from .si import SI

__all__ = ["SGD", "Adam"]


def _check_si(si: Optional[SI]) -> Optional[SI]:
    if si is not None and not isinstance(si, SI):
        raise TypeError(f"si must be a clfast.SI or None, got {type(si).__name__}")
    return si


class _SIOptimizer(Optimizer):
    """Groups each step's parameters into lists for one op call per (SI-tracked, dtype, device, extra key) bucket,
    and checks every parameter of every group before the first bucket is stepped, so a bad gradient raises with
    nothing changed."""

    si: Optional[SI]

    def _buckets(self, group: dict, key: Callable[[dict], object]) -> Dict[tuple, Tuple[list, list, list, list]]:
        """(tracked by SI, dtype, device, key(state)) -> (params, grads, omegas, states) for the params of
        ``group`` with grads. One pass, one state lookup per parameter: this runs every step."""
        buckets: Dict[tuple, Tuple[list, list, list, list]] = {}
        si = self.si
        position = si._position if si is not None else {}
        all_states = self.state
        for p in group["params"]:
            grad = p.grad
            if grad is None:
                continue
            if grad.is_sparse:
                raise RuntimeError("clfast.optim does not support sparse gradients")
            if p.dtype not in (torch.float32, torch.float64):
                raise TypeError(f"clfast.optim steps float32 and float64 parameters; one of shape {list(p.shape)} "
                                f"is {p.dtype} (keep it in a torch.optim optimizer of its own)")
            if p.is_inference():
                raise RuntimeError(f"clfast.optim: a parameter of shape {list(p.shape)} is an inference tensor and "
                                   "cannot be updated outside InferenceMode")
            if grad.shape != p.shape or grad.dtype != p.dtype or grad.device != p.device:
                raise RuntimeError(f"clfast.optim: a parameter of shape {list(p.shape)} ({p.dtype}, {p.device}) has a "
                                   f".grad of shape {list(grad.shape)} ({grad.dtype}, {grad.device}); they must "
                                   "match")
            state = all_states.get(p)
            if state is None:  # entered into self.state by _commit, once the step went through
                state = {}
            k = position.get(id(p))
            if k is not None:
                omega = si.omega[k]
                if omega.shape != p.shape or omega.dtype != p.dtype or omega.device != p.device:
                    raise RuntimeError(f"clfast.optim: the SI state of a parameter of shape {list(p.shape)} is "
                                       f"{omega.dtype} on {omega.device} but the parameter is now {p.dtype} on "
                                       f"{p.device}; create the SI object after moving or converting the model")
            bucket_key = (k is not None, p.dtype, p.device, key(state))
            bucket = buckets.get(bucket_key)
            if bucket is None:
                bucket = buckets[bucket_key] = ([], [], [], [])
            bucket[0].append(p)
            bucket[1].append(grad)
            if k is not None:
                bucket[2].append(si.omega[k])
            bucket[3].append(state)
        return buckets

    def _all_buckets(self, key_of: Callable[[dict], Callable[[dict], object]]):
        """Every group's buckets, all checked before any is stepped."""
        return [(group, self._buckets(group, key_of(group))) for group in self.param_groups]

    def _commit(self, params: list, states: list, omegas: list) -> None:
        for p, state in zip(params, states):
            if p not in self.state:
                self.state[p] = state
        if omegas and self.si is not None:
            self.si._omega_live = True


class SGD(_SIOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) fused with SI's accumulation.

    Args:
        params: parameters or parameter groups, as for torch's optimizers.
        si: a :class:`clfast.SI` whose parameters this optimizer updates; its running estimate ``omega`` is
            accumulated in the same pass as the update (no ``before_step``/``after_step`` needed).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, si: Optional[SI] = None) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov)
        super().__init__(params, defaults)
        self.si = _check_si(si)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        key_of = lambda group: (lambda state, m=group["momentum"] != 0:  # noqa: E731
                                m and state.get("momentum_buffer") is None)
        for group, buckets in self._all_buckets(key_of):
            use_momentum = group["momentum"] != 0
            for (_, _, _, init), (params, grads, omegas, states) in buckets.items():
                # New momentum buffers enter the state only once the step went through.
                bufs: List[Tensor] = []
                if use_momentum:
                    bufs = [torch.empty_like(p, memory_format=torch.preserve_format) if init
                            else state["momentum_buffer"] for p, state in zip(params, states)]
                ops.sgd_si_step_(params, grads, bufs, omegas, lr=group["lr"], momentum=group["momentum"],
                                  dampening=group["dampening"], weight_decay=group["weight_decay"],
                                  nesterov=group["nesterov"], init_buffers=bool(init))
                if use_momentum and init:
                    for state, buf in zip(states, bufs):
                        state["momentum_buffer"] = buf
                self._commit(params, states, omegas)
        return loss


def _adam_step_of(state: dict) -> int:
    step = state.get("step", 0)
    # A CPU tensor when the state came from torch.optim.Adam: float() is no device sync.
    return step if type(step) is int else int(float(step))


class Adam(_SIOptimizer):
    """``torch.optim.Adam`` (L2 weight decay, no amsgrad) fused with SI's accumulation; see :class:`SGD`."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, *, si: Optional[SI] = None) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if eps < 0.0:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.si = _check_si(si)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buckets in self._all_buckets(lambda group: _adam_step_of):
            beta1, beta2 = group["betas"]
            for (_, _, _, step), (params, grads, omegas, states) in buckets.items():
                step += 1
                # Moments and the step count enter the state only once the step went through.
                fresh = [not state for state in states]
                exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) if new else state["exp_avg"]
                           for p, state, new in zip(params, states, fresh)]
                exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) if new
                              else state["exp_avg_sq"] for p, state, new in zip(params, states, fresh)]
                ops.adam_si_step_(params, grads, exp_avg, exp_avg_sq, omegas, lr=group["lr"], beta1=beta1,
                                   beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                                   bias_correction1=1 - beta1 ** step, bias_correction2=1 - beta2 ** step)
                for state, m, v, new in zip(states, exp_avg, exp_avg_sq, fresh):
                    if new:
                        state["exp_avg"], state["exp_avg_sq"] = m, v
                    state["step"] = step
                self._commit(params, states, omegas)
        return loss
