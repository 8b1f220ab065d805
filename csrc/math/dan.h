// Element math of the DAN kernels, shared by the CPU and CUDA kernels: the BatchNorm fold (csrc/dan/dan.h), and the
// derivatives of the activations with torch's formulas. The activations' forward goes through ATen's vectorised
// kernels (csrc/dan/dan.h: apply_act), which keep their output: tanh, sigmoid and relu differentiate from it (as
// torch does), GELU from its input.
#pragma once
#include "host_device.h"

#include <cmath>
#include <cstdint>
#include <type_traits>

namespace clfast {

// Element (b, g * Cg + j) of a logical [B, C] activation matrix, C = groups * Cg, sits at at(g, b) + j: stored
// flat ([B, C], row-major) or grouped ([groups, B, Cg], one slab per neuron).
struct MatrixView {
  int64_t group_base, row;
  CLFAST_HD static MatrixView of(bool grouped, int64_t B, int64_t C, int64_t groups) {
    return grouped ? MatrixView{B * (C / groups), C / groups} : MatrixView{C / groups, C};
  }
  CLFAST_HD int64_t at(int64_t g, int64_t b) const { return g * group_base + b * row; }
};

// 1 / sqrt(var + eps), rounded once from double, as BatchNorm's inverse standard deviation.
template <typename T>
CLFAST_HD inline T bn_rstd(T var, double eps) {
  using std::sqrt;
  return static_cast<T>(1.0 / sqrt(static_cast<double>(var) + eps));
}

// (s, t) of column i of a BatchNorm folded into the following Linear (Weff = W * s, beff = c + W t): train
// mode (rm == nullptr) s = gamma, t = beta; eval mode s = gamma * rstd_run, t = beta - mean_run * s.
template <typename T>
CLFAST_HD inline void bn_scale_shift(const T* g, const T* b, const T* rm, const T* rv, double eps, int64_t i,
                                           T& s, T& t) {
  if (rm == nullptr) {
    s = g[i];
    t = b[i];
  } else {
    s = g[i] * bn_rstd(rv[i], eps);
    t = b[i] - rm[i] * s;
  }
}

// The gradient of gamma from P = sum_r dWeff * W and Q = sum_r dbeff * W (Q is beta's): train mode P, eval
// mode rstd_run * (P - mean_run * Q), since t depends on gamma through s there.
template <typename T>
CLFAST_HD inline T bn_gamma_grad(T P, T Q, const T* rm, const T* rv, double eps, int64_t i) {
  return rm == nullptr ? P : bn_rstd(rv[i], eps) * (P - rm[i] * Q);
}

// The schema's activation names as codes, mapped once by the front (csrc/dan/dan.h: parse_act).
enum Act : int { kIdentity = 0, kTanh = 1, kRelu = 2, kSigmoid = 3, kGelu = 4, kGeluTanh = 5 };
constexpr int kNumActs = 6;

// True when the backward needs the activation's input (GELU), false when it needs its output.
constexpr bool needs_input(int act) { return act == kGelu || act == kGeluTanh; }

// grad * act'(z), from s = act(z) or, when needs_input(act), s = z.
template <typename T>
CLFAST_HD inline T act_backward(int act, T grad, T s) {
  using std::erf;
  using std::exp;
  using std::tanh;
  switch (act) {
    case kTanh: return grad * (T(1) - s * s);
    case kRelu: return s > T(0) ? grad : T(0);
    case kSigmoid: return grad * (T(1) - s) * s;
    case kGelu: {
      const T z = s;
      const T cdf = T(0.5) * (T(1) + erf(z * T(M_SQRT1_2)));
      const T pdf = exp(T(-0.5) * z * z) * T(M_2_SQRTPI * M_SQRT1_2 * 0.5);
      return grad * (cdf + z * pdf);
    }
    case kGeluTanh: {
      const T z = s;
      const T beta = T(M_SQRT2 * M_2_SQRTPI * 0.5), kappa = T(0.044715);
      const T t = tanh(beta * (z + kappa * z * z * z));
      const T left = T(0.5) * z, right = T(1) + t;
      return grad * (T(0.5) * right + left * (T(1) - t * t) * beta * (T(1) + T(3) * kappa * z * z));
    }
    default: return grad;
  }
}

// Calls f(std::integral_constant<int, act>{}), so kernels see the activation as a compile-time constant.
template <typename F>
void with_act(int64_t act, F&& f) {
  switch (act) {
    case kTanh: return f(std::integral_constant<int, kTanh>{});
    case kRelu: return f(std::integral_constant<int, kRelu>{});
    case kSigmoid: return f(std::integral_constant<int, kSigmoid>{});
    case kGelu: return f(std::integral_constant<int, kGelu>{});
    case kGeluTanh: return f(std::integral_constant<int, kGeluTanh>{});
    default: return f(std::integral_constant<int, kIdentity>{});
  }
}

}  // namespace clfast
