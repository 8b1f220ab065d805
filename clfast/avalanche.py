"""clfast's methods as Avalanche plugins, for Avalanche's own strategies (``Naive`` and the others).

Each plugin takes the constructor arguments of its Avalanche counterpart with the same defaults, so switching is
an import change; clfast's options are keyword-only extras. Needs avalanche-lib 0.6 (``pip install
'clfast[avalanche]'``). Example::

    from avalanche.training import Naive
    from clfast.avalanche import SIPlugin

    model = ...
    strategy = Naive(model=model, optimizer=clfast.optim.SGD(model.parameters(), lr=0.01),
                     plugins=[SIPlugin(si_lambda=1.0)])

How they differ from Avalanche's plugins of the same name is listed in each class and in the README's
"Avalanche" section. Random draws (replay sampling, CBP's new weights, OCAR's labels) come from a generator of the
plugin's own, seeded by ``seed`` or, by default, from torch's global generator when training starts, so
``torch.manual_seed`` makes a run repeat.
"""
from __future__ import annotations

from fnmatch import fnmatch
from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

try:
    from avalanche.core import SupervisedPlugin
except ImportError as exc:  # pragma: no cover - exercised in a subprocess without avalanche
    raise ImportError("clfast.avalanche needs avalanche-lib 0.6: pip install 'clfast[avalanche]' (or "
                      "pip install avalanche-lib==0.6.0)") from exc

from .buffer import ReservoirBuffer
from .cbp import CBP
from .ewc import EWC
from .ocar import OCAR
from .optim import _SIOptimizer
from .si import SI

__all__ = ["SIPlugin", "EWCPlugin", "ReplayPlugin", "CBPPlugin", "OCARPlugin"]


def _generator(seed: Optional[int], device) -> torch.Generator:
    """A generator on ``device``, seeded by ``seed`` or by a draw from torch's global generator."""
    if seed is None:
        seed = int(torch.randint(2 ** 62, (1,)))
    return torch.Generator(device=device).manual_seed(int(seed))


def _same_parameters(model: torch.nn.Module, params: List[Tensor], who: str) -> None:
    """clfast keeps its state per parameter tensor: a model whose parameters were replaced or resized (Avalanche's
    dynamic modules) cannot continue with it."""
    current = {id(p): p for p in model.parameters()}
    for p in params:
        if id(p) not in current:
            raise ValueError(f"{who}: the strategy's model no longer holds the parameters this plugin was set up "
                             "with (a new model, or dynamic modules that replaced parameters); clfast's plugins "
                             "need a model whose parameters stay the same tensors")


class _Replaying:
    """The minibatch joined with as many buffer items, and the stream's batch kept for the buffer."""

    stream: Optional[List[Tensor]] = None

    def _keep_stream(self, strategy) -> List[Tensor]:
        self.stream = list(strategy.mbatch)
        return self.stream

    @staticmethod
    def _join(strategy, fields) -> None:
        strategy.mbatch = list(fields)


