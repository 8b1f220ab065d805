"""OCAR: replay whose gradient is preconditioned by the Fisher of the replayed + current data
(Urettini & Carta, arXiv 2502.01866).

Each :meth:`OCAR.step` trains on the current batch plus an equal-size sample of the buffer and replaces the
gradient ``g`` by ``(F + damping I)^{-1} g``:

* ``fisher="exact"``: ``F`` is nngeometry's FIM on that union batch (by :func:`clfast.fisher` where it can, by
  nngeometry otherwise: ``fisher_backend``), in eval mode, so a BatchNorm uses its running statistics (the
  nngeometry OCAR step computes it in the model's mode; the same for a model without BatchNorm or dropout);
  the solve follows nngeometry's conventions (KFAC's pi-damping
  ``(G + sqrt(d)/pi I)^{-1} V (A + sqrt(d) pi I)^{-1}``), so the result equals
  ``F.solve(PVector.from_model_grad(model), regul=damping)``.
* ``fisher="ema"`` (KFAC): the Kronecker factors come from hooks on the step's own forward and one extra
  backward of labels sampled from the model (an unbiased estimate of nngeometry's true-Fisher factors, with its
  scaling), are averaged with decay ``ema_decay`` and inverted every ``refresh`` steps; a step then costs two
  small GEMMs per layer (``kron_mv``).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _distributed, ops
from .buffer import ReservoirBuffer
from ._fisher import (add_kfac_factors_, checked_backend, dan_parts, eval_mode, fisher as clfast_fisher,
                      fisher_or_none, use_clfast)
from ._nngeometry import DANBlock, Layers, fim, pmat_classes

__all__ = ["OCAR"]


def kfac_inverse(a: Tensor, g: Tensor, damping: float) -> Tuple[Tensor, Tensor]:
    """Inverses of nngeometry's pi-damped KFAC factors: ``(A + sqrt(d) pi I)^-1``, ``(G + sqrt(d)/pi I)^-1``."""
    pi = torch.sqrt(torch.trace(a) / torch.trace(g) * (g.shape[0] / a.shape[0]))  # a tensor: no host sync
    eye_a, eye_g = torch.eye(a.shape[0], dtype=a.dtype, device=a.device), torch.eye(g.shape[0], dtype=g.dtype,
                                                                                     device=g.device)
    return (torch.cholesky_inverse(torch.linalg.cholesky(a + (math.sqrt(damping) * pi) * eye_a)),
            torch.cholesky_inverse(torch.linalg.cholesky(g + (math.sqrt(damping) / pi) * eye_g)))


