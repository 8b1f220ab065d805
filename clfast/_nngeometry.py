"""The glue between clfast and nngeometry 0.4, shared by :class:`clfast.EWC` and :class:`clfast.OCAR`: the layer
collection of a model with the modules behind it (:class:`Layers`, which also checks that nngeometry covers the
model), the robust ``FIM`` call (:func:`fim`), and one class per Fisher representation holding how a Fisher of that
kind becomes clfast's fused penalty and its gradient (:data:`REPRESENTATIONS`)."""
from __future__ import annotations

import re

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops


def pmat_classes() -> Dict[str, type]:
    from nngeometry.object import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC

    return {"diag": PMatDiag, "kfac": PMatKFAC, "dense": PMatDense, "blockdiag": PMatBlockDiag, "ekfac": PMatEKFAC}


def representation_name(representation: Union[str, type]) -> str:
    """``"diag"``, ... from a name or an nngeometry ``PMat*`` class."""
    classes = pmat_classes()
    if isinstance(representation, str):
        if representation not in classes:
            raise ValueError(f"representation must be one of {sorted(classes)} or an nngeometry PMat class, got "
                             f"{representation!r}")
        return representation
    names = {cls: name for name, cls in classes.items()}
    if representation not in names:
        raise ValueError(f"unsupported representation {representation!r}; use one of {sorted(classes)}")
    return names[representation]


def fim(model: nn.Module, loader, representation, variant: str, device, layer_collection):
    """nngeometry's ``FIM``, with its ``classif_logits`` whitening made robust: for a confident model
    ``1 - cumsum(softmax)`` can round below zero and nngeometry's square root then gives NaN. The same
    whitening with those roundings clamped at 0 is passed as a ``regression`` function, which gives
    nngeometry's Fisher wherever that is finite."""
    from nngeometry.metrics import FIM

    if variant != "classif_logits":
        return FIM(model, loader, representation, variant=variant, device=device, layer_collection=layer_collection)

    from ._fisher import whitening

    def whitened(*d):  # linear in the logits, with the whitening's Jacobian (p held constant)
        logits = model(d[0].to(device))
        return torch.einsum("kbc,bc->bk", whitening(logits.detach()), logits)

    return FIM(model, loader, representation, variant="regression", device=device, function=whitened,
               layer_collection=layer_collection)


def empirical_fisher(layers: "Layers", loader, representation: str, loss_fn, device):
    """The Fisher of Avalanche's ``EWCPlugin``: over the minibatches of ``loader``, the mean of the squared
    gradient of the minibatch loss ``loss_fn(model(x), y)`` (``"diag"``), or of its outer product (``"dense"``), as
    an nngeometry object. The parameters' ``.grad`` is left alone."""
    leaves = layers.leaves()
    total, batches = None, 0
    for batch in loader:
        x, y = batch[0].to(device), batch[1].to(device)
        grads = torch.autograd.grad(loss_fn(layers.model(x), y), leaves, allow_unused=True)
        g = torch.cat([gr.reshape(-1) for gr in layers.of(list(grads))])
        if representation == "diag":
            total = g * g if total is None else total.add_(g * g)
        else:
            total = torch.outer(g, g) if total is None else total.addr_(g, g)
        batches += 1
    if not batches:
        raise ValueError("the empirical Fisher needs at least one batch; the loader is empty")
    return pmat_classes()[representation](generator=generator(layers), data=total / batches)


def generator(layers: "Layers"):
    """The nngeometry generator an nngeometry matrix of ``layers`` is built with: nngeometry's own hooks, or, for a
    model with clfast.nn DAN layers (which nngeometry cannot hook), its stand-in that only carries the layer
    collection (what nngeometry's matrix methods read)."""
    if layers.has_dan:
        from nngeometry.backend.dummy import DummyGenerator

        return DummyGenerator(layers.collection, layers.parameters()[0].device)
    from nngeometry.backend import TorchHooksJacobianBackend

    return TorchHooksJacobianBackend(layer_collection=layers.collection, model=layers.model,
                                     function=lambda *d: layers.model(d[0]))


# A DAN neuron's parts by their index in the per-neuron layout (``neurons.{i}.core.{index}``, clfast.nn.dan's
# _SEED_NAMES): the stacked (weight, bias) parameters of its BatchNorms and Linears.
DAN_PARTS = {"0": ("bn1_weight", "bn1_bias"), "1": ("weight1", "bias1"), "3": ("bn2_weight", "bn2_bias"),
             "4": ("weight2", "bias2"), "6": ("weight3", "bias3")}


