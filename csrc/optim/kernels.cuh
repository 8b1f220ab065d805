// Fused optimizer device code: functors of the multi-tensor apply. Includes nothing from torch.
#pragma once
#include <cstdint>

#include "../common/multi_tensor.cuh"
#include "../math/optim.h"
#include "../math/si.h"

namespace clfast::cuda {

// Lists: params, grads, momentum buffers, omega. Unused lists repeat params (never written through).
template <typename T>
struct SgdFn {
  __device__ void operator()(TensorListMeta<4>& m, int t, int64_t b, int64_t e, int64_t, SgdHyper<T> h,
                             bool with_si) const {
    T* p = static_cast<T*>(m.ptr[0][t]);
    const T* g = static_cast<const T*>(m.ptr[1][t]);
    T *buf = static_cast<T*>(m.ptr[2][t]), *om = static_cast<T*>(m.ptr[3][t]);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const T old = p[i], grad = g[i];
      const T now = sgd_update(old, grad, h.use_momentum ? buf + i : nullptr, h);
      p[i] = now;
      if (with_si) om[i] = si_accumulate(om[i], now - old, grad);
    }
  }
};

// Lists: params, grads, exp_avg, exp_avg_sq, omega (params again when SI is off).
template <typename T>
struct AdamFn {
  __device__ void operator()(TensorListMeta<5>& m, int t, int64_t b, int64_t e, int64_t, AdamHyper<T> h,
                             bool with_si) const {
    T* p = static_cast<T*>(m.ptr[0][t]);
    const T* g = static_cast<const T*>(m.ptr[1][t]);
    T *ea = static_cast<T*>(m.ptr[2][t]), *eas = static_cast<T*>(m.ptr[3][t]), *om = static_cast<T*>(m.ptr[4][t]);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const T old = p[i], grad = g[i];
      const T now = adam_update(old, grad, ea + i, eas + i, h);
      p[i] = now;
      if (with_si) om[i] = si_accumulate(om[i], now - old, grad);
    }
  }
};

}  // namespace clfast::cuda
