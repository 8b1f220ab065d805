"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) on nngeometry Fisher objects.

The Fisher of each task is computed by nngeometry's ``FIM`` (any representation); the penalty
``sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)`` runs on fused ops: the diagonal one on SI's weighted
squared distance (``si_penalty`` / ``si_penalty_grad_``), KFAC blocks and dense Fishers on ``kron_quadratic``
(``<G V A, V>`` per block, keeping ``G V A`` for the backward) and ``kron_mv``. Block-diagonal and EKFAC Fishers use nngeometry's
own ``vTMv``. The values equal nngeometry's ``F.vTMv(PVector.from_model(model) - v_t)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["EWC"]


def layer_params(layer_collection, modules: Dict[str, nn.Module]):
    """(layer id, weight, bias or None) in nngeometry's parameter order."""
    for lid, layer in layer_collection.layers.items():
        mod = modules[lid]
        has_bias = getattr(layer, "bias", None) is not None or "BatchNorm" in type(layer).__name__
        yield lid, mod.weight, (mod.bias if has_bias else None)


def fim(model: nn.Module, loader, representation, variant: str, device, layer_collection):
    """nngeometry's ``FIM``, with its ``classif_logits`` whitening made robust: for a confident model
    ``1 - cumsum(softmax)`` can round below zero and nngeometry's square root then gives NaN. The same
    whitening with those roundings clamped at 0 is passed as a ``regression`` function, which gives
    nngeometry's Fisher wherever that is finite."""
    from nngeometry.metrics import FIM

    if variant != "classif_logits":
        return FIM(model, loader, representation, variant=variant, device=device, layer_collection=layer_collection)

    def whitened(*d):
        logits = model(d[0].to(device))
        p = torch.softmax(logits, dim=1).detach()
        q = (1 - p.cumsum(dim=1)).clamp_min(0)
        prev = torch.cat([torch.ones_like(q[:, :1]), q[:, :-2]], dim=1)
        scale = (p[:, :-1] * q[:, :-1] / prev.clamp_min(torch.finfo(p.dtype).tiny)).clamp_min(0)
        tri = torch.tril(torch.ones(logits.shape[1], logits.shape[1], device=logits.device), diagonal=-1)
        x_p = torch.mm(logits * p, tri)[:, :-1] / (q[:, :-1] + torch.finfo().eps)
        return (logits[:, :-1] - x_p) * scale ** 0.5

    return FIM(model, loader, representation, variant="regression", device=device, function=whitened,
               layer_collection=layer_collection)


def _representations():
    from nngeometry.object import PMatBlockDiag, PMatDense, PMatDiag, PMatEKFAC, PMatKFAC

    return {"diag": PMatDiag, "kfac": PMatKFAC, "dense": PMatDense, "blockdiag": PMatBlockDiag, "ekfac": PMatEKFAC}


