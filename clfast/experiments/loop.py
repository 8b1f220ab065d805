"""One run: a method trained with one seed through a scenario's tasks, every task evaluated after every epoch.

A run that diverges (a non-finite loss or parameter) or that ends a task with its accuracy on that task at
chance raises :class:`Diverged`, with the task and step: its numbers are never a result.

Under ``torch.distributed`` (``torchrun``) every rank runs the same loop on its share of each batch: the model is
wrapped in ``DistributedDataParallel``, each rank's loss is weighted so that DDP's average gradient is the global
batch's, the evaluation is sharded over the ranks and its counts summed, and every decision (divergence, chance,
a penalty's stiffness) is taken on numbers all ranks share, so they stay in step.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .._distributed import rank_and_world
from ..optim import SGD
from . import methods, metrics, models
from .methods import Diverged
from .scenarios import Scenario, Task

EVAL_CHUNK = 2048


class RunFailed(Exception):
    """A run that did not give results: where (1-based task, steps taken) and why."""

    def __init__(self, task: Optional[int], step: int, reason: str, num_tasks: int) -> None:
        self.task, self.step, self.reason = task, step, reason
        where = f"task {task}/{num_tasks}, step {step}" if task else "before training"
        super().__init__(f"{where}: {reason}")


@dataclass
class Strategy:
    """What the hooks see, named as in Avalanche's strategies."""
    model: nn.Module
    args: argparse.Namespace
    device: torch.device
    generator: torch.Generator
    forward: Optional[Callable[[Tensor], Tensor]] = None
    optimizer: Optional[torch.optim.Optimizer] = None
    experience: Optional[Task] = None
    task_index: int = 0
    num_tasks: int = 0
    epoch: int = 0
    step: int = 0                 # steps taken in the run
    stream_x: Optional[Tensor] = None   # this step's batch from the stream
    stream_y: Optional[Tensor] = None
    mb_x: Optional[Tensor] = None       # what is trained on: the stream's batch, plus what plugins add
    mb_y: Optional[Tensor] = None
    mb_output: Optional[Tensor] = None
    loss: Optional[Tensor] = None
    reports: Dict[str, object] = field(default_factory=dict)
    strength_changes: List[Dict] = field(default_factory=list)  # penalties lowered to stay stable
    rank: int = 0                 # this process's rank under torch.distributed, and the number of ranks
    world: int = 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous share of ``n`` items (all of them in one process)."""
        return _shard(n, self.rank, self.world)

    def report(self, key: str, value) -> None:
        """Keeps ``value`` for the figures (the EWC plugin reports its first Fisher)."""
        self.reports[key] = value


def _shard(n: int, rank: int, world: int) -> slice:
    """Rank ``rank``'s contiguous share of ``n`` items; the shares differ in size by at most one."""
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def empty_share(scenario: Scenario, batch_size: int, world: int) -> Optional[str]:
    """Why some rank of ``world`` would get no example of some training batch (its CBP and OCAR state would have
    nothing to update from), or None."""
    if world == 1:
        return None
    if batch_size < world:
        return (f"--batch-size {batch_size} is smaller than the {world} processes: each rank needs an example of "
                "every batch")
    for t, task in enumerate(scenario.train):
        last = len(task.y) % batch_size
        if 0 < last < world:
            return (f"--batch-size {batch_size}: task {t + 1}'s last batch of each epoch has {last} example(s), "
                    f"fewer than the {world} processes (each rank needs one of every batch); choose a batch size "
                    f"that leaves no remainder of 1 to {world - 1} of its {len(task.y)} examples")
    return None


@torch.no_grad()
def _correct(model: nn.Module, task: Task, num_classes: int, device, task_il: bool, part: slice) -> Tensor:
    """[class-IL, task-IL] counts of correct predictions of ``model`` on the examples ``part`` of ``task``."""
    mask = None
    if task_il:  # only the task's own classes compete
        mask = torch.full((num_classes,), float("-inf"), device=device)
        mask[task.classes] = 0
    correct = torch.zeros(2, dtype=torch.int64)
    for i in range(part.start, part.stop, EVAL_CHUNK):
        chunk = slice(i, min(part.stop, i + EVAL_CHUNK))
        logits = model(task.inputs(chunk, device))
        y = task.y[chunk]
        correct[0] += int((logits.argmax(1).cpu() == y).sum())
        if mask is not None:
            correct[1] += int(((logits + mask).argmax(1).cpu() == y).sum())
    return correct


