"""The Fisher information of a classifier as an nngeometry object, computed without a loop over output classes.

:func:`fisher` returns the matrix nngeometry 0.4's ``FIM(model, loader, PMat..., variant="classif_logits")``
returns (its whitening made robust as in :func:`clfast._nngeometry.fim`), but where nngeometry runs one backward
per whitened output and batch, this runs one batched backward per batch (``is_grads_batched``) that gives the
gradients of all whitened outputs with respect to every layer output at once, and builds the diagonal, the KFAC
factors or the per-example gradients of each layer from those with a few GEMMs: a Linear layer's diagonal in the
fused ``fisher_diag_`` op, every factor and dense or block-diagonal block in ``fisher_factor_`` (exactly
symmetric, about 5/8 of a full product's work) but a convolution's ``G``, one small product per row.
A ``clfast.nn`` DAN layer, which nngeometry cannot hook, is recomputed in batched torch ops during the forward
(:func:`dan_parts`) and its neurons' BatchNorms and Linears are layers like any other.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from ._nngeometry import DANBlock, Layers, empirical_fisher, generator, pmat_classes, representation_name

__all__ = ["fisher", "FISHER_BACKENDS", "Unsupported"]

REPRESENTATIONS = ("diag", "kfac", "dense", "blockdiag")
VARIANTS = ("classif_logits", "empirical")
_CHUNK_BYTES = 256 * 2 ** 20  # default bound of a [examples, outputs, parameters] buffer of per-example gradients
# bound of a group of whitened outputs' layer-output gradients: the backward's own intermediates add a few times that
_GROUP_BYTES = 64 * 2 ** 20
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def fisher(model: nn.Module, loader: Iterable, representation: Union[str, type] = "diag",
           variant: str = "classif_logits", layer_collection=None,
           device: Optional[Union[str, torch.device]] = None, chunk_size: Optional[int] = None):
    """The Fisher information matrix of ``model`` on ``loader`` (batches ``(x, ...)``), model in eval mode.

    ``variant="classif_logits"``: ``F = 1/n sum_i J_i^T J_i`` with ``J_i`` the Jacobian with respect to the
    parameters of example ``i``'s logits whitened by a factor of ``diag(p_i) - p_i p_i^T`` (nngeometry's ``FIM``),
    i.e. ``E_{y ~ p(y|x_i)}[g g^T]`` in closed form. ``variant="empirical"``: the mean over the minibatches of the
    squared (``"diag"``) or outer-product (``"dense"``) gradient of the mean cross-entropy, as :class:`clfast.EWC`
    computes it.

    Args:
        representation: ``"diag"``, ``"kfac"``, ``"dense"``, ``"blockdiag"`` or the nngeometry class.
        layer_collection: nngeometry ``LayerCollection`` of the Linear, Conv2d and BatchNorm1d/2d layers to cover
            (default: the whole model, which must have no other parameters). A ``clfast.nn.DANLayer`` is covered
            in per-neuron blocks named as in its per-neuron layout (``{layer}.neurons.{i}.core.{index}``;
            :class:`clfast._nngeometry.DANBlock`), so the result is nngeometry's ``FIM`` of
            ``layer.to_reference()``; with KFAC its BatchNorms' weights and biases are diagonal blocks.
        device: where the batches go (default: the model's device).
        chunk_size: examples whose per-example gradients are formed at once (dense, blockdiag, and the diagonal of
            Conv2d / BatchNorm layers); default: as many as fit in about 256 MB.

    The sum over the loader is divided by the number of examples seen (nngeometry divides by
    ``len(loader.sampler)``, which differs with ``drop_last``). BatchNorm uses the module's ``eps`` (nngeometry
    1e-5). Memory: the batched backward takes the ``classes - 1`` whitened outputs in groups whose output
    gradients (of every layer) fit in about 64 MB, at least one output at a time.

    Returns:
        nngeometry's ``PMatDiag``, ``PMatKFAC``, ``PMatDense`` or ``PMatBlockDiag``, laid out as nngeometry's.
        The parameters' ``.grad`` and the modules' train/eval modes are left as they were.
    """
    rep = representation_name(representation)
    if rep not in REPRESENTATIONS:
        raise ValueError(f"clfast.fisher computes representations {REPRESENTATIONS}, not {rep!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if variant == "empirical" and rep not in ("diag", "dense"):
        raise ValueError(f"variant='empirical' squares minibatch gradients: use 'diag' or 'dense', not {rep!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    layers = Layers(model, layer_collection, "clfast.fisher", kronecker=rep == "kfac")
    reason = unsupported(layers, rep, variant)
    if reason is not None:
        raise Unsupported(reason)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with eval_mode(model):
        if variant == "empirical":
            return empirical_fisher(layers, loader, rep, F.cross_entropy, device)
        data = _Collector(layers, rep, chunk_size).run(loader, device)
    return pmat_classes()[rep](generator=generator(layers), data=data)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (nngeometry's BatchNorm Jacobians need it; no dropout in a Fisher either), each
    module's mode restored afterwards: a model may mix modes."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


FISHER_BACKENDS = ("auto", "clfast", "nngeometry")


class Unsupported(ValueError):
    """A model whose Fisher :func:`fisher` cannot compute (a layer it does not know, shared weights, a layer off
    the batch dimension); where nngeometry's ``FIM`` can, ``fisher_backend="auto"`` then takes it."""


