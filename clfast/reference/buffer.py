"""Pure-torch reference of the reservoir op (schema in csrc/ops.cpp)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

from ._checks import check_memory


def _check(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    op = "clfast.reservoir_add_"
    if not storage or len(storage) != len(batch):
        raise RuntimeError(f"{op}: expected one batch tensor per storage field, got {len(batch)} for {len(storage)}")
    if num_seen < 0:
        raise RuntimeError(f"{op}: num_seen must be >= 0, got {num_seen}")
    first = storage[0]
    capacity = first.shape[0] if first.dim() else 0
    if capacity <= 0:
        raise RuntimeError(f"{op}: storage[0] must have a leading capacity dimension > 0, got shape {list(first.shape)}")
    B = batch[0].shape[0] if batch[0].dim() else -1
    for f, (s, b) in enumerate(zip(storage, batch)):
        if not isinstance(s, Tensor) or not isinstance(b, Tensor):
            raise RuntimeError(f"{op}: storage[{f}] and batch[{f}] must be tensors")
        if s.device != first.device:
            raise RuntimeError(f"{op}: storage[{f}] is on {s.device} but storage[0] is on {first.device}")
        if not s.is_contiguous():
            raise RuntimeError(f"{op}: storage[{f}] must be contiguous (rows are written in place), got strides "
                               f"{list(s.stride())}")
        if b.device != s.device:
            raise RuntimeError(f"{op}: batch[{f}] is on {b.device} but the buffer is on {s.device}")
        if s.dim() < 1 or s.shape[0] != capacity or b.dim() != s.dim() or b.shape[0] != B or b.shape[1:] != s.shape[1:]:
            raise RuntimeError(f"{op}: batch[{f}] has shape {list(b.shape)} but the buffer holds items of shape "
                               f"{list(s.shape[1:])} (and every field needs the same batch size {B})")
        if b.dtype != s.dtype:
            raise RuntimeError(f"{op}: batch[{f}] is {b.dtype} but the buffer stores {s.dtype}")
    if (not isinstance(draws, Tensor) or draws.dtype != torch.float64 or tuple(draws.shape) != (B,)
            or draws.device != first.device):
        raise RuntimeError(f"{op}: draws must be a float64 vector of {B} values on {first.device}")
    if num_seen > 2 ** 63 - 1 - B:
        raise RuntimeError(f"{op}: num_seen {num_seen} + a batch of {B} overflows the stream index")
    check_memory("reservoir_add_", ("storage", storage, True), ("batch", batch, False), ("draws", [draws], False))


@torch.no_grad()
def reservoir_add_(storage: List[Tensor], batch: List[Tensor], draws: Tensor, num_seen: int) -> None:
    """Algorithm R (csrc/math/reservoir.h): item m goes to slot m while m < capacity, else to
    floor(draws * (m + 1)) when that is a slot; a draw outside [0, 1) or NaN selects no slot."""
    _check(storage, batch, draws, num_seen)
    capacity, B = storage[0].shape[0], batch[0].shape[0]
    if B == 0:
        return
    m = torch.arange(B, device=draws.device, dtype=torch.long) + num_seen
    drawn = torch.floor(draws * (m.to(torch.float64) + 1))
    drawn = torch.where((drawn >= 0) & (drawn < capacity), drawn, torch.full_like(drawn, -1)).to(torch.long)
    slot = torch.where(m < capacity, m, drawn)
    # the last item drawing a slot wins it: sort by slot (stable, so by item within a slot), keep each run's end
    sorted_slot, item = torch.sort(slot, stable=True)
    last = torch.ones_like(sorted_slot, dtype=torch.bool)
    last[:-1] = sorted_slot[1:] != sorted_slot[:-1]
    keep = last & (sorted_slot >= 0)
    for s, b in zip(storage, batch):
        s[sorted_slot[keep]] = b[item[keep]]
