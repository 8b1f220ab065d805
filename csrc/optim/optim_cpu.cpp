// Fused SGD / Adam steps with SI accumulation on the CPU: the update and omega += (new - old) * (-grad) in
// one pass over memory, with no pre-step copy of the parameters.
#include <ATen/Dispatch.h>

#include "../common/launch.h"
#include "../common/multi_tensor_cpu.h"
#include "../common/vectorize.h"
#include "../math/optim.h"
#include "../math/si.h"
#include "optim.h"

#include <type_traits>

namespace clfast::cpu {
namespace {

// One chunk of a fused step: p[i] = update(p[i], g[i], s1[i], s2[i]) with kStates optimizer-state arrays
// (momentum; exp_avg and exp_avg_sq) and, with kOmega, omega += (new - old) * (-g). Every array is a restrict
// parameter and every flag a template argument, so the loop has no branches or alias checks and vectorises.
template <int kStates, bool kOmega, typename T, typename Update>
CLFAST_VECTORIZE void step_chunk(int64_t b, int64_t e, T* __restrict__ p, const T* __restrict__ g, T* __restrict__ s1,
                       T* __restrict__ s2, T* __restrict__ om, const Update& update) {
  for (int64_t i = b; i < e; ++i) {
    T a = T(0), c = T(0);
    if constexpr (kStates > 0) a = s1[i];
    if constexpr (kStates > 1) c = s2[i];
    const T old = p[i], grad = g[i], now = update(old, grad, a, c);
    p[i] = now;
    if constexpr (kStates > 0) s1[i] = a;
    if constexpr (kStates > 1) s2[i] = c;
    if constexpr (kOmega) om[i] = si_accumulate(om[i], now - old, grad);
  }
}

template <typename T>
std::vector<T*> optional_ptrs(const std::vector<at::Tensor>& l, size_t n) {
  return l.empty() ? std::vector<T*>(n, nullptr) : data_ptrs<T>(l);
}

void launch_sgd_step(const SgdStep& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "sgd_si_step_", [&] {
    const auto h = make_sgd_hyper<scalar_t>(a.lr, a.momentum, a.dampening, a.weight_decay, a.nesterov,
                                            a.init_buffers);
    auto P = data_ptrs<scalar_t>(a.params), G = data_ptrs<scalar_t>(a.grads);
    auto B = optional_ptrs<scalar_t>(a.momentum_buffers, a.params.size());
    auto O = optional_ptrs<scalar_t>(a.omega, a.params.size());
    with_flag(!a.omega.empty(), [&](auto with_si) {
      with_flag(h.use_momentum, [&](auto with_momentum) {
        constexpr int kStates = decltype(with_momentum)::value ? 1 : 0;
        for_each_chunk(numels(a.params), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
          step_chunk<kStates, decltype(with_si)::value>(
              b, e, P[t], G[t], B[t], B[t], O[t],
              [&](scalar_t x, scalar_t d, scalar_t& m, scalar_t&) { return sgd_update(x, d, &m, h); });
        });
      });
    });
  });
}

void launch_adam_step(const AdamStep& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "adam_si_step_", [&] {
    const auto h = make_adam_hyper<scalar_t>(a.lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.bias_correction1,
                                             a.bias_correction2);
    auto P = data_ptrs<scalar_t>(a.params), G = data_ptrs<scalar_t>(a.grads), M = data_ptrs<scalar_t>(a.exp_avg),
         V = data_ptrs<scalar_t>(a.exp_avg_sq);
    auto O = optional_ptrs<scalar_t>(a.omega, a.params.size());
    with_flag(!a.omega.empty(), [&](auto with_si) {
      with_flag(h.weight_decayed, [&](auto decay) {
        with_flag(h.one_minus_beta1 < scalar_t(0.5), [&](auto low_lerp) {
          for_each_chunk(numels(a.params), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
            step_chunk<2, decltype(with_si)::value>(
                b, e, P[t], G[t], M[t], V[t], O[t], [&](scalar_t x, scalar_t d, scalar_t& m1, scalar_t& v1) {
                  return adam_update_t<decltype(decay)::value, decltype(low_lerp)::value>(x, d, &m1, &v1, h);
                });
          });
        });
      });
    });
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(SgdStep, cpu, &launch_sgd_step);
CLFAST_REGISTER_LAUNCHER(AdamStep, cpu, &launch_adam_step);

}  // namespace clfast::cpu