def checked_backend(fisher_backend: str, who: str) -> str:
    if fisher_backend not in FISHER_BACKENDS:
        raise ValueError(f"{who}: fisher_backend must be one of {FISHER_BACKENDS}, got {fisher_backend!r}")
    return fisher_backend


def unsupported(layers: Layers, representation: str, variant: str) -> Optional[str]:
    """Why :func:`fisher` cannot compute this Fisher (nngeometry's ``FIM`` then can), or None."""
    if representation not in REPRESENTATIONS:
        return f"clfast.fisher computes representations {REPRESENTATIONS}, not {representation!r}"
    if variant not in VARIANTS:
        return f"clfast.fisher computes variants {VARIANTS}, not {variant!r}"
    for lid, mod in layers.modules.items():
        if mod.weight.dtype not in (torch.float32, torch.float64):
            return (f"clfast.fisher computes in float32 or float64; layer '{lid}' is {mod.weight.dtype} (convert the "
                    "model, e.g. model.float())")
        if mod.weight.device.type not in ("cpu", "cuda"):
            return f"clfast.fisher runs on CPU and CUDA tensors; layer '{lid}' is on {mod.weight.device}"
        if isinstance(mod, DANBlock):
            continue
        if isinstance(mod, nn.Conv2d):
            if mod.groups != 1 or mod.padding_mode != "zeros" or isinstance(mod.padding, str):
                return (f"clfast.fisher: Conv2d '{lid}' needs groups=1, padding_mode='zeros' and numeric padding "
                        "(its per-example gradients are taken by im2col)")
        elif isinstance(mod, _BATCH_NORMS):
            if mod.weight is None or mod.running_mean is None:
                return (f"clfast.fisher: BatchNorm '{lid}' needs affine=True and track_running_stats=True (in eval "
                        "mode it then normalises each example by its running statistics)")
        elif type(mod) is not nn.Linear:
            return (f"clfast.fisher: layer '{lid}' is a {type(mod).__name__}; only Linear, Conv2d and BatchNorm1d/2d "
                    "layers are supported (pass layer_collection= without it)")
    return None


def fisher_or_none(who: str, fisher_backend: str, layers: Layers, compute: Callable[[], Any]):
    """``compute()`` (a :func:`fisher` call), or None where it refuses the model under ``"auto"`` (with a warning):
    the caller then takes nngeometry's ``FIM`` (which a model with DAN layers cannot take)."""
    try:
        return compute()
    except Unsupported as exc:
        if fisher_backend != "auto" or layers.has_dan:
            raise
        warnings.warn(f"{who}: {exc}; the Fisher comes from nngeometry's FIM instead", RuntimeWarning)
        return None


