// Fused SGD / Adam steps with SI accumulation on the CPU: the update and omega += (new - old) * (-grad) in
// one pass over memory, with no pre-step copy of the parameters.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/optim.h"
#include "../math/si.h"
#include "multi_tensor.h"
#include "vectorize.h"

#include <type_traits>

namespace clfast::cpu {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

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
std::vector<T*> optional_ptrs(const ContigList& l, size_t n) {
  return l.empty() ? std::vector<T*>(n, nullptr) : data_ptrs<T>(l.work);
}

void sgd_si_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList omega,
                  double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                  bool init_buffers) {
  check_lists("sgd_si_step_", kCPU,
              {{"params", params},
               {"grads", grads},
               {"momentum_buffers", momentum_buffers, /*optional=*/true},
               {"omega", omega, /*optional=*/true}});
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(),
              "clfast.sgd_si_step_: momentum != 0 needs one momentum buffer per parameter");
  ContigList p(params), g(grads), buf(momentum_buffers), o(omega);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "sgd_si_step_", [&] {
    const auto h = make_sgd_hyper<scalar_t>(lr, momentum, dampening, weight_decay, nesterov, init_buffers);
    auto P = data_ptrs<scalar_t>(p.work), G = data_ptrs<scalar_t>(g.work);
    auto B = optional_ptrs<scalar_t>(buf, p.size()), O = optional_ptrs<scalar_t>(o, p.size());
    with_flag(!o.empty(), [&](auto with_si) {
      with_flag(h.use_momentum, [&](auto with_momentum) {
        constexpr int kStates = decltype(with_momentum)::value ? 1 : 0;
        for_each_chunk(numels(p.work), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
          step_chunk<kStates, decltype(with_si)::value>(
              b, e, P[t], G[t], B[t], B[t], O[t],
              [&](scalar_t x, scalar_t d, scalar_t& m, scalar_t&) { return sgd_update(x, d, &m, h); });
        });
      });
    });
  });
  p.finish();
  buf.finish();
  o.finish();
}

void adam_si_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                   at::TensorList omega, double lr, double beta1, double beta2, double eps, double weight_decay,
                   double bias_correction1, double bias_correction2) {
  check_lists("adam_si_step_", kCPU,
              {{"params", params},
               {"grads", grads},
               {"exp_avg", exp_avg},
               {"exp_avg_sq", exp_avg_sq},
               {"omega", omega, /*optional=*/true}});
  ContigList p(params), g(grads), m(exp_avg), v(exp_avg_sq), o(omega);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "adam_si_step_", [&] {
    const auto h = make_adam_hyper<scalar_t>(lr, beta1, beta2, eps, weight_decay, bias_correction1,
                                             bias_correction2);
    auto P = data_ptrs<scalar_t>(p.work), G = data_ptrs<scalar_t>(g.work), M = data_ptrs<scalar_t>(m.work),
         V = data_ptrs<scalar_t>(v.work);
    auto O = optional_ptrs<scalar_t>(o, p.size());
    with_flag(!o.empty(), [&](auto with_si) {
      with_flag(h.weight_decayed, [&](auto decay) {
        with_flag(h.one_minus_beta1 < scalar_t(0.5), [&](auto low_lerp) {
          for_each_chunk(numels(p.work), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
            step_chunk<2, decltype(with_si)::value>(
                b, e, P[t], G[t], M[t], V[t], O[t], [&](scalar_t x, scalar_t d, scalar_t& m1, scalar_t& v1) {
                  return adam_update_t<decltype(decay)::value, decltype(low_lerp)::value>(x, d, &m1, &v1, h);
                });
          });
        });
      });
    });
  });
  p.finish();
  m.finish();
  v.finish();
  o.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CPU, m) {
  m.impl("sgd_si_step_", &sgd_si_step_);
  m.impl("adam_si_step_", &adam_si_step_);
}

}  // namespace clfast::cpu
