"""The Python face of clfast's ops, one module per op family (wrapper, fake kernels, autograd), and the backend
switch (:mod:`clfast.ops._backend`): modules call these functions, never ``torch.ops.clfast`` directly."""
from ._backend import BACKENDS, backend, native_available, set_backend
from . import kron
from .cbp import cbp_replace_, cbp_update_
from .dan import dan_layer
from .fisher import fisher_diag_, fisher_factor_
from .kron import kron_mv, kron_quadratic
from .optim import adam_si_step_, sgd_si_step_
from .reservoir import reservoir_add_
from .si import si_accumulate_, si_consolidate_, si_penalty, si_penalty_grad_

__all__ = ["BACKENDS", "backend", "native_available", "set_backend", "si_accumulate_", "si_consolidate_",
           "si_penalty", "si_penalty_grad_", "sgd_si_step_", "adam_si_step_", "cbp_update_", "cbp_replace_",
           "reservoir_add_", "kron_quadratic", "kron_mv", "dan_layer", "fisher_diag_",
           "fisher_factor_"]