class EWC:
    """EWC with Fishers as nngeometry objects.

    Args:
        model: the network; its Linear/Conv2d/BatchNorm layers form nngeometry's layer collection.
        representation: ``"diag"``, ``"kfac"``, ``"dense"``, ``"blockdiag"``, ``"ekfac"`` or the nngeometry class
            (``PMatDiag``, ...).
        mode: ``"separate"`` keeps one (Fisher, parameters) pair per task; ``"online"`` keeps the decayed running
            Fisher ``gamma * F_old + F_new`` anchored at the latest parameters.
        gamma: decay of online mode.
        variant: nngeometry's FIM variant (``"classif_logits"``, ``"classif_binary_logits"``, ``"regression"``).
        layer_collection: nngeometry ``LayerCollection`` restricting the parameters (default: the whole model).
        device: where Fishers are computed (default: the model's device).

    Example::

        ewc = clfast.EWC(model, "kfac")
        ...train task 1...
        ewc.consolidate(loader)          # loader yields (x, y) or continuum's (x, y, t)
        loss = F.cross_entropy(model(x), y) + strength * ewc.penalty()
    """

    def __init__(self, model: nn.Module, representation: Union[str, type] = "diag", mode: str = "separate",
                 gamma: float = 1.0, variant: str = "classif_logits", layer_collection=None,
                 device: Optional[Union[str, torch.device]] = None) -> None:
        from nngeometry.layercollection import BatchNorm1dLayer, BatchNorm2dLayer, LayerCollection

        reps = _representations()
        names = {cls: name for name, cls in reps.items()}
        if isinstance(representation, str):
            if representation not in reps:
                raise ValueError(f"representation must be one of {sorted(reps)} or an nngeometry PMat class, got "
                                 f"{representation!r}")
            self.representation = representation
        elif representation in names:
            self.representation = names[representation]
        else:
            raise ValueError(f"unsupported representation {representation!r}; use one of {sorted(reps)}")
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.model, self.mode, self.gamma, self.variant = model, mode, float(gamma), variant
        try:
            self.layer_collection = layer_collection or LayerCollection.from_model(model)
        except Exception as exc:
            raise ValueError(f"EWC: nngeometry cannot handle this model ({exc}); pass a layer_collection of the "
                             "supported layers") from exc
        self._modules = self.layer_collection.get_layerid_module_maps(model)[0]
        if layer_collection is None:  # nngeometry silently skips modules it does not know (e.g. clfast.nn.DAN)
            covered = {id(p) for mod in self._modules.values() for p in mod.parameters(recurse=False)}
            missed = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
            if missed:
                raise ValueError(f"EWC: nngeometry's Fisher does not cover {len(missed)} parameter(s) of this model "
                                 f"({', '.join(missed[:4])}{', ...' if len(missed) > 4 else ''}): it knows Linear, "
                                 "Conv2d and BatchNorm layers only. Pass layer_collection= to regularise a subset "
                                 "explicitly, or use a method without a Fisher (si, replay).")
        if self.representation in ("kfac", "ekfac"):
            for lid, layer in self.layer_collection.layers.items():
                if isinstance(layer, (BatchNorm1dLayer, BatchNorm2dLayer)):
                    raise ValueError(
                        f"EWC({self.representation!r}): nngeometry has no Kronecker factors for BatchNorm layer "
                        f"'{lid}'. Use representation='diag' or 'blockdiag', or pass layer_collection= without it "
                        "(LayerCollection().add_layer_from_model(model, module) for each other layer).")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.fishers: list = []          # nngeometry objects, one per task (separate) or per consolidation
        self._coef: List[float] = []     # c_t: 1 (separate) or gamma^(age) (online)
        self._anchors: List[List[Tensor]] = []  # theta_t per task, in layer-collection parameter order
        self._fast: List[dict] = []      # per task: tensors for the fused ops, coefficient folded in

    # -- parameters in nngeometry's order -----------------------------------------------------------------
    def _layer_params(self):
        return layer_params(self.layer_collection, self._modules)

    def parameters(self) -> List[Tensor]:
        out = []
        for _, w, b in self._layer_params():
            out += [w] + ([b] if b is not None else [])
        return out

    # -- tasks --------------------------------------------------------------------------------------------
    def consolidate(self, loader: Iterable) -> None:
        """Compute the Fisher at the current parameters on ``loader`` (model in eval mode) and store it with the
        parameters."""
        rep = _representations()[self.representation]
        was_training = self.model.training
        self.model.eval()  # nngeometry needs BatchNorm in eval mode; dropout off is right for a Fisher too
        try:
            fisher = fim(self.model, loader, rep, self.variant, self.device, self.layer_collection)
        finally:
            self.model.train(was_training)
        anchor = [p.detach().clone() for p in self.parameters()]
        if self.mode == "online":
            self._coef = [c * self.gamma for c in self._coef]
            self._anchors = [anchor for _ in self._anchors]
        self.fishers.append(fisher)
        self._coef.append(1.0)
        self._anchors.append(anchor)
        self._fast = [self._prepare(f, c, a) for f, c, a in zip(self.fishers, self._coef, self._anchors)]

    def _prepare(self, fisher, coef: float, anchor: List[Tensor]) -> dict:
        """Tensors the fused ops read for one task, with the task's coefficient folded in."""
        if self.representation == "diag":
            sizes = [p.numel() for p in anchor]
            imp = [coef * d.view_as(p) for d, p in zip(torch.split(fisher.data, sizes), anchor)]
            return {"importance": imp}
        if self.representation == "kfac":
            a, g, ref = [], [], []
            it = iter(anchor)
            for lid, w, b in self._layer_params():
                fa, fg = fisher.data[lid]
                a.append(fa)
                g.append(coef * fg)
                aw = next(it).reshape(w.shape[0], -1)
                ref.append(torch.cat([aw, next(it)[:, None]], 1) if b is not None else aw)
            return {"a": a, "g": g, "anchor": ref}
        if self.representation == "dense":
            return {"g": [coef * fisher.data], "anchor": torch.cat([p.reshape(-1) for p in anchor])}
        return {}

    # -- penalty -----------------------------------------------------------------------------------------------
    def penalty(self) -> Tensor:
        """``sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)``, a 0-dim tensor differentiable in the params
        (0 before the first :meth:`consolidate`)."""
        params = self.parameters()
        if not self.fishers:
            return params[0].new_zeros(())
        self._check_params(params, "penalty")
        if self.representation == "diag":
            imp = [t for f in self._fast for t in f["importance"]]
            return ops.si_penalty(imp, [t for a in self._anchors for t in a], params * len(self._fast))
        if self.representation in ("kfac", "dense"):
            a, g, v = self._blocks(params)
            return ops.kron_quadratic(a, g, v)
        from nngeometry.object import PVector

        current = PVector.from_model(self.model) if self._covers_model() else self._pvector(params)
        total = params[0].new_zeros(())
        for fisher, coef, anchor in zip(self.fishers, self._coef, self._anchors):
            total = total + coef * fisher.vTMv(current - self._pvector(anchor))
        return total

    def _check_params(self, params: List[Tensor], where: str) -> None:
        """The consolidated state holds the parameters' dtype and device at consolidate(): a model converted or
        moved since then cannot be compared with it."""
        anchor = self._anchors[-1]
        for k, (p, a) in enumerate(zip(params, anchor)):
            if p.dtype != a.dtype or p.device != a.device:
                raise RuntimeError(f"EWC.{where}: the model's parameters are now {p.dtype} on {p.device}, but the "
                                   f"Fisher was computed for {a.dtype} on {a.device} at consolidate(); convert or move "
                                   "the model back, or create the EWC object (and consolidate) after converting it")

    def _blocks(self, params: List[Tensor]):
        if self.representation == "dense":
            flat = torch.cat([p.reshape(-1) for p in params])
            ones = params[0].new_ones(1, 1)
            return ([ones] * len(self._fast), [f["g"][0] for f in self._fast],
                    [(flat - f["anchor"])[:, None] for f in self._fast])
        mats = []
        for lid, w, b in self._layer_params():
            wm = w.reshape(w.shape[0], -1)
            mats.append(torch.cat([wm, b[:, None]], 1) if b is not None else wm)
        a, g, v = [], [], []
        for f in self._fast:
            a += f["a"]
            g += f["g"]
            v += [m - ref for m, ref in zip(mats, f["anchor"])]
        return a, g, v

    def add_penalty_grad_(self, strength: float = 1.0) -> None:
        """Add ``strength * d penalty / d theta`` into the parameters' ``.grad`` without an autograd graph."""
        if not self.fishers:
            return
        params = self.parameters()
        self._check_params(params, "add_penalty_grad_")
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        with torch.no_grad():
            if self.representation == "diag":
                detached = [p.detach() for p in params]
                for f, anchor in zip(self._fast, self._anchors):
                    ops.si_penalty_grad_(grads, f["importance"], anchor, detached, strength)
                return
            if self.representation in ("kfac", "dense"):
                a, g, v = self._blocks([p.detach() for p in params])
                blocks = ops.kron_mv(params[0].new_tensor(2.0 * strength), a, g, v)
                self._scatter(blocks, grads)
                return
        with torch.enable_grad():
            penalty_grads = torch.autograd.grad(strength * self.penalty(), params)
        for grad, pg in zip(grads, penalty_grads):
            grad.add_(pg)

    def _scatter(self, blocks: List[Tensor], grads: List[Tensor]) -> None:
        """Add per-block gradients back into the weight / bias gradients."""
        if self.representation == "dense":
            for block in blocks:
                for grad, part in zip(grads, torch.split(block.view(-1), [g.numel() for g in grads])):
                    grad.add_(part.view_as(grad))
            return
        layers = list(self._layer_params())
        for t in range(len(self._fast)):
            it = iter(grads)
            for (lid, w, b), block in zip(layers, blocks[t * len(layers):(t + 1) * len(layers)]):
                gw = next(it)
                gw.add_(block[:, :gw[0].numel()].reshape(gw.shape))
                if b is not None:
                    next(it).add_(block[:, -1])

    def _covers_model(self) -> bool:
        return len(self.parameters()) == len([p for p in self.model.parameters()])

    def _pvector(self, tensors: List[Tensor]):
        from nngeometry.object import PVector

        out, it = {}, iter(tensors)
        for lid, w, b in self._layer_params():
            out[lid] = (next(it),) + ((next(it),) if b is not None else ())
        return PVector(self.layer_collection, dict_repr=out)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"representation": self.representation, "mode": self.mode, "gamma": self.gamma,
                "coef": list(self._coef), "anchors": [list(a) for a in self._anchors],
                "fishers": [f.data for f in self.fishers]}

    def load_state_dict(self, state: Dict) -> None:
        """Load :meth:`state_dict` output of an EWC on the same architecture (checked before anything changes)."""
        from nngeometry.backend import TorchHooksJacobianBackend

        if state["representation"] != self.representation:
            raise ValueError(f"EWC.load_state_dict: state holds {state['representation']!r} Fishers, this EWC uses "
                             f"{self.representation!r}")
        shapes = [tuple(p.shape) for p in self.parameters()]
        for anchor in state["anchors"]:
            if [tuple(t.shape) for t in anchor] != shapes:
                raise ValueError("EWC.load_state_dict: the anchors' shapes do not match this model's parameters")
        rep = _representations()[self.representation]
        generator = TorchHooksJacobianBackend(layer_collection=self.layer_collection, model=self.model,
                                              function=lambda *d: self.model(d[0]))
        self.fishers = [rep(generator=generator, data=d) for d in state["fishers"]]
        self._coef = [float(c) for c in state["coef"]]
        self._anchors = [[t.to(self.device) for t in a] for a in state["anchors"]]
        self.mode, self.gamma = state["mode"], float(state["gamma"])
        self._fast = [self._prepare(f, c, a) for f, c, a in zip(self.fishers, self._coef, self._anchors)]
