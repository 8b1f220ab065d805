"""Deep Artificial Neuron (DAN) layers on fused ops.

A DAN layer is N small MLPs ("neurons", each ``BN -> Linear -> act -> BN -> Linear -> act -> Linear``) reading
the same input. The per-neuron DAN implementation (``clfast.baselines.dan``) runs them as a Python loop of
``nn.Sequential``; here each layer keeps its
parameters stacked (``[N, ...]``) and runs as one op call (``clfast::dan_layer``: the fused forward, its
running-statistics update, and one fused backward through C++ autograd): the first Linear of all neurons is one
GEMM, the others are batched over neurons, and BatchNorm and the activation are folded into the passes around
them.

``Neuron``, ``DANLayer`` and ``DAN`` take the per-neuron modules' constructor arguments, draw the same initial
parameters from the same seed, and compute the same outputs, gradients and BatchNorm running statistics.
``from_reference`` / ``to_reference`` convert from and to the per-neuron modules, and ``load_state_dict``
accepts the per-neuron layout (``neurons.{i}.core.{0..6}.*``).

``VECDAN`` is the paper's network (Camp, Mandivarapu, Estrada, arXiv 2011.07035): one neuron "phenotype" shared
by every neuron, and vectorised synapses that give each neuron its own input vector mixed from all outputs of
the previous layer. It runs on the same fused op.

``sync_batchnorm=True`` (like ``nn.SyncBatchNorm``) makes every BatchNorm of these modules use the statistics of
the global batch of a ``torch.distributed`` group in train mode; see :class:`DANLayer`.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from .. import _distributed, ops
from ..reference.dan import _linear

__all__ = ["Neuron", "DANLayer", "DAN", "VECDAN", "activation_name"]

PARAMS = ("bn1_weight", "bn1_bias", "weight1", "bias1", "bn2_weight", "bn2_bias", "weight2", "bias2", "weight3",
          "bias3")
STATS = ("bn1_running_mean", "bn1_running_var", "bn1_num_batches_tracked", "bn2_running_mean", "bn2_running_var",
         "bn2_num_batches_tracked")
# Our name -> (index in the per-neuron Neuron.core, attribute there).
_SEED_NAMES = {
    "bn1_weight": (0, "weight"), "bn1_bias": (0, "bias"), "bn1_running_mean": (0, "running_mean"),
    "bn1_running_var": (0, "running_var"), "bn1_num_batches_tracked": (0, "num_batches_tracked"),
    "weight1": (1, "weight"), "bias1": (1, "bias"),
    "bn2_weight": (3, "weight"), "bn2_bias": (3, "bias"), "bn2_running_mean": (3, "running_mean"),
    "bn2_running_var": (3, "running_var"), "bn2_num_batches_tracked": (3, "num_batches_tracked"),
    "weight2": (4, "weight"), "bias2": (4, "bias"), "weight3": (6, "weight"), "bias3": (6, "bias"),
}


def activation_name(act: nn.Module) -> Optional[str]:
    """The native kernels' name for ``act`` (exact module types only), or None when it has no fused kernel."""
    kind = type(act)
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act.approximate)
    return {nn.Identity: "identity", nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}.get(kind)


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _init_params(module: nn.Module, n: int, ni: int, nf: int, no: int, bias: bool) -> None:
    """Registers the stacked parameters, drawn like n per-neuron Neurons in a row (same generator calls, same order)."""
    shapes = {"bn1_weight": (n, ni), "bn1_bias": (n, ni), "weight1": (n, nf, ni), "bias1": (n, nf),
              "bn2_weight": (n, nf), "bn2_bias": (n, nf), "weight2": (n, nf, nf), "bias2": (n, nf),
              "weight3": (n, no, nf), "bias3": (n, no)}
    for name in PARAMS:
        if name.startswith("bias") and not bias:
            module.register_parameter(name, None)
        else:
            module.register_parameter(name, nn.Parameter(torch.empty(shapes[name])))
    with torch.no_grad():
        module.bn1_weight.fill_(1.0)
        module.bn1_bias.zero_()
        module.bn2_weight.fill_(1.0)
        module.bn2_bias.zero_()
        for i in range(n):  # nn.Linear.reset_parameters of lin1, lin2, lin3 of neuron i
            for k in (1, 2, 3):
                w = getattr(module, f"weight{k}")[i]
                nn.init.kaiming_uniform_(w, a=math.sqrt(5))
                b = getattr(module, f"bias{k}")
                if b is not None:
                    bound = 1 / math.sqrt(w.shape[1])
                    nn.init.uniform_(b[i], -bound, bound)


