// One DAN layer (N neurons, each BN -> Linear -> act -> BN -> Linear -> act -> Linear) as a few GEMMs over
// all neurons plus fused element-wise passes. The GEMMs go through K::gemm (CPU: a loop of BLAS calls, one
// per neuron; CUDA: one batched cuBLAS GEMM), the layer-wide first Linear as a batch of one; the
// element-wise passes are the backend's kernels K (csrc/dan/dan_cpu.cpp, csrc/dan/dan_cuda.cu), so CPU and CUDA share
// this code.
//
// Each BatchNorm's affine part is folded into the Linear that follows it: with u the normalised input
// (train: batch statistics; eval: u = the raw input and the running statistics folded too),
//   BN(h) W^T + c = u Weff^T + beff,  Weff = W * s (per input column),  beff = c + W t,
// where (s, t) = (gamma, beta) in train mode and (gamma * rstd_run, beta - mean_run * gamma * rstd_run) in
// eval mode. The first BN sees the same input for every neuron, so its statistics are computed once and the
// first Linear of all N neurons is one [B, ni] x [ni, N * nf] GEMM; the second and third go through K::gemm.
//
// Layouts: a logical [B, C] activation matrix with C = groups * Cg is stored either flat ([B, C], row-major)
// or grouped ([groups, B, Cg], one slab per neuron, as batched GEMMs want it).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <tuple>
#include <vector>

#include "../math/dan.h"