def evaluate_all(model: nn.Module, tasks: List[Task], num_classes: int, device, task_il: bool,
                 rank: int = 0, world: int = 1) -> List[tuple]:
    """(class-IL accuracy, task-IL accuracy or None) of ``model`` on each task, from one pass over its test data;
    under torch.distributed each rank counts its share of every task and one all-reduce sums the counts."""
    model.eval()
    try:
        counts = torch.stack([_correct(model, t, num_classes, device, task_il, _shard(len(t.y), rank, world))
                              for t in tasks])
    finally:
        model.train()
    if world > 1:
        on = counts.to(device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(on)
        counts = on.cpu()
    return [(float(c[0]) / max(1, len(t.y)), float(c[1]) / max(1, len(t.y)) if task_il else None)
            for c, t in zip(counts.tolist(), tasks)]


def evaluate(model: nn.Module, task: Task, num_classes: int, device, task_il: bool):
    """(class-IL accuracy, task-IL accuracy or None) of ``model`` on ``task``, from one pass."""
    return evaluate_all(model, [task], num_classes, device, task_il)[0]


def chance_margin(chance: float, n: int) -> float:
    """How far above chance a task's accuracy must be to count as learnt: three standard errors of a guesser
    on ``n`` test samples, and at least two points."""
    return max(0.02, 3 * math.sqrt(chance * (1 - chance) / max(1, n)))


def _check_finite(model: nn.Module, losses: Tensor, strategy: "Strategy") -> None:
    """After an epoch (one host sync): the first non-finite loss of ``losses``, else a non-finite parameter.
    Under torch.distributed ``losses`` are first summed over the ranks (each rank's is its share of the global
    loss), so every rank sees the same losses and fails at the same step."""
    if strategy.world > 1 and len(losses):
        dist.all_reduce(losses)
        losses /= strategy.world
    bad = (~torch.isfinite(losses)).nonzero()
    if len(bad):
        strategy.step -= len(losses) - int(bad[0]) - 1  # the failure names the step that went non-finite
        raise Diverged(f"the loss is {float(losses[int(bad[0])])} (training diverged: lower --lr or the method's "
                       "strength)")
    named = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(p).all() for _, p in named]).tolist()  # one host sync for all of them
    if not all(finite):
        name = named[finite.index(False)][0]
        raise Diverged(f"parameter {name} is not finite (training diverged: lower --lr or the method's strength)")


def _loss(strategy: Strategy) -> Tensor:
    """The minibatch's mean cross-entropy; under torch.distributed this rank's sum times ranks / global count
    (one all-reduce of the count), so that DDP's mean of the ranks' gradients is the global batch's."""
    if strategy.world == 1:
        return F.cross_entropy(strategy.mb_output, strategy.mb_y)
    count = torch.full((1,), float(len(strategy.mb_y)), device=strategy.device)  # a fill: no host sync on CUDA
    dist.all_reduce(count)
    return F.cross_entropy(strategy.mb_output, strategy.mb_y, reduction="sum") * (strategy.world / count[0])


def train(method: str, scenario: Scenario, args: argparse.Namespace, seed: int, progress=None) -> Dict:
    """Trains ``method`` with ``seed``; returns the run's record (see the README's results.json schema) with the
    plugins' reports under ``"_reports"``. A run that diverges, learns nothing of a task, or meets a method that
    does not apply (a ValueError) raises RunFailed."""
    device = torch.device(args.device)
    rank, world = rank_and_world()
    torch.manual_seed(seed)  # the same on every rank: the same initial model and random streams
    model = models.make_model(args.model, scenario.num_classes, scenario.input_shape,
                              sync_batchnorm=world > 1).to(device)
    strategy = Strategy(model=model, args=args, device=device,
                        generator=torch.Generator(device=device).manual_seed(seed), rank=rank, world=world)
    try:
        return _train(method, scenario, args, seed, strategy, progress)
    except (ValueError, FloatingPointError) as exc:
        if world > 1 and strategy.experience is not None and not isinstance(exc, Diverged):
            # raised during training, perhaps on this rank alone: the others may be waiting in a collective
            # this rank would not meet, so the job ends here (torchrun stops every rank) instead of going on
            raise
        task = strategy.task_index + 1 if strategy.experience is not None else None
        reason = str(exc) if isinstance(exc, Diverged) else f"{type(exc).__name__}: {exc}"
        raise RunFailed(task, strategy.step, reason, len(scenario.train)) from exc