def _init_stats(module: nn.Module, n: int, ni: int, nf: int) -> None:
    module.register_buffer("bn1_running_mean", torch.zeros(n, ni))
    module.register_buffer("bn1_running_var", torch.ones(n, ni))
    module.register_buffer("bn1_num_batches_tracked", torch.zeros(n, dtype=torch.long))
    module.register_buffer("bn2_running_mean", torch.zeros(n, nf))
    module.register_buffer("bn2_running_var", torch.ones(n, nf))
    module.register_buffer("bn2_num_batches_tracked", torch.zeros(n, dtype=torch.long))


def _check_input(x: Tensor, n: int, ni: int, like: Tensor, training: bool, where: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{where}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() == 2:
        if x.shape[1] != ni:
            raise ValueError(f"input dimension ({x.shape[1]}) do not match neuron input dimension ({ni})")
    elif not (x.dim() == 3 and x.shape[0] == n and x.shape[2] == ni):
        raise ValueError(f"{where}: expected an input [batch, {ni}] (or [{n}, batch, {ni}], one per neuron), got "
                         f"shape {list(x.shape)}")
    if like.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{where}: parameters must be float32 or float64, got {like.dtype}")
    if x.dtype != like.dtype:
        raise TypeError(f"{where}: expected a {like.dtype} input like the layer's parameters, got {x.dtype}")
    if x.device != like.device:
        raise ValueError(f"{where}: the input is on {x.device} but the layer is on {like.device}")
    if training and x.shape[-2] == 0:
        raise ValueError(f"{where}: an empty batch has no batch statistics in train mode (nn.BatchNorm1d would "
                         "turn the running statistics into NaN)")
    if training and x.shape[-2] == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _params(module: nn.Module) -> List[Optional[Tensor]]:
    # Straight from the module's dict: nn.Module.__getattr__ costs ~0.5 us per name, 10 us per layer call.
    table = module._parameters
    try:
        return [table[k] for k in PARAMS]
    except KeyError:  # parametrized (torch.nn.utils.parametrize, weight_norm): attributes computed on access
        return [getattr(module, k) for k in PARAMS]


def _stats(module: nn.Module) -> List[Tensor]:
    table = module._buffers
    try:
        return [table[k] for k in STATS]
    except KeyError:
        return [getattr(module, k) for k in STATS]


def _check_sync(sync_batchnorm, who: str) -> bool:
    if not isinstance(sync_batchnorm, bool):
        raise ValueError(f"{who}: sync_batchnorm must be True or False, got {sync_batchnorm!r}")
    return sync_batchnorm


class _GroupStats(torch.autograd.Function):
    """This rank's BatchNorm statistics (``mean`` and centred sum of squares ``m2``, [G, C], of ``count``
    examples) -> the group's (mean, centred sum of squares, number of examples), combined from every rank's as
    torch's ``batch_norm_gather_stats_with_counts`` does (no raw sum of squares, so no cancellation).

    Forward: one all_gather of ``2 * G * C + 1`` values per rank, combined in rank order on every rank (so every
    rank gets the same bits). Backward: one all-reduce (sum) of ``2 * G * C`` values, the gradients of the group's
    statistics from every rank's loss, as ``nn.SyncBatchNorm``'s backward all-reduces its gradient sums."""

    @staticmethod
    def forward(ctx, mean: Tensor, m2: Tensor, count: int, group) -> Tuple[Tensor, Tensor, Tensor]:
        k = mean.numel()
        local = torch.cat([mean.new_full((1,), float(count)), mean.reshape(-1), m2.reshape(-1)])
        every = local.new_empty(torch.distributed.get_world_size(group), local.numel())
        torch.distributed.all_gather(list(every.unbind(0)), local, group=group)  # into every's rows
        counts = every[:, :1]
        means = every[:, 1:1 + k]
        total = counts.sum()
        group_mean = (counts * means).sum(0) / total
        group_m2 = every[:, 1 + k:].sum(0) + (counts * (means - group_mean).square()).sum(0)
        group_mean, group_m2 = group_mean.view_as(mean), group_m2.view_as(mean)
        ctx.save_for_backward(mean, group_mean, total)
        ctx.count, ctx.group = count, group
        ctx.mark_non_differentiable(total)
        return group_mean, group_m2, total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mean: Tensor, grad_m2: Tensor, _) -> tuple:
        mean, group_mean, total = ctx.saved_tensors
        # Every rank's loss depends on the group's statistics: their gradients are summed over the ranks.
        sums = torch.cat([grad_mean.reshape(-1), grad_m2.reshape(-1)])
        torch.distributed.all_reduce(sums, group=ctx.group)
        sum_mean, sum_m2 = sums.view(2, *mean.shape).unbind(0)
        # group mean = sum_r c_r mean_r / n; group m2 = sum_r (m2_r + c_r (mean_r - group mean)^2), whose
        # derivative through the group mean vanishes (sum_r c_r (mean_r - group mean) = 0).
        count = ctx.count
        grad_local_mean = sum_mean * (count / total) + sum_m2 * (mean - group_mean) * (2 * count)
        return grad_local_mean, sum_m2, None, None


