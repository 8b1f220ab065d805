"""CLArena's CBP (``clarena.cl_algorithms.cbp``), re-implemented with its behaviour for comparison: utility
from the unit's *incoming* weights, min-max normalised; at most one unit replaced per step; U[0, 1)
re-initialisation of the preceding layer's column and the unit's row; ``.item()`` per replacement. It is the
benchmark baseline; use :class:`clfast.CBP` for the paper's algorithm."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


def min_max_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    return (x - x.min()) / (x.max() - x.min() + eps)


class CLArenaCBP:
    """``layers``: ``[(name, layer, consumer or None)]`` in forward order. CLArena calls the third module the
    "preceding layer" and re-draws its column ``[:, unit]``: it is the layer that reads this layer's output."""

    def __init__(self, layers: List[Tuple[str, nn.Module, Optional[nn.Module]]], replacement_rate: float,
                 maturity_threshold: int, utility_decay_rate: float) -> None:
        self.layers = layers
        self.replacement_rate, self.maturity_threshold = replacement_rate, maturity_threshold
        self.utility_decay_rate = utility_decay_rate
        self.contribution_utility: Dict[str, Tensor] = {}
        self.num_replacements: Dict[str, int] = {}
        self.age: Dict[str, Tensor] = {}
        for name, layer, _ in layers:
            n = layer.weight.shape[0]
            self.contribution_utility[name] = torch.zeros(n, device=layer.weight.device)
            self.num_replacements[name] = 0
            self.age[name] = torch.zeros(n, device=layer.weight.device)

    def on_train_batch_end(self, activations: Dict[str, Tensor]) -> None:
        for name, layer, consumer in self.layers:
            self.age[name] += 1
            current = (torch.mean(torch.abs(activations[name]), dim=0)
                       * torch.sum(torch.abs(layer.weight), dim=1)).detach()
            current = min_max_normalize(current)
            self.contribution_utility[name] = (self.utility_decay_rate * self.contribution_utility[name]
                                               + (1 - self.utility_decay_rate) * current)
            eligible = torch.where(self.age[name] > self.maturity_threshold)[0]
            self.num_replacements[name] += int(self.replacement_rate * eligible.numel())
            if self.num_replacements[name] > 1:
                unit = eligible[torch.argmin(self.contribution_utility[name][eligible]
                                             / self.age[name][eligible]).item()]
                with torch.no_grad():
                    if consumer is not None:
                        consumer.weight[:, unit] = torch.rand_like(consumer.weight[:, unit])
                    layer.weight[unit] = torch.rand_like(layer.weight[unit])
                self.contribution_utility[name][unit] = 0.0
                self.age[name][unit] = 0
                self.num_replacements[name] -= 1
