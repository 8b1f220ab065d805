// The DAN layer ops' front: dan_layer_forward and dan_layer_backward (one layer of N neurons, each BN -> Linear
// -> act -> BN -> Linear -> act -> Linear, as a few GEMMs over all neurons plus fused column passes), their
// autograd, the running-statistics update of the BatchNorms, and dan_layer, which chains them. The forward and
// backward check their arguments once and launch each pass (csrc/dan/dan.h: the params structs) on the
// tensors' device. The autograd function lives in C++ because a DAN step is dominated by per-call overhead:
// a Python autograd wrapper cost more than the fused kernels it wraps.
//
// Each BatchNorm's affine part is folded into the Linear that follows it: with u the normalised input
// (train: batch statistics; eval: u = the raw input and the running statistics folded too),
//   BN(h) W^T + c = u Weff^T + beff,  Weff = W * s (per input column),  beff = c + W t,
// where (s, t) = (gamma, beta) in train mode and (gamma * rstd_run, beta - mean_run * gamma * rstd_run) in
// eval mode. The first BN sees the same input for every neuron, so its statistics are computed once and the
// first Linear of all N neurons is one [B, ni] x [ni, N * nf] GEMM (a batch of one); the others are batched
// over the neurons.
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
using namespace dan_detail;

constexpr const char* kOp = "dan_layer";

// act(z) by ATen's vectorised kernels: in place, except for GELU, whose backward needs z.
at::Tensor apply_act(at::Tensor& z, int64_t act) {
  switch (act) {
    case kTanh: return z.tanh_();
    case kRelu: return z.relu_();
    case kSigmoid: return z.sigmoid_();
    case kGelu: return at::gelu(z);
    case kGeluTanh: return at::gelu(z, "tanh");
    default: return z;
  }
}

// The passes on one device, each filling its params struct (csrc/dan/dan.h) for the device's launcher. A matrix
// argument's flag says whether it is stored grouped (MatrixView).
struct Passes {
  c10::Device device;
  void gemm(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) const {
    launch(kOp, device, DanGemm{out, bias, a, b});
  }
  void col_norm(const at::Tensor& h, bool h_grouped, const at::Tensor& u, bool u_grouped, int64_t B, int64_t C,
                int64_t groups, bool normalize, double eps, const at::Tensor& mean, const at::Tensor& var) const {
    launch(kOp, device,
           DanColNorm{h, u, mean, var, MatrixView::of(h_grouped, B, C, groups), MatrixView::of(u_grouped, B, C, groups),
                      B, C / groups, groups, normalize, eps});
  }
  void norm_act_backward(const at::Tensor& du, const at::Tensor& u, bool du_grouped, const at::Tensor& var,
                         double eps, bool normalize, const at::Tensor& s_act, bool z_grouped, int64_t act,
                         const at::Tensor& dz, bool dz_grouped, int64_t B, int64_t C, int64_t groups,
                         const at::Tensor& colsum) const {
    launch(kOp, device,
           DanNormActBackward{du, u, var, s_act, dz, colsum, MatrixView::of(du_grouped, B, C, groups),
                              MatrixView::of(z_grouped, B, C, groups), MatrixView::of(dz_grouped, B, C, groups), B,
                              C / groups, groups, normalize, static_cast<int>(act), eps});
  }
  void fold(const at::Tensor& W, const at::Tensor& bias, const at::Tensor& g, const at::Tensor& b,
            const at::Tensor& rm, const at::Tensor& rv, double eps, const at::Tensor& Weff,
            const at::Tensor& beff) const {
    launch(kOp, device, DanFold{W, bias, g, b, rm, rv, Weff, beff, eps});
  }
  void unfold_backward(const at::Tensor& dWeff, const at::Tensor& dbeff, const at::Tensor& W, const at::Tensor& g,
                       const at::Tensor& b, const at::Tensor& rm, const at::Tensor& rv, double eps,
                       const at::Tensor& dW, const at::Tensor& dg, const at::Tensor& db) const {
    launch(kOp, device, DanUnfoldBackward{dWeff, dbeff, W, g, b, rm, rv, dW, dg, db, eps});
  }
};

