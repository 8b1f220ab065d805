"""Synaptic Intelligence (Zenke et al., 2017) on fused multi-tensor ops.

Two APIs over the same ops:

* hypnettorch's four functions -- :func:`si_pre_optim_step`, :func:`si_post_optim_step`,
  :func:`si_compute_importance`, :func:`si_regularizer` -- with the same arguments, error messages and module
  buffer names (``si_omega_weights_{i}``, ``si_prev_theta_weights_{i}``, ``si_running_omega_weights_{i}``,
  ``si_pre_step_theta_weights_{i}``, with ``_{params_name}`` after ``si_omega``/... when a group is named), so
  changing the import is the whole migration and state_dicts load either way;
* the :class:`SI` class, which keeps its state itself and plugs into :mod:`clfast.optim`'s fused steps.

Every parameter tensor ``[*]`` has state of the same shape. Each function performs one op call for all
parameters (one parallel loop on the CPU, one multi-tensor launch on CUDA).
"""
from __future__ import annotations

import weakref
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops


__all__ = ["si_pre_optim_step", "si_post_optim_step", "si_compute_importance", "si_regularizer", "SI"]

def si_buffer_names(param_id: int, params_name: Optional[str] = None) -> Tuple[str, str, str, str]:
    """Buffer names of (Omega, theta_prev, running omega, theta_pre_step) for parameter ``param_id``."""
    group = "" if params_name is None else f"_{params_name}"
    return (f"si_omega{group}_weights_{param_id}", f"si_prev_theta{group}_weights_{param_id}",
            f"si_running_omega{group}_weights_{param_id}", f"si_pre_step_theta{group}_weights_{param_id}")


# Pre-step checkpoints are registered as buffers and set to None after use, like hypnettorch; the storage
# is kept here and reused, so a training step allocates nothing.
_pre_step_storage: "weakref.WeakKeyDictionary[nn.Module, Dict[str, Tensor]]" = weakref.WeakKeyDictionary()


def _tracked(params: Iterable[Tensor]) -> List[tuple]:
    """(index in ``params``, parameter) for every parameter that requires grad: hypnettorch's SI buffer indices."""
    return [(i, p) for i, p in enumerate(params) if p.requires_grad]


def _check_finite(op: str, **lists: Sequence[Tensor]) -> None:
    """One host sync at a task boundary, so a diverged run fails loudly instead of storing NaN importances."""
    flags = [torch.isfinite(t).all() for ts in lists.values() for t in ts]
    if flags and not bool(torch.stack(flags).all()):
        for name, ts in lists.items():
            for k, t in enumerate(ts):
                if not bool(torch.isfinite(t).all()):
                    raise ValueError(f"{op}: {name}[{k}] contains NaN or Inf; importances were not updated")


def _check_epsilon(epsilon: float) -> float:
    if not (float(epsilon) > 0 and float(epsilon) != float("inf")):
        raise ValueError(f"epsilon must be a positive finite damping constant, got {epsilon!r}")
    return float(epsilon)


def si_pre_optim_step(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                      no_pre_step_ckpt: bool = False) -> None:
    """Checkpoint ``theta_pre_step`` before the optimizer step (and, on the first call, ``theta_prev``).

    Args:
        net: module that stores SI's state as buffers.
        params: parameter tensors ``[*]``; those with ``requires_grad`` are tracked, indexed by position.
        params_name: name of the parameter group, for several SI groups on one module.
        no_pre_step_ckpt: skip the pre-step checkpoint; :func:`si_post_optim_step` then needs ``delta_params``.
    """
    tracked = _tracked(params)
    for i, p in tracked:
        _, prev_name, _, _ = si_buffer_names(i, params_name)
        if not hasattr(net, prev_name):  # the start of the first task, needed to normalise importances
            net.register_buffer(prev_name, p.detach().clone())
    if no_pre_step_ckpt or not tracked:
        return
    storage = _pre_step_storage.setdefault(net, {})
    dst = []
    for i, p in tracked:
        name = si_buffer_names(i, params_name)[3]
        buf = storage.get(name)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = storage[name] = torch.empty_like(p, memory_format=torch.preserve_format).detach()
        net.register_buffer(name, buf)
        dst.append(buf)
    torch._foreach_copy_(dst, [p.detach() for _, p in tracked])