class SIPlugin(SupervisedPlugin):
    """Synaptic Intelligence (Zenke et al. 2017) on :class:`clfast.SI`, as Avalanche's
    ``SynapticIntelligencePlugin(si_lambda, eps, excluded_parameters, device)``.

    With a :class:`clfast.optim.SGD` or :class:`clfast.optim.Adam` as the strategy's optimizer the path integral
    is accumulated inside the optimizer's fused step (no copies of the parameters before and after it); the plugin
    attaches itself to the optimizer at every experience, so ``make_optimizer``/``reset_optimizer`` keep it. With
    any other optimizer it checkpoints the parameters before the update and accumulates after it.

    Differences from Avalanche's plugin (the penalty is ``si_lambda / 2 * sum Omega (theta - theta*)^2`` in both):
    - no upper clip: Avalanche clamps every importance at 0.001, which binds on nearly every weight (an importance
      is of the order of ``1 / lr`` per task);
    - each task's contribution ``omega / (delta^2 + eps)`` is clamped at 0 from below, as in hypnettorch, so a
      task never lowers an importance; Avalanche adds it as it is;
    - on a CPU model Avalanche 0.6 keeps views of the live parameters as its reference weights, so every update
      reads as zero and its SI regularises nothing; here the reference weights are copies on any device;
    - the state lives on the parameters' device (Avalanche keeps it on the CPU and copies every step); ``device``
      may only name the strategy's device.
    Without the clip, the default ``eps=1e-7`` gives weights that barely moved in a task importances of up to
    ``omega / 1e-7``, which can make SGD diverge; a larger damping such as ``eps=1e-3`` (hypnettorch's) avoids it.
    As in Avalanche, ``si_lambda`` may be a list (one per experience, the last repeated), BatchNorm parameters and
    those matching ``excluded_parameters`` (fnmatch patterns) are not regularised.
    """

    def __init__(self, si_lambda: Union[float, Sequence[float]], eps: float = 1e-7,
                 excluded_parameters: Optional[Sequence[str]] = None, device="as_strategy") -> None:
        super().__init__()
        self.si_lambda = list(si_lambda) if isinstance(si_lambda, (list, tuple)) else [si_lambda]
        if not self.si_lambda or not all(float(v) >= 0 for v in self.si_lambda):
            raise ValueError(f"si_lambda must be >= 0 (or a non-empty list of such), got {si_lambda!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.eps = float(eps)
        self.excluded_parameters = set(excluded_parameters or [])
        self._device = device
        self.si: Optional[SI] = None
        self._fused = False
        self._consolidated = False

    def _parameters(self, model) -> List[Tensor]:
        norm = {id(p) for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)
                for p in m.parameters(recurse=False)}
        patterns = self.excluded_parameters | {x + ".*" for x in self.excluded_parameters if not x.endswith("*")}
        return [p for name, p in model.named_parameters() if p.requires_grad and id(p) not in norm
                and not any(fnmatch(name, pat) for pat in patterns)]

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self._device != "as_strategy" and torch.device(self._device) != torch.device(strategy.device):
            raise ValueError(f"SIPlugin: device {self._device!r} differs from the strategy's {strategy.device}; "
                             "clfast keeps SI's state with the parameters (use device='as_strategy')")
        if self.si is None:
            self.si = SI(self._parameters(strategy.model), epsilon=self.eps)
        else:
            _same_parameters(strategy.model, self.si.params, "SIPlugin")
        exp = strategy.clock.train_exp_counter
        self.si.strength = float(self.si_lambda[min(exp, len(self.si_lambda) - 1)]) / 2
        optimizer = strategy.optimizer
        self._fused = isinstance(optimizer, _SIOptimizer)
        if self._fused:
            if optimizer.si is not None and optimizer.si is not self.si:
                raise ValueError("SIPlugin: the strategy's clfast optimizer already accumulates another clfast.SI; "
                                 "create it without si= and let the plugin attach its own")
            optimizer.si = self.si

    def before_backward(self, strategy, **kwargs) -> None:
        if self._consolidated:
            strategy.loss = strategy.loss + self.si.penalty()

    def before_update(self, strategy, **kwargs) -> None:
        if not self._fused:
            self.si.before_step()

    def after_update(self, strategy, **kwargs) -> None:
        if not self._fused:
            self.si.after_step()

    def after_training_exp(self, strategy, **kwargs) -> None:
        self.si.consolidate()
        self._consolidated = True


class EWCPlugin(SupervisedPlugin):
    """Elastic Weight Consolidation (Kirkpatrick et al. 2017) on :class:`clfast.EWC`, as Avalanche's
    ``EWCPlugin(ewc_lambda, mode, decay_factor, keep_importance_data)``: the loss gains
    ``ewc_lambda * sum_t c_t (theta - theta_t)^T F_t (theta - theta_t)``.

    Keyword extras:
        representation: ``"diag"`` (Avalanche's), ``"kfac"``, ``"dense"``, ``"blockdiag"`` or ``"ekfac"``.
        variant: ``"classif_logits"`` (default), the Fisher of the model's predictive distribution per example, as
            nngeometry's ``FIM``; or ``"empirical"``, Avalanche's: the mean over minibatches of the squared gradient
            of the minibatch loss (``"diag"`` or ``"dense"``).
        fisher_samples: at most this many examples of the experience for the Fisher (default: all).

    Differences from Avalanche's plugin: the default Fisher is the true (model-sampled) one per example, not squared
    minibatch gradients (``variant="empirical"`` gives Avalanche's numbers); online mode keeps each task's Fisher
    with coefficient ``decay_factor ** age`` (the same penalty as Avalanche's running sum), so
    ``keep_importance_data`` has no effect.
    """

    def __init__(self, ewc_lambda: float, mode: str = "separate", decay_factor: Optional[float] = None,
                 keep_importance_data: bool = False, *, representation: str = "diag",
                 variant: str = "classif_logits", fisher_samples: Optional[int] = None) -> None:
        super().__init__()
        if (decay_factor is None) == (mode == "online"):
            raise ValueError("decay_factor is required with mode='online' and only allowed with it")
        if not float(ewc_lambda) >= 0:
            raise ValueError(f"ewc_lambda must be >= 0, got {ewc_lambda}")
        if fisher_samples is not None and (int(fisher_samples) != fisher_samples or fisher_samples < 1):
            raise ValueError(f"fisher_samples must be a positive integer, got {fisher_samples!r}")
        self.ewc_lambda, self.mode, self.decay_factor = float(ewc_lambda), mode, decay_factor
        self.keep_importance_data = keep_importance_data
        self.representation, self.variant, self.fisher_samples = representation, variant, fisher_samples
        self.ewc: Optional[EWC] = None
        # mode, representation and variant are checked now (by EWC itself) rather than at the first experience's end
        EWC(torch.nn.Linear(1, 1), representation, mode=mode, gamma=1.0 if decay_factor is None else decay_factor,
            variant=variant)

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.ewc is None:
            self.ewc = EWC(strategy.model, self.representation, mode=self.mode,
                           gamma=1.0 if self.decay_factor is None else self.decay_factor, variant=self.variant,
                           device=strategy.device, loss_fn=strategy._criterion)
        else:
            _same_parameters(strategy.model, self.ewc.layers.leaves(), "EWCPlugin")

    def before_backward(self, strategy, **kwargs) -> None:
        if self.ewc.fishers:
            strategy.loss = strategy.loss + self.ewc_lambda * self.ewc.penalty()

    def after_training_exp(self, strategy, **kwargs) -> None:
        dataset = strategy.experience.dataset
        if self.fisher_samples is not None and self.fisher_samples < len(dataset):
            dataset = dataset.subset(range(self.fisher_samples))
        loader = torch.utils.data.DataLoader(dataset, batch_size=strategy.train_mb_size,
                                             collate_fn=getattr(dataset, "collate_fn", None),
                                             num_workers=kwargs.get("num_workers", 0))
        self.ewc.consolidate(loader)


