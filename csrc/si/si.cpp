// Front of the SI ops: validation, contiguous copies, version counters; the kernels run in si_cpu.cpp and
// si_cuda.cu. Registered once for every backend (CompositeExplicitAutograd); Meta goes to the fake kernels.
#include <torch/library.h>

#include "../common/checks.h"
#include "../common/launch.h"
#include "si.h"

namespace clfast {
namespace {

void si_accumulate_(at::TensorList omega, at::TensorList params, at::TensorList ref, at::TensorList grads,
                    bool ref_is_delta) {
  constexpr const char* op = "si_accumulate_";
  check_lists(op, {{"params", params}, {"omega", omega}, {"ref", ref}, {"grads", grads}});
  check_memory(op, {{"omega", omega, true}, {"params", params, false}, {"ref", ref, false}, {"grads", grads, false}});
  ContigList o(omega), p(params), r(ref), g(grads);
  launch(op, params[0].device(), SiAccumulate{o.work, p.work, r.work, g.work, ref_is_delta});
  o.finish();
  bump_versions(omega);
}

void si_consolidate_(at::TensorList importance, at::TensorList prev, at::TensorList omega, at::TensorList params,
                     double epsilon) {
  constexpr const char* op = "si_consolidate_";
  check_lists(op, {{"params", params}, {"importance", importance}, {"prev", prev}, {"omega", omega}});
  check_memory(op, {{"importance", importance, true}, {"prev", prev, true}, {"omega", omega, true},
                    {"params", params, false}});
  ContigList imp(importance), pr(prev), o(omega), p(params);
  launch(op, params[0].device(), SiConsolidate{imp.work, pr.work, o.work, p.work, epsilon});
  imp.finish();
  pr.finish();
  o.finish();
  bump_versions(importance);
  bump_versions(prev);
  bump_versions(omega);
}

at::Tensor si_penalty(at::TensorList importance, at::TensorList prev, at::TensorList params) {
  constexpr const char* op = "si_penalty";
  check_lists(op, {{"params", params}, {"importance", importance}, {"prev", prev}});
  ContigList imp(importance), pr(prev), p(params);
  SiPenalty args{imp.work, pr.work, p.work, params[0].new_empty({})};
  launch(op, params[0].device(), args);
  return args.out;
}

Tensors new_like(const Tensors& ts) {
  Tensors out;
  for (const at::Tensor& t : ts) out.push_back(t.new_empty(t.sizes()));
  return out;
}

Tensors si_penalty_backward(const at::Tensor& grad_out, at::TensorList importance, at::TensorList prev,
                            at::TensorList params) {
  constexpr const char* op = "si_penalty_backward";
  check_lists(op, {{"params", params}, {"importance", importance}, {"prev", prev}});
  TORCH_CHECK(grad_out.numel() == 1 && grad_out.device() == params[0].device(), "clfast.", op,
              ": grad_out must be one element on ", params[0].device(), ", got shape ", grad_out.sizes(), " on ",
              grad_out.device());
  ContigList imp(importance), pr(prev), p(params);
  SiPenaltyGrad args{new_like(p.work), imp.work, pr.work, p.work, 0.0,
                     grad_out.reshape({}).to(params[0].scalar_type()).contiguous(), false};
  launch(op, params[0].device(), args);
  return args.out;
}

void si_penalty_grad_(at::TensorList grads, at::TensorList importance, at::TensorList prev, at::TensorList params,
                      double scale) {
  constexpr const char* op = "si_penalty_grad_";
  check_lists(op, {{"params", params}, {"grads", grads}, {"importance", importance}, {"prev", prev}});
  check_memory(op, {{"grads", grads, true}, {"importance", importance, false}, {"prev", prev, false},
                    {"params", params, false}});
  ContigList g(grads), imp(importance), pr(prev), p(params);
  launch(op, params[0].device(), SiPenaltyGrad{g.work, imp.work, pr.work, p.work, scale, at::Tensor(), true});
  g.finish();
  bump_versions(grads);
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("si_accumulate_", &si_accumulate_);
  m.impl("si_consolidate_", &si_consolidate_);
  m.impl("si_penalty", &si_penalty);
  m.impl("si_penalty_backward", &si_penalty_backward);
  m.impl("si_penalty_grad_", &si_penalty_grad_);
}

}  // namespace clfast
