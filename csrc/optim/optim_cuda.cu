// Fused SGD / Adam launchers on CUDA: one multi-tensor launch updates parameters, optimizer state and SI's
// omega, reading each parameter and gradient once.
#include <ATen/Dispatch.h>

#include "../common/launch.h"
#include "../common/multi_tensor_cuda.h"
#include "kernels.cuh"
#include "optim.h"

namespace clfast::cuda {
namespace {

void launch_sgd_step(const SgdStep& a) {
  const bool with_si = !a.omega.empty();
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "sgd_si_step_", [&] {
    const auto h = make_sgd_hyper<scalar_t>(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov,
                                            a.init_buffers);
    // Unused lists repeat params (never written through).
    multi_tensor_apply<4>({a.params, a.grads, h.use_momentum ? a.momentum_buffers : a.params,
                           with_si ? a.omega : a.params},
                          SgdFn<scalar_t>(), h, with_si);
  });
}

void launch_adam_step(const AdamStep& a) {
  const bool with_si = !a.omega.empty();
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "adam_si_step_", [&] {
    const auto h = make_adam_hyper<scalar_t>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.bias_correction1,
                                             a.bias_correction2);
    multi_tensor_apply<5>({a.params, a.grads, a.exp_avg, a.exp_avg_sq, with_si ? a.omega : a.params},
                          AdamFn<scalar_t>(), h, with_si);
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(SgdStep, cuda, &launch_sgd_step);
CLFAST_REGISTER_LAUNCHER(AdamStep, cuda, &launch_adam_step);

}  // namespace clfast::cuda
