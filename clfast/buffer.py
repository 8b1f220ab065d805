"""Reservoir replay buffers: :class:`ReservoirBuffer` keeps its items as preallocated tensors on a device and
adds a whole batch with one op; :class:`DataBuffer` is the list-based DataBuffer's interface on top of it."""
from __future__ import annotations

import random
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import ops

__all__ = ["ReservoirBuffer", "DataBuffer"]


def _overlaps(a: Tensor, b: Tensor) -> bool:
    return a.numel() > 0 and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ReservoirBuffer:
    """Exact reservoir sampling (Vitter's Algorithm R) of a stream of batches into ``capacity`` slots.

    Every item of a stream of N has the same chance ``capacity / N`` to be in the buffer. Adding a batch gives
    the same buffer as adding its items one by one with the same random draws (a later item of the batch wins a
    slot drawn twice), in one op and, on CUDA, with no host synchronisation.

    Args:
        capacity: number of items kept.
        device: where the storage lives (default: the device of the first batch).
        generator: ``torch.Generator`` on that device, for reproducible draws.

    Storage is allocated from the first batch: one tensor ``[capacity, *item_shape]`` per field (``x``, ``y``,
    then any extras such as logits or task ids), each with that field's dtype.
    """

    def __init__(self, capacity: int, device: Optional[torch.device | str] = None,
                 generator: Optional[torch.Generator] = None) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        self.capacity = int(capacity)
        self.device = torch.device(device) if device is not None else None
        self.generator = generator
        self.storage: List[Tensor] = []
        self.num_seen = 0

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def add(self, x: Tensor, y: Optional[Tensor] = None, *extras: Tensor) -> None:
        """Offer a batch: ``x [B, ...]``, ``y [B, ...]`` and extras ``[B, ...]``. Mismatched shapes or dtypes
        raise ``ValueError`` and leave the buffer unchanged."""
        fields = [x] + ([y] if y is not None else []) + list(extras)
        if not all(isinstance(t, Tensor) for t in fields):
            raise TypeError("ReservoirBuffer.add expects tensors")
        B = fields[0].shape[0] if fields[0].dim() else None
        if B is None or any(t.dim() == 0 or t.shape[0] != B for t in fields):
            raise ValueError("ReservoirBuffer.add: every field needs the same leading batch dimension, got shapes "
                             f"{[list(t.shape) for t in fields]}")
        device = self.device or fields[0].device
        if self.storage:
            if len(fields) != len(self.storage):
                raise ValueError(f"ReservoirBuffer.add: the buffer stores {len(self.storage)} fields, got "
                                 f"{len(fields)}")
            for f, (t, s) in enumerate(zip(fields, self.storage)):
                if t.shape[1:] != s.shape[1:] or t.dtype != s.dtype:
                    raise ValueError(f"ReservoirBuffer.add: field {f} is {t.dtype} {list(t.shape[1:])} per item but "
                                     f"the buffer stores {s.dtype} {list(s.shape[1:])}")
        if B == 0:
            return
        self._add([t.detach().to(device) for t in fields], None)

    def _add(self, batch: List[Tensor], draws: Optional[Tensor]) -> None:
        """Checked fields on the buffer's device; ``draws`` [B] float64 in [0, 1), or None for fresh ones."""
        B, device = batch[0].shape[0], batch[0].device
        if self.num_seen > 2 ** 63 - 1 - B:
            raise OverflowError(f"ReservoirBuffer.add: num_seen {self.num_seen} + a batch of {B} overflows the "
                                "stream index")
        # A batch read from the storage itself (a view of it) is copied first: the op refuses overlapping inputs.
        batch = [t.clone() if s is not None and _overlaps(t, s) else t
                 for t, s in zip(batch, self.storage or [None] * len(batch))]
        storage = self.storage or [torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype, device=device)
                                   for t in batch]
        drawn_from = self.generator.get_state() if draws is None and self.generator is not None else None
        try:
            if draws is None:
                draws = torch.rand(B, dtype=torch.float64, device=device, generator=self.generator)
            ops.reservoir_add_(storage, batch, draws, self.num_seen)
        except Exception:
            if drawn_from is not None:  # a refused batch leaves the generator where it was
                self.generator.set_state(drawn_from)
            raise
        self.storage = storage
        self.num_seen += B

    def sample(self, n: int) -> Tuple[Tensor, ...]:
        """``n`` items without replacement (all of them, shuffled, when fewer are stored), one tensor per field."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not self.storage:
            raise RuntimeError("ReservoirBuffer.sample: the buffer is empty; add a batch first")
        index = torch.randperm(len(self), device=self.storage[0].device, generator=self.generator)[:n]
        return tuple(s.index_select(0, index) for s in self.storage)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "num_seen": self.num_seen, "storage": list(self.storage),
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output (checked before anything changes)."""
        storage = list(state["storage"])
        if int(state["capacity"]) != self.capacity or any(s.shape[0] != self.capacity for s in storage):
            raise ValueError(f"ReservoirBuffer.load_state_dict: capacity {state['capacity']} does not match "
                             f"{self.capacity}")
        num_seen = state["num_seen"]
        if (isinstance(num_seen, bool) or int(num_seen) != num_seen or not 0 <= int(num_seen) < 2 ** 63
                or (num_seen and not storage)):
            raise ValueError(f"ReservoirBuffer.load_state_dict: num_seen must be an integer in [0, 2^63) with "
                             f"storage when > 0, got {num_seen!r}")
        if len({(s.device, s.dim() > 0) for s in storage}) > 1:
            raise ValueError("ReservoirBuffer.load_state_dict: every storage field must be on one device")
        device = self.device
        self.storage = [s.to(device) if device is not None else s.clone() for s in storage]
        self.num_seen = int(state["num_seen"])
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