def _group_stats(h: Tensor, batch: int, group) -> Tuple[Tensor, Tensor, Tensor]:
    """The group's batch mean and biased variance of ``h`` [G, B, C] per (g, c), and its number of examples."""
    # Two passes (mean, then centred squares): exact for a large mean, and defined for an empty batch, whose
    # statistics then stay in the graph like every other rank's (each rank must run the same backward collectives).
    mean = h.sum(1) / max(batch, 1)
    m2 = (h - mean[:, None]).square().sum(1)
    mean, m2, total = _GroupStats.apply(mean, m2, batch, group)
    return mean, m2 / total, total


def _sync_layer(x: Tensor, params: Sequence[Optional[Tensor]], stats: Sequence[Tensor], momentum: Optional[float],
                eps: float, act: nn.Module, group, where: str) -> Tensor:
    """A DAN layer in train mode whose BatchNorms use the group's batch statistics: clfast.reference.dan's batched
    torch ops, with a shared input's first statistics computed once for every neuron."""
    g1, b1, w1, c1, g2, b2, w2, c2, w3, c3 = params
    n, batch = w1.shape[0], x.shape[-2]

    def activate(h: Tensor) -> Tensor:  # on [N * B, C], the [batch, features] layout the per-neuron act sees
        return act(h.reshape(-1, h.shape[-1])).view(h.shape)

    h = x.unsqueeze(0) if x.dim() == 2 else x  # [1 or N, B, ni]
    mean1, var1, total = _group_stats(h, batch, group)
    if batch <= 1 and int(total) <= 1:  # every rank sees the same total: all of them raise, none waits
        raise ValueError(f"{where}: expected more than 1 value per channel when training, got {int(total)} in the "
                         f"whole process group (input size {list(x.shape)} on this rank)")
    u1 = torch.addcmul(b1[:, None], g1[:, None], (h - mean1[:, None]) * torch.rsqrt(var1[:, None] + eps))
    a1 = activate(_linear(u1, w1, c1))
    mean2, var2, _ = _group_stats(a1, batch, group)
    u2 = torch.addcmul(b2[:, None], g2[:, None], (a1 - mean2[:, None]) * torch.rsqrt(var2[:, None] + eps))
    y = _linear(activate(_linear(u2, w2, c2)), w3, c3)  # [N, B, no]
    with torch.no_grad():  # written only once the whole layer has run, like the reference
        unbias = total / (total - 1)  # a tensor: no wait for the device
        for rm, rv, nb, mean, var in ((*stats[:3], mean1, var1), (*stats[3:], mean2, var2)):
            nb.add_(1)
            factor = momentum if momentum is not None else 1.0 / float(nb[0])  # None: cumulative average
            rm.mul_(1 - factor).add_(mean.expand_as(rm), alpha=factor)
            rv.mul_(1 - factor).add_((var * unbias).expand_as(rv), alpha=factor)
    return y.transpose(0, 1).reshape(batch, n * y.shape[2])


