"""Pure-torch reference of the reservoir op, and the one-by-one Algorithm R it must equal."""
from __future__ import annotations

import math
import random
from typing import List

import torch
from torch import Tensor


def _check(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    if not storage or len(storage) != len(batch):
        raise RuntimeError(f"clfast.reservoir_add_: expected one batch tensor per storage field, got {len(batch)} for "
                           f"{len(storage)}")
    B = batch[0].shape[0] if batch[0].dim() else -1
    for f, (s, b) in enumerate(zip(storage, batch)):
        if b.dim() != s.dim() or b.shape[0] != B or b.shape[1:] != s.shape[1:]:
            raise RuntimeError(f"clfast.reservoir_add_: batch[{f}] has shape {list(b.shape)} but the buffer holds "
                               f"items of shape {list(s.shape[1:])} (and every field needs the same batch size {B})")
        if b.dtype != s.dtype:
            raise RuntimeError(f"clfast.reservoir_add_: batch[{f}] is {b.dtype} but the buffer stores {s.dtype}")
        if b.device != s.device:
            raise RuntimeError(f"clfast.reservoir_add_: batch[{f}] is on {b.device} but the buffer is on {s.device}")
    if draws.dtype != torch.float64 or tuple(draws.shape) != (B,):
        raise RuntimeError(f"clfast.reservoir_add_: draws must be a float64 vector of {B} values")


@torch.no_grad()
def reservoir_add_(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    _check(storage, batch, draws, num_seen)
    capacity, B = storage[0].shape[0], batch[0].shape[0]
    if B == 0:
        return
    m = torch.arange(num_seen, num_seen + B, device=draws.device, dtype=torch.float64)
    slot = torch.where(m < capacity, m, torch.floor(draws * (m + 1))).to(torch.long)
    slot = torch.where(slot < capacity, slot, torch.full_like(slot, -1))
    # the last item drawing a slot wins it: sort by slot (stable, so by item within a slot), keep each run's end
    sorted_slot, item = torch.sort(slot, stable=True)
    last = torch.ones_like(sorted_slot, dtype=torch.bool)
    last[:-1] = sorted_slot[1:] != sorted_slot[:-1]
    keep = last & (sorted_slot >= 0)
    for s, b in zip(storage, batch):
        s[sorted_slot[keep]] = b[item[keep]]


def reservoir_add_one_by_one(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Vitter's Algorithm R item by item, as the seed's DataBuffer does, with the draws given."""
    capacity = storage[0].shape[0]
    for j in range(batch[0].shape[0]):
        m = num_seen + j
        slot = m if m < capacity else math.floor(float(draws[j]) * (m + 1))
        if slot < capacity:
            for s, b in zip(storage, batch):
                s[slot] = b[j]


class ListDataBuffer:
    """The seed notebook's DataBuffer as it is: a Python list of ``(x, y)`` pairs, one ``random.randint`` per
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