class OCAR:
    """Fisher-preconditioned replay.

    Args:
        model: the network (Linear / Conv2d layers and ``clfast.nn`` DAN layers; the same layer collection as
            :class:`clfast.EWC`).
        buffer: a :class:`clfast.ReservoirBuffer` holding ``(x, y)``; each step adds the current batch to it.
        optimizer: applied to the preconditioned gradient.
        representation: ``"kfac"``, ``"diag"`` or ``"dense"`` (``"ema"`` needs ``"kfac"``).
        damping: Tikhonov damping ``d`` of the solve.
        fisher: ``"exact"`` or ``"ema"``.
        ema_decay, refresh: EMA decay of the factors, and how often (in steps) they are re-inverted.
        loss_fn: training loss ``loss_fn(model(x), y)``.
        generator: for the labels sampled in ema mode.
        fisher_backend: who computes the exact mode's Fisher: ``"auto"`` (default) :func:`clfast.fisher` where it
            can (Linear, Conv2d, BatchNorm layers) and nngeometry's ``FIM`` otherwise; ``"clfast"`` or
            ``"nngeometry"`` to choose.
        distributed, process_group: under ``torch.distributed`` (by default whenever a process group is
            initialised; ``distributed=False`` turns it off) the Fisher is that of all ranks' batches: ema mode
            averages each step's factors over the ranks (weighted by batch size, one all-reduce), exact mode the
            union batch's Fisher, so every rank preconditions with the same matrix. Each rank keeps its own buffer.
    """

    def __init__(self, model: nn.Module, buffer: ReservoirBuffer, optimizer: torch.optim.Optimizer,
                 representation: str = "kfac", damping: float = 1e-2, fisher: str = "exact",
                 ema_decay: float = 0.95, refresh: int = 10,
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                 generator: Optional[torch.Generator] = None, fisher_backend: str = "auto",
                 distributed: Optional[bool] = None, process_group=None) -> None:
        if representation not in ("kfac", "diag", "dense"):
            raise ValueError(f"representation must be 'kfac', 'diag' or 'dense', got {representation!r}")
        if fisher not in ("exact", "ema"):
            raise ValueError(f"fisher must be 'exact' or 'ema', got {fisher!r}")
        if fisher == "ema" and representation != "kfac":
            raise ValueError("fisher='ema' keeps Kronecker factors: use representation='kfac' (or fisher='exact')")
        if not damping > 0:
            raise ValueError(f"damping must be > 0, got {damping}")
        if not 0 <= ema_decay < 1 or int(refresh) != refresh or refresh < 1:
            raise ValueError("ema_decay must be in [0, 1) and refresh a positive integer")
        self.model, self.buffer, self.optimizer = model, buffer, optimizer
        self.representation, self.damping, self.fisher = representation, float(damping), fisher
        self.ema_decay, self.refresh, self.loss_fn, self.generator = float(ema_decay), int(refresh), loss_fn, generator
        self.layers = Layers(model, None, "OCAR" if representation != "kfac" else "OCAR('kfac')",
                             kronecker=representation == "kfac")
        self.fisher_backend = checked_backend(fisher_backend, "OCAR")
        self.distributed, self.process_group = _distributed.check(distributed, "OCAR"), process_group
        self._fim_only = False  # set once clfast.fisher has refused the model (auto)
        self._use_clfast()  # fisher_backend="clfast" on a model clfast.fisher cannot take is refused now
        self.steps = 0
        self.factors: Dict[str, List[Tensor]] = {}   # layer id -> [A, G] (ema mode)
        self._inverses: Optional[Tuple[List[Tensor], List[Tensor]]] = None
        self._hooks: list = []
        self._collecting = False  # hooks record only inside forward()
        self._inputs: Dict[str, Tensor] = {}
        self._outputs: Dict[str, Tensor] = {}
        if fisher == "ema":
            dan = {}
            for lid, mod in self.layers.modules.items():
                if isinstance(mod, DANBlock):
                    dan[mod.name] = mod.layer
                else:
                    self._hooks.append(mod.register_forward_hook(self._capture(lid)))
            self._hooks += [layer.register_forward_hook(self._capture_dan(name)) for name, layer in dan.items()]

    def _use_clfast(self) -> bool:
        return self.fisher == "exact" and not self._fim_only and use_clfast(
            self.fisher_backend, self.layers, self.representation, "classif_logits", "OCAR")

    def _capture(self, lid: str):
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and self._collecting:
                self._inputs[lid], self._outputs[lid] = inputs[0].detach(), output
        return hook

    def _capture_dan(self, name: str):
        """A DAN layer's fused forward gives no access to its neurons' parts: while recording, the rest of the
        network runs on its recomputation (:func:`clfast._fisher.dan_parts`), whose parts the factors read."""
        def hook(module, inputs, output):
            if torch.is_grad_enabled() and self._collecting:
                out, parts = dan_parts(module, inputs[0])
                for index, (x, y) in parts.items():
                    self._inputs[(name, index)], self._outputs[(name, index)] = x, y
                return out
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    # -- the training step -----------------------------------------------------------------------------------
    def step(self, x: Tensor, y: Tensor) -> Tensor:
        """One replay step on ``x [B, ...]``, ``y [B]`` plus ``B`` buffer items; returns the (detached) loss.
        A batch the model or the loss refuses raises with the buffer, its generator and the factors unchanged."""
        if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
            raise ValueError(f"OCAR.step: x and y need the same leading batch size, got {list(x.shape)} and "
                             f"{list(y.shape)}")
        if self.buffer.storage:  # the buffer's own checks of the batch, before the step (it joins at the end)
            self.buffer.add(x[:0], y[:0])
        generator = self.buffer.generator
        drawn_from = generator.get_state() if generator is not None else None
        try:
            xs, ys = self.replay(x, y)
            out = self._model_forward(xs)
            loss = self.loss_fn(out, ys)
        except Exception:
            if drawn_from is not None:  # the replayed items are drawn again next time
                generator.set_state(drawn_from)
            raise
        if self.fisher == "ema":
            self._update_factors(out)
        self.optimizer.zero_grad()
        loss.backward()
        self.precondition_(xs, ys)
        self.optimizer.step()
        self.end_step(x, y)
        return loss.detach()

    def end_step(self, x: Tensor, y: Tensor, *extras: Tensor) -> None:
        """After the optimizer step: the current batch (with any extra fields the buffer stores, such as task
        labels) joins the buffer; the factor refresh clock ticks."""
        self.buffer.add(x, y, *extras)
        self.steps += 1

    def replay(self, x: Tensor, y: Tensor, *extras: Tensor) -> Tuple[Tensor, ...]:
        """The batch with as many buffer items appended (the batch alone while the buffer is empty), one tensor
        per field: ``x``, ``y`` and the extras."""
        fields = (x, y, *extras)
        if not len(self.buffer):
            return fields
        stored = self.buffer.storage
        if len(stored) != len(fields) or any(f.shape[1:] != s.shape[1:] for f, s in zip(fields, stored)):
            raise ValueError(f"OCAR: a batch of items {[list(f.shape[1:]) for f in fields]} cannot be replayed with "
                             f"the buffer's {[list(s.shape[1:]) for s in stored]}")
        drawn = self.buffer.sample(x.shape[0])
        return tuple(torch.cat([f, b.to(f.device)]) for f, b in zip(fields, drawn))

    def forward(self, xs: Tensor, module: Optional[nn.Module] = None) -> Tensor:
        """``model(xs)``; in ema mode also updates the running Kronecker factors from this forward. ``module``
        runs the forward instead of the model, e.g. its ``DistributedDataParallel`` wrapper."""
        out = self._model_forward(xs, module)
        if self.fisher == "ema":
            self._update_factors(out)
        return out

    def record_forward(self) -> None:
        """For a training loop that calls the model itself: the model's next forward is recorded, and
        :meth:`recorded` must follow it (ema mode; nothing happens in exact mode)."""
        self._collecting = self.fisher == "ema"

    def recorded(self, out: Tensor) -> None:
        """After the forward that :meth:`record_forward` announced, with its output: updates the running factors."""
        if self._collecting:
            self._collecting = False
            self._update_factors(out)

    def _model_forward(self, xs: Tensor, module: Optional[nn.Module] = None) -> Tensor:
        self.record_forward()
        try:
            return (self.model if module is None else module)(xs)
        finally:
            self._collecting = False

    def precondition_(self, x: Optional[Tensor] = None, y: Optional[Tensor] = None) -> None:
        """Replace the parameters' ``.grad`` by ``(F + damping I)^{-1} .grad``; exact mode computes ``F`` on
        ``(x, y)``, ema mode uses the running factors."""
        grads = self.layers.grads()
        if self.fisher == "ema":
            if self._inverses is None or self.steps % self.refresh == 0:
                self._invert([self.factors[lid] for lid in self.layers.modules])
            self._apply_kfac(grads, *self._inverses)
            return
        if x is None:
            raise ValueError("OCAR.precondition_: exact mode needs the batch (x, y) the Fisher is computed on")
        fisher = None
        if self._use_clfast():
            fisher = fisher_or_none("OCAR", self.fisher_backend, self.layers, lambda: clfast_fisher(
                self.model, [(x,)], self.representation, layer_collection=self.layers.collection, device=x.device))
            self._fim_only = fisher is None
        if fisher is None:  # in eval mode, as clfast.fisher computes it (BatchNorm on its running statistics)
            loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(x))
            with eval_mode(self.model):
                fisher = fim(self.model, loader, pmat_classes()[self.representation], "classif_logits", x.device,
                             self.layers.collection)
        group = _distributed.group(self.distributed, self.process_group, "OCAR")
        if group is not None:  # the Fisher of the ranks' union batches together
            _distributed.fisher_mean_(fisher, float(len(x)), group, "OCAR")
        if self.representation == "kfac":
            self._invert([fisher.data[lid] for lid in self.layers.modules])
            self._apply_kfac(grads, *self._inverses)
            return
        with torch.no_grad():
            flat = torch.cat([g.reshape(-1) for g in grads])
            if self.representation == "diag":
                flat = flat / (fisher.data + self.damping)
            else:
                eye = torch.eye(len(flat), dtype=flat.dtype, device=flat.device)
                flat = torch.linalg.solve(fisher.data + self.damping * eye, flat)
            for g, part in zip(grads, torch.split(flat, [g.numel() for g in grads])):
                g.copy_(part.view_as(g))

    def _invert(self, factors: List) -> None:
        inv = [kfac_inverse(a, g, self.damping) for a, g in factors]
        self._inverses = ([a for a, _ in inv], [g for _, g in inv])

    @torch.no_grad()
    def _apply_kfac(self, grads: List[Tensor], a_inv: List[Tensor], g_inv: List[Tensor]) -> None:
        blocks = self.layers.matrices(grads)
        solved = ops.kron_mv(blocks[0].new_ones(()), a_inv, g_inv, blocks)
        for g in grads:
            g.zero_()
        self.layers.scatter(solved, grads)

    # -- ema factors ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _batch_factors(self, lid: str, x: Tensor, gy: Tensor, n_out: int) -> Tuple[Tensor, Tensor]:
        """nngeometry's KFAC factors of one batch: A = sqrt(K) sum x x^T / n, G = sum g g^T / (sqrt(K) n)."""
        mod = self.layers.modules[lid]
        if isinstance(mod, DANBlock) and mod.kind in ("scale", "shift"):  # a DAN BatchNorm's weight or bias
            g = gy * x if mod.kind == "scale" else gy
            return x.new_ones(1, 1), torch.diag((g * g).sum(0) / x.shape[0])
        n, size_a, k = x.shape[0], mod.weight[0].numel() + (mod.bias is not None), math.sqrt(n_out)
        a, g = x.new_zeros(size_a, size_a), gy.new_zeros(gy.shape[1], gy.shape[1])
        add_kfac_factors_(a, g, mod, x, gy, k / n, 1 / (k * n))
        return a, g

    def _update_factors(self, out: Tensor) -> None:
        # labels from the model's own predictive distribution: E[g g^T] is the true Fisher's G factor
        with torch.no_grad():
            try:
                sampled = torch.multinomial(torch.softmax(out.detach().float(), 1), 1, generator=self.generator)[:, 0]
            except RuntimeError as exc:  # multinomial checks its input anyway: no extra sync to find out
                raise FloatingPointError("OCAR: the model's outputs are not finite (training diverged); lower the "
                                         "learning rate or raise damping") from exc
        modules = self.layers.modules
        keys = {lid: (mod.name, mod.index) if isinstance(mod, DANBlock) else lid for lid, mod in modules.items()}
        targets = list(dict.fromkeys(keys.values()))  # a DAN layer's part once for all its neurons
        mc_loss = F.cross_entropy(out, sampled, reduction="sum")
        grads = dict(zip(targets, torch.autograd.grad(mc_loss, [self._outputs[t] for t in targets],
                                                      retain_graph=True)))
        n_out = out.shape[1] - 1  # nngeometry's whitened outputs for classif_logits
        d = self.ema_decay if self.factors else 0.0
        batch = {}
        for lid, key in keys.items():
            x, gy = self._inputs[key], grads[key]
            if isinstance(modules[lid], DANBlock):  # [N, B, C]: this neuron's
                x, gy = x[modules[lid].neuron], gy[modules[lid].neuron]
            batch[lid] = self._batch_factors(lid, x, gy, n_out)
        group = _distributed.group(self.distributed, self.process_group, "OCAR")
        if group is not None:  # the factors of the ranks' batches together, on every rank
            _distributed.weighted_mean_([t for pair in batch.values() for t in pair], float(out.shape[0]), group)
        for lid, (a, g) in batch.items():
            if lid in self.factors:
                self.factors[lid][0].mul_(d).add_(a, alpha=1 - d)
                self.factors[lid][1].mul_(d).add_(g, alpha=1 - d)
            else:
                self.factors[lid] = [a, g]
        self._inputs, self._outputs = {}, {}
