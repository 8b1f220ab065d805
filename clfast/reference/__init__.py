"""Pure-torch references of every clfast op, one module per op family with the native op's name and schema.

They are the oracle the tests compare the C++/CUDA kernels against, and the implementation clfast runs on
when the extension is not built (``clfast.backend() == "reference"``); each checks its arguments as the native
front does and raises the same errors. The code clfast replaces (hypnettorch's SI, CLArena's CBP, the
per-neuron DAN, ...), re-implemented for benchmarks and parity tests, is in :mod:`clfast.baselines`.
"""
from .optim import adam_si_step_, sgd_si_step_
from .si import si_accumulate_, si_consolidate_, si_penalty, si_penalty_backward, si_penalty_grad_

__all__ = [
    "si_accumulate_",
    "si_consolidate_",
    "si_penalty",
    "si_penalty_backward",
    "si_penalty_grad_",
    "sgd_si_step_",
    "adam_si_step_",
]
from .cbp import cbp_replace_, cbp_update_  # noqa: E402

__all__ += ["cbp_update_", "cbp_replace_"]
from .buffer import reservoir_add_  # noqa: E402

__all__ += ["reservoir_add_"]
from .ewc import kron_mv, kron_quadratic  # noqa: E402

__all__ += ["kron_quadratic", "kron_mv"]
from .dan import dan_bn_update_, dan_layer  # noqa: E402

__all__ += ["dan_layer", "dan_bn_update_"]
from .fisher import fisher_diag_, fisher_factor_  # noqa: E402

__all__ += ["fisher_diag_", "fisher_factor_"]