class ReplayPlugin(_Replaying, SupervisedPlugin):
    """Experience replay on :class:`clfast.ReservoirBuffer`, as Avalanche's ``ReplayPlugin(mem_size, batch_size,
    batch_size_mem, task_balanced_dataloader, storage_policy)``.

    Every minibatch joins the buffer (reservoir sampling over the whole stream: every example seen has the same
    chance to be kept) and is trained together with ``batch_size_mem`` buffer items (default: the strategy's
    ``train_mb_size``), drawn from the buffer on its device without a second DataLoader. All the minibatch's fields
    are stored, task labels included.

    Keyword extras: ``device`` of the buffer (default: the strategy's), ``seed`` of its draws.

    Differences from Avalanche's plugin: Avalanche fills its buffer once per experience, balanced over experiences,
    and replays from the second experience on; this buffer is filled online, so replay starts within the first
    experience once the buffer holds items. ``batch_size`` must be None or the strategy's ``train_mb_size``;
    ``task_balanced_dataloader`` and ``storage_policy`` are not supported.
    """

    def __init__(self, mem_size: int = 200, batch_size: Optional[int] = None, batch_size_mem: Optional[int] = None,
                 task_balanced_dataloader: bool = False, storage_policy=None, *, device=None,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        if task_balanced_dataloader:
            raise ValueError("ReplayPlugin: task_balanced_dataloader is not supported (one reservoir over the "
                             "whole stream)")
        if storage_policy is not None:
            raise ValueError("ReplayPlugin: storage_policy is not supported; the buffer is a reservoir")
        if batch_size_mem is not None and (int(batch_size_mem) != batch_size_mem or batch_size_mem < 1):
            raise ValueError(f"batch_size_mem must be a positive integer, got {batch_size_mem!r}")
        self.mem_size, self.batch_size, self.batch_size_mem = mem_size, batch_size, batch_size_mem
        self.device, self.seed = device, seed
        self.buffer = ReservoirBuffer(mem_size, device=device)

    def before_training(self, strategy, **kwargs) -> None:
        if self.buffer.generator is None:
            device = self.device if self.device is not None else strategy.device
            self.buffer.device = torch.device(device)
            self.buffer.generator = _generator(self.seed, device)

    def before_training_exp(self, strategy, **kwargs) -> None:
        if self.batch_size is not None and self.batch_size != strategy.train_mb_size:
            raise ValueError(f"ReplayPlugin: batch_size {self.batch_size} differs from the strategy's train_mb_size "
                             f"{strategy.train_mb_size}; the stream's minibatches are the strategy's")

    def before_training_iteration(self, strategy, **kwargs) -> None:
        stream = self._keep_stream(strategy)
        if len(self.buffer):
            n = self.batch_size_mem or strategy.train_mb_size
            drawn = self.buffer.sample(n)
            if len(drawn) != len(stream):
                raise ValueError(f"ReplayPlugin: the minibatch has {len(stream)} fields, the buffer stores "
                                 f"{len(drawn)}")
            self._join(strategy, [torch.cat([f, b.to(f.device)]) for f, b in zip(stream, drawn)])

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self.buffer.add(*self.stream)
        self.stream = None


class CBPPlugin(SupervisedPlugin):
    """Continual Backpropagation (Dohare et al. 2024) on :class:`clfast.CBP`: after each update, low-utility mature
    hidden units of the strategy's model are reinitialised (and their optimizer moments zeroed). Avalanche has no
    counterpart; the arguments are CLArena's ``CBP(replacement_rate, maturity_threshold, utility_decay_rate)``.

    Keyword extras: ``utility``, ``init`` and ``layers`` as :class:`clfast.CBP`, ``seed`` of the new weights.
    """

    def __init__(self, replacement_rate: float = 1e-4, maturity_threshold: int = 100,
                 utility_decay_rate: float = 0.99, *, utility: str = "contribution", init: str = "kaiming",
                 layers=None, seed: Optional[int] = None) -> None:
        super().__init__()
        self.options = dict(replacement_rate=replacement_rate, maturity_threshold=maturity_threshold,
                            utility_decay_rate=utility_decay_rate, utility=utility, init=init)
        self.layers, self.seed = layers, seed
        self.cbp: Optional[CBP] = None
        CBP(torch.nn.Sequential(torch.nn.Linear(1, 2), torch.nn.ReLU(), torch.nn.Linear(2, 1)),
            **self.options).remove()  # the options' checks, now

    def before_training(self, strategy, **kwargs) -> None:
        if self.cbp is None:
            device = next(strategy.model.parameters()).device
            self.cbp = CBP(strategy.model, layers=self.layers, generator=_generator(self.seed, device),
                           **self.options)

    def before_training_exp(self, strategy, **kwargs) -> None:
        _same_parameters(strategy.model, [L.layer.weight for L in self.cbp._layers], "CBPPlugin")
        self.cbp.optimizer = strategy.optimizer  # make_optimizer may have built a new one

    def after_update(self, strategy, **kwargs) -> None:
        self.cbp.step()


class OCARPlugin(_Replaying, SupervisedPlugin):
    """OCAR (Urettini & Carta 2025) on :class:`clfast.OCAR`: replay from a reservoir of ``mem_size`` items, with
    the gradient of the joined minibatch preconditioned by ``(F + damping I)^-1`` before the update.

    Keyword extras as :class:`clfast.OCAR`: ``representation`` (``"kfac"``, ``"diag"``, ``"dense"``), ``fisher``
    (``"exact"``: the Fisher of each joined minibatch; ``"ema"``: running Kronecker factors), ``ema_decay``,
    ``refresh``; and ``device`` of the buffer, ``seed`` of the draws. As many items are replayed as the minibatch
    holds; the buffer is filled online, as :class:`ReplayPlugin`'s.
    """

    def __init__(self, mem_size: int = 200, damping: float = 1e-2, *, representation: str = "kfac",
                 fisher: str = "exact", ema_decay: float = 0.95, refresh: int = 10, device=None,
                 seed: Optional[int] = None) -> None:
        super().__init__()
        self.options = dict(representation=representation, damping=damping, fisher=fisher, ema_decay=ema_decay,
                            refresh=refresh)
        self.mem_size, self.device, self.seed = mem_size, device, seed
        ReservoirBuffer(mem_size)  # the checks, now
        self.ocar: Optional[OCAR] = None
        OCAR(torch.nn.Linear(1, 1), ReservoirBuffer(1), None, **self.options)

    def before_training(self, strategy, **kwargs) -> None:
        if self.ocar is None:
            device = torch.device(self.device if self.device is not None else strategy.device)
            generator = _generator(self.seed, device)
            self.ocar = OCAR(strategy.model, ReservoirBuffer(self.mem_size, device=device, generator=generator),
                             None, loss_fn=strategy._criterion, generator=generator, **self.options)

    def before_training_exp(self, strategy, **kwargs) -> None:
        _same_parameters(strategy.model, self.ocar.layers.leaves(), "OCARPlugin")

    def before_training_iteration(self, strategy, **kwargs) -> None:
        self._join(strategy, self.ocar.replay(*self._keep_stream(strategy)))

    def before_forward(self, strategy, **kwargs) -> None:
        self.ocar.record_forward()

    def after_forward(self, strategy, **kwargs) -> None:
        self.ocar.recorded(strategy.mb_output)

    def after_backward(self, strategy, **kwargs) -> None:
        self.ocar.precondition_(strategy.mb_x, strategy.mb_y)

    def after_update(self, strategy, **kwargs) -> None:
        self.ocar.end_step(*self.stream)
        self.stream = None
