// Front of the fused optimizer ops: validation, contiguous copies, version counters; the kernels run in
// optim_cpu.cpp and optim_cuda.cu.
#include <torch/library.h>

#include <cmath>

#include "../common/checks.h"
#include "../common/launch.h"
#include "optim.h"

namespace clfast {
namespace {

void sgd_si_step_(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers, at::TensorList omega,
                  double lr, double momentum, double dampening, double weight_decay, bool nesterov,
                  bool init_buffers) {
  constexpr const char* op = "sgd_si_step_";
  check_lists(op, {{"params", params},
                   {"grads", grads},
                   {"momentum_buffers", momentum_buffers, /*optional=*/true},
                   {"omega", omega, /*optional=*/true}});
  TORCH_CHECK(momentum == 0 || !momentum_buffers.empty(), "clfast.", op,
              ": momentum != 0 needs one momentum buffer per parameter");
  check_memory(op, {{"params", params, true},
                    {"momentum_buffers", momentum != 0 ? momentum_buffers : at::TensorList(), true},
                    {"omega", omega, true},
                    {"grads", grads, false}});
  ContigList p(params), g(grads), buf(momentum != 0 ? momentum_buffers : at::TensorList()), o(omega);
  launch(op, params[0].device(),
         SgdStep{p.work, g.work, buf.work, o.work, lr, momentum, dampening, weight_decay, nesterov, init_buffers});
  p.finish();
  buf.finish();
  o.finish();
  bump_versions(params);
  if (momentum != 0) bump_versions(momentum_buffers);
  bump_versions(omega);
}

void adam_si_step_(at::TensorList params, at::TensorList grads, at::TensorList exp_avg, at::TensorList exp_avg_sq,
                   at::TensorList omega, double lr, double beta1, double beta2, double eps, double weight_decay,
                   double bias_correction1, double bias_correction2) {
  constexpr const char* op = "adam_si_step_";
  check_lists(op, {{"params", params},
                   {"grads", grads},
                   {"exp_avg", exp_avg},
                   {"exp_avg_sq", exp_avg_sq},
                   {"omega", omega, /*optional=*/true}});
  // 1 - beta^step for step >= 1 and beta in [0, 1): anything else divides by zero or takes a negative root.
  TORCH_CHECK(bias_correction1 > 0 && bias_correction1 <= 1, "clfast.", op,
              ": bias_correction1 must be 1 - beta1^step, in (0, 1], got ", bias_correction1);
  TORCH_CHECK(bias_correction2 > 0 && bias_correction2 <= 1, "clfast.", op,
              ": bias_correction2 must be 1 - beta2^step, in (0, 1], got ", bias_correction2);
  check_memory(op, {{"params", params, true},
                    {"exp_avg", exp_avg, true},
                    {"exp_avg_sq", exp_avg_sq, true},
                    {"omega", omega, true},
                    {"grads", grads, false}});
  ContigList p(params), g(grads), m(exp_avg), v(exp_avg_sq), o(omega);
  launch(op, params[0].device(),
         AdamStep{p.work, g.work, m.work, v.work, o.work, lr, beta1, beta2, eps, weight_decay, bias_correction1,
                  bias_correction2});
  p.finish();
  m.finish();
  v.finish();
  o.finish();
  bump_versions(params);
  bump_versions(exp_avg);
  bump_versions(exp_avg_sq);
  bump_versions(omega);
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("sgd_si_step_", &sgd_si_step_);
  m.impl("adam_si_step_", &adam_si_step_);
}

}  // namespace clfast