class _Stacked(nn.Module):
    """Shared machinery: the fused op (or the reference) on this module's stacked parameters."""

    act_fn: nn.Module
    momentum: Optional[float]
    eps: float
    # Class defaults: modules pickled before the option existed load with it off.
    sync_batchnorm: bool = False
    process_group = None

    def _sync_group(self):
        """The process group whose global batch the BatchNorms normalise with now, or None (this rank's batch)."""
        if not (self.sync_batchnorm and self.training):
            return None
        group = _distributed.group(None, self.process_group, type(self).__name__)
        if group is None or torch.distributed.get_world_size(group) == 1:
            return None
        return group

    def _run(self, x: Tensor, params: Sequence[Optional[Tensor]], stats: Sequence[Tensor], n: int,
             group=None) -> Tensor:
        if params[0].shape[0] != n:  # a phenotype shared by the n neurons: autograd sums its gradients
            params = [None if p is None else p.expand(n, *p.shape[1:]) for p in params]
        if group is not None:
            return _sync_layer(x, params, stats, self.momentum, self.eps, self.act_fn, group, type(self).__name__)
        act = activation_name(self.act_fn)
        if act is None or self.momentum is None:
            reason = f"activation {type(self.act_fn).__name__}" if act is None else "momentum=None"
            _warn_once(reason, f"clfast.nn: no fused DAN kernel for {reason}; those layers run on the pure-torch "
                               "reference (same numbers, slower)")
            return ops.dan_layer(x, params, stats, self.training, self.momentum, self.eps, self.act_fn)
        return ops.dan_layer(x, params, stats, self.training, self.momentum, self.eps, act)