namespace clfast {

namespace dan_detail {

inline void check_param(const char* name, const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& x) {
  TORCH_CHECK(t.defined(), "clfast.dan_layer: ", name, " is undefined");
  TORCH_CHECK(t.sizes() == shape, "clfast.dan_layer: ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "clfast.dan_layer: ", name, " must be ", x.scalar_type(),
              " like the input, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), "clfast.dan_layer: ", name, " is on ", t.device(), " but the input is on ",
              x.device());
}

// The schema's activation name as the kernels' code (csrc/math/dan.h: Act), mapped once at the op boundary.
inline int64_t parse_act(c10::string_view name) {
  static constexpr const char* kActNames[kNumActs] = {"identity", "tanh", "relu", "sigmoid", "gelu", "gelu_tanh"};
  for (int64_t i = 0; i < kNumActs; ++i)
    if (name == kActNames[i]) return i;
  TORCH_CHECK(false, "clfast.dan_layer: unknown activation '", std::string(name),
              "'; expected 'identity', 'tanh', 'relu', 'sigmoid', 'gelu' or 'gelu_tanh'");
}

// An optional tensor argument that is given and defined (C++ callers may pass an undefined tensor for None).
inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

inline void check_optional(const char* name, const std::optional<at::Tensor>& t, at::IntArrayRef shape,
                           const at::Tensor& x) {
  if (present(t)) check_param(name, *t, shape, x);
}

struct Dims {
  int64_t N, nf, ni, no, B;
  bool per_neuron;  // x [N, B, ni] (one input per neuron) instead of [B, ni] (shared)
  int64_t G1() const { return per_neuron ? N : 1; }
};

inline Dims check_layer(const at::Tensor& x, const at::Tensor& g1, const at::Tensor& b1, const at::Tensor& W1,
                        const std::optional<at::Tensor>& c1, const at::Tensor& g2, const at::Tensor& b2,
                        const at::Tensor& W2, const std::optional<at::Tensor>& c2, const at::Tensor& W3,
                        const std::optional<at::Tensor>& c3, const std::optional<at::Tensor>& rm1,
                        const std::optional<at::Tensor>& rv1, const std::optional<at::Tensor>& rm2,
                        const std::optional<at::Tensor>& rv2, double eps) {
  TORCH_CHECK(x.defined() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "clfast.dan_layer: expected a float32 or float64 input, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "None");
  // The layer's sizes come from the BatchNorm parameters (N, ni from bn1_weight, nf from bn2_weight) and the
  // output Linear (no): every other argument is then checked against them, so a wrong one is named.
  TORCH_CHECK(g1.defined() && g1.dim() == 2 && g2.defined() && g2.dim() == 2 && W3.defined() && W3.dim() == 3,
              "clfast.dan_layer: bn1_weight must be [N, ni], bn2_weight [N, nf] and weight3 [N, no, nf], got ",
              g1.defined() ? g1.sizes() : at::IntArrayRef{}, ", ", g2.defined() ? g2.sizes() : at::IntArrayRef{},
              " and ", W3.defined() ? W3.sizes() : at::IntArrayRef{});
  Dims d{g1.size(0), g2.size(1), g1.size(1), W3.size(1), 0, x.dim() == 3};
  TORCH_CHECK(d.N > 0 && d.nf > 0 && d.ni > 0 && d.no > 0, "clfast.dan_layer: empty layer (N=", d.N, ", nf=", d.nf,
              ", ni=", d.ni, ", no=", d.no, ")");
  check_param("bn1_bias", b1, {d.N, d.ni}, x);
  check_param("weight1", W1, {d.N, d.nf, d.ni}, x);
  TORCH_CHECK((x.dim() == 2 && x.size(1) == d.ni) || (x.dim() == 3 && x.size(0) == d.N && x.size(2) == d.ni),
              "clfast.dan_layer: expected an input [B, ", d.ni, "] or [", d.N, ", B, ", d.ni, "], got ", x.sizes());
  d.B = x.size(-2);
  check_param("bn1_weight", g1, {d.N, d.ni}, x);
  check_optional("bias1", c1, {d.N, d.nf}, x);
  check_param("bn2_weight", g2, {d.N, d.nf}, x);
  check_param("bn2_bias", b2, {d.N, d.nf}, x);
  check_param("weight2", W2, {d.N, d.nf, d.nf}, x);
  check_optional("bias2", c2, {d.N, d.nf}, x);
  check_param("weight3", W3, {d.N, d.no, d.nf}, x);
  check_optional("bias3", c3, {d.N, d.no}, x);
  const bool eval = present(rm1);
  TORCH_CHECK(eval == present(rv1) && eval == present(rm2) && eval == present(rv2),
              "clfast.dan_layer: pass all four running statistics (eval mode) or none (train mode)");
  check_optional("running_mean1", rm1, {d.N, d.ni}, x);
  check_optional("running_var1", rv1, {d.N, d.ni}, x);
  check_optional("running_mean2", rm2, {d.N, d.nf}, x);
  check_optional("running_var2", rv2, {d.N, d.nf}, x);
  // torch's BatchNorm: a positive eps in train mode, a non-negative one in eval mode.
  TORCH_CHECK_VALUE(eval || eps > 0, "batch_norm eps must be positive during training, but got ", eps);
  TORCH_CHECK_VALUE(eps >= 0, "batch_norm eps must be non-negative, but got ", eps);
  TORCH_CHECK_VALUE(eval || d.B > 1, "Expected more than 1 value per channel when training, got input size ",
                    x.sizes());
  return d;
}

// dan_bn_update_'s arguments for one BatchNorm; returns its channel count C. The batch statistics hold C values
// (the first BN of a layer with a shared input) or N * C. All contiguous, on `device`, statistics of one float
// dtype and int64 counters.
inline int64_t check_bn_update(const at::Tensor& running_mean, const at::Tensor& running_var,
                               const at::Tensor& num_batches, const at::Tensor& mean, const at::Tensor& var,
                               const char* which, const c10::Device& device) {
  for (const at::Tensor* t : {&running_mean, &running_var, &num_batches, &mean, &var}) {
    TORCH_CHECK(t->defined(), "clfast.dan_bn_update_: undefined tensor (", which, " BatchNorm)");
    TORCH_CHECK(t->device() == device, "clfast.dan_bn_update_: ", which, " BatchNorm's statistics are on ",
                t->device(), " but running_mean1 is on ", device);
  }
  TORCH_CHECK(running_mean.dim() == 2 && running_var.sizes() == running_mean.sizes() && num_batches.dim() == 1 &&
                  num_batches.size(0) == running_mean.size(0),
              "clfast.dan_bn_update_: ", which, " running statistics must be [N, C] with counters [N], got ",
              running_mean.sizes(), ", ", running_var.sizes(), ", ", num_batches.sizes());
  const int64_t C = running_mean.size(1);
  TORCH_CHECK(mean.numel() == var.numel() && C > 0 && mean.numel() % C == 0 &&
                  (mean.numel() == C || mean.numel() == running_mean.numel()),
              "clfast.dan_bn_update_: ", which, " batch statistics must hold C or N * C values, got ", mean.numel());
  for (const at::Tensor* t : {&running_mean, &running_var, &num_batches, &mean, &var})
    TORCH_CHECK(t->is_contiguous(), "clfast.dan_bn_update_: expected contiguous tensors (", which, " BatchNorm)");
  TORCH_CHECK((running_mean.scalar_type() == at::kFloat || running_mean.scalar_type() == at::kDouble) &&
                  running_var.scalar_type() == running_mean.scalar_type() &&
                  mean.scalar_type() == running_mean.scalar_type() && var.scalar_type() == running_mean.scalar_type() &&
                  num_batches.scalar_type() == at::kLong,
              "clfast.dan_bn_update_: expected running and batch statistics of one dtype, float32 or float64, and "
              "int64 counters (", which, " BatchNorm), got ", running_mean.scalar_type(), ", ",
              running_var.scalar_type(), ", ", mean.scalar_type(), ", ", var.scalar_type(), ", ",
              num_batches.scalar_type());
  return C;
}

inline void check_bn_batch(int64_t batch) {
  TORCH_CHECK(batch > 1, "clfast.dan_bn_update_: expected a batch of more than 1, got ", batch);
}

}  // namespace dan_detail

// The tensors dan_layer_forward returns for its backward, in the schema's order (clfast/ops/dan.py's fake kernel
// lists the same names): u1 the normalised input (train mode; empty in eval mode, where x is kept), s1 what the
// first activation's backward differentiates from (a1, or z1 for GELU), u2 the second BatchNorm's normalised
// input, z2 the second pre-activation (GELU only), a2 the second activation, Weff1 / Weff2 the folded weights,
// and the two BatchNorms' batch means and biased variances (train mode only).
struct DanSaved {
  at::Tensor u1, s1, u2, z2, a2, Weff1, Weff2, mean1, var1, mean2, var2;
  static constexpr int kCount = 11;
  static constexpr const char* kNames[kCount] = {"u1",    "s1",    "u2",   "z2",    "a2",  "Weff1",
                                                 "Weff2", "mean1", "var1", "mean2", "var2"};
  std::vector<at::Tensor> list() const { return {u1, s1, u2, z2, a2, Weff1, Weff2, mean1, var1, mean2, var2}; }
  static DanSaved from(at::TensorList t) {
    TORCH_CHECK(t.size() == kCount, "clfast.dan_layer_backward: expected the ", kCount,
                " tensors saved by the forward, got ", t.size());
    return {t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9], t[10]};
  }
};

// dan_bn_update_'s launch arguments: both BatchNorms of a layer, validated by the front (csrc/dan/dan.cpp).
struct DanBnUpdate {
  struct One {
    at::Tensor running_mean, running_var, num_batches, mean, var;
  } bn[2];
  double momentum;
  int64_t batch;
};

namespace dan_detail {

inline at::Tensor contig(const at::Tensor& t) { return t.is_contiguous() ? t : t.contiguous(); }

// act(z) by ATen's vectorised kernels: in place, except for GELU, whose backward needs z.
inline at::Tensor apply_act(at::Tensor& z, int64_t act) {
  switch (act) {
    case kTanh: return z.tanh_();
    case kRelu: return z.relu_();
    case kSigmoid: return z.sigmoid_();
    case kGelu: return at::gelu(z);
    case kGeluTanh: return at::gelu(z, "tanh");
    default: return z;
  }
}
inline at::Tensor contig(const std::optional<at::Tensor>& t) { return present(t) ? contig(*t) : at::Tensor(); }

// out[g] = bias[g] (broadcast over rows, if defined) + a[g] b[g], one ATen GEMM per neuron g; out may be a view
// (ATen writes each block in place). The backends' K::gemm falls back on it.
inline void gemm_per_neuron(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  for (int64_t g = 0; g < out.size(0); ++g) {
    at::Tensor o = out.select(0, g);
    if (bias.defined()) {
      at::addmm_out(o, bias.select(0, g), a.select(0, g), b.select(0, g));
    } else {
      at::mm_out(o, a.select(0, g), b.select(0, g));
    }
  }
}

}  // namespace dan_detail

// Forward. Train mode (no running statistics): batch statistics. Returns the output [B, N * no] and the tensors
// the backward needs: {u1 (train) or empty, s1, u2, z2 (GELU) or empty, a2, Weff1, Weff2, mean1, var1, mean2,
// var2}, where s1 = a1, or z1 for GELU (what act_backward differentiates from); the batch statistics are empty
// in eval mode, and var is biased, as BatchNorm normalises with it.
template <typename K>
std::tuple<at::Tensor, std::vector<at::Tensor>> dan_layer_forward_impl(
    const at::Tensor& x_, const at::Tensor& g1_, const at::Tensor& b1_, const at::Tensor& W1_,
    const std::optional<at::Tensor>& c1_, const at::Tensor& g2_, const at::Tensor& b2_, const at::Tensor& W2_,
    const std::optional<at::Tensor>& c2_, const at::Tensor& W3_, const std::optional<at::Tensor>& c3_,
    const std::optional<at::Tensor>& rm1_, const std::optional<at::Tensor>& rv1_,
    const std::optional<at::Tensor>& rm2_, const std::optional<at::Tensor>& rv2_, double eps,
    c10::string_view act_name) {
  using namespace dan_detail;
  const Dims d = check_layer(x_, g1_, b1_, W1_, c1_, g2_, b2_, W2_, c2_, W3_, c3_, rm1_, rv1_, rm2_, rv2_, eps);
  const int64_t act = parse_act(act_name);
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
    K::col_norm(x, true, u1, true, B, G1 * ni, G1, true, eps, mean1, var1);
  }
  at::Tensor Weff1 = at::empty({N, nf, ni}, opts), beff1 = at::empty({N, nf}, opts);
  K::fold(W1, contig(c1_), contig(g1_), contig(b1_), rm1, rv1, eps, Weff1, beff1);
  at::Tensor z1;
  if (d.per_neuron) {
    z1 = at::empty({N, B, nf}, opts);
    K::gemm(z1, beff1, u1, Weff1.transpose(1, 2));
  } else {  // one GEMM for all neurons: [B, ni] x [ni, N * nf]
    z1 = at::empty({B, N * nf}, opts);
    K::gemm(z1.unsqueeze(0), beff1.view({1, N * nf}), u1.unsqueeze(0), Weff1.view({1, N * nf, ni}).transpose(1, 2));
  }
  const at::Tensor a1 = apply_act(z1, act);  // z1 holds a1 unless the activation is GELU

