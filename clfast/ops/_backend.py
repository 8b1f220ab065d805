"""The one place where clfast chooses between the native extension and the pure-torch references: every op
wrapper in :mod:`clfast.ops` calls :func:`op`, which gives ``torch.ops.clfast.<name>`` (the dispatcher then picks
the CPU or CUDA kernel) or, on the reference backend, the function of the same name in :mod:`clfast.reference`."""
from __future__ import annotations

import os
import warnings
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from .. import reference

BACKENDS = ("native", "reference")

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.clfast.*)

    _native_error: str | None = None
except ImportError as exc:  # not built, or built against another torch
    _native_error = f"{type(exc).__name__}: {exc}"


def native_available() -> bool:
    """True when the compiled extension ``clfast._C`` is loaded."""
    return _native_error is None


def _initial_backend() -> str:
    requested = os.environ.get("CLFAST_BACKEND", "").strip().lower()
    if requested and requested not in BACKENDS:
        raise ValueError(f"CLFAST_BACKEND must be one of {BACKENDS}, got {requested!r}")
    if requested == "reference":
        return "reference"
    if native_available():
        return "native"
    warnings.warn(
        f"clfast: the native extension could not be loaded ({_native_error}); running on the pure-torch "
        "reference ops, which give the same numbers more slowly. Build it with "
        "`pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=3,
    )
    return "reference"


_backend = _initial_backend()


def backend() -> str:
    """The backend ops run on: ``"native"`` (compiled C++/CUDA kernels) or ``"reference"`` (pure torch)."""
    return _backend


def set_backend(name: str) -> None:
    """Switch every clfast op to ``"native"`` or ``"reference"``. Raises if native is asked for but not built."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "native" and not native_available():
        raise RuntimeError(f"clfast: the native extension is not available ({_native_error})")
    _backend = name


_registrars: List[Callable[[str], None]] = []


def registrar(register: Callable[[str], None]) -> Callable[[str], None]:
    """Decorates an ops module's ``_register(ns)``, which registers the fake kernels and Python autograd of its ops
    in the op namespace ``ns``: run now for ``clfast`` when the extension is loaded, and again by
    :func:`register_namespace` for another build of the same ops."""
    _registrars.append(register)
    if native_available():
        register("clfast")
    return register


def register_namespace(ns: str) -> None:
    """Registers every ops module's fake kernels and autograd for ``torch.ops.<ns>``, a library built from the
    same sources under another namespace (the tests' emulated CUDA library, tests/cuemu)."""
    for register in _registrars:
        register(ns)


def op(name: str) -> Callable:
    """``torch.ops.clfast.<name>`` on the native backend, ``clfast.reference.<name>`` on the reference one."""
    if _backend == "native":
        return getattr(torch.ops.clfast, name)
    return getattr(reference, name)




def one_device(op_name: str, *args) -> None:
    """For the fake kernels: a fake kernel runs for meta tensors and under FakeTensorMode, and a real tensor among
    meta ones would send a call there too and do nothing. Every tensor argument must be on one device, as the
    native fronts check."""
    first = None
    for arg in args:
        for t in (arg if isinstance(arg, (list, tuple)) else [arg]):
            if isinstance(t, Tensor):
                if first is None:
                    first = t
                elif t.device != first.device:
                    raise RuntimeError(f"clfast.{op_name}: tensors on {first.device} and {t.device}; all tensors "
                                       "must be on one device")


def list_flags(needs, n: int) -> list:
    """``ctx.needs_input_grad`` of a ``Tensor[]`` argument (a list per argument) as one bool per tensor."""
    return list(needs) if isinstance(needs, (list, tuple)) else [bool(needs)] * n
