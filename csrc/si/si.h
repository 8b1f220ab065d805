// SI op family: the params structs the front (si.cpp) fills and the launchers (si_cpu.cpp, si_cuda.cu) read.
// Every list is contiguous, validated, and of one dtype and device.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace clfast {

using Tensors = std::vector<at::Tensor>;

struct SiAccumulate {  // omega += (ref_is_delta ? ref : params - ref) * (-grads)
  Tensors omega, params, ref, grads;
  bool ref_is_delta;
};

struct SiConsolidate {  // importance += clamp(omega / ((params - prev)^2 + epsilon), 0); prev = params; omega = 0
  Tensors importance, prev, omega, params;
  double epsilon;
};

struct SiPenalty {  // out (0-dim) = sum importance * (params - prev)^2
  Tensors importance, prev, params;
  at::Tensor out;
};

// out (+)= s * 2 * importance * (params - prev), with s = scale_tensor (one element on the device, read there:
// no host sync) when it is defined, else scale.
struct SiPenaltyGrad {
  Tensors out, importance, prev, params;
  double scale;
  at::Tensor scale_tensor;
  bool accumulate;
};

}  // namespace clfast