  at::Tensor u2 = at::empty({N, B, nf}, opts);
  at::Tensor mean2 = training ? at::empty({N * nf}, opts) : none();
  at::Tensor var2 = training ? at::empty({N * nf}, opts) : none();
  K::col_norm(a1, d.per_neuron, u2, true, B, N * nf, N, training, eps, mean2, var2);
  at::Tensor Weff2 = at::empty({N, nf, nf}, opts), beff2 = at::empty({N, nf}, opts);
  K::fold(W2, contig(c2_), contig(g2_), contig(b2_), rm2, rv2, eps, Weff2, beff2);
  at::Tensor z2 = at::empty({N, B, nf}, opts);
  K::gemm(z2, beff2, u2, Weff2.transpose(1, 2));
  const at::Tensor a2 = apply_act(z2, act);
  // The third GEMM writes each neuron's block of the concatenated output [B, N * no] in place.
  at::Tensor out = at::empty({B, N * d.no}, opts);
  K::gemm(out.view({B, N, d.no}).transpose(0, 1), contig(c3_), a2, W3.transpose(1, 2));
  const bool gelu = needs_input(act);
  return {out, DanSaved{training ? u1 : none(), z1, u2, gelu ? z2 : none(), a2, Weff1, Weff2, mean1, var1, mean2,
                        var2}.list()};
}

