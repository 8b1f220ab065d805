"""clfast: fused C++/CUDA kernels for continual learning on PyTorch.

Ops run through ``torch.ops.clfast.*`` when the native extension is built and on the pure-torch references
in :mod:`clfast.reference` otherwise (same numbers, slower). :func:`backend` says which, :func:`set_backend`
or ``CLFAST_BACKEND=reference`` forces the references.
"""
from .ops import backend, native_available, set_backend
from ._version import __version__
from . import nn, optim, si
from .si import SI
from .cbp import CBP
from .buffer import DataBuffer, ReservoirBuffer
from .ewc import EWC
from .ocar import OCAR
from ._fisher import fisher

__all__ = ["__version__", "backend", "set_backend", "native_available", "nn", "si", "SI", "optim", "CBP",
           "ReservoirBuffer", "DataBuffer", "EWC", "OCAR", "fisher"]
