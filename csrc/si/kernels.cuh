// SI device code: functors of the multi-tensor apply and the final sum of the penalty. Includes nothing from
// torch (only math/ and the device side of the multi-tensor apply).
#pragma once
#include <cstdint>

#include "../common/multi_tensor.cuh"
#include "../math/si.h"

namespace clfast::cuda {

template <typename T>
struct AccumulateFn {  // lists: omega, params, ref, grads
  __device__ void operator()(TensorListMeta<4>& m, int t, int64_t b, int64_t e, int64_t, bool ref_is_delta) const {
    T* om = static_cast<T*>(m.ptr[0][t]);
    const T *p = static_cast<const T*>(m.ptr[1][t]), *r = static_cast<const T*>(m.ptr[2][t]),
            *g = static_cast<const T*>(m.ptr[3][t]);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x)
      om[i] = si_accumulate(om[i], ref_is_delta ? r[i] : p[i] - r[i], g[i]);
  }
};

template <typename T>
struct ConsolidateFn {  // lists: importance, prev, omega, params
  __device__ void operator()(TensorListMeta<4>& m, int t, int64_t b, int64_t e, int64_t, T eps) const {
    T *im = static_cast<T*>(m.ptr[0][t]), *pv = static_cast<T*>(m.ptr[1][t]), *om = static_cast<T*>(m.ptr[2][t]);
    const T* p = static_cast<const T*>(m.ptr[3][t]);
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const T param = p[i];
      im[i] += si_importance(om[i], param, pv[i], eps);
      pv[i] = param;
      om[i] = T(0);
    }
  }
};

template <typename T>
struct PenaltyFn {  // lists: importance, prev, params; one double partial sum per block
  __device__ void operator()(TensorListMeta<3>& m, int t, int64_t b, int64_t e, int64_t block,
                             double* partials) const {
    const T *im = static_cast<const T*>(m.ptr[0][t]), *pv = static_cast<const T*>(m.ptr[1][t]),
            *p = static_cast<const T*>(m.ptr[2][t]);
    double acc = 0.0;
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) acc += static_cast<double>(si_penalty_term(im[i], p[i], pv[i]));
    acc = block_sum(acc);
    if (threadIdx.x == 0) partials[block] = acc;
  }
};

// Adds the per-block partial sums in a fixed order: the result does not depend on scheduling.
template <typename T>
__global__ void __launch_bounds__(kThreads) sum_partials(const double* partials, int64_t n, T* out) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
  acc = block_sum(acc);
  if (threadIdx.x == 0) *out = static_cast<T>(acc);
}

template <typename T>
struct PenaltyGradFn {  // lists: out, importance, prev, params; out = [out +] scale * 2 * imp * (p - prev)
  __device__ void operator()(TensorListMeta<4>& m, int t, int64_t b, int64_t e, int64_t, T scale,
                             const T* scale_ptr, bool accumulate) const {
    T* d = static_cast<T*>(m.ptr[0][t]);
    const T *im = static_cast<const T*>(m.ptr[1][t]), *pv = static_cast<const T*>(m.ptr[2][t]),
            *p = static_cast<const T*>(m.ptr[3][t]);
    const T s = scale_ptr != nullptr ? *scale_ptr : scale;  // backward reads grad_out on the device: no sync
    for (int64_t i = b + threadIdx.x; i < e; i += blockDim.x) {
      const T v = si_penalty_grad(im[i], p[i], pv[i], s);
      d[i] = accumulate ? d[i] + v : v;
    }
  }
};

}  // namespace clfast::cuda