// Backward of dan_layer_forward from its saved tensors. Returns {dx, dbn1_weight, dbn1_bias, dweight1, dbias1,
// dbn2_weight, dbn2_bias, dweight2, dbias2, dweight3, dbias3}: the gradient of forward argument i at index i (dx
// empty when !input_grad).
template <typename K>
std::vector<at::Tensor> dan_layer_backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x_, const at::Tensor& g1_, const at::Tensor& b1_,
    const at::Tensor& W1_, const at::Tensor& g2_, const at::Tensor& b2_, const at::Tensor& W2_, const at::Tensor& W3_,
    const std::optional<at::Tensor>& rm1_, const std::optional<at::Tensor>& rv1_,
    const std::optional<at::Tensor>& rm2_, const std::optional<at::Tensor>& rv2_, at::TensorList saved, double eps,
    c10::string_view act_name, bool input_grad) {
  using namespace dan_detail;
  const Dims d = check_layer(x_, g1_, b1_, W1_, std::nullopt, g2_, b2_, W2_, std::nullopt, W3_, std::nullopt, rm1_,
                             rv1_, rm2_, rv2_, eps);
  const int64_t act = parse_act(act_name);
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
  K::gemm(dW3, undefined, dy.transpose(1, 2), a2);
  K::gemm(da2, undefined, dy, W3);

  at::Tensor dz2 = at::empty({N, B, nf}, opts), dbeff2 = at::empty({N, nf}, opts);
  K::norm_act_backward(da2, none, true, none, eps, false, s2, true, act, dz2, true, B, N * nf, N, dbeff2);
  at::Tensor dWeff2 = at::empty({N, nf, nf}, opts), du2 = at::empty({N, B, nf}, opts);
  K::gemm(dWeff2, undefined, dz2.transpose(1, 2), u2);
  K::gemm(du2, undefined, dz2, Weff2);
  at::Tensor dW2 = at::empty_like(W2), dg2 = at::empty({N, nf}, opts), db2 = at::empty({N, nf}, opts);
  K::unfold_backward(dWeff2, dbeff2, W2, contig(g2_), contig(b2_), rm2, rv2, eps, dW2, dg2, db2);

  at::Tensor dz1 = at::empty_like(s1), dbeff1 = at::empty({N, nf}, opts);
  K::norm_act_backward(du2, u2, true, var2, eps, training, s1, d.per_neuron, act, dz1, d.per_neuron, B, N * nf, N,
                       dbeff1);
  at::Tensor dWeff1, du1;
  if (d.per_neuron) {
    dWeff1 = at::empty({N, nf, ni}, opts);
    K::gemm(dWeff1, undefined, dz1.transpose(1, 2), u1);
    if (input_grad) {
      du1 = at::empty({N, B, ni}, opts);
      K::gemm(du1, undefined, dz1, Weff1);
    }
  } else {
    dWeff1 = at::empty({N, nf, ni}, opts);
    K::gemm(dWeff1.view({1, N * nf, ni}), undefined, dz1.t().unsqueeze(0), u1.unsqueeze(0));
    if (input_grad) {
      du1 = at::empty({B, ni}, opts);
      K::gemm(du1.unsqueeze(0), undefined, dz1.unsqueeze(0), Weff1.view({1, N * nf, ni}));
    }
  }
  at::Tensor dW1 = at::empty_like(W1), dg1 = at::empty({N, ni}, opts), db1 = at::empty({N, ni}, opts);
  K::unfold_backward(dWeff1, dbeff1, W1, contig(g1_), contig(b1_), rm1, rv1, eps, dW1, dg1, db1);

  at::Tensor dx = none;
  if (input_grad && training) {
    dx = at::empty_like(u1);
    at::Tensor colsum = at::empty({G1 * ni}, opts);
    K::norm_act_backward(du1, u1, true, var1, eps, true, none, true, kIdentity, dx, true, B, G1 * ni, G1, colsum);
  } else if (input_grad) {
    dx = du1;
  }
  return {dx, dg1, db1, dW1, dbeff1, dg2, db2, dW2, dbeff2, dW3, dc3};
}

}  // namespace clfast
