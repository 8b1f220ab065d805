"""Elastic Weight Consolidation (Kirkpatrick et al., 2017) on nngeometry Fisher objects.

The Fisher of each task is nngeometry's ``FIM`` (any representation), computed by :func:`clfast.fisher` where it
can and by nngeometry otherwise (``fisher_backend``), or comes from squared minibatch gradients as Avalanche's
``EWCPlugin`` does (``variant="empirical"``); the penalty
``sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)`` runs on fused ops: the diagonal one on SI's weighted
squared distance (``si_penalty`` / ``si_penalty_grad_``), KFAC blocks and dense Fishers on ``kron_quadratic``
(``<G V A, V>`` per block, keeping ``G V A`` for the backward) and ``kron_mv``. Block-diagonal and EKFAC Fishers use nngeometry's
own ``vTMv``. The values equal nngeometry's ``F.vTMv(PVector.from_model(model) - v_t)``.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _distributed
from ._fisher import checked_backend, fisher as clfast_fisher, fisher_or_none, use_clfast
from ._nngeometry import REPRESENTATIONS, Layers, empirical_fisher, fim, generator, pmat_classes, representation_name

__all__ = ["EWC"]

VARIANTS = ("classif_logits", "classif_binary_logits", "regression", "empirical")


class EWC:
    """EWC with Fishers as nngeometry objects.

    Args:
        model: the network; its Linear/Conv2d/BatchNorm layers form nngeometry's layer collection, and each
            ``clfast.nn.DANLayer`` its neurons' blocks (Fisher by :func:`clfast.fisher` only).
        representation: ``"diag"``, ``"kfac"``, ``"dense"``, ``"blockdiag"``, ``"ekfac"`` or the nngeometry class
            (``PMatDiag``, ...).
        mode: ``"separate"`` keeps one (Fisher, parameters) pair per task; ``"online"`` keeps the decayed running
            Fisher ``gamma * F_old + F_new`` anchored at the latest parameters.
        gamma: decay of online mode.
        variant: nngeometry's FIM variant (``"classif_logits"``, ``"classif_binary_logits"``, ``"regression"``),
            or ``"empirical"``: the mean over the loader's minibatches of the squared minibatch-loss gradient, which
            is the Fisher of Avalanche's ``EWCPlugin`` (``"diag"`` or ``"dense"``, the outer product).
        loss_fn: the minibatch loss of the empirical Fisher, ``loss_fn(model(x), y)``.
        layer_collection: nngeometry ``LayerCollection`` restricting the parameters (default: the whole model).
        device: where Fishers are computed (default: the model's device).
        distributed, process_group: under ``torch.distributed`` (by default whenever a process group is
            initialised; ``distributed=False`` turns it off) each consolidation replaces the rank's Fisher by the
            ranks' mean weighted by their numbers of examples (batches for ``"empirical"``): one all-reduce, after
            which every rank holds the Fisher of all ranks' data and applies the same penalty.
        fisher_backend: ``"auto"`` (default) computes the Fisher with :func:`clfast.fisher` (one batched backward
            per batch, fused kernels) wherever it can: classif_logits diag, KFAC, dense and blockdiag on Linear,
            Conv2d and BatchNorm layers; and with nngeometry's ``FIM`` otherwise (EKFAC, the other variants,
            other layers, shared weights: a warning says so). ``"clfast"`` insists on clfast.fisher (ValueError
            where it cannot), ``"nngeometry"`` always takes ``FIM``. Both give the same matrix (to rounding), but
            for a loader with ``drop_last`` (clfast.fisher divides by the examples it saw, nngeometry by
            ``len(loader.sampler)``) and a BatchNorm whose ``eps`` is not 1e-5 (nngeometry uses 1e-5).

    Example::

        ewc = clfast.EWC(model, "kfac")
        ...train task 1...
        ewc.consolidate(loader)          # loader yields (x, y) or continuum's (x, y, t)
        loss = F.cross_entropy(model(x), y) + strength * ewc.penalty()
    """

    def __init__(self, model: nn.Module, representation: Union[str, type] = "diag", mode: str = "separate",
                 gamma: float = 1.0, variant: str = "classif_logits", layer_collection=None,
                 device: Optional[Union[str, torch.device]] = None, loss_fn=F.cross_entropy,
                 fisher_backend: str = "auto", distributed: Optional[bool] = None, process_group=None) -> None:
        self.representation = representation_name(representation)
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "empirical" and self.representation not in ("diag", "dense"):
            raise ValueError("variant='empirical' squares minibatch gradients: use representation 'diag' or "
                             f"'dense', not {self.representation!r}")
        if mode not in ("separate", "online"):
            raise ValueError(f"mode must be 'separate' or 'online', got {mode!r}")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.model, self.mode, self.gamma, self.variant = model, mode, float(gamma), variant
        self.loss_fn = loss_fn
        self.layers = Layers(model, layer_collection, "EWC" if self.representation not in ("kfac", "ekfac")
                             else f"EWC({self.representation!r})", kronecker=self.representation in ("kfac", "ekfac"))
        self.layer_collection = self.layers.collection
        self._rep = REPRESENTATIONS[self.representation]
        self.fisher_backend = checked_backend(fisher_backend, "EWC")
        self.distributed, self.process_group = _distributed.check(distributed, "EWC"), process_group
        self._use_clfast()  # fisher_backend="clfast" on a model clfast.fisher cannot take is refused now
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.fishers: list = []          # nngeometry objects, one per task (separate) or per consolidation
        self._coef: List[float] = []     # c_t: 1 (separate) or gamma^(age) (online)
        self._anchors: List[List[Tensor]] = []  # theta_t per task, in layer-collection parameter order
        self._fast: List[dict] = []      # per task: tensors for the fused ops, coefficient folded in

    def _use_clfast(self) -> bool:
        return self.variant != "empirical" and use_clfast(self.fisher_backend, self.layers, self.representation,
                                                          self.variant, "EWC")

    def parameters(self) -> List[Tensor]:
        """The regularised parameters, in nngeometry's order."""
        return self.layers.parameters()

    # -- tasks --------------------------------------------------------------------------------------------
    def consolidate(self, loader: Iterable) -> None:
        """Compute the Fisher at the current parameters on ``loader`` (model in eval mode) and store it with the
        parameters."""
        rep = pmat_classes()[self.representation]
        group = _distributed.group(self.distributed, self.process_group, "EWC")
        if group is not None and self.representation == "ekfac":
            raise ValueError("EWC: EKFAC's eigenbases cannot be averaged over ranks; use diag, kfac, dense or "
                             "blockdiag, or distributed=False")
        counted = _Counted(loader)
        was_training = self.model.training
        self.model.eval()  # nngeometry needs BatchNorm in eval mode; dropout off is right for a Fisher too
        try:
            if self.variant == "empirical":
                fisher = empirical_fisher(self.layers, counted, self.representation, self.loss_fn, self.device)
                weight = lambda: counted.batches  # noqa: E731  (it is a mean over minibatches)
            else:
                fisher = None
                if self._use_clfast():
                    fisher = fisher_or_none("EWC", self.fisher_backend, self.layers, lambda: clfast_fisher(
                        self.model, counted, self.representation, self.variant, self.layers.collection, self.device))
                    weight = lambda: counted.examples  # noqa: E731
                if fisher is None:  # nngeometry divides by the sampler's length
                    fisher = fim(self.model, loader, rep, self.variant, self.device, self.layers.collection)
                    weight = lambda: len(loader.sampler)  # noqa: E731
        finally:
            self.model.train(was_training)
        if group is not None:
            _distributed.fisher_mean_(fisher, float(weight()), group, "EWC")
        anchor = [p.detach().clone() for p in self.parameters()]
        if self.mode == "online":
            self._coef = [c * self.gamma for c in self._coef]
            self._anchors = [anchor for _ in self._anchors]
        self.fishers.append(fisher)
        self._coef.append(1.0)
        self._anchors.append(anchor)
        self._fast = [self._rep.prepare(self.layers, f, c, a) for f, c, a in zip(self.fishers, self._coef,
                                                                                self._anchors)]

    # -- penalty -----------------------------------------------------------------------------------------------
    @property
    def coefficients(self) -> List[float]:
        """``c_t`` of each stored Fisher: 1 in separate mode, ``gamma`` to the power of its age online."""
        return list(self._coef)

    def penalty(self) -> Tensor:
        """``sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)``, a 0-dim tensor differentiable in the params
        (0 before the first :meth:`consolidate`)."""
        params = self.parameters()
        if not self.fishers:
            return params[0].new_zeros(())
        self._check_params(params, "penalty")
        return self._rep.penalty(self.layers, self._fast, params)

    def _check_params(self, params: List[Tensor], where: str) -> None:
        """The consolidated state holds the parameters' dtype and device at consolidate(): a model converted or
        moved since then cannot be compared with it."""
        anchor = self._anchors[-1]
        for k, (p, a) in enumerate(zip(params, anchor)):
            if p.dtype != a.dtype or p.device != a.device:
                raise RuntimeError(f"EWC.{where}: the model's parameters are now {p.dtype} on {p.device}, but the "
                                   f"Fisher was computed for {a.dtype} on {a.device} at consolidate(); convert or move "
                                   "the model back, or create the EWC object (and consolidate) after converting it")

    def add_penalty_grad_(self, strength: float = 1.0) -> None:
        """Add ``strength * d penalty / d theta`` into the parameters' ``.grad`` without an autograd graph."""
        if not self.fishers:
            return
        params = self.parameters()
        self._check_params(params, "add_penalty_grad_")
        with torch.no_grad():
            self._rep.add_penalty_grad(self.layers, self._fast, params, self.layers.grads(), strength)

    # -- state -------------------------------------------------------------------------------------------------
    def state_dict(self) -> Dict:
        return {"representation": self.representation, "mode": self.mode, "gamma": self.gamma,
                "coef": list(self._coef), "anchors": [list(a) for a in self._anchors],
                "fishers": [f.data for f in self.fishers]}

    def load_state_dict(self, state: Dict) -> None:
        """Load :meth:`state_dict` output of an EWC on the same architecture (checked before anything changes)."""
        if state["representation"] != self.representation:
            raise ValueError(f"EWC.load_state_dict: state holds {state['representation']!r} Fishers, this EWC uses "
                             f"{self.representation!r}")
        shapes = [tuple(p.shape) for p in self.parameters()]
        for anchor in state["anchors"]:
            if [tuple(t.shape) for t in anchor] != shapes:
                raise ValueError("EWC.load_state_dict: the anchors' shapes do not match this model's parameters")
        rep = pmat_classes()[self.representation]
        self.fishers = [rep(generator=generator(self.layers), data=d) for d in state["fishers"]]
        self._coef = [float(c) for c in state["coef"]]
        self._anchors = [[t.to(self.device) for t in a] for a in state["anchors"]]
        self.mode, self.gamma = state["mode"], float(state["gamma"])
        self._fast = [self._rep.prepare(self.layers, f, c, a) for f, c, a in zip(self.fishers, self._coef,
                                                                                self._anchors)]


class _Counted:
    """A loader that counts the examples and batches it gives (each pass counts afresh)."""

    def __init__(self, loader: Iterable) -> None:
        self.loader, self.examples, self.batches = loader, 0, 0

    def __iter__(self):
        self.examples = self.batches = 0
        for batch in self.loader:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            self.examples += len(x)
            self.batches += 1
            yield batch

    def __len__(self) -> int:
        return len(self.loader)
