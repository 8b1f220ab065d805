"""Reservoir replay buffers: :class:`ReservoirBuffer` keeps its items as preallocated tensors on a device and
adds a whole batch with one op; :class:`DataBuffer` is the list-based DataBuffer's interface on top of it."""
from __future__ import annotations

import hashlib
import operator
import random
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import _distributed, ops

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
        distributed, process_group: under ``torch.distributed`` (by default whenever a process group is
            initialised; ``True`` requires one, ``False`` treats the process as alone) the buffer works with the
            group's ranks as ``scope`` says; ``process_group`` defaults to the world.
        scope: with synchronisation on,

            * ``"rank"`` (default): one buffer per rank, of the rank's own stream, and no communication. With
              ``generator=None`` the buffer draws from its own generator (made on the storage's device at the first
              batch), seeded from ``torch.initial_seed()`` and the rank in the group: ranks that all call
              ``torch.manual_seed(s)`` still keep different items, and a rerun keeps the same ones. A
              ``generator`` given is used as it is: seed it differently on each rank.
            * ``"global"``: one reservoir of the global stream (each step's batches of rank 0, rank 1, ... in rank
              order), the same on every rank: after every ``add`` each rank holds, bitwise, the buffer one process
              would hold after adding the ranks' batches concatenated, and ``num_seen`` counts the global stream.
              ``add`` and ``sample`` are collectives (every rank calls them, in the same order). The draws come
              from a generator kept identical on every rank: ``generator`` (seed it alike on every rank) or, when
              None, the buffer's own, seeded from ``torch.initial_seed()``. A hash of its state travels with each
              call's sizes, and whenever the ranks' states differ (the first add with the buffer's own generator,
              generators seeded differently, a shared generator drawn from on some ranks only) every rank first
              takes the group's first rank's state. Cost of an ``add``: two all_gathers, one of 4 int64 per rank
              (size, verdict of the checks, fields' signature, generator hash), one of the batches, each rank's
              padded to the largest, all fields packed in one message (each rank receives ``world * max_r B_r``
              items' bytes); plus one broadcast of the generator's state (5056 bytes on the CPU, 16 on CUDA) when
              the ranks' differ. Cost of a ``sample``: one all_gather of 2 int64 per rank (n, generator
              hash); no items move. The int64 headers go through the CPU when the group has a CPU backend
              (gloo, ``cpu:gloo,cuda:nccl``); in a CUDA-only group reading them synchronises with the host.

            Without a process group (or with ``distributed=False``) both scopes are the single-process buffer,
            drawing from ``generator`` or, when None, torch's global generator.

    Storage is allocated from the first batch: one tensor ``[capacity, *item_shape]`` per field (``x``, ``y``,
    then any extras such as logits or task ids), each with that field's dtype.
    """

    def __init__(self, capacity: int, device: Optional[torch.device | str] = None,
                 generator: Optional[torch.Generator] = None, *, distributed: Optional[bool] = None,
                 process_group=None, scope: str = "rank") -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity!r}")
        if scope not in SCOPES:
            raise ValueError(f"ReservoirBuffer: scope must be one of {SCOPES}, got {scope!r}")
        self.capacity = int(capacity)
        self.device = torch.device(device) if device is not None else None
        self.generator = generator
        self.distributed = _distributed.check(distributed, "ReservoirBuffer")
        self.process_group, self.scope = process_group, scope
        self._own: Optional[torch.Generator] = None  # drawn from under a process group when generator is None
        self.storage: List[Tensor] = []
        self.num_seen = 0

    def __len__(self) -> int:
        return min(self.num_seen, self.capacity)

    def add(self, x: Tensor, y: Optional[Tensor] = None, *extras: Tensor) -> None:
        """Offer a batch: ``x [B, ...]``, ``y [B, ...]`` and extras ``[B, ...]``. Mismatched shapes or dtypes
        raise ``ValueError`` and leave the buffer unchanged (in global scope: on every rank, when any rank's batch
        is refused or the ranks' batches differ in fields; a batch of 0 items is fine)."""
        fields = [x] + ([y] if y is not None else []) + list(extras)
        group = self._group()
        if self.scope == "global" and group is not None:
            self._add_global(fields, group)
            return
        self._check(fields)
        if fields[0].shape[0] == 0:
            return
        batch = [t.detach().to(self.device or fields[0].device) for t in fields]
        self._add(batch, None, self._rank_generator(batch[0].device, group))

    def _group(self):
        return _distributed.group(self.distributed, self.process_group, "ReservoirBuffer")

    def _check(self, fields: List[Tensor]) -> None:
        if not all(isinstance(t, Tensor) for t in fields):
            raise TypeError("ReservoirBuffer.add expects tensors")
        B = fields[0].shape[0] if fields[0].dim() else None
        if B is None or any(t.dim() == 0 or t.shape[0] != B for t in fields):
            raise ValueError("ReservoirBuffer.add: every field needs the same leading batch dimension, got shapes "
                             f"{[list(t.shape) for t in fields]}")
        if self.storage:
            if len(fields) != len(self.storage):
                raise ValueError(f"ReservoirBuffer.add: the buffer stores {len(self.storage)} fields, got "
                                 f"{len(fields)}")
            for f, (t, s) in enumerate(zip(fields, self.storage)):
                if t.shape[1:] != s.shape[1:] or t.dtype != s.dtype:
                    raise ValueError(f"ReservoirBuffer.add: field {f} is {t.dtype} {list(t.shape[1:])} per item but "
                                     f"the buffer stores {s.dtype} {list(s.shape[1:])}")

    def _rank_generator(self, device: torch.device, group) -> Optional[torch.Generator]:
        """The generator of a per-rank draw: the user's; else, under a process group, the buffer's own, seeded
        per rank; else None (torch's global generator)."""
        if self.generator is not None or group is None:
            return self.generator
        if self._own is None:
            self._own = torch.Generator(device).manual_seed(_distributed.rank_seed(torch.initial_seed(), group))
        return self._own

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        """The generator of a global-scope draw (made the same on every rank by :meth:`_agree`)."""
        if self.generator is not None:
            return self.generator
        if self._own is None:
            self._own = torch.Generator(device).manual_seed(torch.initial_seed())
        return self._own

    def _fingerprint(self) -> int:
        """The global-scope generator's state as an int64 (0: not made yet), to tell whether the ranks agree."""
        generator = self.generator if self.generator is not None else self._own
        if generator is None:
            return 0
        state = generator.get_state().numpy().tobytes()
        return int.from_bytes(hashlib.blake2b(state, digest_size=8).digest(), "little", signed=True) or 1

    def _agree(self, fingerprints: List[int], device: torch.device, group) -> torch.Generator:
        """The global-scope generator, made the same on every rank (the first rank's) unless it already is."""
        generator = self._shared_generator(device)
        if len(set(fingerprints)) > 1 or 0 in fingerprints:
            _distributed.broadcast_generator_(generator, device, group)
        return generator

    def _add_global(self, fields: List, group) -> None:
        # Every rank learns every rank's verdict before raising: a rank raising alone would leave the others
        # waiting in the next collective.
        try:
            self._check(fields)
            refusal = None
        except (TypeError, ValueError) as error:
            refusal = error
        device = self.device or (self.storage[0].device if self.storage else
                                 next((t.device for t in fields if isinstance(t, Tensor)), torch.device("cpu")))
        header = ([fields[0].shape[0], 1, _signature(fields)] if refusal is None else [0, 0, 0]) + \
            [self._fingerprint()]
        headers = _distributed.all_gather_ints(header, device, group)
        refused = [r for r, h in enumerate(headers) if not h[1]]
        if refused:
            raise ValueError(f"ReservoirBuffer.add (scope='global'): the batch of rank(s) {refused} of the process "
                             "group was refused, so no rank added its batch"
                             + (f"; this rank's: {refusal}" if refusal is not None else "")) from refusal
        if len({h[2] for h in headers}) > 1:
            raise ValueError("ReservoirBuffer.add (scope='global'): every rank's batch needs the same fields (count, "
                             "item shapes, dtypes); the ranks' differ, this rank's are "
                             f"{[(t.dtype, list(t.shape[1:])) for t in fields]}")
        counts = [h[0] for h in headers]
        if sum(counts) == 0:
            return
        batch = _distributed.gather_rows([t.detach().to(device) for t in fields], counts, group)
        self._add(batch, None, self._agree([h[3] for h in headers], device, group))

    def _add(self, batch: List[Tensor], draws: Optional[Tensor], generator: Optional[torch.Generator]) -> None:
        """Checked fields on the buffer's device; ``draws`` [B] float64 in [0, 1), or None for fresh ones from
        ``generator`` (None: torch's global generator)."""
        B, device = batch[0].shape[0], batch[0].device
        if self.num_seen > 2 ** 63 - 1 - B:
            raise OverflowError(f"ReservoirBuffer.add: num_seen {self.num_seen} + a batch of {B} overflows the "
                                "stream index")
        # A batch read from the storage itself (a view of it) is copied first: the op refuses overlapping inputs.
        batch = [t.clone() if s is not None and _overlaps(t, s) else t
                 for t, s in zip(batch, self.storage or [None] * len(batch))]
        storage = self.storage or [torch.empty((self.capacity, *t.shape[1:]), dtype=t.dtype, device=device)
                                   for t in batch]
        drawn_from = generator.get_state() if draws is None and generator is not None else None
        try:
            if draws is None:
                draws = torch.rand(B, dtype=torch.float64, device=device, generator=generator)
            ops.reservoir_add_(storage, batch, draws, self.num_seen)
        except Exception:
            if drawn_from is not None:  # a refused batch leaves the generator where it was
                generator.set_state(drawn_from)
            raise
        self.storage = storage
        self.num_seen += B

    def sample(self, n: int) -> Tuple[Tensor, ...]:
        """``n`` items without replacement (all of them, shuffled, when fewer are stored), one tensor per field.

        In global scope each rank asks for its own ``n`` and gets its share of one draw: with one permutation
        ``perm`` of the stored items (the same on every rank), rank ``r`` takes ``perm[o_r : o_r + n_r]``,
        ``o_r = n_0 + ... + n_(r-1)``, clipped to ``len(self)``. The ranks' samples are disjoint and, in rank
        order, are what one process's ``sample(n_0 + n_1 + ...)`` returns from the same buffer and generator."""
        group = self._group()
        if self.scope == "global" and group is not None:
            return self._sample_global(n, group)
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if not self.storage:
            raise RuntimeError("ReservoirBuffer.sample: the buffer is empty; add a batch first")
        device = self.storage[0].device
        index = torch.randperm(len(self), device=device, generator=self._rank_generator(device, group))[:n]
        return tuple(s.index_select(0, index) for s in self.storage)

    def _sample_global(self, n: int, group) -> Tuple[Tensor, ...]:
        if not self.storage:  # the same on every rank: they all raise
            raise RuntimeError("ReservoirBuffer.sample: the buffer is empty; add a batch first")
        try:
            n = operator.index(n)
        except TypeError:
            pass
        valid = isinstance(n, int) and 0 <= n < 2 ** 62  # a bad n on one rank is refused on every rank
        device = self.storage[0].device
        asked = _distributed.all_gather_ints([n if valid else -1, self._fingerprint()], device, group)
        ns = [a[0] for a in asked]
        if min(ns) < 0:
            raise ValueError(f"ReservoirBuffer.sample (scope='global'): n must be an integer >= 0 on every rank, got "
                             f"{n!r} here and {ns} over the ranks (-1: refused)")
        generator = self._agree([a[1] for a in asked], device, group)
        start = sum(ns[:torch.distributed.get_rank(group)])
        index = torch.randperm(len(self), device=device, generator=generator)[start:start + n]
        return tuple(s.index_select(0, index) for s in self.storage)

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "num_seen": self.num_seen, "storage": list(self.storage),
                "scope": self.scope,
                "generator": self.generator.get_state() if self.generator is not None else None,
                "own_generator": self._own.get_state() if self._own is not None else None}

    def load_state_dict(self, state: dict) -> None:
        """Load :meth:`state_dict` output (checked before anything changes)."""
        storage = list(state["storage"])
        if int(state["capacity"]) != self.capacity or any(s.shape[0] != self.capacity for s in storage):
            raise ValueError(f"ReservoirBuffer.load_state_dict: capacity {state['capacity']} does not match "
                             f"{self.capacity}")
        if state.get("scope", "rank") != self.scope:
            raise ValueError(f"ReservoirBuffer.load_state_dict: the state is of scope {state.get('scope')!r}, this "
                             f"buffer's is {self.scope!r}")
        num_seen = state["num_seen"]
        if (isinstance(num_seen, bool) or int(num_seen) != num_seen or not 0 <= int(num_seen) < 2 ** 63
                or (num_seen and not storage)):
            raise ValueError(f"ReservoirBuffer.load_state_dict: num_seen must be an integer in [0, 2^63) with "
                             f"storage when > 0, got {num_seen!r}")
        if len({(s.device, s.dim() > 0) for s in storage}) > 1:
            raise ValueError("ReservoirBuffer.load_state_dict: every storage field must be on one device")
        device = self.device
        own = None
        if state.get("own_generator") is not None and (device is not None or storage):
            own = torch.Generator(device if device is not None else storage[0].device)
            own.set_state(state["own_generator"])
        self.storage = [s.to(device) if device is not None else s.clone() for s in storage]
        self.num_seen = int(state["num_seen"])
        self._own = own if own is not None else self._own
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])


SCOPES = ("rank", "global")


def _signature(fields: List[Tensor]) -> int:
    """The fields' count, item shapes and dtypes as an int64, the same in every process."""
    text = repr([(str(t.dtype), tuple(t.shape[1:])) for t in fields]).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little", signed=True)


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
        self._buffer._add([xs, ys], torch.tensor(draws, dtype=torch.float64), None)

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