class DANLayer(_Stacked):
    """``neurons`` neurons reading the same input of ``n_ni * p_neurons`` features; output ``[B, neurons *
    n_nout_ni]``, the neurons' outputs concatenated (the per-neuron ``DANLayer``).

    Parameters are stacked over neurons: ``bn1_weight``/``bn1_bias`` [N, ni], ``weight1`` [N, nf, ni], ``bias1``
    [N, nf], ``bn2_weight``/``bn2_bias`` [N, nf], ``weight2`` [N, nf, nf], ``bias2`` [N, nf], ``weight3``
    [N, nout, nf], ``bias3`` [N, nout]; BatchNorm buffers ``bn{1,2}_running_{mean,var}`` [N, C] and
    ``bn{1,2}_num_batches_tracked`` [N]. With ``shared=True`` the neurons share one set of parameters (leading
    dimension 1): the paper's shared phenotype. The input may also be ``[N, B, ni]``, one input per neuron.
    Activations with a fused kernel: Tanh (default), ReLU, Sigmoid, GELU, Identity; any other module runs on the
    pure-torch reference with a one-time warning.

    ``sync_batchnorm=True`` (like ``nn.SyncBatchNorm``): in train mode, with an initialised ``torch.distributed``
    process group (``process_group``, default the world) of more than one rank, both BatchNorms normalise with
    the statistics of the global batch (every rank's examples; the ranks' batch sizes may differ, and a rank may
    have 1 or 0 examples), update the running statistics with its unbiased variance, and the backward adds the
    other ranks' gradient terms: outputs, gradients and running statistics are those of one process on the ranks'
    batches concatenated. Every rank must call the layer alike (same train mode, same ``requires_grad`` of the
    input), since each call runs collectives. Cost per call: the layer runs as batched torch ops instead of the
    fused op, plus two all_gathers in the forward (``2 * C1 + 1`` and ``2 * N * nf + 1`` values per rank, C1 =
    ``ni`` for an input every neuron reads, ``N * ni`` for one input per neuron) and two all-reduces in the
    backward (``2 * C1`` and ``2 * N * nf`` values; the first only when the input requires grad). In eval mode,
    without a process group, or in a group of one rank the layer runs the fused op as with ``False``.
    """

    def __init__(self, neurons: int, n_ni: int, n_nf: int, n_nout_ni: int, p_neurons: int = 1, bias: bool = True,
                 act_fn: Optional[nn.Module] = None, *, shared: bool = False, momentum: Optional[float] = 0.1,
                 eps: float = 1e-5, sync_batchnorm: bool = False, process_group=None) -> None:
        super().__init__()
        _check_positive(neurons=neurons, n_ni=n_ni, n_nf=n_nf, n_nout_ni=n_nout_ni, p_neurons=p_neurons)
        self.sync_batchnorm = _check_sync(sync_batchnorm, type(self).__name__)
        self.process_group = process_group
        act_fn = nn.Tanh() if act_fn is None else act_fn
        if not isinstance(act_fn, nn.Module):
            raise TypeError("activation must be of nn.Module instance")
        self._n = neurons
        self._ni = n_ni * p_neurons
        self.n_nf, self.n_nout_ni, self.shared = n_nf, n_nout_ni, shared
        self.act_fn, self.momentum, self.eps = act_fn, momentum, eps
        _init_params(self, 1 if shared else neurons, self._ni, n_nf, n_nout_ni, bias)
        _init_stats(self, neurons, self._ni, n_nf)
        self.register_load_state_dict_pre_hook(_from_seed_layout)

    def extra_repr(self) -> str:
        return (f"neurons={self._n}, ni={self._ni}, nf={self.n_nf}, nout={self.n_nout_ni}, "
                f"bias={self.bias1 is not None}, act_fn={self.act_fn}" + (", shared=True" if self.shared else "")
                + (", sync_batchnorm=True" if self.sync_batchnorm else ""))

    def forward(self, x: Tensor) -> Tensor:
        """x [B, ni] (or [N, B, ni]) -> [B, N * nout]."""
        group = self._sync_group() if self.sync_batchnorm else None
        # Synchronised, a rank's batch may hold 1 or 0 examples: the group's total is checked instead.
        _check_input(x, self._n, self._ni, self.weight1, self.training and group is None, "DANLayer")
        return self._run(x, _params(self), _stats(self), self._n, group)

    # ---- conversions from and to the per-neuron modules ----

    @classmethod
    def from_reference(cls, layer: nn.Module, memo: Optional[dict] = None) -> "DANLayer":
        """A DANLayer with the parameters and BatchNorm state of a per-neuron ``DANLayer`` (``clfast.baselines.dan``
        or any class with its layout). The activation module is copied (``memo``: ``copy.deepcopy``'s, to share
        one copy between layers)."""
        return _convert_from(DANLayer, layer, list(layer.neurons), memo)

    def to_reference(self, memo: Optional[dict] = None) -> "nn.Module":
        """The per-neuron ``DANLayer`` (``clfast.baselines.dan``) with this layer's parameters and BatchNorm state."""
        from ..baselines import dan as _seed  # the per-neuron layout: loaded only to convert to it
        with torch.random.fork_rng(devices=[]):  # its throw-away initialisation leaves the global RNG alone
            ref = _seed.DANLayer(self._n, self._ni, self.n_nf, self.n_nout_ni, bias=self.bias1 is not None,
                                 act_fn=copy.deepcopy(self.act_fn, memo))
        return self._fill_reference(ref, list(ref.neurons))

    def _fill_reference(self, ref: nn.Module, neurons: List[nn.Module], single: bool = False) -> nn.Module:
        for neuron in neurons:
            neuron.core[0].momentum = neuron.core[3].momentum = self.momentum
            neuron.core[0].eps = neuron.core[3].eps = self.eps
        ref = ref.to(self.weight1.device, self.weight1.dtype)
        state = _to_seed_layout(self.state_dict(), self._n)
        if single:  # a per-neuron Neuron: its keys are core.*
            state = {k[len("neurons.0."):]: v for k, v in state.items()}
        ref.load_state_dict(state)
        return ref.train(self.training)


