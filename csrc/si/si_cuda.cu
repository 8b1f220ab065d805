// SI launchers on CUDA: one multi-tensor launch for all parameter tensors per call.
#include <ATen/Dispatch.h>

#include "../common/cuda_host.h"
#include "../common/launch.h"
#include "../common/multi_tensor_cuda.h"
#include "kernels.cuh"
#include "si.h"

namespace clfast::cuda {
namespace {

void launch_si_accumulate(const SiAccumulate& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_accumulate_", [&] {
    multi_tensor_apply<4>({a.omega, a.params, a.ref, a.grads}, AccumulateFn<scalar_t>(), a.ref_is_delta);
  });
}

void launch_si_consolidate(const SiConsolidate& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_consolidate_", [&] {
    multi_tensor_apply<4>({a.importance, a.prev, a.omega, a.params}, ConsolidateFn<scalar_t>(),
                          static_cast<scalar_t>(a.epsilon));
  });
}

void launch_si_penalty(const SiPenalty& a) {
  const DeviceGuard guard(a.params[0].device());
  const int64_t n = total_blocks(a.params);
  at::Tensor partials = a.params[0].new_empty({std::max<int64_t>(n, 1)}, a.params[0].options().dtype(at::kDouble));
  if (n == 0) partials.zero_();
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_penalty", [&] {
    multi_tensor_apply<3>({a.importance, a.prev, a.params}, PenaltyFn<scalar_t>(), partials.data_ptr<double>());
    CLFAST_LAUNCH(sum_partials<scalar_t>, 1, kThreads, 0, current_stream(), partials.data_ptr<double>(),
                  std::max<int64_t>(n, 1), a.out.data_ptr<scalar_t>());
  });
}

void launch_si_penalty_grad(const SiPenaltyGrad& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_penalty_grad_", [&] {
    const scalar_t* scale_ptr = a.scale_tensor.defined() ? a.scale_tensor.data_ptr<scalar_t>() : nullptr;
    multi_tensor_apply<4>({a.out, a.importance, a.prev, a.params}, PenaltyGradFn<scalar_t>(),
                          static_cast<scalar_t>(a.scale), scale_ptr, a.accumulate);
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(SiAccumulate, cuda, &launch_si_accumulate);
CLFAST_REGISTER_LAUNCHER(SiConsolidate, cuda, &launch_si_consolidate);
CLFAST_REGISTER_LAUNCHER(SiPenalty, cuda, &launch_si_penalty);
CLFAST_REGISTER_LAUNCHER(SiPenaltyGrad, cuda, &launch_si_penalty_grad);

}  // namespace clfast::cuda