// Forward. Train mode (no running statistics): batch statistics. Returns the output [B, N * no] and the tensors
// the backward needs: {u1 (train) or empty, s1, u2, z2 (GELU) or empty, a2, Weff1, Weff2, mean1, var1, mean2,
// var2}, where s1 = a1, or z1 for GELU (what act_backward differentiates from); the batch statistics are empty
// in eval mode, and var is biased, as BatchNorm normalises with it.
std::tuple<at::Tensor, std::vector<at::Tensor>> dan_layer_forward(
    const at::Tensor& x_, const at::Tensor& g1_, const at::Tensor& b1_, const at::Tensor& W1_,
    const std::optional<at::Tensor>& c1_, const at::Tensor& g2_, const at::Tensor& b2_, const at::Tensor& W2_,
    const std::optional<at::Tensor>& c2_, const at::Tensor& W3_, const std::optional<at::Tensor>& c3_,
    const std::optional<at::Tensor>& rm1_, const std::optional<at::Tensor>& rv1_,
    const std::optional<at::Tensor>& rm2_, const std::optional<at::Tensor>& rv2_, double eps,
    c10::string_view act_name) {
  const Dims d = check_layer({x_, g1_, b1_, W1_, value(c1_), g2_, b2_, W2_, value(c2_), W3_, value(c3_), value(rm1_),
                              value(rv1_), value(rm2_), value(rv2_), eps});
  const int64_t act = parse_act(act_name);
  const Passes k{x_.device()};
  const bool training = !present(rm1_);
  const int64_t N = d.N, nf = d.nf, ni = d.ni, B = d.B, G1 = d.G1();
  const at::Tensor x = contig(x_), W1 = contig(W1_), W2 = contig(W2_), W3 = contig(W3_);
  const at::Tensor rm1 = contig(rm1_), rv1 = contig(rv1_), rm2 = contig(rm2_), rv2 = contig(rv2_);
  const auto opts = x.options();
  const auto none = [&] { return at::empty({0}, opts); };  // a fresh one each time: outputs must not alias

  at::Tensor u1 = x, mean1 = none(), var1 = none();
  if (training) {
    u1 = at::empty_like(x);
    mean1 = at::empty({G1 * ni}, opts);
    var1 = at::empty({G1 * ni}, opts);
    k.col_norm(x, true, u1, true, B, G1 * ni, G1, true, eps, mean1, var1);
  }
  at::Tensor Weff1 = at::empty({N, nf, ni}, opts), beff1 = at::empty({N, nf}, opts);
  k.fold(W1, contig(c1_), contig(g1_), contig(b1_), rm1, rv1, eps, Weff1, beff1);
  at::Tensor z1;
  if (d.per_neuron) {
    z1 = at::empty({N, B, nf}, opts);
    k.gemm(z1, beff1, u1, Weff1.transpose(1, 2));
  } else {  // one GEMM for all neurons: [B, ni] x [ni, N * nf]
    z1 = at::empty({B, N * nf}, opts);
    k.gemm(z1.unsqueeze(0), beff1.view({1, N * nf}), u1.unsqueeze(0), Weff1.view({1, N * nf, ni}).transpose(1, 2));
  }
  const at::Tensor a1 = apply_act(z1, act);  // z1 holds a1 unless the activation is GELU

  at::Tensor u2 = at::empty({N, B, nf}, opts);
  at::Tensor mean2 = training ? at::empty({N * nf}, opts) : none();
  at::Tensor var2 = training ? at::empty({N * nf}, opts) : none();
  k.col_norm(a1, d.per_neuron, u2, true, B, N * nf, N, training, eps, mean2, var2);
  at::Tensor Weff2 = at::empty({N, nf, nf}, opts), beff2 = at::empty({N, nf}, opts);
  k.fold(W2, contig(c2_), contig(g2_), contig(b2_), rm2, rv2, eps, Weff2, beff2);
  at::Tensor z2 = at::empty({N, B, nf}, opts);
  k.gemm(z2, beff2, u2, Weff2.transpose(1, 2));
  const at::Tensor a2 = apply_act(z2, act);
  // The third GEMM writes each neuron's block of the concatenated output [B, N * no] in place.
  at::Tensor out = at::empty({B, N * d.no}, opts);
  k.gemm(out.view({B, N, d.no}).transpose(0, 1), contig(c3_), a2, W3.transpose(1, 2));
  const bool gelu = needs_input(act);
  return {out, DanSaved{training ? u1 : none(), z1, u2, gelu ? z2 : none(), a2, Weff1, Weff2, mean1, var1, mean2,
                        var2}.list()};
}

