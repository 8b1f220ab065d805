"""The runner's continual-learning methods: one plugin per file, found by name.

A method is one plugin or several joined by ``+`` (``cbp+replay``); ``finetune`` is plain training. Each plugin
is a :class:`Plugin` subclass in its own module of this package, with its command-line flags and their checks,
and it acts through hooks named as Avalanche's (``before_training``, ``before_training_exp``, ``before_forward``,
``before_backward``, ``after_backward``, ``after_update``, ``after_training_exp``), each called with the
:class:`clfast.experiments.loop.Strategy` that holds the model, the optimizer, the minibatch and the loss. Adding
a file that defines a ``Plugin`` subclass with a new ``name`` adds a method.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from typing import Dict, List, Optional, Type


class Diverged(FloatingPointError):
    """Training went non-finite, learnt nothing of a task, or met a penalty too stiff for its step size: a failed
    run. Under torch.distributed it is raised on every rank alike (it is decided on numbers they share)."""


class Plugin:
    """A method's hooks; each does nothing unless overridden."""

    name: str = ""
    help: str = ""
    # other plugins this one cannot be combined with, and why
    conflicts: Dict[str, str] = {}
    # keyword arguments for clfast.optim.SGD (SI rides on the fused step)
    optimizer_options: Dict = {}

    def __init__(self, strategy, args: argparse.Namespace) -> None:
        pass

    @staticmethod
    def add_arguments(group: argparse._ArgumentGroup) -> None:
        """Adds the method's flags to the parser."""

    @staticmethod
    def check(args: argparse.Namespace) -> Optional[str]:
        """The first bad flag value, as '--flag: why', or None."""
        return None

    def before_training(self, strategy) -> None: ...
    def before_training_exp(self, strategy) -> None: ...
    def before_forward(self, strategy) -> None: ...
    def before_backward(self, strategy) -> None: ...
    def after_backward(self, strategy) -> None: ...
    def after_update(self, strategy) -> None: ...
    def after_training_exp(self, strategy) -> None: ...


def stable_strength(strategy, curvature: float, what: str, flag: str, value: float) -> float:
    """The strength a quadratic penalty keeps after a consolidation that left its largest curvature at
    ``curvature`` (with strength ``value``, set by ``flag``).

    Heavy-ball SGD on a quadratic of curvature h diverges once ``lr * h >= 2 (1 + momentum)``, and the loss only
    adds curvature, so past that limit the next task would go non-finite. Then ``--stiffness cap`` (the default)
    halves the strength below the limit's and records the change in the run; ``--stiffness fail`` fails the run,
    naming the strength that would be stable."""
    lr, momentum = strategy.args.lr, strategy.args.momentum
    limit = 2 * (1 + momentum) / lr
    if curvature < limit or strategy.task_index >= strategy.num_tasks - 1:  # no step follows the last task
        return value
    stable = value * limit / curvature
    why = (f"{what} is too stiff for SGD at lr {lr}, momentum {momentum}: its largest curvature {curvature:.4g} is "
           f"past 2 (1 + momentum) / lr = {limit:.4g}, where SGD diverges")
    if strategy.args.stiffness == "fail":
        raise Diverged(f"{why}; {flag} below {stable:.3g} is stable up to this task")
    new = stable / 2
    strategy.strength_changes.append({"task": strategy.task_index + 1, "flag": flag, "from": value, "to": new,
                                      "curvature": curvature, "limit": limit})
    if strategy.rank == 0:  # every rank takes the same decision; one says so
        print(f"  {why}: {flag} {value:.4g} -> {new:.4g} from task {strategy.task_index + 2} on", file=sys.stderr,
              flush=True)
    return new


def registry() -> Dict[str, Type[Plugin]]:
    """Every plugin of this package by name, in alphabetical order."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, Plugin) and obj is not Plugin and obj.name:
                found[obj.name] = obj
    return dict(sorted(found.items()))


def names() -> List[str]:
    return ["finetune", *registry()]


def parse(method: str) -> List[str]:
    """The plugin names of ``method`` in its order (``finetune`` adds none); ValueError when it is not valid."""
    plugins = registry()
    parts = method.split("+")
    bad = [p for p in parts if p != "finetune" and p not in plugins]
    if bad or not all(parts):
        raise ValueError(f"unknown method part(s) {bad or [method]} in {method!r}; methods are "
                         f"{', '.join(names())}, joined by '+'")
    parts = [p for p in parts if p != "finetune"]
    if len(set(parts)) != len(parts):
        raise ValueError(f"{method!r} names a method twice")
    for p in parts:
        for other, why in plugins[p].conflicts.items():
            if other in parts:
                raise ValueError(why)
    return parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name, plugin in registry().items():
        plugin.add_arguments(parser.add_argument_group(f"{name}: {plugin.help}"))


def check(args: argparse.Namespace) -> Optional[str]:
    for plugin in registry().values():
        error = plugin.check(args)
        if error:
            return error
    return None


def build(method: str, strategy, args: argparse.Namespace) -> List[Plugin]:
    plugins = registry()
    return [plugins[p](strategy, args) for p in parse(method)]
