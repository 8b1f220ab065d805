// Element-wise optimizer math shared by the CPU and CUDA kernels, in the operation order of
// torch.optim.SGD / Adam's single-tensor code paths, so parameters match torch's within rounding (nvcc may
// contract products into FMAs).
#pragma once
#include "host_device.h"

#include <cmath>

namespace clfast {

template <typename T>
struct SgdHyper {
  T lr, momentum, dampening_complement, weight_decay;  // dampening_complement = 1 - dampening
  bool use_momentum, nesterov, init_buffers, weight_decayed;
};

// From the op's arguments; scalars are cast to T after double arithmetic, as torch does with Python floats.
template <typename T>
inline SgdHyper<T> make_sgd_hyper(double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                                  bool init_buffers) {
  return {static_cast<T>(lr), static_cast<T>(momentum), static_cast<T>(1 - dampening), static_cast<T>(weight_decay),
          momentum != 0,      nesterov,                 init_buffers,                 weight_decay != 0};
}

// Returns the new parameter value; updates the momentum buffer in place when momentum is used.
template <typename T>
CLFAST_HD inline T sgd_update(T param, T grad, T* buf, const SgdHyper<T>& h) {
  T g = h.weight_decayed ? grad + h.weight_decay * param : grad;
  if (h.use_momentum) {
    const T b = h.init_buffers ? g : *buf * h.momentum + h.dampening_complement * g;
    *buf = b;
    g = h.nesterov ? g + h.momentum * b : b;
  }
  return param + (-h.lr) * g;
}

template <typename T>
struct AdamHyper {
  T one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay, neg_step_size, bias_correction2_sqrt;
  bool weight_decayed;
};

template <typename T>
inline AdamHyper<T> make_adam_hyper(double lr, double beta1, double beta2, double eps, double weight_decay,
                                    double bias_correction1, double bias_correction2) {
  return {static_cast<T>(1 - beta1),       static_cast<T>(beta2),
          static_cast<T>(1 - beta2),       static_cast<T>(eps),
          static_cast<T>(weight_decay),    static_cast<T>(-(lr / bias_correction1)),
          static_cast<T>(std::sqrt(bias_correction2)), weight_decay != 0};
}

// kDecay: weight decay is on; kLowLerp: 1 - beta1 < 0.5 (which side of torch's lerp formula applies). As
// template flags the CPU loop has no branches left and vectorises.
template <bool kDecay, bool kLowLerp, typename T>
CLFAST_HD inline T adam_update_t(T param, T grad, T* exp_avg, T* exp_avg_sq, const AdamHyper<T>& h) {
  T g = grad;
  if constexpr (kDecay) g = grad + h.weight_decay * param;
  // exp_avg.lerp_(g, 1 - beta1), with torch's two-sided lerp formula.
  const T m0 = *exp_avg, w = h.one_minus_beta1;
  T m;
  if constexpr (kLowLerp) {
    m = m0 + w * (g - m0);
  } else {
    m = g - (g - m0) * (T(1) - w);
  }
  // exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
  const T v = *exp_avg_sq * h.beta2 + h.one_minus_beta2 * g * g;
  *exp_avg = m;
  *exp_avg_sq = v;
  const T denom = std::sqrt(v) / h.bias_correction2_sqrt + h.eps;
  return param + h.neg_step_size * (m / denom);
}

template <typename T>
CLFAST_HD inline T adam_update(T param, T grad, T* exp_avg, T* exp_avg_sq, const AdamHyper<T>& h) {
  const bool low = h.one_minus_beta1 < T(0.5);
  if (h.weight_decayed)
    return low ? adam_update_t<true, true>(param, grad, exp_avg, exp_avg_sq, h)
               : adam_update_t<true, false>(param, grad, exp_avg, exp_avg_sq, h);
  return low ? adam_update_t<false, true>(param, grad, exp_avg, exp_avg_sq, h)
             : adam_update_t<false, false>(param, grad, exp_avg, exp_avg_sq, h);
}

}  // namespace clfast