class DANBlock:
    """One neuron's BatchNorm or Linear in a ``clfast.nn.DANLayer``, as a layer of a Fisher: layer id
    ``{layer}.neurons.{i}.core.{index}`` as in the per-neuron layout, ``weight`` and ``bias`` views of the stacked
    parameters. For Kronecker-factored Fishers a BatchNorm is two blocks, ``...core.{index}.weight`` and
    ``.bias`` (kinds ``"scale"`` and ``"shift"``), each a column ``[C, 1]`` with its exact diagonal as ``G``."""

    def __init__(self, name: str, layer: nn.Module, neuron: int, index: str, only: Optional[str] = None) -> None:
        self.name, self.layer, self.neuron, self.index, self.only = name, layer, neuron, index, only
        self.kind = "linear" if index in ("1", "4", "6") else {None: "batchnorm", "weight": "scale",
                                                               "bias": "shift"}[only]

    def views(self, of: Callable[[Tensor], Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """(weight, bias or None) of this block cut from ``of(stacked parameter)``."""
        w_name, b_name = DAN_PARTS[self.index]
        if self.only is not None:
            return of(getattr(self.layer, w_name if self.only == "weight" else b_name))[self.neuron], None
        b = getattr(self.layer, b_name)
        return of(getattr(self.layer, w_name))[self.neuron], None if b is None else of(b)[self.neuron]

    @property
    def weight(self) -> Tensor:
        return self.views(lambda p: p)[0]

    @property
    def bias(self) -> Optional[Tensor]:
        return self.views(lambda p: p)[1]

    def nngeometry_layer(self):
        from nngeometry.layercollection import BatchNorm1dLayer, LinearLayer

        w, b = self.weight, self.bias
        if self.kind == "batchnorm":
            return BatchNorm1dLayer(num_features=w.shape[0])
        if self.kind == "linear":
            return LinearLayer(in_features=w.shape[1], out_features=w.shape[0], bias=b is not None)
        return LinearLayer(in_features=1, out_features=w.shape[0], bias=False)


def dan_blocks(name: str, layer: nn.Module, kronecker: bool) -> List[Tuple[str, DANBlock]]:
    """A DANLayer's blocks in the per-neuron layout's order (neuron by neuron: BatchNorm, Linear, BatchNorm,
    Linear, Linear), which is nngeometry's order for the per-neuron modules."""
    prefix = f"{name}.neurons" if name else "neurons"
    out = []
    for i in range(layer.weight1.shape[0]):
        for index in DAN_PARTS:
            lid = f"{prefix}.{i}.core.{index}"
            if kronecker and index in ("0", "3"):
                out += [(f"{lid}.{only}", DANBlock(name, layer, i, index, only)) for only in ("weight", "bias")]
            else:
                out.append((lid, DANBlock(name, layer, i, index)))
    return out


def _dan_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The model's clfast.nn DAN layers with one set of parameters per neuron (not a shared phenotype)."""
    from torch.nn.utils.parametrize import is_parametrized

    from .nn.dan import DANLayer

    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, DANLayer) and mod.weight1.shape[0] == mod._n and not is_parametrized(mod)}


_DAN_ID = re.compile(r"^(?:(.*)\.)?neurons\.(\d+)\.core\.([01346])(?:\.(weight|bias))?$")


def _resolve(lid: str, named: Dict[str, nn.Module], dan: Dict[str, nn.Module]):
    """The module behind a layer id, or the :class:`DANBlock` a DAN layer's id names."""
    if lid in named:
        return named[lid]
    match = _DAN_ID.match(lid)
    name, neuron, index, only = match.groups() if match else (None, "0", "", None)
    layer = dan.get(name or "")
    if layer is None or int(neuron) >= layer.weight1.shape[0] or (only is not None and index not in ("0", "3")):
        raise ValueError(f"layer id {lid!r} names no module of the model, nor a neuron's part of one of its clfast.nn "
                         "DAN layers (with one set of unparametrized parameters per neuron)")
    return DANBlock(name or "", layer, int(neuron), index, only)


