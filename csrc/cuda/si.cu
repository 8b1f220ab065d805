// SI ops on CUDA: one multi-tensor launch for all parameter tensors per call.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/si.h"
#include "common.cuh"

namespace clfast::cuda {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

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

void si_accumulate_(at::TensorList omega, at::TensorList params, at::TensorList ref, at::TensorList grads,
                    bool ref_is_delta) {
  check_lists("si_accumulate_", kCUDA, {{"params", params}, {"omega", omega}, {"ref", ref}, {"grads", grads}});
  ContigList o(omega), p(params), r(ref), g(grads);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_accumulate_", [&] {
    multi_tensor_apply<4>({o.work, p.work, r.work, g.work}, AccumulateFn<scalar_t>(), ref_is_delta);
  });
  o.finish();
}

void si_consolidate_(at::TensorList importance, at::TensorList prev, at::TensorList omega, at::TensorList params,
                     double epsilon) {
  check_lists("si_consolidate_", kCUDA,
              {{"params", params}, {"importance", importance}, {"prev", prev}, {"omega", omega}});
  ContigList imp(importance), pr(prev), o(omega), p(params);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_consolidate_", [&] {
    multi_tensor_apply<4>({imp.work, pr.work, o.work, p.work}, ConsolidateFn<scalar_t>(),
                          static_cast<scalar_t>(epsilon));
  });
  imp.finish();
  pr.finish();
  o.finish();
}

at::Tensor si_penalty(at::TensorList importance, at::TensorList prev, at::TensorList params) {
  check_lists("si_penalty", kCUDA, {{"params", params}, {"importance", importance}, {"prev", prev}});
  ContigList imp(importance), pr(prev), p(params);
  const c10::cuda::CUDAGuard guard(params[0].device());
  const int64_t n = total_blocks(p.work);
  at::Tensor partials = params[0].new_empty({std::max<int64_t>(n, 1)}, params[0].options().dtype(at::kDouble));
  if (n == 0) partials.zero_();
  at::Tensor out = params[0].new_empty({});
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_penalty", [&] {
    multi_tensor_apply<3>({imp.work, pr.work, p.work}, PenaltyFn<scalar_t>(), partials.data_ptr<double>());
    sum_partials<scalar_t><<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        partials.data_ptr<double>(), std::max<int64_t>(n, 1), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::vector<at::Tensor> si_penalty_backward(const at::Tensor& grad_out, at::TensorList importance,
                                            at::TensorList prev, at::TensorList params) {
  check_lists("si_penalty_backward", kCUDA, {{"params", params}, {"importance", importance}, {"prev", prev}});
  TORCH_CHECK(grad_out.numel() == 1 && grad_out.device() == params[0].device(),
              "clfast.si_penalty_backward: grad_out must be one element on ", params[0].device(), ", got shape ",
              grad_out.sizes(), " on ", grad_out.device());
  ContigList imp(importance), pr(prev), p(params);
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : p.work) out.push_back(t.new_empty(t.sizes()));
  const at::Tensor scale = grad_out.to(params[0].scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_penalty_backward", [&] {
    multi_tensor_apply<4>({out, imp.work, pr.work, p.work}, PenaltyGradFn<scalar_t>(), scalar_t(0),
                          static_cast<const scalar_t*>(scale.data_ptr<scalar_t>()), false);
  });
  return out;
}

void si_penalty_grad_(at::TensorList grads, at::TensorList importance, at::TensorList prev, at::TensorList params,
                      double scale) {
  check_lists("si_penalty_grad_", kCUDA,
              {{"params", params}, {"grads", grads}, {"importance", importance}, {"prev", prev}});
  ContigList g(grads), imp(importance), pr(prev), p(params);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_penalty_grad_", [&] {
    multi_tensor_apply<4>({g.work, imp.work, pr.work, p.work}, PenaltyGradFn<scalar_t>(),
                          static_cast<scalar_t>(scale), static_cast<const scalar_t*>(nullptr), true);
  });
  g.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CUDA, m) {
  m.impl("si_accumulate_", &si_accumulate_);
  m.impl("si_consolidate_", &si_consolidate_);
  m.impl("si_penalty", &si_penalty);
  m.impl("si_penalty_backward", &si_penalty_backward);
  m.impl("si_penalty_grad_", &si_penalty_grad_);
}

}  // namespace clfast::cuda