// Backward of dan_layer_forward from its saved tensors. Returns {dx, dbn1_weight, dbn1_bias, dweight1, dbias1,
// dbn2_weight, dbn2_bias, dweight2, dbias2, dweight3, dbias3}: the gradient of forward argument i at index i (dx
// empty when !input_grad).
std::vector<at::Tensor> dan_layer_backward(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& g1_, const at::Tensor& b1_,
    const at::Tensor& W1_, const at::Tensor& g2_, const at::Tensor& b2_, const at::Tensor& W2_, const at::Tensor& W3_,
    const std::optional<at::Tensor>& rm1_, const std::optional<at::Tensor>& rv1_,
    const std::optional<at::Tensor>& rm2_, const std::optional<at::Tensor>& rv2_, at::TensorList saved, double eps,
    c10::string_view act_name, bool input_grad) {
  const Dims d = check_layer({x_, g1_, b1_, W1_, {}, g2_, b2_, W2_, {}, W3_, {}, value(rm1_), value(rv1_), value(rm2_),
                              value(rv2_), eps});
  const int64_t act = parse_act(act_name);
  const Passes k{x_.device()};
  const DanSaved sv = DanSaved::from(saved);
  const int64_t N = d.N, nf = d.nf, ni = d.ni, no = d.no, B = d.B, G1 = d.G1();
  TORCH_CHECK(grad_out.numel() == B * N * no, "clfast.dan_layer_backward: grad_out must have ", B * N * no,
              " elements, got ", grad_out.sizes());
  const bool training = !present(rm1_);
  TORCH_CHECK(grad_out.device() == x_.device() && grad_out.scalar_type() == x_.scalar_type(),
              "clfast.dan_layer_backward: grad_out must be ", x_.scalar_type(), " on ", x_.device());
  {  // the saved tensors must be the forward's: the kernels read them as contiguous arrays of these sizes
    const int64_t S = training ? N * nf : 0, S1 = training ? G1 * ni : 0;
    const std::vector<int64_t> z1 = d.per_neuron ? std::vector<int64_t>{N, B, nf} : std::vector<int64_t>{B, N * nf};
    const std::vector<std::vector<int64_t>> shapes = {
        training ? x_.sizes().vec() : std::vector<int64_t>{0}, z1, {N, B, nf},
        needs_input(act) ? std::vector<int64_t>{N, B, nf} : std::vector<int64_t>{0}, {N, B, nf}, {N, nf, ni},
        {N, nf, nf}, {S1}, {S1}, {S}, {S}};
    for (size_t i = 0; i < shapes.size(); ++i)
      TORCH_CHECK(saved[i].sizes() == at::IntArrayRef(shapes[i]) && saved[i].is_contiguous() &&
                      saved[i].scalar_type() == x_.scalar_type() && saved[i].device() == x_.device(),
                  "clfast.dan_layer_backward: saved[", i, "] (", DanSaved::kNames[i],
                  ") is not what dan_layer_forward saved (expected a "
                  "contiguous ", x_.scalar_type(), " tensor of shape ", at::IntArrayRef(shapes[i]), " on ", x_.device(),
                  ", got ", saved[i].sizes(), ")");
  }
  const at::Tensor W1 = contig(W1_), W2 = contig(W2_), W3 = contig(W3_);
  const at::Tensor rm1 = contig(rm1_), rv1 = contig(rv1_), rm2 = contig(rm2_), rv2 = contig(rv2_);
  const at::Tensor u1 = training ? sv.u1 : contig(x_);
  const at::Tensor &s1 = sv.s1, &u2 = sv.u2, &a2 = sv.a2, &Weff1 = sv.Weff1, &Weff2 = sv.Weff2, &var1 = sv.var1,
                   &var2 = sv.var2;
  const at::Tensor& s2 = needs_input(act) ? sv.z2 : a2;
  const auto opts = u1.options();
  const at::Tensor none = at::empty({0}, opts), undefined;

  const at::Tensor dy = grad_out.reshape({B, N, no}).transpose(0, 1);  // [N, B, no], each neuron's block in place
  const at::Tensor dc3 = dy.sum(1);
  at::Tensor dW3 = at::empty({N, no, nf}, opts), da2 = at::empty({N, B, nf}, opts);
  k.gemm(dW3, undefined, dy.transpose(1, 2), a2);
  k.gemm(da2, undefined, dy, W3);

  at::Tensor dz2 = at::empty({N, B, nf}, opts), dbeff2 = at::empty({N, nf}, opts);
  k.norm_act_backward(da2, none, true, none, eps, false, s2, true, act, dz2, true, B, N * nf, N, dbeff2);
  at::Tensor dWeff2 = at::empty({N, nf, nf}, opts), du2 = at::empty({N, B, nf}, opts);
  k.gemm(dWeff2, undefined, dz2.transpose(1, 2), u2);
  k.gemm(du2, undefined, dz2, Weff2);
  at::Tensor dW2 = at::empty_like(W2), dg2 = at::empty({N, nf}, opts), db2 = at::empty({N, nf}, opts);
  k.unfold_backward(dWeff2, dbeff2, W2, contig(g2_), contig(b2_), rm2, rv2, eps, dW2, dg2, db2);

  at::Tensor dz1 = at::empty_like(s1), dbeff1 = at::empty({N, nf}, opts);
  k.norm_act_backward(du2, u2, true, var2, eps, training, s1, d.per_neuron, act, dz1, d.per_neuron, B, N * nf, N,
                       dbeff1);
  at::Tensor dWeff1, du1;
  if (d.per_neuron) {
    dWeff1 = at::empty({N, nf, ni}, opts);
    k.gemm(dWeff1, undefined, dz1.transpose(1, 2), u1);
    if (input_grad) {
      du1 = at::empty({N, B, ni}, opts);
      k.gemm(du1, undefined, dz1, Weff1);
    }
  } else {
    dWeff1 = at::empty({N, nf, ni}, opts);
    k.gemm(dWeff1.view({1, N * nf, ni}), undefined, dz1.t().unsqueeze(0), u1.unsqueeze(0));
    if (input_grad) {
      du1 = at::empty({B, ni}, opts);
      k.gemm(du1.unsqueeze(0), undefined, dz1.unsqueeze(0), Weff1.view({1, N * nf, ni}));
    }
  }
  at::Tensor dW1 = at::empty_like(W1), dg1 = at::empty({N, ni}, opts), db1 = at::empty({N, ni}, opts);
  k.unfold_backward(dWeff1, dbeff1, W1, contig(g1_), contig(b1_), rm1, rv1, eps, dW1, dg1, db1);

  at::Tensor dx = none;
  if (input_grad && training) {
    dx = at::empty_like(u1);
    at::Tensor colsum = at::empty({G1 * ni}, opts);
    k.norm_act_backward(du1, u1, true, var1, eps, true, none, true, kIdentity, dx, true, B, G1 * ni, G1, colsum);
  } else if (input_grad) {
    dx = du1;
  }
  return {dx, dg1, db1, dW1, dbeff1, dg2, db2, dW2, dbeff2, dW3, dc3};
}