def si_post_optim_step(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                       delta_params: Optional[Sequence[Tensor]] = None) -> None:
    """Accumulate ``omega += (theta - theta_pre_step) * (-grad)`` after the optimizer step, for all parameters
    in one fused op.

    Args:
        delta_params: the update ``theta_new - theta_old`` per parameter (indexed like ``params``), instead of
            the pre-step checkpoint; then no optimizer step is needed, only gradients.
    """
    tracked = _tracked(params)
    omegas, refs, grads, fresh = [], [], [], []
    for i, p in tracked:  # validate everything before touching any state
        _, _, running_name, pre_name = si_buffer_names(i, params_name)
        if p.grad is None:
            raise ValueError('Function "si_post_optim_step" expects that gradients wrt the loss have been '
                             'computed.')
        if delta_params is None:
            pre = getattr(net, pre_name, None)
            if pre is None:
                raise ValueError('Function "si_post_optim_step" requires that function "si_pre_optim_step" '
                                 'has been called or "delta_params" was set.')
            refs.append(pre)
        else:
            refs.append(delta_params[i].detach())
        omega = getattr(net, running_name, None)
        if omega is None:
            omega = torch.zeros_like(p).detach()
            fresh.append((running_name, omega))
        omegas.append(omega)
        grads.append(p.grad)
    ops.si_accumulate_(omegas, [p.detach() for _, p in tracked], refs, grads, delta_params is not None)
    for name, omega in fresh:
        net.register_buffer(name, omega)
    if delta_params is None:
        for i, _ in tracked:  # a second post-step without a pre-step is an error, as in hypnettorch
            setattr(net, si_buffer_names(i, params_name)[3], None)


def si_compute_importance(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None,
                          epsilon: float = 1e-3) -> None:
    """After a task: ``Omega += clamp(omega / ((theta - theta_prev)^2 + epsilon), min=0)``, then
    ``theta_prev = theta`` and the running ``omega`` is reset (to None, as in hypnettorch).

    Raises ``ValueError`` without changing anything if the running estimate or a parameter is not finite.
    """
    epsilon = _check_epsilon(epsilon)
    tracked = _tracked(params)
    importance, prev, running, fresh = [], [], [], []
    for i, p in tracked:
        omega_name, prev_name, running_name, _ = si_buffer_names(i, params_name)
        if not hasattr(net, prev_name):
            raise ValueError('SI importance weights can only be computed if function "si_pre_optim_step" has '
                             'been called at the beginning of training the first task.')
        if not hasattr(net, running_name) or getattr(net, running_name) is None:
            raise ValueError('SI importance weights can only be computed if function "si_post_optim_step" has '
                             'been correctly used during training.')
        omega = getattr(net, omega_name, None)
        if omega is None:
            omega = torch.zeros_like(p).detach()
            fresh.append((omega_name, omega))
        importance.append(omega)
        prev.append(getattr(net, prev_name))
        running.append(getattr(net, running_name))
    detached = [p.detach() for _, p in tracked]
    _check_finite("si_compute_importance", running_omega=running, params=detached)
    ops.si_consolidate_(importance, prev, running, detached, epsilon)
    for name, omega in fresh:
        net.register_buffer(name, omega)
    for i, _ in tracked:
        setattr(net, si_buffer_names(i, params_name)[2], None)


def si_regularizer(net: nn.Module, params: Sequence[Tensor], params_name: Optional[str] = None):
    """``sum_i sum(Omega_i * (theta_i - theta_prev_i)^2)``: a 0-dim tensor differentiable in ``params``
    (``0.0`` when no parameter requires grad). Multiply by the strength yourself, as with hypnettorch."""
    tracked = _tracked(params)
    importance, prev = [], []
    for i, _ in tracked:
        omega_name, prev_name, _, _ = si_buffer_names(i, params_name)
        if not hasattr(net, omega_name) or not hasattr(net, prev_name):
            raise ValueError('Function "si_regularizer" can only be used after function '
                             '"si_compute_importance" has been called at least once.')
        importance.append(getattr(net, omega_name))
        prev.append(getattr(net, prev_name))
    if not tracked:
        return 0.0
    return ops.si_penalty(importance, prev, [p for _, p in tracked])


