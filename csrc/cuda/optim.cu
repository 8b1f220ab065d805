// Fused SGD / Adam steps with SI accumulation on CUDA: one multi-tensor launch updates parameters, optimizer
// state and SI's omega, reading each parameter and gradient once.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/optim.h"
#include "../math/si.h"
#include "common.cuh"

namespace clfast::cuda {
namespace {

constexpr auto kCUDA = c10::DeviceType::CUDA;

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

void sgd_si_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList omega,
                  double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                  bool init_buffers) {
  check_lists("sgd_si_step_", kCUDA,
              {{"params", params},
               {"grads", grads},
               {"momentum_buffers", momentum_buffers, /*optional=*/true},
               {"omega", omega, /*optional=*/true}});
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
              "clfast.sgd_si_step_: momentum != 0 needs one momentum buffer per parameter");
  ContigList p(params), g(grads), buf(momentum_buffers), o(omega);
  const bool with_si = !o.empty();
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "sgd_si_step_", [&] {
    const auto h = make_sgd_hyper<scalar_t>(lr, momentum, dampening, weight_decay, nesterov, init_buffers);
    multi_tensor_apply<4>({p.work, g.work, h.use_momentum ? buf.work : p.work, with_si ? o.work : p.work},
                          SgdFn<scalar_t>(), h, with_si);
  });
  p.finish();
  buf.finish();
  o.finish();
}

void adam_si_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                   at::TensorList omega, double lr, double beta1, double beta2, double eps, double weight_decay,
                   double bias_correction1, double bias_correction2) {
  check_lists("adam_si_step_", kCUDA,
              {{"params", params},
               {"grads", grads},
               {"exp_avg", exp_avg},
               {"exp_avg_sq", exp_avg_sq},
               {"omega", omega, /*optional=*/true}});
  ContigList p(params), g(grads), m(exp_avg), v(exp_avg_sq), o(omega);
  const bool with_si = !o.empty();
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "adam_si_step_", [&] {
    const auto h = make_adam_hyper<scalar_t>(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                             bias_correction2);
    multi_tensor_apply<5>({p.work, g.work, m.work, v.work, with_si ? o.work : p.work}, AdamFn<scalar_t>(), h,
                          with_si);
  });
  p.finish();
  m.finish();
  v.finish();
  o.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CUDA, m) {
  m.impl("sgd_si_step_", &sgd_si_step_);
  m.impl("adam_si_step_", &adam_si_step_);
}

}  // namespace clfast::cuda
