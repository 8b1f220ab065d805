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


def _addresses(t: Tensor) -> Tensor:
    offsets = torch.zeros((), dtype=torch.long)
    for size, stride in zip(t.shape, t.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.reshape(-1) * t.element_size() + t.data_ptr()


def _overlaps_itself(t: Tensor) -> bool:
    """csrc/common/checks.h's overlaps_itself."""
    if t.numel() <= 1:
        return False
    reach = 0
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] > 1):
        if stride <= reach:
            return t.numel() > 1 << 20 or _addresses(t).unique().numel() < t.numel()
        reach += stride * (size - 1)
    return False


def _byte_range(t: Tensor) -> Tuple[int, int]:
    extent = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride()))
    lo = t.data_ptr()
    return lo, lo + extent * t.element_size()


def _share_an_element(x: Tensor, y: Tensor) -> bool:
    """csrc/common/checks.h's share_an_element: dense pairs whose ranges meet overlap; otherwise the element
    addresses are compared, up to 2^20 elements each."""
    def dense(t):
        dims = sorted((t.stride(d), t.shape[d]) for d in range(t.dim()) if t.shape[d] != 1)
        expected = 1
        for stride, size in dims:
            if stride != expected:
                return False
            expected *= size
        return True

    if dense(x) and dense(y):
        return True
    if max(x.numel(), y.numel()) > 1 << 20 or x.element_size() != y.element_size():
        return True

    return bool(torch.isin(_addresses(x), _addresses(y)).any())


def check_memory(op: str, *args: Tuple[str, Sequence[Tensor], bool]) -> None:
    """The native fronts' check_memory (csrc/common/checks.h): written tensors must be writable and share no
    memory with any other argument. ``args``: (name, tensors, written)."""
    ranges = []
    for name, tensors, written in args:
        for i, t in enumerate(tensors):
            if not isinstance(t, Tensor) or t.numel() == 0:
                continue
            if written:
                if _overlaps_itself(t):
                    raise RuntimeError(f"clfast.{op}: {name}[{i}] cannot be written: several of its elements share "
                                       "memory (an expanded or stride-0 view); pass a tensor that owns its "
                                       "elements, e.g. .clone()")
                if t.is_inference() and not torch.is_inference_mode_enabled():
                    raise RuntimeError(f"clfast.{op}: {name}[{i}] is an inference tensor; in-place updates to it are "
                                       "only allowed inside InferenceMode")
            lo, hi = _byte_range(t)
            ranges.append((lo, hi, name, i, written, t))
    ranges.sort(key=lambda r: r[0])
    open_ = []
    for r in ranges:
        open_ = [o for o in open_ if o[1] > r[0]]
        for o in open_:
            if not (o[4] or r[4]) or not _share_an_element(o[5], r[5]):
                continue
            what = "two outputs" if (o[4] and r[4]) else "an output and an input"
            raise RuntimeError(f"clfast.{op}: {o[2]}[{o[3]}] and {r[2]}[{r[3]}] share memory; {what} of this op must "
                               "not overlap (pass separate tensors, e.g. .clone())")
        open_.append(r)
