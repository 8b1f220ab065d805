"""The list-based DataBuffer (a Python list, one ``random.randint`` per item) and Algorithm R item by
item: the baselines ``clfast.ReservoirBuffer`` / ``clfast.DataBuffer`` are tested and benchmarked against."""
from __future__ import annotations

import math
import random
from typing import List

import torch
from torch import Tensor


def reservoir_add_one_by_one(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Vitter's Algorithm R item by item, as the list-based DataBuffer does, with the draws given."""
    capacity = storage[0].shape[0]
    for j in range(batch[0].shape[0]):
        m = num_seen + j
        slot = m if m < capacity else math.floor(float(draws[j]) * (m + 1))
        if slot < capacity:
            for s, b in zip(storage, batch):
                s[slot] = b[j]


class ListDataBuffer:
    """The list-based DataBuffer: a Python list of ``(x, y)`` pairs, one ``random.randint`` per
    item; the baseline of the buffer benchmarks."""

    def __init__(self, max_size: int) -> None:
        self.buffer: list = []
        self.max_size = max_size
        self.num_seen_examples = 0

    def update_buffer(self, new_data) -> None:
        for x, y in new_data:
            self.num_seen_examples += 1
            if len(self.buffer) < self.max_size:
                self.buffer.append((x, y))
            else:
                slot = random.randint(0, self.num_seen_examples - 1)
                if slot < self.max_size:
                    self.buffer[slot] = (x, y)

    def sample(self, n: int):
        items = self.buffer if len(self.buffer) < n else random.sample(self.buffer, n)
        if not items:
            return torch.Tensor(), torch.Tensor()
        xs, ys = zip(*items)
        return torch.stack(xs), torch.stack(ys)