class SI:
    """Synaptic Intelligence with its state held here, for everyday training loops.

    ``theta_prev`` is checkpointed when the object is created (hypnettorch does it on the first
    ``si_pre_optim_step``), importances start at zero, so :meth:`penalty` is 0 during the first task.

    Example::

        si = clfast.SI(model, strength=1.0)
        for task in tasks:
            for x, y in task:
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y) + si.penalty()
                loss.backward()
                si.before_step(); opt.step(); si.after_step()
            si.consolidate()

    or, with no pre-step copy at all, ``opt = clfast.optim.SGD(model.parameters(), lr, si=si)`` and only
    ``opt.step()`` and ``si.consolidate()``.

    Args:
        model_or_params: a module (its ``parameters()``) or an iterable of parameters; those with
            ``requires_grad`` are tracked, keeping their position as the buffer index like hypnettorch.
        strength: factor applied by :meth:`penalty` and :meth:`add_penalty_grad`.
        epsilon: damping of the importance normalisation.
        params_name: parameter-group name used in :meth:`state_dict` keys, as in the functional API.
    """

    def __init__(self, model_or_params: Union[nn.Module, Iterable[Tensor]], strength: float = 1.0,
                 epsilon: float = 1e-3, params_name: Optional[str] = None) -> None:
        if isinstance(model_or_params, Tensor):
            raise TypeError("SI expects a module or an iterable of parameters, got a single tensor; wrap it "
                            "in a list")
        all_params = list(model_or_params.parameters() if isinstance(model_or_params, nn.Module)
                          else model_or_params)
        tracked = _tracked(all_params)
        if not tracked:
            raise ValueError("SI: none of the given parameters requires grad")
        self.strength = float(strength)
        self.epsilon = _check_epsilon(epsilon)
        self.params_name = params_name
        self._index = [i for i, _ in tracked]
        self.params: List[Tensor] = [p for _, p in tracked]
        self._position = {id(p): k for k, p in enumerate(self.params)}
        groups: Dict[tuple, List[int]] = {}  # one op call per dtype and device, as clfast.optim does
        for k, p in enumerate(self.params):
            groups.setdefault((p.dtype, p.device), []).append(k)
        self._groups = list(groups.values())
        with torch.no_grad():
            self.prev = [p.detach().clone() for p in self.params]
            self.importance = [torch.zeros_like(p) for p in self.params]
            self.omega = [torch.zeros_like(p) for p in self.params]
        self._pre: Optional[List[Tensor]] = None
        self._pre_valid = False
        # What hypnettorch would hold: importances exist after the first consolidation, and the running estimate
        # between an accumulation and the next consolidation (None, so absent from a state_dict, otherwise).
        self._has_importance = False
        self._omega_live = False

    # -- training step -----------------------------------------------------------------------------------
    def before_step(self) -> None:
        """Checkpoint the parameters before ``optimizer.step()`` (one multi-tensor copy, no allocation)."""
        if self._pre is None:
            self._pre = [torch.empty_like(p).detach() for p in self.params]
        torch._foreach_copy_(self._pre, [p.detach() for p in self.params])
        self._pre_valid = True

    def after_step(self, delta_params: Optional[Sequence[Tensor]] = None) -> None:
        """``omega += (theta - theta_pre_step) * (-grad)`` after ``optimizer.step()``; with ``delta_params``
        (one per tracked parameter) no :meth:`before_step` is needed."""
        grads = self._grads("after_step")
        if delta_params is None:
            if not self._pre_valid:
                raise ValueError("SI.after_step: call before_step() before the optimizer step, or pass "
                                 "delta_params")
            ref = self._pre
        else:
            ref = [d.detach() for d in delta_params]
            if len(ref) != len(self.params):
                raise ValueError(f"SI.after_step: expected {len(self.params)} delta_params (one per tracked "
                                 f"parameter), got {len(ref)}")
        for omega, params, r, g in self._split(self.omega, self._detached(), ref, grads):
            ops.si_accumulate_(omega, params, r, g, delta_params is not None)
        self._pre_valid = False
        self._omega_live = True

    def consolidate(self) -> None:
        """End of a task: fold the running estimate into the importances and checkpoint ``theta_prev``."""
        detached = self._detached()
        _check_finite("SI.consolidate", omega=self.omega, params=detached)
        for importance, prev, omega, params in self._split(self.importance, self.prev, self.omega, detached):
            ops.si_consolidate_(importance, prev, omega, params, self.epsilon)
        self._has_importance, self._omega_live = True, False

    # -- regulariser ---------------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """``strength * sum(Omega * (theta - theta_prev)^2)``, a 0-dim tensor differentiable in the params."""
        parts = [ops.si_penalty(*lists) for lists in self._split(self.importance, self.prev, self.params)]
        return self.strength * (parts[0] if len(parts) == 1 else sum(parts[1:], parts[0]))

    def add_penalty_grad(self) -> None:
        """Add the penalty's gradient ``strength * 2 * Omega * (theta - theta_prev)`` straight into ``.grad``
        (no autograd graph); call it after ``loss.backward()``."""
        for lists in self._split(self._grads("add_penalty_grad"), self.importance, self.prev, self._detached()):
            ops.si_penalty_grad_(*lists, self.strength)

    # -- state -----------------------------------------------------------------------------------------------
    def _names(self, k: int):
        return si_buffer_names(self._index[k], self.params_name)

    def state_dict(self) -> Dict[str, Tensor]:
        """SI's state under hypnettorch's buffer names, holding the keys a module trained with hypnettorch's
        functions holds at the same point: ``si_prev_theta_*`` always, ``si_omega_*`` after the first
        :meth:`consolidate`, ``si_running_omega_*`` between an optimizer step and the next :meth:`consolidate`.
        It loads with ``strict=True`` into such a module, and back."""
        out = {}
        for k in range(len(self.params)):
            omega_name, prev_name, running_name, _ = self._names(k)
            if self._has_importance:
                out[omega_name] = self.importance[k]
            out[prev_name] = self.prev[k]
            if self._omega_live:
                out[running_name] = self.omega[k]
        return out

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load :meth:`state_dict` output or a module's state_dict holding SI buffers (other keys are ignored).
        ``si_prev_theta_*`` is required; a missing importance or running estimate means zero (as hypnettorch's
        None). Everything is checked before anything is copied."""
        plan, present = [], {0: [], 2: []}
        for k, p in enumerate(self.params):
            names = self._names(k)
            for slot, (name, dst) in enumerate(zip(names[:3], (self.importance[k], self.prev[k], self.omega[k]))):
                src = state_dict.get(name)
                if src is None:
                    if slot == 1:
                        raise KeyError(f"SI.load_state_dict: missing '{name}'")
                    plan.append((dst, None))
                    present[slot].append(False)
                    continue
                if not isinstance(src, Tensor) or src.shape != p.shape:
                    raise ValueError(f"SI.load_state_dict: '{name}' must be a tensor of shape {list(p.shape)}, "
                                     f"got {getattr(src, 'shape', type(src).__name__)}")
                plan.append((dst, src))
                if slot != 1:
                    present[slot].append(True)
        with torch.no_grad():
            for dst, src in plan:
                dst.zero_() if src is None else dst.copy_(src)
        self._has_importance, self._omega_live = any(present[0]), any(present[2])

    # -- helpers ---------------------------------------------------------------------------------------------
    def _split(self, *lists: List[Tensor]):
        """The parallel lists cut into the parameters' (dtype, device) groups."""
        if len(self._groups) == 1:
            return [lists]
        return [tuple([lst[k] for k in group] for lst in lists) for group in self._groups]

    def _detached(self) -> List[Tensor]:
        return [p.detach() for p in self.params]

    def _grads(self, op: str) -> List[Tensor]:
        grads = [p.grad for p in self.params]
        if any(g is None for g in grads):
            raise ValueError(f"SI.{op}: every tracked parameter needs a .grad; compute the loss's gradients "
                             "first")
        return grads