def _train(method, scenario, args, seed, strategy, progress) -> Dict:
    model, device = strategy.model, strategy.device
    strategy.num_tasks = len(scenario.train)
    world = strategy.world
    strategy.forward = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    plugins = methods.build(method, strategy, args)
    options = {k: v for p in plugins for k, v in p.optimizer_options.items()}
    strategy.optimizer = SGD(model.parameters(), lr=args.lr, momentum=args.momentum, **options)
    order = torch.Generator().manual_seed(seed)
    T, C = len(scenario.train), scenario.num_classes
    evals = lambda: evaluate_all(model, scenario.test, C, device, scenario.task_il,  # noqa: E731
                                 strategy.rank, world)
    base = evals()  # the untrained model: forward transfer's baseline
    acc, acc_til = np.zeros((T, T)), np.zeros((T, T))
    curves: List[List[float]] = []  # per epoch (over the whole run): class-IL accuracy on every task
    train_time = consolidation_time = 0.0  # the training time includes the consolidations
    for p in plugins:
        p.before_training(strategy)
    for t, task in enumerate(scenario.train):
        strategy.experience, strategy.task_index = task, t
        start = time.perf_counter()
        for p in plugins:
            p.before_training_exp(strategy)
        for epoch in range(args.epochs):
            strategy.epoch = epoch
            batches = torch.randperm(len(task.y), generator=order).split(args.batch_size)
            losses = torch.empty(len(batches), device=device)
            for i, idx in enumerate(batches):
                idx = idx[strategy.shard(len(idx))]  # the same permutation on every rank: this rank's share
                strategy.stream_x, strategy.stream_y = task.inputs(idx, device), task.y[idx].to(device)
                strategy.mb_x, strategy.mb_y = strategy.stream_x, strategy.stream_y
                for p in plugins:
                    p.before_forward(strategy)
                strategy.optimizer.zero_grad()
                strategy.mb_output = strategy.forward(strategy.mb_x)
                strategy.loss = _loss(strategy)
                for p in plugins:
                    p.before_backward(strategy)
                strategy.loss.backward()
                for p in plugins:
                    p.after_backward(strategy)
                strategy.optimizer.step()
                for p in plugins:
                    p.after_update(strategy)
                losses[i] = strategy.loss.detach()
                strategy.step += 1
                if progress is not None:
                    progress.step()
            _check_finite(model, losses, strategy)
            if epoch == args.epochs - 1:  # consolidation, before the evaluation that closes the task
                consolidating = time.perf_counter()
                for p in plugins:
                    p.after_training_exp(strategy)
                _check_finite(model, losses[:0], strategy)
                consolidation_time += time.perf_counter() - consolidating
            train_time += time.perf_counter() - start
            result = evals()
            start = time.perf_counter()
            curves.append([r[0] for r in result])
            if progress is not None:
                progress.epoch(t, epoch, float(losses.mean()), result[t][1] if scenario.task_il else result[t][0])
        acc[t] = [r[0] for r in result]
        if scenario.task_il:
            acc_til[t] = [r[1] for r in result]
        learnt = acc_til[t, t] if scenario.task_il else acc[t, t]
        chance = 1 / len(scenario.test[t].classes)
        if learnt <= chance + chance_margin(chance, len(scenario.test[t].y)):
            raise Diverged(f"accuracy {100 * learnt:.1f}% on the task just trained is at chance "
                           f"({100 * chance:.1f}%): it learnt nothing")
    record = {
        "seed": seed, "status": "ok", "error": None,
        **metrics.summary(acc, base=[r[0] for r in base]),
        "acc_matrix": acc.tolist(), "baseline": [r[0] for r in base], "curves": curves,
        "strength_changes": strategy.strength_changes, "wall_time_s": train_time,
        "consolidation_s": consolidation_time, "steps": strategy.step,
        "steps_per_s": strategy.step / train_time if train_time else 0.0,
    }
    if scenario.task_il:
        til = metrics.summary(acc_til, base=[r[1] for r in base])
        record.update({f"{k}_task_il": v for k, v in til.items()}, acc_matrix_task_il=acc_til.tolist(),
                      baseline_task_il=[r[1] for r in base])
    record["_reports"] = strategy.reports
    return record