def use_clfast(fisher_backend: str, layers: Layers, representation: str, variant: str, who: str) -> bool:
    """Whether ``who`` (EWC, OCAR) computes its Fisher with :func:`fisher` (True) or nngeometry's ``FIM``:
    ``"auto"`` takes clfast.fisher wherever it computes this Fisher, ``"clfast"`` insists on it. Asked at each
    computation, so a model converted since (``.half()``) is judged as it is then."""
    backend = checked_backend(fisher_backend, who)
    reason = unsupported(layers, representation, variant)
    if layers.has_dan and reason is not None:
        raise ValueError(f"{who}: nngeometry's FIM cannot hook clfast.nn DAN layers, so only clfast.fisher computes "
                         f"this model's Fisher, and it refuses this one: {reason}")
    if layers.has_dan and backend == "nngeometry":
        raise ValueError(f"{who}: nngeometry's FIM cannot hook clfast.nn DAN layers, so only clfast.fisher computes "
                         "this model's Fisher; use fisher_backend='auto' or 'clfast'")
    if backend == "nngeometry":
        return False
    if reason is not None and backend == "clfast":
        raise ValueError(f"{who}: {reason}; use fisher_backend='nngeometry' (or 'auto')")
    return reason is None


def whitening(logits: Tensor) -> Tensor:
    """``W [K = classes - 1, B, classes]``: the Jacobian with respect to the logits of nngeometry's whitened
    classif_logits outputs (Tanabe & Sagae's factor of ``diag(p) - p p^T``, ``p`` held constant), with
    :func:`clfast._nngeometry.fim`'s clamping of the roundings that make nngeometry's NaN."""
    p = torch.softmax(logits, dim=1)
    q = (1 - p.cumsum(dim=1)).clamp_min(0)  # q_j = sum_{c > j} p_c
    prev = torch.cat([torch.ones_like(q[:, :1]), q[:, :-2]], dim=1)
    scale = (p[:, :-1] * q[:, :-1] / prev.clamp_min(torch.finfo(p.dtype).tiny)).clamp_min(0).sqrt()
    k, c = logits.shape[1] - 1, logits.shape[1]
    eye = torch.eye(k, c, dtype=p.dtype, device=p.device)
    later = torch.triu(torch.ones(k, c, dtype=p.dtype, device=p.device), diagonal=1)  # [c > j]
    # output_j = scale_j (z_j - sum_{c > j} p_c z_c / (q_j + eps)), nngeometry's eps included
    w = eye - later * p[:, None, :] / (q[:, :-1, None] + torch.finfo(p.dtype).eps)
    return (scale[:, :, None] * w).transpose(0, 1)


