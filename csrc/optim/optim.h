// Fused optimizer op family: params structs filled by the front (optim.cpp), read by the launchers
// (optim_cpu.cpp, optim_cuda.cu). Lists are contiguous and validated; momentum_buffers / omega may be empty.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace clfast {

struct SgdStep {
  std::vector<at::Tensor> params, grads, momentum_buffers, omega;
  double lr, momentum, dampening, weight_decay;
  bool nesterov, init_buffers;
};

struct AdamStep {
  std::vector<at::Tensor> params, grads, exp_avg, exp_avg_sq, omega;
  double lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2;
};

}  // namespace clfast
