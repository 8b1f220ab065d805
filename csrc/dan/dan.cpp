// Device-agnostic parts of the DAN layer ops: autograd for dan_layer_forward, the running-statistics update of
// its BatchNorms, and dan_layer, which chains the two. The autograd function lives in C++ because a DAN step is dominated by per-call overhead:
// a Python autograd wrapper cost more than the fused kernels it wraps.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/launch.h"
#include "dan.h"

namespace clfast {
namespace {

using OptT = std::optional<at::Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, std::vector<at::Tensor>> call_forward(
    const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1, const OptT& c1,
    const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& W2, const OptT& c2, const at::Tensor& W3,
    const OptT& c3, const OptT& rm1, const OptT& rv1, const OptT& rm2, const OptT& rv2, double eps, c10::string_view act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("clfast::dan_layer_forward", "")
                             .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const OptT&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptT&,
                                 const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&, const OptT&,
                                 double, c10::string_view)>();
  return op.call(x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, rm1, rv1, rm2, rv2, eps, act);
}

std::vector<at::Tensor> call_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& g1,
                                      const at::Tensor& b1, const at::Tensor& W1, const at::Tensor& g2,
                                      const at::Tensor& b2, const at::Tensor& W2, const at::Tensor& W3,
                                      const OptT& rm1, const OptT& rv1, const OptT& rm2, const OptT& rv2,
                                      at::TensorList saved, double eps, c10::string_view act, bool input_grad) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("clfast::dan_layer_backward", "")
                             .typed<std::vector<at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                 at::TensorList, double, c10::string_view, bool)>();
  return op.call(grad_out, x, g1, b1, W1, g2, b2, W2, W3, rm1, rv1, rm2, rv2, saved, eps, act, input_grad);
}

using dan_detail::present;

OptT opt(const at::Tensor& t) { return t.defined() ? OptT(t) : std::nullopt; }

// dan_layer_backward's tensor arguments saved by the autograd function before the forward's DanSaved tensors:
// x (eval mode), bn1_weight, bn1_bias, weight1, bn2_weight, bn2_bias, weight2, weight3, the 4 running statistics.
constexpr int kBackwardInputs = 12;

struct DanLayerFunction : public torch::autograd::Function<DanLayerFunction> {
  // Returns {out, saved...}; the saved tensors are outputs too (for dan_bn_update_), never differentiated.
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1,
                               const at::Tensor& W1, const OptT& c1, const at::Tensor& g2, const at::Tensor& b2,
                               const at::Tensor& W2, const OptT& c2, const at::Tensor& W3, const OptT& c3,
                               const OptT& rm1, const OptT& rv1, const OptT& rm2, const OptT& rv2, double eps,
                               c10::string_view act) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, saved] = call_forward(x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, rm1, rv1, rm2, rv2, eps, act);
    // The backward's inputs, then the forward's saved tensors. In train mode the backward reads the normalised
    // input u1, not x: x is not kept alive.
    const bool training = !present(rm1);
    variable_list to_save = {training ? at::Tensor() : x, g1, b1, W1, g2, b2, W2, W3, rm1.value_or(at::Tensor()),
                             rv1.value_or(at::Tensor()), rm2.value_or(at::Tensor()), rv2.value_or(at::Tensor())};
    static_assert(kBackwardInputs == 12, "the inputs saved above");
    to_save.insert(to_save.end(), saved.begin(), saved.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["act"] = std::string(act);
    ctx->saved_data["biases"] = std::vector<bool>{present(c1), present(c2), present(c3)};
    ctx->mark_non_differentiable(saved);
    ctx->set_materialize_grads(false);
    variable_list outs{out};
    outs.insert(outs.end(), saved.begin(), saved.end());
    return outs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(17);  // one per forward argument; dan_layer_backward returns the first 11 in order
    if (!grads[0].defined()) return result;
    const variable_list s = ctx->get_saved_variables();
    const std::vector<at::Tensor> saved(s.begin() + kBackwardInputs, s.end());
    const bool input_grad = ctx->needs_input_grad(0);
    const at::Tensor& x = s[0].defined() ? s[0] : DanSaved::from(saved).u1;  // train mode: only its metadata
    const auto g = call_backward(grads[0], x, s[1], s[2], s[3], s[4], s[5], s[6], s[7], opt(s[8]), opt(s[9]),
                                 opt(s[10]), opt(s[11]), saved, ctx->saved_data["eps"].toDouble(),
                                 ctx->saved_data["act"].toStringRef(), input_grad);
    const auto biases = ctx->saved_data["biases"].toBoolList();
    for (int i = 0; i < 11; ++i) {
      const bool wanted = i == 0 ? input_grad : i == 4 ? biases[0] : i == 8 ? biases[1] : i == 10 ? biases[2] : true;
      if (wanted) result[i] = g[i];  // x, bn1_weight, bn1_bias, weight1, bias1, ..., weight3, bias3
    }
    return result;
  }
};

