"""Continual Backpropagation (Dohare et al., "Loss of plasticity in deep continual learning", Nature 2024).

After each optimizer step, every hidden unit's utility is updated and a small fraction of mature,
low-utility units is re-initialised. The algorithm is the authors' generate-and-test (GnT) with CLArena's
hyperparameter names; a step performs no host synchronisation: how many units to replace depends only on
the units' ages, which the host tracks exactly, so selection (top-k) and re-initialisation run on the device.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import _distributed, ops

UTILITIES = ("contribution", "zero_contribution", "adaptable_contribution")

__all__ = ["CBP"]

_WEIGHTED = (nn.Linear, nn.Conv2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)
_GAINS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SELU: "selu", nn.LeakyReLU: "leaky_relu",
          nn.ELU: "relu", nn.GELU: "relu", nn.SiLU: "relu", nn.Mish: "relu", nn.ReLU6: "relu", nn.Softplus: "relu",
          nn.Hardtanh: "tanh", nn.Identity: "linear"}
INITS = ("kaiming", "default", "xavier", "lecun")


@dataclass
class _Layer:
    name: str
    layer: nn.Module
    next: nn.Module
    norm: Optional[nn.Module] = None
    feature: Optional[nn.Module] = None  # whose output is the unit's activation
    activation: Optional[nn.Module] = None
    bound: float = 0.0
    recent: Deque[Tuple[int, int]] = field(default_factory=deque)  # (step, units replaced), last maturity steps
    accumulated: float = 0.0
    replaced: int = 0

    @property
    def units(self) -> int:
        return self.layer.weight.shape[0]


def _fan(layer: nn.Module) -> Tuple[int, int]:
    w = layer.weight
    receptive = w[0][0].numel() if w.dim() > 2 else 1
    return w.shape[1] * receptive, w.shape[0] * receptive


def _bound(layer: nn.Module, activation: Optional[nn.Module], init: str) -> float:
    """Half-width of U(-b, b) for new incoming weights, as in GnT."""
    fan_in, fan_out = _fan(layer)
    name = next((g for cls, g in _GAINS.items() if isinstance(activation, cls)), "linear")
    if isinstance(activation, nn.SELU):
        init = "lecun"
    gain = nn.init.calculate_gain(name, getattr(activation, "negative_slope", None)) if name != "linear" else 1.0
    if init == "default":
        return math.sqrt(1 / fan_in)
    if init == "xavier":
        return gain * math.sqrt(6 / (fan_in + fan_out))
    if init == "lecun":
        return math.sqrt(3 / fan_in)
    return gain * math.sqrt(3 / fan_in)


def _leaves(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if len(list(m.children())) == 0]


def _describe(model: nn.Module, layer: nn.Module, nxt: nn.Module, init: str,
              feature: Optional[nn.Module] = None) -> _Layer:
    """Finds, between a layer and the next weighted layer, an optional norm and activation (in that order)."""
    leaves = _leaves(model)
    mods = [m for _, m in leaves]
    names = {id(m): n for n, m in leaves}
    if id(layer) not in names or id(nxt) not in names:
        raise ValueError("CBP: every layer and next layer must be a submodule of the model")
    norm = act = None
    start, stop = mods.index(layer), mods.index(nxt)
    if stop <= start:
        raise ValueError(f"CBP: layer '{names[id(nxt)]}' does not come after '{names[id(layer)]}'")
    found = layer
    for m in mods[start + 1:stop]:
        if isinstance(m, _NORMS) and act is None and norm is None:
            norm = found = m
        elif isinstance(m, tuple(_GAINS)) and act is None:
            act = found = m
        else:
            break
    if isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) != (layer.weight.shape[0],):
        raise ValueError(f"CBP: LayerNorm after '{names[id(layer)]}' must normalise over its "
                         f"{layer.weight.shape[0]} units, got normalized_shape {tuple(norm.normalized_shape)}")
    return _Layer(names[id(layer)], layer, nxt, norm, feature or found, act, _bound(layer, act, init))


class CBP:
    """Continual Backpropagation for an ``nn.Sequential``-style MLP or ConvNet.

    Call :meth:`step` after ``optimizer.step()``. Activations are captured by forward hooks during training
    forwards (or passed to ``step(activations)``, keyed by layer name, as CLArena does).

    Args:
        model: the network; without ``layers``, consecutive Linear/Conv2d leaves in registration order form the
            (layer, next layer) pairs, with an optional BatchNorm/LayerNorm and activation in between. A Conv2d
            may feed a Linear through a flatten.
        replacement_rate: fraction of eligible units replaced per step (accumulated; its integer part replaced).
        maturity_threshold: steps a unit must have lived before it can be replaced.
        utility_decay_rate: decay ``eta`` of the utility and activation-mean averages.
        utility: ``"contribution"`` (mean|h| * sum_k |W_next[k, i]|), ``"zero_contribution"`` (|h - mean|
            instead of |h|) or ``"adaptable_contribution"`` (zero contribution / mean |W_cur[i, :]|).
        init: bound of the new incoming weights U(-b, b): ``"kaiming"``, ``"default"``, ``"xavier"``, ``"lecun"``.
        optimizer: if given, the replaced units' moments (Adam ``exp_avg``/``exp_avg_sq``, SGD
            ``momentum_buffer``) are zeroed. Adam's per-tensor ``step`` is left alone.
        layers: explicit ``(layer, next_layer)`` or ``(layer, next_layer, feature_module)`` pairs (modules or
            names); the activation is the feature module's output (default: as found between the two).
        generator: ``torch.Generator`` for the new weights (on the model's device).
        distributed, process_group: under ``torch.distributed`` (by default whenever a process group is
            initialised; ``distributed=False`` turns it off) each step averages the utilities and activation means
            over the group's ranks, weighted by their batch sizes (one all-reduce), and every rank takes the new
            weights its first rank drew (one broadcast per step that replaces units), so the ranks of a DDP model
            replace the same units with the same weights and stay identical.
    """

    def __init__(self, model: nn.Module, replacement_rate: float = 1e-4, maturity_threshold: int = 100,
                 utility_decay_rate: float = 0.99, utility: str = "contribution", init: str = "kaiming",
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 layers: Optional[Sequence[Sequence[Union[str, nn.Module]]]] = None,
                 generator: Optional[torch.Generator] = None, distributed: Optional[bool] = None,
                 process_group=None) -> None:
        if not 0 <= replacement_rate <= 1:
            raise ValueError(f"replacement_rate must be in [0, 1], got {replacement_rate}")
        if int(maturity_threshold) != maturity_threshold or maturity_threshold < 0:
            raise ValueError(f"maturity_threshold must be a non-negative integer, got {maturity_threshold}")
        if not 0 <= utility_decay_rate < 1:
            raise ValueError(f"utility_decay_rate must be in [0, 1), got {utility_decay_rate}")
        if utility not in UTILITIES:
            raise ValueError(f"utility must be one of {UTILITIES}, got {utility!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        self.model, self.optimizer, self.generator = model, optimizer, generator
        self.distributed, self.process_group = _distributed.check(distributed, "CBP"), process_group
        self._group = None  # the step's process group, for its replacements
        self.replacement_rate, self.maturity_threshold = float(replacement_rate), int(maturity_threshold)
        self.utility_decay_rate, self.utility, self.init = float(utility_decay_rate), utility, init
        self._layers = self._pairs(model, layers, init)
        ref = self._layers[0].layer.weight
        zeros = lambda L: torch.zeros(L.units, dtype=ref.dtype, device=ref.device)  # noqa: E731
        self.utilities = [zeros(L) for L in self._layers]
        self.means = [zeros(L) for L in self._layers]
        self.ages = [zeros(L) for L in self._layers]
        self.steps = 0
        self._captured: Dict[str, Tensor] = {}
        self._hooks = [L.feature.register_forward_hook(self._capture(L.name)) for L in self._layers]

    @staticmethod
    def _pairs(model, layers, init) -> List[_Layer]:
        modules = dict(model.named_modules())
        resolve = lambda m: modules[m] if isinstance(m, str) else m  # noqa: E731
        if layers is None:
            weighted = [m for _, m in _leaves(model) if isinstance(m, _WEIGHTED)]
            if len(weighted) < 2:
                raise ValueError("CBP needs at least one Linear/Conv2d hidden layer followed by another one; "
                                 f"found {len(weighted)} weighted layer(s)")
            out = [_describe(model, a, b, init) for a, b in zip(weighted[:-1], weighted[1:])]
        else:
            out = []
            for pair in layers:
                parts = [resolve(m) for m in pair]
                if len(parts) not in (2, 3) or not all(isinstance(m, _WEIGHTED) for m in parts[:2]):
                    raise ValueError("CBP: layers must hold (layer, next_layer[, feature_module]) with Linear or "
                                     f"Conv2d layers, got {pair!r}")
                out.append(_describe(model, parts[0], parts[1], init, parts[2] if len(parts) == 3 else None))
        for L in out:
            if L.layer.weight.untyped_storage().data_ptr() == L.next.weight.untyped_storage().data_ptr():
                raise ValueError(f"CBP: '{L.name}' and the layer after it share their weight storage (tied "
                                 "weights); replacing a unit would rewrite both")
            units, per_row = L.units, L.next.weight[0].numel()
            if per_row % units:
                raise ValueError(f"CBP: layers do not chain: '{L.name}' has {units} units but the next layer "
                                 f"takes {per_row} inputs per output (not a multiple of {units})")
        return out

    def _capture(self, name: str):
        def hook(module, inputs, output):
            if self.model.training:
                self._captured[name] = output.detach()
        return hook

    def remove(self) -> None:
        """Remove the forward hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @property
    def layer_names(self) -> List[str]:
        return [L.name for L in self._layers]

    # -- the step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, activations: Optional[Mapping[str, Tensor]] = None) -> None:
        """Update utilities and replace units; call after ``optimizer.step()``.

        Args:
            activations: ``{layer name: [B, units, ...]}``; default: those captured in the last training forward.
        """
        source = self._captured if activations is None else activations
        missing = [L.name for L in self._layers if L.name not in source]
        if missing:
            hint = ("run a training-mode forward pass before each step" if activations is None
                    else f"expected keys {self.layer_names}")
            raise RuntimeError(f"CBP.step: no activations for layer(s) {missing}; {hint}")
        dtype = self.utilities[0].dtype  # activations under autocast come in half precision
        feats = [source[L.name].detach().to(dtype) for L in self._layers]
        group = _distributed.group(self.distributed, self.process_group, "CBP")
        ops.cbp_update_(self.utilities, self.means, self.ages, feats, [L.next.weight.detach() for L in self._layers],
                         [L.layer.weight.detach() for L in self._layers], self.utility_decay_rate,
                         self.utility)
        if group is not None:  # the same decayed averages as one process on the global batch
            _distributed.weighted_mean_(self.utilities + self.means, float(feats[0].shape[0]), group)
        self._group = group
        self._captured = {}
        steps = self.steps + 1
        # Counts first, bookkeeping after the replacements: a failed call leaves the host state as it was.
        plans = [self._count(L, steps) for L in self._layers]
        for k, (L, (count, _, _)) in enumerate(zip(self._layers, plans)):
            if count:
                self._replace(k, L, count)
        self.steps = steps
        for L, (count, accumulated, recent) in zip(self._layers, plans):
            L.accumulated, L.recent = accumulated - count, recent
            if count:
                L.recent.append((steps, count))
                L.replaced += count

    def _count(self, L: _Layer, t: int) -> Tuple[int, float, deque]:
        """Units to replace at step ``t``, with the layer's new accumulator and recent-replacement window (not yet
        stored): eligible units are those not replaced in the last maturity_threshold steps."""
        mt = self.maturity_threshold
        recent = deque(L.recent)
        while recent and recent[0][0] < t - mt:
            recent.popleft()
        if t <= mt:
            return 0, L.accumulated, recent
        eligible = L.units - sum(c for _, c in recent)
        if eligible <= 0:
            return 0, L.accumulated, recent
        accumulated = L.accumulated + self.replacement_rate * eligible
        return min(int(accumulated), eligible), accumulated, recent

    def _replace(self, k: int, L: _Layer, count: int) -> None:
        u, m, a = self.utilities[k], self.means[k], self.ages[k]
        w = L.layer.weight
        new = torch.empty(count, w[0].numel(), dtype=w.dtype, device=w.device).uniform_(
            -L.bound, L.bound, generator=self.generator)
        if self._group is not None:  # every rank draws (its generator moves on alike), the first rank's are kept
            _distributed.broadcast_(new, self._group)
        bias = lambda mod: mod.bias.detach() if getattr(mod, "bias", None) is not None else None  # noqa: E731
        index = ops.cbp_replace_(w.detach(), bias(L.layer), L.next.weight.detach(), bias(L.next), u, m, a, new,
                                  self.utility_decay_rate, self.maturity_threshold)
        if L.norm is not None:
            if getattr(L.norm, "weight", None) is not None:
                L.norm.weight.detach().index_fill_(0, index, 1.0)
            if getattr(L.norm, "bias", None) is not None:
                L.norm.bias.detach().index_fill_(0, index, 0.0)
            if getattr(L.norm, "running_mean", None) is not None:
                L.norm.running_mean.index_fill_(0, index, 0.0)
                L.norm.running_var.index_fill_(0, index, 1.0)
        if self.optimizer is not None:
            self._reset_optimizer(L, index)

    def _reset_optimizer(self, L: _Layer, index: Tensor) -> None:
        units = L.units
        targets = [(L.layer.weight, 0), (getattr(L.layer, "bias", None), 0), (L.next.weight, 1)]
        if L.norm is not None:
            targets += [(getattr(L.norm, "weight", None), 0), (getattr(L.norm, "bias", None), 0)]
        for p, dim in targets:
            state = self.optimizer.state.get(p) if p is not None else None
            for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                buf = state.get(key) if state else None
                if isinstance(buf, Tensor) and buf.shape == p.shape:
                    if dim == 0 or buf.dim() > 2 or buf.shape[1] == units:  # any memory format
                        buf.index_fill_(dim, index, 0.0)
                    else:  # a Linear after a flatten: the unit's group of columns
                        buf.view(buf.shape[0], units, -1).index_fill_(1, index, 0.0)

    # -- state ------------------------------------------------------------------------------------------------------
    def stats(self) -> Dict[str, int]:
        """Units replaced so far, per layer."""
        return {L.name: L.replaced for L in self._layers}

    def state_dict(self) -> dict:
        """Unit statistics, the host's replacement bookkeeping and, when given, the generator's state."""
        return {"steps": self.steps,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "layers": {L.name: {"utility": u.clone(), "mean": m.clone(), "age": a.clone(),
                                    "accumulated": L.accumulated, "recent": list(L.recent), "replaced": L.replaced}
                           for L, u, m, a in zip(self._layers, self.utilities, self.means, self.ages)}}

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict` output; everything is checked before anything changes."""
        layers = state.get("layers", {})
        if sorted(layers) != sorted(self.layer_names):
            raise KeyError(f"CBP.load_state_dict: expected layers {self.layer_names}, got {sorted(layers)}")
        for L in self._layers:
            for key in ("utility", "mean", "age"):
                t = layers[L.name].get(key)
                if not isinstance(t, Tensor) or tuple(t.shape) != (L.units,):
                    raise ValueError(f"CBP.load_state_dict: layers['{L.name}']['{key}'] must be a tensor of shape "
                                     f"[{L.units}]")
        self.steps = int(state["steps"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
        for L, u, m, a in zip(self._layers, self.utilities, self.means, self.ages):
            s = layers[L.name]
            u.copy_(s["utility"]), m.copy_(s["mean"]), a.copy_(s["age"])
            L.accumulated, L.replaced = float(s["accumulated"]), int(s["replaced"])
            L.recent = deque((int(t), int(c)) for t, c in s["recent"])
