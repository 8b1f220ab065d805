"""The one place where clfast chooses between the native extension and the pure-torch references.

Modules call the functions below; each forwards to ``torch.ops.clfast.<op>`` (the dispatcher then picks the
CPU or CUDA kernel) or, on the reference backend, to the function of the same name in ``clfast.reference``.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import reference

BACKENDS = ("native", "reference")

try:
    from . import _C  # noqa: F401  (loading it registers torch.ops.clfast.*)

    _native_error: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _native_error = f"{type(exc).__name__}: {exc}"


def native_available() -> bool:
    """True when the compiled extension ``clfast._C`` is loaded."""
    return _native_error is None


def _initial_backend() -> str:
    requested = os.environ.get("CLFAST_BACKEND", "").strip().lower()
    if requested and requested not in BACKENDS:
        raise ValueError(f"CLFAST_BACKEND must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    if native_available():
        return "native"
    warnings.warn(
        f"clfast: the native extension could not be loaded ({_native_error}); running on the pure-torch "
        "reference ops, which give the same numbers more slowly. Build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    return "reference"


_backend = _initial_backend()


def backend() -> str:
    """The backend ops run on: ``"native"`` (compiled C++/CUDA kernels) or ``"reference"`` (pure torch)."""
    return _backend


def set_backend(name: str) -> None:
    """Switch every clfast op to ``"native"`` or ``"reference"``. Raises if native is asked for but not built."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError(f"clfast: the native extension is not available ({_native_error})")
    _backend = name


def _op(name: str) -> Callable:
    if _backend == "native":
        return getattr(torch.ops.clfast, name)
    return getattr(reference, name)


# ---- SI ----------------------------------------------------------------------------------------------------


def si_accumulate_(
    omega: Sequence[Tensor], params: Sequence[Tensor], ref: Sequence[Tensor], grads: Sequence[Tensor],
    ref_is_delta: bool = False,
) -> None:
    """``omega_i += (params_i - ref_i) * (-grads_i)``, or ``omega_i += ref_i * (-grads_i)`` if ``ref_is_delta``."""
    if len(params):
        _op("si_accumulate_")(list(omega), list(params), list(ref), list(grads), ref_is_delta)


def si_consolidate_(
    importance: Sequence[Tensor], prev: Sequence[Tensor], omega: Sequence[Tensor], params: Sequence[Tensor],
    epsilon: float,
) -> None:
    """``importance_i += clamp(omega_i / ((params_i - prev_i)^2 + epsilon), min=0)``; ``prev_i = params_i``;
    ``omega_i = 0``."""
    if len(params):
        _op("si_consolidate_")(list(importance), list(prev), list(omega), list(params), float(epsilon))


def si_penalty(importance: Sequence[Tensor], prev: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """``sum_i sum(importance_i * (params_i - prev_i)^2)`` as a 0-dim tensor, differentiable in ``params``."""
    if not len(params):
        return torch.zeros(())
    return _op("si_penalty")(list(importance), list(prev), list(params))


def si_penalty_grad_(
    grads: Sequence[Tensor], importance: Sequence[Tensor], prev: Sequence[Tensor], params: Sequence[Tensor],
    scale: float,
) -> None:
    """``grads_i += scale * 2 * importance_i * (params_i - prev_i)`` with no autograd graph."""
    if len(params):
        _op("si_penalty_grad_")(list(grads), list(importance), list(prev), list(params), float(scale))


# ---- fused optimizer steps -----------------------------------------------------------------------------------


def sgd_si_step_(
    params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], omega: List[Tensor], *,
    lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool, init_buffers: bool,
) -> None:
    """torch.optim.SGD's update of ``params`` (and ``momentum_buffers``); ``omega += (new - old) * (-grads)``
    when ``omega`` is non-empty."""
    if params:
        _op("sgd_si_step_")(params, grads, momentum_buffers, omega, float(lr), float(momentum), float(dampening),
                            float(weight_decay), bool(nesterov), bool(init_buffers))


def adam_si_step_(
    params: List[Tensor], grads: List[Tensor], exp_avg: List[Tensor], exp_avg_sq: List[Tensor],
    omega: List[Tensor], *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    bias_correction1: float, bias_correction2: float,
) -> None:
    """torch.optim.Adam's update of ``params`` and its moments; ``omega`` as in :func:`sgd_si_step_`."""
    if params:
        _op("adam_si_step_")(params, grads, exp_avg, exp_avg_sq, omega, float(lr), float(beta1), float(beta2),
                             float(eps), float(weight_decay), float(bias_correction1), float(bias_correction2))


