"""How clfast's components keep their state identical on every rank under ``torch.distributed``.

Each component takes ``distributed=None`` (on whenever a default process group is initialised), ``True`` (on,
and an error without a process group) or ``False`` (off: state per rank), and ``process_group=`` (default: the
world). :func:`group` answers, at each step, which group to synchronise over (None: none); the collectives run on
the tensors' own device (gloo for CPU tensors, NCCL for CUDA ones).
"""
from __future__ import annotations

from typing import List, Optional

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
