"""How clfast's components keep their state identical on every rank under ``torch.distributed``.

Each component takes ``distributed=None`` (on whenever a default process group is initialised), ``True`` (on,
and an error without a process group) or ``False`` (off: state per rank), and ``process_group=`` (default: the
world). :func:`group` answers, at each step, which group to synchronise over (None: none); the collectives run on
the tensors' own device (gloo for CPU tensors, NCCL for CUDA ones).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["check", "group", "weighted_mean_", "broadcast_"]


def check(distributed: Optional[bool], who: str) -> Optional[bool]:
    if distributed not in (None, True, False):
        raise ValueError(f"{who}: distributed must be None (automatic), True or False, got {distributed!r}")
    return distributed


def group(distributed: Optional[bool], process_group, who: str):
    """The process group ``who`` synchronises over now, or None for per-rank state."""
    if distributed is False:
        return None
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not initialised:
        if distributed:
            raise RuntimeError(f"{who}: distributed=True needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group, or a torchrun launch)")
        return None
    return process_group if process_group is not None else torch.distributed.group.WORLD


def rank_and_world() -> Tuple[int, int]:
    """(rank, number of ranks) of this process in the default group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def weighted_mean_(tensors: List[Tensor], weight: float, process_group) -> None:
    """Replaces each tensor by ``sum_r w_r t_r / sum_r w_r`` over the group's ranks, in one all-reduce."""
    flat = torch.cat([t.reshape(-1) for t in tensors] + [tensors[0].new_ones(1)]).mul_(weight)
    torch.distributed.all_reduce(flat, group=process_group)
    flat = flat[:-1] / flat[-1]
    for t, part in zip(tensors, torch.split(flat, [t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def broadcast_(tensor: Tensor, process_group) -> None:
    """The group's first rank's ``tensor`` on every rank."""
    torch.distributed.broadcast(tensor, src=torch.distributed.get_global_rank(process_group, 0)
                                if process_group is not torch.distributed.group.WORLD else 0, group=process_group)


def fisher_mean_(fisher, weight: float, process_group, who: str) -> None:
    """An nngeometry Fisher (diag, dense, KFAC or block-diagonal) replaced in place by the ranks' mean weighted by
    ``weight`` (each rank's number of examples): the Fisher of their examples together, since each rank's is a
    mean over its own (a KFAC block's factors each are)."""
    data = fisher.data
    if isinstance(data, Tensor):
        tensors = [data]
    elif isinstance(data, dict) and all(isinstance(v, Tensor) or (isinstance(v, tuple) and len(v) == 2)
                                        for v in data.values()):
        tensors = [t for v in data.values() for t in ((v,) if isinstance(v, Tensor) else v)]
    else:
        raise ValueError(f"{who}: a {type(fisher).__name__} cannot be averaged over ranks (EKFAC's eigenbases "
                         "differ per rank); use diag, kfac, dense or blockdiag, or distributed=False")
    weighted_mean_(tensors, weight, process_group)


def rank_seed(seed: int, process_group) -> int:
    """A seed for this rank of the group derived from ``seed`` (e.g. ``torch.initial_seed()``): the same on every
    run, different on every rank (splitmix64's mixer is a bijection, so distinct ranks give distinct seeds)."""
    mask = 2 ** 64 - 1

    def mix(z: int) -> int:
        z = (z + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    return mix((seed & mask) ^ mix(torch.distributed.get_rank(process_group)))


def all_gather_ints(values: List[int], device: torch.device, process_group) -> List[List[int]]:
    """Every rank's ``values`` (as many on each rank), in rank order: one all_gather of ``len(values)`` int64s per
    rank. They are host numbers, so they go through the CPU whenever the group has a CPU backend (gloo, or
    ``cpu:gloo,cuda:nccl``), with no wait for the GPU; a CUDA-only group (NCCL) takes them on ``device``, and
    reading them back then synchronises with the host."""
    if torch.device("cpu") in getattr(process_group, "_device_types", ()):
        device = torch.device("cpu")
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size(process_group))]
    torch.distributed.all_gather(out, mine, group=process_group)
    return torch.stack(out).tolist()


def gather_rows(fields: List[Tensor], counts: List[int], process_group) -> List[Tensor]:
    """Every rank's ``fields`` (tensors ``[counts[rank], ...]``, with the same item shapes and dtypes on every rank),
    each concatenated over the ranks in rank order. One all_gather: each rank sends its fields' bytes side by side,
    padded to ``max(counts)`` rows, so every rank receives ``world * max(counts) * bytes per item``."""
    mine, most = fields[0].shape[0], max(counts)
    items = [f.shape[1:].numel() for f in fields]
    widths = [n * f.element_size() for n, f in zip(items, fields)]
    packed = torch.zeros((most, sum(widths)), dtype=torch.uint8, device=fields[0].device)
    if mine:
        packed[:mine] = torch.cat([f.reshape(mine, n).contiguous().view(torch.uint8) for f, n in zip(fields, items)], 1)
    out = [torch.empty_like(packed) for _ in counts]
    torch.distributed.all_gather(out, packed, group=process_group)
    rows = torch.cat([o[:c] for o, c in zip(out, counts)])
    gathered, start = [], 0
    for f, w in zip(fields, widths):
        shape = (rows.shape[0], *f.shape[1:])
        gathered.append(rows[:, start:start + w].contiguous().view(f.dtype).reshape(shape) if w
                        else torch.empty(shape, dtype=f.dtype, device=rows.device))
        start += w
    return gathered


def broadcast_generator_(generator: torch.Generator, device: torch.device, process_group) -> None:
    """The group's first rank's ``generator`` state on every rank: one broadcast of the state's bytes (5056 for a
    CPU generator, 16 for a CUDA one) through ``device``, which the group's backend must handle."""
    state = generator.get_state().to(device)
    broadcast_(state, process_group)
    generator.set_state(state.cpu())
