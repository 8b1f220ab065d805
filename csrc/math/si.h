// Element-wise SI math shared by the CPU and CUDA kernels, written in the same operation order as the
// hypnettorch SI's torch expressions: on the CPU float32 results round identically; nvcc contracts some products into
// FMAs, so CUDA results agree within float rounding.
#pragma once
#include "host_device.h"

namespace clfast {

// omega += delta * (-grad), delta = params - pre_step (or given).
template <typename T>
CLFAST_HD inline T si_accumulate(T omega, T delta, T grad) {
  return omega + delta * (-grad);
}

// clamp(omega / ((params - prev)^2 + eps), min=0); `q < 0 ? 0 : q` keeps NaN like torch.clamp.
template <typename T>
CLFAST_HD inline T si_importance(T omega, T param, T prev, T eps) {
  const T d = param - prev;
  const T q = omega / (d * d + eps);
  return q < T(0) ? T(0) : q;
}

// importance * (params - prev)^2, one term of the penalty.
template <typename T>
CLFAST_HD inline T si_penalty_term(T importance, T param, T prev) {
  const T d = param - prev;
  return importance * (d * d);
}

// d/dparams of scale * importance * (params - prev)^2.
template <typename T>
CLFAST_HD inline T si_penalty_grad(T importance, T param, T prev, T scale) {
  return scale * T(2) * importance * (param - prev);
}

}  // namespace clfast