class _Collector:
    """Sums one representation's per-layer statistics over a loader and normalises them as nngeometry does."""

    def __init__(self, layers: Layers, rep: str, chunk_size: Optional[int]) -> None:
        self.layers, self.rep, self.chunk_size = layers, rep, chunk_size
        self.lids = list(layers.modules)
        self.numel = {lid: layer.numel() for lid, layer in layers.collection.layers.items()}
        self.dan = {mod.name: mod.layer for mod in layers.modules.values() if isinstance(mod, DANBlock)}
        # per forward: a layer id -> (input, output), a DAN layer's name -> (input, {part index: (input, output)})
        self.captured: Dict[str, Tuple[Tensor, Any]] = {}
        self.total: Dict[Any, Tensor] = {}  # the sums over the loader, by layer (and factor)
        self.batched = True  # is_grads_batched, until a module's backward refuses vmap

    def _hook(self, lid: str):
        def hook(module, inputs, output):
            if lid in self.captured:
                raise Unsupported(f"clfast.fisher: layer '{lid}' runs more than once per forward (shared weights)")
            if torch.is_grad_enabled() and not output.requires_grad and output.is_floating_point():
                # a frozen layer on an input without gradient: its parameters still have a Fisher
                output = output.detach().requires_grad_()
            self.captured[lid] = (inputs[0].detach(), output)
            # the rest of the network gets a copy, so an in-place op after the layer (ReLU(inplace=True)) cannot
            # turn the captured tensor into another one
            return output.clone()
        return hook

    def _dan_hook(self, name: str):
        def hook(module, inputs, output):
            if name in self.captured:
                raise Unsupported(f"clfast.fisher: DAN layer '{name}' runs more than once per forward (shared "
                                  "weights)")
            out, parts = dan_parts(module, inputs[0])
            self.captured[name] = (inputs[0], parts)
            return out  # the rest of the network runs on the recomputation, so gradients reach its parts
        return hook

    @torch.no_grad()
    def run(self, loader: Iterable, device: torch.device):
        handles = [self.layers.modules[lid].register_forward_hook(self._hook(lid)) for lid in self.lids
                   if not isinstance(self.layers.modules[lid], DANBlock)]
        handles += [layer.register_forward_hook(self._dan_hook(name)) for name, layer in self.dan.items()]
        try:
            self.total = {}
            n, k = 0, None
            for batch in loader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, Tensor):
                    raise ValueError(f"clfast.fisher: batches must be tensors or (inputs, ...) sequences, got a "
                                     f"{type(x).__name__}")
                x = x.to(device)
                for xs, gys, k_batch, first in self._output_grads(x):
                    if k is not None and k_batch != k:
                        raise ValueError(f"clfast.fisher: the model gives {k + 1} logits on one batch, {k_batch + 1} "
                                         "on another")
                    k = k_batch
                    self._batch(xs, gys, first)
                n += x.shape[0]
        finally:
            for h in handles:
                h.remove()
            self.captured = {}
        if not n or k is None:
            raise ValueError("clfast.fisher: the loader gave no examples")
        return self._finish(n, k)

    def _output_grads(self, x: Tensor) -> Iterator[Tuple[Dict[str, Tensor], Dict[str, Tensor], int, bool]]:
        """Per layer: its input ``[B, ...]`` and the gradients ``[B, k, ...]`` of whitened outputs summed over the
        batch with respect to its output, which per example are that example's own (eval mode); with K, and
        whether this is the batch's first group of outputs. The K outputs come in groups whose gradients fit in
        about ``_GROUP_BYTES``, so memory does not grow with the number of classes."""
        if x.is_floating_point():  # so that every layer output requires grad, even with frozen parameters
            x = x.detach().requires_grad_()
        self.captured = {}
        with torch.enable_grad():
            logits = self.layers.model(x)
        if not isinstance(logits, Tensor):
            raise ValueError(f"clfast.fisher: the model must return a logits tensor, got a {type(logits).__name__}")
        if logits.dim() != 2 or logits.shape[1] < 2:
            raise ValueError(f"clfast.fisher: classif_logits needs logits [batch, classes >= 2], got "
                             f"{list(logits.shape)}")
        if not logits.requires_grad:
            raise ValueError("clfast.fisher: the model's logits have no gradient (is its forward under no_grad?)")
        if logits.shape[0] != x.shape[0]:
            raise ValueError(f"clfast.fisher: the model maps inputs {list(x.shape)} to logits {list(logits.shape)}; the "
                             "examples must be on the first dimension of both")
        w = whitening(logits.detach())  # [K, B, C]
        k, b = w.shape[0], w.shape[1]
        if self.batched:
            targets = self._targets(b)
            outs = [out for _, out, _ in targets]
            step = max(1, min(k, _GROUP_BYTES // max(1, sum(o.numel() * o.element_size() for o in outs))))

            def grads(k0: int) -> Dict[str, Tensor]:
                k1 = min(k, k0 + step)
                g = torch.autograd.grad(logits, outs, w[k0:k1], is_grads_batched=True, allow_unused=True,
                                        retain_graph=k1 < k)
                # [K, ...] with the examples on dimension bdim + 1 -> [B, K, ...]
                return self._per_layer({key: t.movedim(bdim + 1, 0) for (key, _, bdim), t in zip(targets, g)
                                        if t is not None}, b)
            try:
                first = grads(0)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as exc:
                if "vmap" not in str(exc) and "batching rule" not in str(exc).lower():
                    raise
                warnings.warn(f"clfast.fisher: the model's backward does not run under vmap ({exc}); the batch is "
                              "replicated once per whitened output instead", RuntimeWarning)
                self.batched = False
            else:
                yield first[0], first[1], k, True
                for k0 in range(step, k, step):
                    yield (*grads(k0), k, False)
                return
        # fallback: one forward and backward of the batch repeated K times, replica k carrying output k
        self.captured = {}
        with torch.enable_grad():
            logits = self.layers.model(x.repeat(k, *([1] * (x.dim() - 1))))
        targets = self._targets(k * b)
        grads = torch.autograd.grad(logits, [out for _, out, _ in targets], w.reshape(k * b, -1), allow_unused=True)
        xs, gys = self._per_layer({key: g.unflatten(bdim, (k, b)).movedim(bdim, 0).movedim(bdim + 1, 0) for (key, _, bdim), g
                                   in zip(targets, grads) if g is not None}, b)
        yield xs, gys, k, True

    def _targets(self, rows: int) -> List[Tuple[Any, Tensor, int]]:
        """(key, output, dimension of its examples) of every captured output with a gradient: a layer's (the others
        add nothing, as in nngeometry) or a DAN layer's part ``(name, index)``, whose tensors are ``[N, B, C]``.
        Each must see one row per example: a layer on another first dimension (a constant input, tokens folded
        into the batch) would have its per-example gradients summed."""
        out = []
        for key, (inp, captured) in self.captured.items():
            if key in self.dan:
                if inp.shape[-2] != rows:
                    raise Unsupported(f"clfast.fisher: DAN layer '{key}' sees input {list(inp.shape)} for a batch of "
                                      f"{rows}; per-example gradients need one input row per example")
                out += [((key, index), o, 1) for index, (_, o) in captured.items() if o.requires_grad]
                continue
            if inp.shape[0] != rows or captured.shape[0] != rows:
                raise Unsupported(f"clfast.fisher: layer '{key}' sees input {list(inp.shape)} and output "
                                  f"{list(captured.shape)} for a batch of {rows}; per-example gradients need the "
                                  "examples on the first dimension of every layer")
            if captured.requires_grad:
                out.append((key, captured, 0))
        return out

    def _per_layer(self, grads: Dict[Any, Tensor], b: int) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Inputs ``[B, ...]`` and output gradients ``[B, K, ...]`` by layer id from the gradients ``[B, K, ...]``
        by target: a DAN block's are its neuron's slice of its part's."""
        xs, gys = {}, {}
        for lid in self.lids:
            mod = self.layers.modules[lid]
            if isinstance(mod, DANBlock):
                key = (mod.name, mod.index)
                if key in grads:
                    xs[lid] = self.captured[mod.name][1][mod.index][0][mod.neuron, :b]
                    gys[lid] = grads[key][:, :, mod.neuron]
            elif lid in grads:
                xs[lid], gys[lid] = self.captured[lid][0][:b], grads[lid]
        return xs, gys

    # -- one batch: every statistic is summed in place into self.total ------------------------------------------
    def _acc(self, key, shape: Tuple[int, ...], like: Tensor) -> Tensor:
        if key not in self.total:
            self.total[key] = like.new_zeros(shape)
        return self.total[key]

    def _batch(self, xs: Dict[str, Tensor], gys: Dict[str, Tensor], first: bool) -> None:
        self._squares: Dict[Any, Tensor] = {}
        live = [lid for lid in self.lids if lid in gys]  # a layer the logits do not depend on adds nothing
        if not live:
            return
        k = gys[live[0]].shape[1]
        if self.rep == "diag":
            for lid in live:
                self._diag(lid, xs[lid], gys[lid])
        elif self.rep == "kfac":
            for lid in live:
                self._kfac(lid, xs[lid], gys[lid], first)
        elif self.rep == "blockdiag":
            for lid in live:
                acc = self._acc(lid, (self.numel[lid],) * 2, gys[lid])
                for sl in self._chunks(xs[lid].shape[0], k, self.numel[lid], xs[lid].dtype):
                    ops.fisher_factor_(acc, self._per_example(lid, xs[lid][sl], gys[lid][sl]), 1.0, False)
        else:  # dense: every layer's per-example columns side by side
            b, size = gys[live[0]].shape[0], sum(self.numel.values())
            acc = self._acc("dense", (size, size), gys[live[0]])
            for sl in self._chunks(b, k, size, acc.dtype):
                rows = k * gys[live[0]][sl].shape[0]
                j = torch.cat([self._per_example(lid, xs[lid][sl], gys[lid][sl]) if lid in gys else
                               acc.new_zeros(rows, self.numel[lid]) for lid in self.lids], dim=1)
                ops.fisher_factor_(acc, j, 1.0, False)

    def _chunks(self, b: int, k: int, numel: int, dtype: torch.dtype):
        size = self.chunk_size or max(1, _CHUNK_BYTES // (k * numel * torch.finfo(dtype).bits // 8))
        return [slice(s, s + size) for s in range(0, b, size)]

    def _per_example(self, lid: str, x: Tensor, gy: Tensor) -> Tensor:
        """``[b * K, P]``: the gradient of each (example, whitened output) pair, weight then bias."""
        mod = self.layers.modules[lid]
        b, k, kind = gy.shape[0], gy.shape[1], _kind(mod)
        if kind == "linear":
            gw = gy[:, :, :, None] * _flat(lid, x)[:, None, None, :]
            gb = gy
        elif kind == "conv":
            g = gy.reshape(b, k * gy.shape[2], -1)  # [b, K * out, locations]
            gw = torch.bmm(g, _patches(mod, x))  # sum over locations of gy x^T
            gb = g.sum(2)
        elif kind == "shift":
            gw = gb = gy
        else:  # a DAN block's BatchNorm input comes normalised
            gw = gy * (x if isinstance(mod, DANBlock) else _normalised(mod, x))[:, None]
            if gy.dim() > 3:  # sum over locations (sum(()) would sum over everything)
                gw, gb = gw.flatten(3).sum(3), gy.flatten(3).sum(3)
            else:
                gb = gy
        parts = [gw.reshape(b * k, -1)] + ([gb.reshape(b * k, -1)] if self._has_bias(lid) else [])
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def _elementwise_diag(self, lid: str, x: Tensor, gy: Tensor) -> List[Tensor]:
        """The diagonal of a BatchNorm on ``[B, C]`` (or of a DAN BatchNorm's weight or bias alone): each
        example's gradient is ``gy * x`` (``gy``) elementwise, so the sum over examples and outputs of its squares
        is ``sum_b x^2 sum_k gy^2``, weight then bias."""
        mod = self.layers.modules[lid]
        key = (mod.name, mod.index, mod.neuron) if isinstance(mod, DANBlock) else lid
        if key not in self._squares:  # a DAN BatchNorm's weight and bias blocks share it
            self._squares[key] = (gy * gy).sum(1)  # [B, C]
        s = self._squares[key]
        if mod.kind == "shift" if isinstance(mod, DANBlock) else False:
            return [s.sum(0)]
        xn = x if isinstance(mod, DANBlock) else _normalised(mod, x)
        weight = (s * (xn * xn)).sum(0)
        return [weight, s.sum(0)] if self._has_bias(lid) else [weight]

    def _has_bias(self, lid: str) -> bool:
        return self.layers.modules[lid].bias is not None

    def _diag(self, lid: str, x: Tensor, gy: Tensor) -> None:
        mod = self.layers.modules[lid]
        acc = self._acc(lid, (self.numel[lid],), gy)
        kind = _kind(mod)
        if kind == "linear":  # sum_{i,k} gy_ik^2 x_i^2 = (sum_k gy_k^2)^T x^2: one fused GEMM
            ops.fisher_diag_(acc, _flat(lid, x), gy, mod.bias is not None)
            return
        if kind != "conv" and gy.dim() == 3:  # an elementwise affine on [B, C]
            acc.add_(torch.cat(self._elementwise_diag(lid, x, gy)))
            return
        for sl in self._chunks(x.shape[0], gy.shape[1], self.numel[lid], x.dtype):
            j = self._per_example(lid, x[sl], gy[sl])
            acc.add_((j * j).sum(0))

    def _kfac(self, lid: str, x: Tensor, gy: Tensor, first: bool) -> None:
        """nngeometry's sums: A = sum over examples (and locations) of x x^T, with a 1 appended for the bias (once
        per batch: ``first``); G = sum over outputs and examples of g g^T, divided by the number of locations for a
        convolution."""
        mod = self.layers.modules[lid]
        if _kind(mod) in ("scale", "shift"):  # a DAN BatchNorm's weight or bias: its exact diagonal, for G
            self._acc((lid, "g"), (gy.shape[2],), gy).add_(self._elementwise_diag(lid, x, gy)[0])
            return
        size_a = mod.weight[0].numel() + (mod.bias is not None)
        a = self._acc((lid, "a"), (size_a, size_a), gy) if first else None
        add_kfac_factors_(a, self._acc((lid, "g"), (gy.shape[2],) * 2, gy), mod,
                          _flat(lid, x) if isinstance(mod, nn.Linear) else x,
                          gy.transpose(0, 1).flatten(0, 1), 1.0, 1.0)  # [K * B, out, ...]: rows in any order

    def _finish(self, n: int, k: int):
        total = self.total
        if self.rep == "dense":
            size = sum(self.numel.values())
            mod = self.layers.modules[self.lids[0]]
            return total.get("dense", mod.weight.new_zeros(size, size)) / n
        out: Dict[str, Any] = {}
        for lid in self.lids:
            w = self.layers.modules[lid].weight
            if self.rep == "kfac" and _kind(self.layers.modules[lid]) in ("scale", "shift"):
                out[lid] = (w.new_ones(1, 1), torch.diag(total.get((lid, "g"), w.new_zeros(len(w))) / n))
            elif self.rep == "kfac":
                size_a = w[0].numel() + self._has_bias(lid)
                a = total.get((lid, "a"), w.new_zeros(size_a, size_a))
                g = total.get((lid, "g"), w.new_zeros(len(w), len(w)))
                # nngeometry's scaling (torch_hooks.py get_kfac_blocks): A sqrt(K) / n, G / (sqrt(K) n)
                out[lid] = (a * (math.sqrt(k) / n), g / (math.sqrt(k) * n))
            elif self.rep == "blockdiag":
                out[lid] = total[lid] / n if lid in total else w.new_zeros(self.numel[lid], self.numel[lid])
            else:
                out[lid] = total[lid] / n if lid in total else w.new_zeros(self.numel[lid])
        return torch.cat([out[lid] for lid in self.lids]) if self.rep == "diag" else out


def add_kfac_factors_(a: Optional[Tensor], g: Tensor, mod: nn.Module, x: Tensor, gy: Tensor, a_scale: float,
                      g_scale: float) -> None:
    """Sums one batch into a layer's KFAC factors, nngeometry's way: ``a += a_scale * sum x x^T`` over examples
    (and a convolution's locations: im2col columns), a 1 appended for the bias (``a`` None: skipped);
    ``g += g_scale * sum g g^T`` over the rows of ``gy [N, out, ...]``, divided by the number of locations for a
    convolution. Both stay exactly symmetric."""
    bias = mod.bias is not None
    if isinstance(mod, nn.Conv2d):
        if a is not None:
            ops.fisher_factor_(a, _patches(mod, x).flatten(0, 1), a_scale, bias)
        m = gy.reshape(*gy.shape[:2], -1)  # [N, out, locations]: one small product per row beats a transposed copy
        gram = torch.bmm(m, m.mT).sum(0)
        g.add_(gram + gram.mT, alpha=0.5 * g_scale / m.shape[2])
        return
    if a is not None:
        ops.fisher_factor_(a, x.reshape(x.shape[0], -1), a_scale, bias)
    ops.fisher_factor_(g, gy, g_scale, False)


def _kind(mod) -> str:
    """How a layer's per-example gradients come from its input and output gradient: "linear", "conv",
    "batchnorm", or a DAN BatchNorm's weight alone ("scale") or bias alone ("shift")."""
    if isinstance(mod, DANBlock):
        return mod.kind
    return "linear" if isinstance(mod, nn.Linear) else "conv" if isinstance(mod, nn.Conv2d) else "batchnorm"


def dan_parts(layer: nn.Module, x: Tensor) -> Tuple[Tensor, Dict[str, Tuple[Tensor, Tensor]]]:
    """A ``clfast.nn.DANLayer`` on ``x`` recomputed in batched torch ops (those of ``clfast.reference.dan_layer``,
    BatchNorm on the running statistics in eval mode, on the batch's in train mode, which the layer's own forward
    has already counted), which run under vmap where the fused op does not: its output ``[B, N * no]`` and, by part
    index in the per-neuron layout, each part's input (detached) and output ``[N, B, C]``: a BatchNorm's
    normalised input and affine output, a Linear's input and output."""
    from .nn.dan import _params, _stats
    from .reference.dan import _linear

    g1, b1, w1, c1, g2, b2, w2, c2, w3, c3 = _params(layer)
    rm1, rv1, _, rm2, rv2, _ = _stats(layer)
    act, eps = layer.act_fn, layer.eps

    def activate(h: Tensor) -> Tensor:  # on [N * B, C], the [batch, features] layout the per-neuron act sees
        # on a copy: an in-place activation (ReLU(inplace=True)) would overwrite the Linear output it is given
        return act(h.reshape(-1, h.shape[-1]).clone()).view(h.shape)

    def normalise(h: Tensor, mean: Tensor, var: Tensor, shared: Optional[Tensor] = None) -> Tensor:
        if layer.training:  # an input every neuron reads has its batch statistics computed once
            var, mean = (torch.var_mean(h, dim=1, correction=0) if shared is None else
                         (t.expand(len(h), -1) for t in torch.var_mean(shared, dim=0, correction=0)))
        return (h - mean[:, None]) * torch.rsqrt(var[:, None] + eps)

    h = x.unsqueeze(0).expand(w1.shape[0], *x.shape) if x.dim() == 2 else x
    xh1 = normalise(h, rm1, rv1, x if x.dim() == 2 else None)
    u1 = g1[:, None] * xh1 + b1[:, None]
    z1 = _linear(u1, w1, c1)
    xh2 = normalise(activate(z1), rm2, rv2)
    u2 = g2[:, None] * xh2 + b2[:, None]
    z2 = _linear(u2, w2, c2)
    a2 = activate(z2)
    y = _linear(a2, w3, c3)
    parts = {"0": (xh1.detach(), u1), "1": (u1.detach(), z1), "3": (xh2.detach(), u2), "4": (u2.detach(), z2),
             "6": (a2.detach(), y)}
    return torch.cat(list(y), dim=1), parts


def _flat(lid: str, x: Tensor) -> Tensor:
    if x.dim() != 2:
        raise Unsupported(f"clfast.fisher: Linear '{lid}' gets input {list(x.shape)}; nngeometry's Fisher (and this "
                         "one) take Linear inputs [batch, features] only")
    return x


def _patches(mod: nn.Conv2d, x: Tensor) -> Tensor:
    """im2col as ``[B, locations, in * kh * kw]``, each row in the order of ``weight[o].reshape(-1)``: one strided
    copy of windows of the padded input (``F.unfold`` gives the same numbers, several hundred times slower on the
    CPU at these sizes)."""
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = mod.kernel_size, mod.stride, mod.dilation, mod.padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph))
    # [B, C, oh, ow, window] per axis; every dilation-th element of a window is a tap
    win = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    b, c, oh, ow = win.shape[:4]
    return win.permute(0, 2, 3, 1, 4, 5).reshape(b, oh * ow, c * kh * kw)


def _normalised(mod: "nn.modules.batchnorm._BatchNorm", x: Tensor) -> Tensor:
    """BatchNorm's input normalised by the running statistics (eval mode), channels on dimension 1."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return (x - mod.running_mean.view(shape)) / torch.sqrt(mod.running_var.view(shape) + mod.eps)