class Layers:
    """nngeometry's layer collection of ``model`` and the module behind each layer id.

    The collection holds nngeometry's layers and, for each ``clfast.nn.DANLayer`` (one set of parameters per
    neuron), its neurons' BatchNorms and Linears as nngeometry layers named as in the per-neuron layout
    (:class:`DANBlock`), in module order: the layout nngeometry gives the per-neuron model (``to_reference()``).
    Without an explicit ``layer_collection`` every trainable parameter must be covered (nngeometry silently skips
    modules it does not know); ``kronecker=True`` refuses BatchNorm layers, which have no Kronecker factors in
    nngeometry (a DAN layer's BatchNorms become diagonal blocks instead, see :class:`DANBlock`)."""

    def __init__(self, model: nn.Module, layer_collection=None, who: str = "EWC", kronecker: bool = False) -> None:
        from nngeometry.layercollection import BatchNorm1dLayer, BatchNorm2dLayer, LayerCollection

        self.model = model
        try:
            self.collection = layer_collection or LayerCollection.from_model(model)
        except Exception as exc:
            raise ValueError(f"{who}: nngeometry cannot handle this model ({exc}); pass a layer_collection of the "
                             "supported layers") from exc
        dan = _dan_layers(model)
        if dan and layer_collection is None:  # in module order, so the ids and their order are those of the per-neuron model
            known, self.collection = self.collection, LayerCollection()
            for name, mod in model.named_modules():
                if name in known.layers:
                    self.collection.add_layer(name, known.layers[name])
                elif name in dan:
                    for lid, block in dan_blocks(name, mod, kronecker):
                        self.collection.add_layer(lid, block.nngeometry_layer())
        named = dict(model.named_modules())
        self.modules: Dict[str, Any] = {lid: _resolve(lid, named, dan) for lid in self.collection.layers}
        for lid, mod in self.modules.items():
            given = self.collection.layers[lid]
            if isinstance(mod, DANBlock):
                if isinstance(given, BatchNorm1dLayer) and kronecker:
                    raise ValueError(f"{who}: a Kronecker-factored Fisher takes a DAN layer's BatchNorm '{lid}' as two "
                                     f"diagonal blocks, '{lid}.weight' and '{lid}.bias' (the default collection)")
                expected = mod.nngeometry_layer()
                if type(given) is not type(expected) or given.numel() != expected.numel() or given != expected:
                    raise ValueError(f"{who}: the layer collection describes '{lid}' as {given} of {given.numel()} "
                                     f"parameters, but that part of the DAN layer is {expected} of "
                                     f"{expected.numel()}")
        self.has_dan = any(isinstance(m, DANBlock) for m in self.modules.values())
        if layer_collection is None:
            covered = {id(p) for p in self.leaves()}
            missed = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
            if missed:
                raise ValueError(f"{who}: the Fisher does not cover {len(missed)} parameter(s) of this model "
                                 f"({', '.join(missed[:4])}{', ...' if len(missed) > 4 else ''}): it knows Linear, "
                                 "Conv2d and BatchNorm layers and clfast.nn DAN layers (not a shared phenotype, "
                                 "not parametrized) only. Pass layer_collection= to regularise a subset explicitly, or use a method "
                                 "without a Fisher (si, replay).")
        if kronecker:
            for lid, layer in self.collection.layers.items():
                if isinstance(layer, (BatchNorm1dLayer, BatchNorm2dLayer)):
                    raise ValueError(
                        f"{who}: nngeometry has no Kronecker factors for BatchNorm layer '{lid}'. Use "
                        "representation='diag' or 'blockdiag', or pass layer_collection= without it "
                        "(LayerCollection().add_layer_from_model(model, module) for each other layer).")

    def _pairs(self, of: Callable[[Tensor], Tensor]) -> Iterator[Tuple[str, Tensor, Optional[Tensor]]]:
        for lid, layer in self.collection.layers.items():
            mod = self.modules[lid]
            if isinstance(mod, DANBlock):
                yield (lid, *mod.views(of))
            else:
                has_bias = getattr(layer, "bias", None) is not None or "BatchNorm" in type(layer).__name__
                yield lid, of(mod.weight), (of(mod.bias) if has_bias else None)

    def __iter__(self) -> Iterator[Tuple[str, Tensor, Optional[Tensor]]]:
        """(layer id, weight, bias or None) in nngeometry's parameter order (a DAN block's: views)."""
        return self._pairs(lambda p: p)

    @staticmethod
    def _flat(pairs) -> List[Tensor]:
        out = []
        for _, w, b in pairs:
            out += [w] + ([b] if b is not None else [])
        return out

    def parameters(self) -> List[Tensor]:
        return self._flat(self)

    def leaves(self) -> List[Tensor]:
        """The model parameters behind :meth:`parameters` (a DAN layer's stacked ones once), for autograd."""
        seen: Dict[int, Tensor] = {}

        def note(p: Tensor) -> Tensor:
            seen.setdefault(id(p), p)
            return p
        self._flat(self._pairs(note))
        return list(seen.values())

    def of(self, values: List[Optional[Tensor]]) -> List[Tensor]:
        """Tensors laid out as :meth:`parameters` from tensors laid out as :meth:`leaves` (None: zeros)."""
        by_leaf = {id(p): (v if v is not None else torch.zeros_like(p)) for p, v in zip(self.leaves(), values)}
        return self._flat(self._pairs(lambda p: by_leaf[id(p)]))

    def grads(self) -> List[Tensor]:
        """The ``.grad`` of :meth:`parameters` (views of a DAN layer's stacked gradients), zeros where missing."""
        def grad(p: Tensor) -> Tensor:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            return p.grad
        return self._flat(self._pairs(grad))

    def covers_model(self) -> bool:
        return not self.has_dan and len(self.parameters()) == len(list(self.model.parameters()))

    def pvector(self, tensors: List[Tensor]):
        """An nngeometry ``PVector`` of tensors in :meth:`parameters` order."""
        from nngeometry.object import PVector

        out, it = {}, iter(tensors)
        for lid, _, b in self:
            out[lid] = (next(it),) + ((next(it),) if b is not None else ())
        return PVector(self.collection, dict_repr=out)

    def matrices(self, tensors: List[Tensor]) -> List[Tensor]:
        """Per layer, ``[out, in]`` weight (``[out, in + 1]`` with the bias as the last column): KFAC's layout."""
        out, it = [], iter(tensors)
        for _, w, b in self:
            wm = next(it).reshape(w.shape[0], -1)
            out.append(torch.cat([wm, next(it)[:, None]], 1) if b is not None else wm)
        return out

    def scatter(self, blocks: List[Tensor], grads: List[Tensor]) -> None:
        """Add per-layer ``[out, in(+1)]`` blocks into the weight and bias gradients."""
        it = iter(grads)
        for (_, _, b), block in zip(self, blocks):
            gw = next(it)
            gw.add_(block[:, :gw[0].numel()].reshape(gw.shape))
            if b is not None:
                next(it).add_(block[:, -1])


