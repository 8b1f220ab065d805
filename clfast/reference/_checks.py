"""Input checks of the reference ops, with the native ops' messages (csrc/checks.h), so both backends fail
the same way on bad input and before touching any state."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
from torch import Tensor

_DTYPES = (torch.float32, torch.float64)


def check_lists(op: str, *lists: Tuple[str, Sequence[Tensor]], optional: Sequence[str] = ()) -> None:
    """The first list is the reference (the parameters); lists named in ``optional`` may be empty."""
    ref_name, ref = lists[0]
    if len(ref) == 0:
        raise RuntimeError(f"clfast.{op}: expected at least one tensor in '{ref_name}'")
    first = ref[0]
    for name, tensors in lists:
        if name in optional and len(tensors) == 0:
            continue
        if len(tensors) != len(ref):
            raise RuntimeError(f"clfast.{op}: '{name}' has {len(tensors)} tensors but '{ref_name}' has {len(ref)}")
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor):
                raise RuntimeError(f"clfast.{op}: {name}[{i}] is undefined (None)")
            if t.dtype not in _DTYPES:
                raise RuntimeError(f"clfast.{op}: {name}[{i}] must be float32 or float64, got {t.dtype}")
            if t.dtype != first.dtype:
                raise RuntimeError(f"clfast.{op}: all tensors must share one dtype; {name}[{i}] is {t.dtype} "
                                   f"but {ref_name}[0] is {first.dtype}")
            if t.device != first.device:
                raise RuntimeError(f"clfast.{op}: {name}[{i}] is on {t.device} but {ref_name}[0] is on "
                                   f"{first.device}; all tensors must be on one device")
            if t.shape != ref[i].shape:
                raise RuntimeError(f"clfast.{op}: {name}[{i}] has shape {list(t.shape)} but {ref_name}[{i}] has "
                                   f"shape {list(ref[i].shape)}")
