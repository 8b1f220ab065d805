// Fused SGD / Adam steps with SI accumulation on the CPU: the update and omega += (new - old) * (-grad) in
// one pass over memory, with no pre-step copy of the parameters.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/optim.h"
#include "../math/si.h"
#include "multi_tensor.h"

#include <type_traits>

namespace clfast::cpu {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

// One chunk of a fused step: p[i] = update(i, p[i], g[i]) and, with SI, omega += (new - old) * (-g). The
// update keeps optimizer state in locals and stores it itself, so the loop has no aliasing the compiler must
// assume and vectorises.
template <typename T, typename Update>
inline void step_chunk(int64_t b, int64_t e, T* __restrict__ p, const T* __restrict__ g, T* __restrict__ om,
                       const Update& update) {
  if (om == nullptr) {
    for (int64_t i = b; i < e; ++i) p[i] = update(i, p[i], g[i]);
  } else {
    for (int64_t i = b; i < e; ++i) {
      const T old = p[i], grad = g[i], now = update(i, old, grad);
      p[i] = now;
      om[i] = si_accumulate(om[i], now - old, grad);
    }
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
    for_each_chunk(numels(p.work), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
      scalar_t* __restrict__ bb = B[t];
      if (bb == nullptr) {
        step_chunk(b, e, P[t], G[t], O[t], [&](int64_t, scalar_t x, scalar_t d) {
          scalar_t unused = 0;  // a local, not nullptr: the store is branch-free and the loop vectorises
          return sgd_update(x, d, &unused, h);
        });
      } else {
        step_chunk(b, e, P[t], G[t], O[t], [&](int64_t i, scalar_t x, scalar_t d) {
          scalar_t m = bb[i];
          const scalar_t now = sgd_update(x, d, &m, h);
          bb[i] = m;
          return now;
        });
      }
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
    auto run = [&](auto decay, auto low_lerp) {
      for_each_chunk(numels(p.work), [&, h](int64_t t, int64_t b, int64_t e) {  // h by value: no aliasing
        scalar_t *__restrict__ mm = M[t], *__restrict__ vv = V[t];
        step_chunk(b, e, P[t], G[t], O[t], [&](int64_t i, scalar_t x, scalar_t d) {
          scalar_t m1 = mm[i], v1 = vv[i];
          const scalar_t now = adam_update_t<decltype(decay)::value, decltype(low_lerp)::value>(x, d, &m1, &v1, h);
          mm[i] = m1;
          vv[i] = v1;
          return now;
        });
      });
    };
    using yes = std::true_type;
    using no = std::false_type;
    const bool low = h.one_minus_beta1 < scalar_t(0.5);
    if (h.weight_decayed) {
      low ? run(yes{}, yes{}) : run(yes{}, no{});
    } else {
      low ? run(no{}, yes{}) : run(no{}, no{});
    }
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