def _convert_from(cls, module: nn.Module, neurons: List[nn.Module], memo: Optional[dict]) -> "DANLayer":
    """A ``cls`` (DANLayer or Neuron) holding the state of the per-neuron ``module`` made of ``neurons``."""
    bn1, lin1, act, bn2, _, _, lin3 = neurons[0].core
    for neuron in neurons:
        b1, b2 = neuron.core[0], neuron.core[3]
        if (b1.momentum, b1.eps) != (bn1.momentum, bn1.eps) or (b2.momentum, b2.eps) != (bn1.momentum, bn1.eps):
            raise ValueError("clfast.nn: every BatchNorm of a DAN layer must share one momentum and eps, got "
                             f"{(b1.momentum, b1.eps)} and {(b2.momentum, b2.eps)}")
    act = copy.deepcopy(act, memo)
    with torch.random.fork_rng(devices=[]):  # the throw-away initialisation leaves the global RNG as it was
        if cls is Neuron:
            new = Neuron(lin1.in_features, lin1.out_features, lin3.out_features, bias=lin1.bias is not None,
                         act_fn=act)
            new.momentum, new.eps = bn1.momentum, bn1.eps
        else:
            new = DANLayer(len(neurons), lin1.in_features, lin1.out_features, lin3.out_features,
                           bias=lin1.bias is not None, act_fn=act, momentum=bn1.momentum, eps=bn1.eps)
    new = new.to(lin1.weight.device, lin1.weight.dtype)  # before loading: no float32 round trip
    new.load_state_dict(module.state_dict())
    return new.train(module.training)


def _to_seed_layout(state: Dict[str, Tensor], n: int) -> Dict[str, Tensor]:
    out = {}
    for name, (index, attr) in _SEED_NAMES.items():
        if name not in state:
            continue
        value = state[name]
        for i in range(n):  # a shared phenotype (leading dimension 1) is copied into every neuron
            out[f"neurons.{i}.core.{index}.{attr}"] = value[0 if value.shape[0] == 1 else i].clone()
    for key, value in state.items():  # an activation with state: the per-neuron layout shares it at core.2 and core.5
        if key.startswith("act_fn."):
            for i in range(n):
                for index in (2, 5):
                    out[f"neurons.{i}.core.{index}.{key[len('act_fn.'):]}"] = value.clone()
    return out


def _from_seed_layout(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                      error_msgs) -> None:
    """load_state_dict pre-hook: rewrites a per-neuron-layout state dict (``neurons.{i}.core.{k}.*``) into ours."""
    if module._n == 1 and prefix + "core.1.weight" in state_dict:  # a per-neuron Neuron's own state dict
        for key in [k for k in state_dict if k.startswith(prefix + "core.")]:
            state_dict[prefix + "neurons.0." + key[len(prefix):]] = state_dict.pop(key)
    if prefix + "neurons.0.core.1.weight" not in state_dict:
        return
    for name, (index, attr) in _SEED_NAMES.items():
        keys = [f"{prefix}neurons.{i}.core.{index}.{attr}" for i in range(module._n)]
        if not all(k in state_dict for k in keys):
            if "num_batches" in name and f"{prefix}neurons.0.core.{index}.running_mean" in state_dict:
                state_dict[prefix + name] = torch.zeros(module._n, dtype=torch.long)  # an old BatchNorm's
            continue
        values = [state_dict.pop(k) for k in keys]
        stacked = torch.stack([v.reshape(()) if "num_batches" in name else v for v in values])
        if module.shared and name in PARAMS:
            if not all(torch.equal(values[0], v) for v in values[1:]):
                error_msgs.append(f"{prefix}{name}: the per-neuron layout's neurons differ, a shared layer needs "
                                  "them equal")
            stacked = stacked[:1]
        state_dict[prefix + name] = stacked
    act_prefix = prefix + "neurons.0.core.2."
    for key in [k for k in state_dict if k.startswith(prefix + "neurons.")]:
        parts = key[len(prefix):].split(".")  # neurons, i, core, index, ...
        if len(parts) > 4 and parts[2] == "core" and parts[3] in ("2", "5"):
            value = state_dict.pop(key)
            if key.startswith(act_prefix):
                state_dict[prefix + "act_fn." + ".".join(parts[4:])] = value