# ---- representations: a task's Fisher as the tensors of the fused penalty ------------------------------------------
# Each class turns one consolidated Fisher (with its coefficient c_t and anchor theta_t) into the tensors the fused
# ops read (prepare), and evaluates sum_t c_t (theta - theta_t)^T F_t (theta - theta_t) over all tasks (penalty) and
# adds strength times its gradient into .grad (add_penalty_grad).


class DiagFisher:
    """SI's weighted squared distance: ``si_penalty`` / ``si_penalty_grad_`` with the diagonal as importance."""

    @staticmethod
    def prepare(layers: Layers, fisher, coef: float, anchor: List[Tensor]) -> dict:
        sizes = [p.numel() for p in anchor]
        return {"importance": [coef * d.view_as(p) for d, p in zip(torch.split(fisher.data, sizes), anchor)],
                "anchor": anchor}

    @staticmethod
    def penalty(layers: Layers, tasks: List[dict], params: List[Tensor]) -> Tensor:
        return ops.si_penalty([t for f in tasks for t in f["importance"]], [t for f in tasks for t in f["anchor"]],
                              params * len(tasks))

    @staticmethod
    def add_penalty_grad(layers: Layers, tasks: List[dict], params: List[Tensor], grads: List[Tensor],
                         strength: float) -> None:
        detached = [p.detach() for p in params]
        for f in tasks:
            ops.si_penalty_grad_(grads, f["importance"], f["anchor"], detached, strength)