class DataBuffer:
    """The list-based DataBuffer's interface (``update_buffer(pairs)``, ``sample(n)``, ``buffer``,
    ``num_seen_examples``; ``clfast.baselines.buffer``) on a :class:`ReservoirBuffer` on the CPU. It draws from
    Python's ``random`` exactly as the list-based DataBuffer does (one ``random.randint`` per item once the buffer
    is full, ``random.sample`` to sample), so under the same ``random.seed`` it keeps and returns the same items,
    and leaves ``random`` in the same state."""

    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self._buffer = ReservoirBuffer(max_size, device="cpu")

    @property
    def num_seen_examples(self) -> int:
        return self._buffer.num_seen

    @property
    def buffer(self) -> List[Tuple[Tensor, Tensor]]:
        return list(zip(*(s[:len(self._buffer)] for s in self._buffer.storage))) if self._buffer.storage else []

    def update_buffer(self, new_data: Sequence[Tuple[Tensor, Tensor]]) -> None:
        """Add a list of ``(x, y)`` pairs (reservoir sampling, in one op for the whole list)."""
        pairs = list(new_data)
        if not pairs:
            return
        xs = torch.stack([torch.as_tensor(x) for x, _ in pairs])
        ys = torch.stack([torch.as_tensor(y) for _, y in pairs])
        if self._buffer.storage:  # add()'s checks, before any draw
            self._buffer.add(xs[:0], ys[:0])
        seen = self._buffer.num_seen
        # The list-based DataBuffer's slot for item m >= max_size is random.randint(0, m); the op's is
        # floor(draw * (m + 1)), which the draw (slot + 1/2) / (m + 1) gives back exactly.
        draws = [(random.randint(0, m) + 0.5) / (m + 1) if m >= self.max_size else 0.0
                 for m in range(seen, seen + len(pairs))]
        self._buffer._add([xs, ys], torch.tensor(draws, dtype=torch.float64))

    def sample(self, n: int) -> Tuple[Tensor, Tensor]:
        """``n`` items without replacement (``random.sample``), or all of them in buffer order when fewer are
        stored; two empty tensors for an empty buffer."""
        size = len(self._buffer)
        if size == 0:
            return torch.Tensor(), torch.Tensor()
        if size < n:
            return tuple(s[:size].clone() for s in self._buffer.storage)
        index = torch.tensor(random.sample(range(size), n), dtype=torch.long)
        return tuple(s.index_select(0, index) for s in self._buffer.storage)