class Neuron(DANLayer):
    """One DAN neuron, ``BN -> Linear -> act -> BN -> Linear -> act -> Linear`` (the per-neuron ``Neuron``)."""

    def __init__(self, ni: int, nf: int, nout_ni: int, bias: bool = True, act_fn: Optional[nn.Module] = None, *,
                 sync_batchnorm: bool = False, process_group=None) -> None:
        super().__init__(1, ni, nf, nout_ni, bias=bias, act_fn=act_fn, sync_batchnorm=sync_batchnorm,
                         process_group=process_group)

    @classmethod
    def from_reference(cls, neuron: nn.Module, memo: Optional[dict] = None) -> "Neuron":
        """A Neuron with the parameters and BatchNorm state of a per-neuron ``Neuron``."""
        return _convert_from(Neuron, neuron, [neuron], memo)

    def to_reference(self, memo: Optional[dict] = None) -> "nn.Module":
        """The per-neuron ``Neuron`` with this neuron's parameters and BatchNorm state."""
        from ..baselines import dan as _seed  # the per-neuron layout: loaded only to convert to it
        with torch.random.fork_rng(devices=[]):
            ref = _seed.Neuron(self._ni, self.n_nf, self.n_nout_ni, bias=self.bias1 is not None,
                               act_fn=copy.deepcopy(self.act_fn, memo))
        return self._fill_reference(ref, [ref], single=True)


class DAN(nn.Module):
    """The three-layer DAN of ``clfast.baselines.dan``: 3 neurons (hidden 50, out 100), 2 neurons (50, 25),
    1 neuron (10, classes). ``sync_batchnorm`` and ``process_group`` go to the three layers (see
    :class:`DANLayer`): per training step 6 all_gathers of ``2 * ni + 1226`` values per rank in all and 5
    all-reduces of 1220 values in all (one more, of ``2 * ni``, when the input requires grad)."""

    def __init__(self, ni: int, num_classes: int, act: Optional[nn.Module] = None, *, sync_batchnorm: bool = False,
                 process_group=None) -> None:
        super().__init__()
        _check_sync(sync_batchnorm, "DAN")
        sync = dict(sync_batchnorm=sync_batchnorm, process_group=process_group)
        self.dan1 = DANLayer(neurons=3, n_ni=ni, n_nf=50, n_nout_ni=100, p_neurons=1, act_fn=act, **sync)
        self.dan2 = DANLayer(neurons=2, n_ni=100, n_nf=50, n_nout_ni=25, p_neurons=3, act_fn=act, **sync)
        self.dan3 = DANLayer(neurons=1, n_ni=25, n_nf=10, n_nout_ni=num_classes, p_neurons=2, act_fn=act, **sync)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, ni] -> [B, num_classes]."""
        return self.dan3(self.dan2(self.dan1(x)))

    @classmethod
    def from_reference(cls, dan: nn.Module) -> "DAN":
        """A DAN with the parameters and BatchNorm state of a per-neuron ``DAN``."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        memo: dict = {}  # the three layers share one copy of the activation, as the per-neuron layers share theirs
        for name in ("dan1", "dan2", "dan3"):
            setattr(new, name, DANLayer.from_reference(getattr(dan, name), memo))
        return new.train(dan.training)

    def to_reference(self) -> "nn.Module":
        """The per-neuron ``DAN`` (``clfast.baselines.dan``) with this DAN's parameters and BatchNorm state."""
        from ..baselines import dan as _seed  # the per-neuron layout: loaded only to convert to it
        ref = _seed.DAN.__new__(_seed.DAN)
        nn.Module.__init__(ref)
        memo: dict = {}
        for name in ("dan1", "dan2", "dan3"):
            setattr(ref, name, getattr(self, name).to_reference(memo))
        return ref.train(self.training)


class _Phenotype(nn.Module):
    """The neuron parameters every neuron of a VECDAN shares (leading dimension 1)."""

    def __init__(self, ni: int, nf: int, no: int, bias: bool) -> None:
        super().__init__()
        _init_params(self, 1, ni, nf, no, bias)


class _LayerStats(nn.Module):
    def __init__(self, n: int, ni: int, nf: int) -> None:
        super().__init__()
        _init_stats(self, n, ni, nf)