# ---- CBP -----------------------------------------------------------------------------------------------------


def cbp_update_(utility: List[Tensor], mean: List[Tensor], age: List[Tensor], features: List[Tensor],
                w_next: List[Tensor], w_cur: List[Tensor], decay: float, utility_type: str) -> None:
    """Per layer and unit: age, running activation mean and utility EMA (see csrc/ops.cpp); ``utility_type`` is
    ``"contribution"``, ``"zero_contribution"`` or ``"adaptable_contribution"``."""
    if utility:
        _op("cbp_update_")(utility, mean, age, features, w_next, w_cur, float(decay), str(utility_type))


def cbp_replace_(w_cur: Tensor, b_cur: Optional[Tensor], w_next: Tensor, b_next: Optional[Tensor],
                 utility: Tensor, mean: Tensor, age: Tensor, new_weights: Tensor, decay: float,
                 maturity_threshold: int) -> Tensor:
    """Selects and replaces ``new_weights.shape[0]`` units of one layer; returns their indices (csrc/ops.cpp)."""
    return _op("cbp_replace_")(w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights, float(decay),
                               int(maturity_threshold))


# ---- EWC -----------------------------------------------------------------------------------------------------


def kron_quadratic(a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> Tensor:
    """``sum_i <g_i v_i a_i, v_i>`` for symmetric factors, differentiable in ``v``."""
    return _op("kron_quadratic")(list(a), list(g), list(v))[0]


def kron_mv(scale: Tensor, a: Sequence[Tensor], g: Sequence[Tensor], v: Sequence[Tensor]) -> List[Tensor]:
    """``scale * g_i v_i a_i`` per block (``scale`` a 0-dim tensor)."""
    return _op("kron_mv")(scale, list(a), list(g), list(v))


# ---- reservoir buffer ------------------------------------------------------------------------------------------


def reservoir_add_(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Algorithm R for a whole batch into preallocated storage (see csrc/ops.cpp)."""
    _op("reservoir_add_")(storage, batch, draws, int(num_seen))


# ---- DAN ------------------------------------------------------------------------------------------------------

def dan_layer(x: Tensor, params: Sequence[Optional[Tensor]], stats: Sequence[Tensor], training: bool,
              momentum: float, eps: float, act: int) -> Tensor:
    """One DAN layer of N neurons (see ``clfast.reference.dan.dan_layer`` for shapes): ``params`` = (bn1_weight,
    bn1_bias, weight1, bias1, bn2_weight, bn2_bias, weight2, bias2, weight3, bias3), ``stats`` = (running_mean1,
    running_var1, num_batches1, running_mean2, running_var2, num_batches2), updated in place when training."""
    return _op("dan_layer")(x, *params, *stats, bool(training), float(momentum), float(eps), int(act))


# ---- fake (meta) kernels and autograd for the native ops --------------------------------------------------------


def _one_device(op: str, *args) -> None:
    """A fake kernel runs for meta tensors and under FakeTensorMode. A real tensor among meta ones would send a
    call there too and do nothing: every tensor argument must be on one device, as the native fronts check."""
    first = None
    for arg in args:
        for t in (arg if isinstance(arg, (list, tuple)) else [arg]):
            if isinstance(t, Tensor):
                if first is None:
                    first = t
                elif t.device != first.device:
                    raise RuntimeError(f"clfast.{op}: tensors on {first.device} and {t.device}; all tensors must be "
                                       "on one device")


if native_available():

    @torch.library.register_fake("clfast::si_accumulate_")
    def _(omega, params, ref, grads, ref_is_delta):
        _one_device("si_accumulate_", omega, params, ref, grads)

    @torch.library.register_fake("clfast::si_consolidate_")
    def _(importance, prev, omega, params, epsilon):
        _one_device("si_consolidate_", importance, prev, omega, params)

    @torch.library.register_fake("clfast::si_penalty")
    def _(importance, prev, params):
        _one_device("si_penalty", importance, prev, params)
        return params[0].new_empty(())

    @torch.library.register_fake("clfast::si_penalty_backward")
    def _(grad_out, importance, prev, params):
        _one_device("si_penalty_backward", grad_out, importance, prev, params)
        return [torch.empty_like(p, memory_format=torch.contiguous_format) for p in params]

    @torch.library.register_fake("clfast::si_penalty_grad_")
    def _(grads, importance, prev, params, scale):
        _one_device("si_penalty_grad_", grads, importance, prev, params)

    @torch.library.register_fake("clfast::sgd_si_step_")
    def _(params, grads, momentum_buffers, omega, lr, momentum, dampening, weight_decay, nesterov, init_buffers):
        _one_device("sgd_si_step_", params, grads, momentum_buffers, omega)

    @torch.library.register_fake("clfast::adam_si_step_")
    def _(params, grads, exp_avg, exp_avg_sq, omega, lr, beta1, beta2, eps, weight_decay, bc1, bc2):
        _one_device("adam_si_step_", params, grads, exp_avg, exp_avg_sq, omega)

    @torch.library.register_fake("clfast::cbp_update_")
    def _(utility, mean, age, features, w_next, w_cur, decay, utility_type):
        _one_device("cbp_update_", utility, mean, age, features, w_next, w_cur)

    @torch.library.register_fake("clfast::cbp_replace_")
    def _(w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights, decay, maturity_threshold):
        _one_device("cbp_replace_", w_cur, b_cur, w_next, b_next, utility, mean, age, new_weights)
        return utility.new_empty((new_weights.shape[0],), dtype=torch.long)

    @torch.library.register_fake("clfast::reservoir_add_")
    def _(storage, batch, draws, num_seen):
        _one_device("reservoir_add_", storage, batch, draws)

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
        needs_imp, needs_prev, needs_params = ctx.needs_input_grad
        grad_params = grad_prev = grad_imp = None
        if needs_params or needs_prev:
            d = torch.ops.clfast.si_penalty_backward(grad, list(importance), list(prev), list(params))
            grad_params = d if needs_params else None
            grad_prev = [-t for t in d] if needs_prev else None
        if needs_imp:
            grad_imp = [grad * (p - pv) ** 2 for p, pv in zip(params, prev)]
        return grad_imp, grad_prev, grad_params

    torch.library.register_autograd("clfast::si_penalty", _si_penalty_backward, setup_context=_si_penalty_setup)

    @torch.library.register_fake("clfast::kron_quadratic")
    def _(a, g, v):
        _one_device("kron_quadratic", a, g, v)
        return v[0].new_empty(()), [torch.empty_like(x, memory_format=torch.contiguous_format) for x in v]

    @torch.library.register_fake("clfast::kron_mv")
    def _(scale, a, g, v):
        _one_device("kron_mv", scale, a, g, v)
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

    @torch.library.register_fake("clfast::dan_layer_forward")
    def _(x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3, rm1, rv1, rm2, rv2, eps, act):
        _one_device("dan_layer", x, g1, b1, w1, c1, g2, b2, w2, c2, w3, c3, rm1, rv1, rm2, rv2)
        (n, nf, ni), no, batch, training = w1.shape, w3.shape[1], x.shape[-2], rm1 is None
        stats = lambda c: x.new_empty((c,) if training else (0,))  # noqa: E731
        g = n if x.dim() == 3 else 1
        z1 = x.new_empty((n, batch, nf) if x.dim() == 3 else (batch, n * nf))
        z2 = x.new_empty((n, batch, nf) if act in (4, 5) else (0,))  # kept for GELU's backward only
        saved = [x.new_empty(x.shape if training else (0,)), z1, x.new_empty((n, batch, nf)), z2,
                 x.new_empty((n, batch, nf)), x.new_empty((n, nf, ni)),
                 x.new_empty((n, nf, nf)), stats(g * ni), stats(g * ni), stats(n * nf), stats(n * nf)]
        return x.new_empty((batch, n * no)), saved

    @torch.library.register_fake("clfast::dan_layer_backward")
    def _(grad_out, x, g1, b1, w1, g2, b2, w2, w3, rm1, rv1, rm2, rv2, saved, eps, act, input_grad):
        _one_device("dan_layer_backward", grad_out, x, g1, b1, w1, g2, b2, w2, w3, rm1, rv1, rm2, rv2, saved)
        n, nf = w1.shape[:2]
        return [x.new_empty(x.shape if input_grad else (0,)), torch.empty_like(g1), torch.empty_like(b1),
                torch.empty_like(w1), x.new_empty((n, nf)), torch.empty_like(g2), torch.empty_like(b2),
                torch.empty_like(w2), x.new_empty((n, nf)), torch.empty_like(w3), x.new_empty((n, w3.shape[1]))]

    @torch.library.register_fake("clfast::dan_bn_update_")
    def _(rm1, rv1, nb1, rm2, rv2, nb2, mean1, var1, mean2, var2, momentum, batch):
        _one_device("dan_bn_update_", rm1, rv1, nb1, rm2, rv2, nb2, mean1, var1, mean2, var2)

    # dan_layer_forward's autograd is registered in C++ (csrc/dan/dan.cpp).