using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, std::vector<at::Tensor>> call_forward(
    const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1, const OptT& c1,
    const at::Tensor& g2, const at::Tensor& b2, const at::Tensor& W2, const OptT& c2, const at::Tensor& W3,
    const OptT& c3, const OptT& rm1, const OptT& rv1, const OptT& rm2, const OptT& rv2, double eps, c10::string_view act) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow(CLFAST_NAMESPACE "::dan_layer_forward", "")
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
                             .findSchemaOrThrow(CLFAST_NAMESPACE "::dan_layer_backward", "")
                             .typed<std::vector<at::Tensor>(
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                 const at::Tensor&, const OptT&, const OptT&, const OptT&, const OptT&,
                                 at::TensorList, double, c10::string_view, bool)>();
  return op.call(grad_out, x, g1, b1, W1, g2, b2, W2, W3, rm1, rv1, rm2, rv2, saved, eps, act, input_grad);
}

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
                             .findSchemaOrThrow(CLFAST_NAMESPACE "::dan_bn_update_", "")
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

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("dan_layer_forward", &dan_layer_forward);
  m.impl("dan_layer_backward", &dan_layer_backward);
  m.impl("dan_bn_update_", &dan_bn_update_);
}

TORCH_LIBRARY_IMPL(clfast, CompositeImplicitAutograd, m) { m.impl("dan_layer", &dan_layer); }

}  // namespace clfast