class VECDAN(_Stacked):
    """The paper's DAN network: layers of neurons that all share one phenotype, wired by vectorised synapses.

    Layer l has ``neurons[l]`` neurons; its synapses (a Linear) mix all outputs of the previous layer (the input
    for l = 0) into one ``n_channels`` vector per neuron; every neuron is the shared phenotype ``n_channels ->
    n_nf -> n_nf -> n_nout``; a Linear readout maps the last layer's outputs to ``out_features``. Meta-learn
    the phenotype, then :meth:`freeze_phenotype` and train only :meth:`synapse_parameters` on new tasks.
    ``bias`` applies to the phenotype's Linears (synapses and readout always have biases).
    ``sync_batchnorm=True``: every layer's BatchNorms use the global batch's statistics in train mode under
    ``torch.distributed`` (see :class:`DANLayer`; each layer has one input per neuron, so per layer and step two
    all_gathers of ``2 * N * n_channels + 1`` and ``2 * N * n_nf + 1`` values per rank and two all-reduces of
    ``2 * N * n_channels`` and ``2 * N * n_nf``).
    """

    def __init__(self, in_features: int, out_features: int, neurons: Sequence[int] = (8, 8), n_channels: int = 4,
                 n_nf: int = 16, n_nout: int = 1, act_fn: Optional[nn.Module] = None, bias: bool = True,
                 momentum: Optional[float] = 0.1, eps: float = 1e-5, *, sync_batchnorm: bool = False,
                 process_group=None) -> None:
        super().__init__()
        self.sync_batchnorm = _check_sync(sync_batchnorm, "VECDAN")
        self.process_group = process_group
        neurons = list(neurons)
        _check_positive(in_features=in_features, out_features=out_features, n_channels=n_channels, n_nf=n_nf,
                        n_nout=n_nout, layers=len(neurons), **{f"neurons[{i}]": n for i, n in enumerate(neurons)})
        self.act_fn = nn.Tanh() if act_fn is None else act_fn
        if not isinstance(self.act_fn, nn.Module):
            raise TypeError("activation must be of nn.Module instance")
        self.momentum, self.eps, self.neurons, self.n_channels = momentum, eps, neurons, n_channels
        self.phenotype = _Phenotype(n_channels, n_nf, n_nout, bias)
        widths = [in_features] + [n * n_nout for n in neurons]
        self.synapses = nn.ModuleList(nn.Linear(w, n * n_channels) for w, n in zip(widths[:-1], neurons))
        self.stats = nn.ModuleList(_LayerStats(n, n_channels, n_nf) for n in neurons)
        self.readout = nn.Linear(widths[-1], out_features)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, in_features] -> [B, out_features]."""
        params = _params(self.phenotype)
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.synapses[0].in_features:
            raise ValueError(f"VECDAN: expected an input [batch, {self.synapses[0].in_features}], got "
                             f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        group = self._sync_group() if self.sync_batchnorm else None
        _check_input(x, 1, x.shape[1], params[0], self.training and group is None, "VECDAN")  # dtype, device, batch
        h = x
        for synapse, stats, n in zip(self.synapses, self.stats, self.neurons):
            v = synapse(h).view(h.shape[0], n, self.n_channels).transpose(0, 1)  # [N, B, channels]
            h = self._run(v, params, _stats(stats), n, group)
        return self.readout(h)

    def extra_repr(self) -> str:
        return "sync_batchnorm=True" if self.sync_batchnorm else ""

    def phenotype_parameters(self) -> Iterator[nn.Parameter]:
        """The shared neuron parameters (and the activation's, if it has any)."""
        yield from self.phenotype.parameters()
        yield from self.act_fn.parameters()

    def synapse_parameters(self) -> Iterator[nn.Parameter]:
        yield from self.synapses.parameters()
        yield from self.readout.parameters()

    def freeze_phenotype(self, frozen: bool = True) -> "VECDAN":
        """Stops (or restarts) learning of the shared phenotype; the synapses keep learning."""
        for p in self.phenotype_parameters():
            p.requires_grad_(not frozen)
        return self
