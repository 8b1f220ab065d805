"""Continual-learning methods of the experiment runner, each a thin component over clfast's modules.

A method name is one component or several joined by ``+`` (e.g. ``cbp+replay``). Components hook into one
training loop (:func:`clfast.run.train_method`): ``batch`` may append replayed items, ``forward`` may replace
``model(x)``, ``penalty`` adds to the loss, ``after_backward`` may rewrite gradients, ``after_step`` sees the
current batch, ``end_task`` consolidates.
"""
from __future__ import annotations

from argparse import Namespace
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .buffer import ReservoirBuffer
from .cbp import CBP
from .ewc import EWC
from .ocar import OCAR
from .optim import SGD
from .si import SI

COMPONENTS = ("finetune", "replay", "ewc", "si", "ocar", "cbp")


class Component:
    def batch(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor]:
        return x, y

    forward = None  # optional callable replacing model(x)

    def penalty(self) -> Optional[Tensor]:
        return None

    def after_backward(self, xs: Tensor, ys: Tensor) -> None:
        pass

    def after_step(self, x: Tensor, y: Tensor) -> None:
        pass

    def end_task(self, x: Tensor, y: Tensor) -> None:
        pass


class Replay(Component):
    def __init__(self, args: Namespace, generator: torch.Generator) -> None:
        self.buffer = ReservoirBuffer(args.buffer_size, generator=generator)

    def batch(self, x, y):
        if not len(self.buffer):
            return x, y
        xb, yb = self.buffer.sample(x.shape[0])
        return torch.cat([x, xb]), torch.cat([y, yb])

    def after_step(self, x, y):
        self.buffer.add(x, y)


class EWCComponent(Component):
    def __init__(self, model: nn.Module, args: Namespace) -> None:
        self.ewc = EWC(model, args.ewc_representation, mode=args.ewc_mode, gamma=args.ewc_gamma)
        self.strength, self.fisher_samples = args.ewc_lambda, args.fisher_samples

    def penalty(self):
        return self.strength * self.ewc.penalty() if self.ewc.fishers else None

    def end_task(self, x, y):
        n = min(len(x), self.fisher_samples)
        data = torch.utils.data.TensorDataset(x[:n], y[:n])
        self.ewc.consolidate(torch.utils.data.DataLoader(data, batch_size=256))


class SIComponent(Component):
    def __init__(self, model: nn.Module, args: Namespace) -> None:
        self.si = SI(model, strength=args.si_strength, epsilon=args.si_epsilon)

    def penalty(self):
        return self.si.penalty()

    def end_task(self, x, y):
        self.si.consolidate()


class OCARComponent(Component):
    def __init__(self, model: nn.Module, args: Namespace, generator: torch.Generator) -> None:
        self.ocar = OCAR(model, ReservoirBuffer(args.buffer_size, generator=generator), optimizer=None,
                         representation=args.ocar_representation, damping=args.ocar_damping, fisher=args.ocar_fisher,
                         refresh=args.ocar_refresh, generator=generator)
        self.forward = self.ocar.forward

    def batch(self, x, y):
        return self.ocar.replay(x, y)

    def after_backward(self, xs, ys):
        self.ocar.precondition_(xs, ys)

    def after_step(self, x, y):
        self.ocar.end_step(x, y)


class CBPComponent(Component):
    def __init__(self, model: nn.Module, args: Namespace, optimizer, generator: torch.Generator) -> None:
        self.cbp = CBP(model, replacement_rate=args.cbp_rate, maturity_threshold=args.cbp_maturity,
                       optimizer=optimizer, generator=generator)

    def after_step(self, x, y):
        self.cbp.step()


def parse(method: str) -> List[str]:
    parts = method.split("+")
    bad = [p for p in parts if p not in COMPONENTS]
    if bad or not parts:
        raise ValueError(f"unknown method part(s) {bad} in {method!r}; methods are {', '.join(COMPONENTS)}, "
                         "joined by '+'")
    if "ocar" in parts and "replay" in parts:
        raise ValueError("ocar already replays: use 'ocar', not 'ocar+replay'")
    if len([p for p in parts if p in ("ocar", "si")]) > 1:
        raise ValueError("combine at most one of ocar / si with other methods")
    return [p for p in parts if p != "finetune"]


def build(method: str, model: nn.Module, args: Namespace, generator: torch.Generator):
    """(optimizer, components) for ``method``."""
    parts = parse(method)
    si = SIComponent(model, args) if "si" in parts else None
    # SI's accumulation runs inside clfast's fused SGD step; the others use the same optimizer
    optimizer = SGD(model.parameters(), lr=args.lr, momentum=args.momentum, si=si.si if si else None)
    components: List[Component] = []
    for part in parts:
        if part == "replay":
            components.append(Replay(args, generator))
        elif part == "ewc":
            components.append(EWCComponent(model, args))
        elif part == "si":
            components.append(si)
        elif part == "ocar":
            components.append(OCARComponent(model, args, generator))
        elif part == "cbp":
            components.append(CBPComponent(model, args, optimizer, generator))
    return optimizer, components