std::tuple<at::Tensor, std::vector<at::Tensor>> dan_layer_forward_autograd(
    const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1, const OptT& c1,
    const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& W2, const OptT& c2, const at::Tensor& W3,
    const OptT& c3, const OptT& rm1, const OptT& rv1, const OptT& rm2, const OptT& rv2, double eps, c10::string_view act) {
  variable_list outs =
      DanLayerFunction::apply(x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, rm1, rv1, rm2, rv2, eps, act);
  return {outs[0], std::vector<at::Tensor>(outs.begin() + 1, outs.end())};
}

void call_bn_update(at::Tensor& rm1, at::Tensor& rv1, at::Tensor& nb1, at::Tensor& rm2, at::Tensor& rv2,
                    at::Tensor& nb2, const at::Tensor& mean1, const at::Tensor& var1, const at::Tensor& mean2,
                    const at::Tensor& var2, double momentum, int64_t batch) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("clfast::dan_bn_update_", "")
                             .typed<void(at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&, at::Tensor&,
                                         at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const at::Tensor&, double, int64_t)>();
  op.call(rm1, rv1, nb1, rm2, rv2, nb2, mean1, var1, mean2, var2, momentum, batch);
}

at::Tensor dan_layer(const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1,
                     const OptT& c1, const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& W2, const OptT& c2,
                     const at::Tensor& W3, const OptT& c3, at::Tensor& rm1, at::Tensor& rv1, at::Tensor& nb1,
                     at::Tensor& rm2, at::Tensor& rv2, at::Tensor& nb2, bool training, double momentum, double eps,
                     c10::string_view act) {
  if (!training) return std::get<0>(call_forward(x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, rm1, rv1, rm2, rv2, eps, act));
  auto [out, saved] = call_forward(x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, std::nullopt, std::nullopt,
                                   std::nullopt, std::nullopt, eps, act);
  const DanSaved sv = DanSaved::from(saved);
  call_bn_update(rm1, rv1, nb1, rm2, rv2, nb2, sv.mean1, sv.var1, sv.mean2, sv.var2, momentum, x.size(-2));
  return out;
}

// nn.BatchNorm1d's update of both BatchNorms of a layer: running = (1 - momentum) * running + momentum * batch
// (unbiased variance), num_batches_tracked += 1. Both are checked before either is written.
void dan_bn_update_(at::Tensor& running_mean1, at::Tensor& running_var1, at::Tensor& num_batches1,
                    at::Tensor& running_mean2, at::Tensor& running_var2, at::Tensor& num_batches2,
                    const at::Tensor& mean1, const at::Tensor& var1, const at::Tensor& mean2, const at::Tensor& var2,
                    double momentum, int64_t batch) {
  constexpr const char* op = "dan_bn_update_";
  dan_detail::check_bn_batch(batch);
  const c10::Device device = running_mean1.device();
  dan_detail::check_bn_update(running_mean1, running_var1, num_batches1, mean1, var1, "first", device);
  dan_detail::check_bn_update(running_mean2, running_var2, num_batches2, mean2, var2, "second", device);
  check_memory(op, {{"running_mean1", running_mean1, true}, {"running_var1", running_var1, true},
                    {"num_batches1", num_batches1, true}, {"running_mean2", running_mean2, true},
                    {"running_var2", running_var2, true}, {"num_batches2", num_batches2, true},
                    {"mean1", mean1, false}, {"var1", var1, false}, {"mean2", mean2, false}, {"var2", var2, false}});
  launch(op, device,
         DanBnUpdate{{{running_mean1, running_var1, num_batches1, mean1, var1},
                      {running_mean2, running_var2, num_batches2, mean2, var2}},
                     momentum, batch});
  bump_versions({running_mean1, running_var1, num_batches1, running_mean2, running_var2, num_batches2});
}

}  // namespace

// The backward is not differentiable: refuse double backward (create_graph=True) instead of returning gradients
// that silently lack their own graph.
std::vector<at::Tensor> dan_layer_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x,
                                                    const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1,
                                                    const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& W2,
                                                    const at::Tensor& W3, const OptT& rm1, const OptT& rv1,
                                                    const OptT& rm2, const OptT& rv2, at::TensorList saved, double eps,
                                                    c10::string_view act, bool input_grad) {
  const bool needs_graph = at::GradMode::is_enabled() &&
                           (grad_out.requires_grad() || x.requires_grad() || g1.requires_grad() ||
                            b1.requires_grad() || W1.requires_grad() || g2.requires_grad() || b2.requires_grad() ||
                            W2.requires_grad() || W3.requires_grad());
  TORCH_CHECK(!needs_graph, "clfast.dan_layer: double backward (create_graph=True) is not supported");
  at::AutoDispatchBelowADInplaceOrView guard;
  return call_backward(grad_out, x, g1, b1, W1, g2, b2, W2, W3, rm1, rv1, rm2, rv2, saved, eps, act, input_grad);
}

TORCH_LIBRARY_IMPL(clfast, Autograd, m) {
  m.impl("dan_layer_forward", &dan_layer_forward_autograd);
  m.impl("dan_layer_backward", &dan_layer_backward_autograd);
}

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) { m.impl("dan_bn_update_", &dan_bn_update_); }

TORCH_LIBRARY_IMPL(clfast, CompositeImplicitAutograd, m) { m.impl("dan_layer", &dan_layer); }

}  // namespace clfast
