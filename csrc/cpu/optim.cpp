// Fused SGD / Adam steps with SI accumulation on the CPU: the update and omega += (new - old) * (-grad) in
// one pass over memory, with no pre-step copy of the parameters.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/optim.h"
#include "../math/si.h"
#include "multi_tensor.h"

namespace clfast::cpu {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

// Runs update(i, param, grad) -> new param over all chunks; accumulates SI's omega when `omega` is non-empty.
template <typename scalar_t, typename Update>
void fused_step(ContigList& p, const ContigList& g, ContigList& o, const Update& update) {
  auto P = data_ptrs<scalar_t>(p.work), G = data_ptrs<scalar_t>(g.work);
  auto O = o.empty() ? std::vector<scalar_t*>(p.size(), nullptr) : data_ptrs<scalar_t>(o.work);
  for_each_chunk(numels(p.work), [&](int64_t t, int64_t b, int64_t e) {
    scalar_t* __restrict__ pp = P[t];
    scalar_t* __restrict__ om = O[t];
    const scalar_t* __restrict__ gg = G[t];
    if (om == nullptr) {
      for (int64_t i = b; i < e; ++i) pp[i] = update(t, i, pp[i], gg[i]);
    } else {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t old = pp[i], now = update(t, i, old, gg[i]);
        pp[i] = now;
        om[i] = si_accumulate(om[i], now - old, gg[i]);
      }
    }
  });
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
    const SgdHyper<scalar_t> h{static_cast<scalar_t>(lr),          static_cast<scalar_t>(momentum),
                               static_cast<scalar_t>(1 - dampening), static_cast<scalar_t>(weight_decay),
                               momentum != 0,                       nesterov,
                               init_buffers,                        weight_decay != 0};
    auto B = h.use_momentum ? data_ptrs<scalar_t>(buf.work) : std::vector<scalar_t*>(p.size(), nullptr);
    fused_step<scalar_t>(p, g, o, [&](int64_t t, int64_t i, scalar_t param, scalar_t grad) {
      return sgd_update(param, grad, h.use_momentum ? B[t] + i : nullptr, h);
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
    // Scalars computed in double then cast, as torch does with Python floats.
    const AdamHyper<scalar_t> h{static_cast<scalar_t>(1 - beta1),
                                static_cast<scalar_t>(beta2),
                                static_cast<scalar_t>(1 - beta2),
                                static_cast<scalar_t>(eps),
                                static_cast<scalar_t>(weight_decay),
                                static_cast<scalar_t>(-(lr / bias_correction1)),
                                static_cast<scalar_t>(std::sqrt(bias_correction2)),
                                weight_decay != 0};
    auto M = data_ptrs<scalar_t>(m.work), V = data_ptrs<scalar_t>(v.work);
    fused_step<scalar_t>(p, g, o, [&](int64_t t, int64_t i, scalar_t param, scalar_t grad) {
      return adam_update(param, grad, M[t] + i, V[t] + i, h);
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