class KFACFisher:
    """``<G V A, V>`` per layer on ``kron_quadratic``, its gradient on ``kron_mv``."""

    @staticmethod
    def prepare(layers: Layers, fisher, coef: float, anchor: List[Tensor]) -> dict:
        a = [fisher.data[lid][0] for lid, _, _ in layers]
        g = [coef * fisher.data[lid][1] for lid, _, _ in layers]
        ops.kron.check_symmetric(a + g)  # at consolidation, so no backward reads a value
        return {"a": a, "g": g, "anchor": layers.matrices(anchor)}

    @staticmethod
    def _blocks(layers: Layers, tasks: List[dict], params: List[Tensor]):
        mats = layers.matrices(params)
        a, g, v = [], [], []
        for f in tasks:
            a += f["a"]
            g += f["g"]
            v += [m - ref for m, ref in zip(mats, f["anchor"])]
        return a, g, v

    @classmethod
    def penalty(cls, layers: Layers, tasks: List[dict], params: List[Tensor]) -> Tensor:
        return ops.kron_quadratic(*cls._blocks(layers, tasks, params))

    @classmethod
    def add_penalty_grad(cls, layers: Layers, tasks: List[dict], params: List[Tensor], grads: List[Tensor],
                         strength: float) -> None:
        a, g, v = cls._blocks(layers, tasks, [p.detach() for p in params])
        blocks = ops.kron_mv(params[0].new_tensor(2.0 * strength), a, g, v)
        per_task = len(blocks) // len(tasks)
        for t in range(len(tasks)):
            layers.scatter(blocks[t * per_task:(t + 1) * per_task], grads)


class DenseFisher:
    """The whole ``[P, P]`` Fisher as one 1x1-factored ``kron_quadratic`` block."""

    @staticmethod
    def prepare(layers: Layers, fisher, coef: float, anchor: List[Tensor]) -> dict:
        g, one = coef * fisher.data, fisher.data.new_ones(1, 1)
        ops.kron.check_symmetric([g, one])  # at consolidation, so no backward reads a value
        return {"g": g, "one": one, "anchor": torch.cat([p.reshape(-1) for p in anchor])}

    @staticmethod
    def _blocks(tasks: List[dict], params: List[Tensor]):
        flat = torch.cat([p.reshape(-1) for p in params])
        return [f["one"] for f in tasks], [f["g"] for f in tasks], [(flat - f["anchor"])[:, None] for f in tasks]

    @classmethod
    def penalty(cls, layers: Layers, tasks: List[dict], params: List[Tensor]) -> Tensor:
        return ops.kron_quadratic(*cls._blocks(tasks, params))

    @classmethod
    def add_penalty_grad(cls, layers: Layers, tasks: List[dict], params: List[Tensor], grads: List[Tensor],
                         strength: float) -> None:
        blocks = ops.kron_mv(params[0].new_tensor(2.0 * strength), *cls._blocks(tasks, [p.detach() for p in params]))
        for block in blocks:
            for grad, part in zip(grads, torch.split(block.view(-1), [g.numel() for g in grads])):
                grad.add_(part.view_as(grad))


class NNGeometryFisher:
    """Block-diagonal and EKFAC Fishers: nngeometry's own ``vTMv``, differentiated by autograd."""

    @staticmethod
    def prepare(layers: Layers, fisher, coef: float, anchor: List[Tensor]) -> dict:
        return {"fisher": fisher, "coef": coef, "anchor": anchor}

    @staticmethod
    def penalty(layers: Layers, tasks: List[dict], params: List[Tensor]) -> Tensor:
        from nngeometry.object import PVector

        current = PVector.from_model(layers.model) if layers.covers_model() else layers.pvector(params)
        total = params[0].new_zeros(())
        for f in tasks:
            total = total + f["coef"] * f["fisher"].vTMv(current - layers.pvector(f["anchor"]))
        return total

    @classmethod
    def add_penalty_grad(cls, layers: Layers, tasks: List[dict], params: List[Tensor], grads: List[Tensor],
                         strength: float) -> None:
        with torch.enable_grad():
            penalty_grads = torch.autograd.grad(strength * cls.penalty(layers, tasks, params), params)
        for grad, pg in zip(grads, penalty_grads):
            grad.add_(pg)


REPRESENTATIONS = {"diag": DiagFisher, "kfac": KFACFisher, "dense": DenseFisher, "blockdiag": NNGeometryFisher,
                   "ekfac": NNGeometryFisher}
