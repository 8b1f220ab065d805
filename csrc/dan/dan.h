// DAN op family: the argument checks, the forward's saved tensors and the params structs that the front
// (csrc/dan/dan.cpp) fills and the launchers (csrc/dan/dan_cpu.cpp, csrc/dan/dan_cuda.cu) read.
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

// dan_layer_forward's arguments by name, in the schema's order; an absent optional is an undefined tensor.
struct DanLayerArgs {
  at::Tensor x, g1, b1, W1, c1, g2, b2, W2, c2, W3, c3, rm1, rv1, rm2, rv2;
  double eps;
  bool training() const { return !rm1.defined(); }
};

inline at::Tensor value(const std::optional<at::Tensor>& t) { return present(t) ? *t : at::Tensor(); }

struct Dims {
  int64_t N, nf, ni, no, B;
  bool per_neuron;  // x [N, B, ni] (one input per neuron) instead of [B, ni] (shared)
  int64_t G1() const { return per_neuron ? N : 1; }
};

inline Dims check_layer(const DanLayerArgs& a) {
  const at::Tensor& x = a.x;
  TORCH_CHECK(x.defined() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble),
              "clfast.dan_layer: expected a float32 or float64 input, got ",
              x.defined() ? c10::toString(x.scalar_type()) : "None");
  // The layer's sizes come from the BatchNorm parameters (N, ni from bn1_weight, nf from bn2_weight) and the
  // output Linear (no): every other argument is then checked against them, so a wrong one is named.
  TORCH_CHECK(a.g1.defined() && a.g1.dim() == 2 && a.g2.defined() && a.g2.dim() == 2 && a.W3.defined() &&
                  a.W3.dim() == 3,
              "clfast.dan_layer: bn1_weight must be [N, ni], bn2_weight [N, nf] and weight3 [N, no, nf], got ",
              a.g1.defined() ? a.g1.sizes() : at::IntArrayRef{}, ", ",
              a.g2.defined() ? a.g2.sizes() : at::IntArrayRef{}, " and ",
              a.W3.defined() ? a.W3.sizes() : at::IntArrayRef{});
  Dims d{a.g1.size(0), a.g2.size(1), a.g1.size(1), a.W3.size(1), 0, x.dim() == 3};
  TORCH_CHECK(d.N > 0 && d.nf > 0 && d.ni > 0 && d.no > 0, "clfast.dan_layer: empty layer (N=", d.N, ", nf=", d.nf,
              ", ni=", d.ni, ", no=", d.no, ")");
  check_param("bn1_bias", a.b1, {d.N, d.ni}, x);
  check_param("weight1", a.W1, {d.N, d.nf, d.ni}, x);
  TORCH_CHECK((x.dim() == 2 && x.size(1) == d.ni) || (x.dim() == 3 && x.size(0) == d.N && x.size(2) == d.ni),
              "clfast.dan_layer: expected an input [B, ", d.ni, "] or [", d.N, ", B, ", d.ni, "], got ", x.sizes());
  d.B = x.size(-2);
  const auto optional = [&](const char* name, const at::Tensor& t, at::IntArrayRef shape) {
    if (t.defined()) check_param(name, t, shape, x);
  };
  check_param("bn1_weight", a.g1, {d.N, d.ni}, x);
  optional("bias1", a.c1, {d.N, d.nf});
  check_param("bn2_weight", a.g2, {d.N, d.nf}, x);
  check_param("bn2_bias", a.b2, {d.N, d.nf}, x);
  check_param("weight2", a.W2, {d.N, d.nf, d.nf}, x);
  optional("bias2", a.c2, {d.N, d.nf});
  check_param("weight3", a.W3, {d.N, d.no, d.nf}, x);
  optional("bias3", a.c3, {d.N, d.no});
  const bool eval = !a.training();
  TORCH_CHECK(eval == a.rv1.defined() && eval == a.rm2.defined() && eval == a.rv2.defined(),
              "clfast.dan_layer: pass all four running statistics (eval mode) or none (train mode)");
  optional("running_mean1", a.rm1, {d.N, d.ni});
  optional("running_var1", a.rv1, {d.N, d.ni});
  optional("running_mean2", a.rm2, {d.N, d.nf});
  optional("running_var2", a.rv2, {d.N, d.nf});
  // torch's BatchNorm: a positive eps in train mode, a non-negative one in eval mode.
  TORCH_CHECK_VALUE(eval || a.eps > 0, "batch_norm eps must be positive during training, but got ", a.eps);
  TORCH_CHECK_VALUE(a.eps >= 0, "batch_norm eps must be non-negative, but got ", a.eps);
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

inline at::Tensor contig(const std::optional<at::Tensor>& t) { return present(t) ? contig(*t) : at::Tensor(); }

// out[g] = bias[g] (broadcast over rows, if defined) + a[g] b[g], one ATen GEMM per neuron g; out may be a view
// (ATen writes each block in place). The backends' GEMM launchers fall back on it.
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

// The passes of a layer's forward and backward, one params struct each: the front (csrc/dan/dan.cpp) fills them and
// launches each on the tensors' device (csrc/dan/dan_cpu.cpp, csrc/dan/dan_cuda.cu). Tensors are contiguous
// unless said otherwise; an undefined tensor stands for an absent one (bias, train-mode running statistics).

// out[g] = bias[g] (broadcast over rows, if defined) + a[g] b[g] for every neuron g. Views allowed: out may be a
// column block of a wider matrix, written in place; a and b any strides.
struct DanGemm {
  at::Tensor out, bias, a, b;
};

// u = normalize ? (h - mean) * rstd : h per column of the logical [B, groups * Cg] matrix h, with the columns'
// mean and biased variance when normalize.
struct DanColNorm {
  at::Tensor h, u, mean, var;
  MatrixView hv, uv;
  int64_t B, Cg, groups;
  bool normalize;
  double eps;
};

// dz = act'(s_act) * dh per column, dh = du (normalize false) or BatchNorm's input gradient
// rstd * (du - mean(du) - u * mean(du * u)) from the batch variance var; colsum = the column sums of dz.
// u shares du's layout; s_act is read only when act is not the identity.
struct DanNormActBackward {
  at::Tensor du, u, var, s_act, dz, colsum;
  MatrixView duv, zv, dzv;
  int64_t B, Cg, groups;
  bool normalize;
  int act;
  double eps;
};

// One BatchNorm folded into the Linear W [N, R, Cc] that follows it: Weff = W * s, beff = bias + W t
// (csrc/math/dan.h: bn_scale_shift).
struct DanFold {
  at::Tensor W, bias, g, b, rm, rv, Weff, beff;
  double eps;
};

// The fold's backward: dW = dWeff * s + dbeff t^T, and the gradients dg, db of the BatchNorm's gamma and beta.
struct DanUnfoldBackward {
  at::Tensor dWeff, dbeff, W, g, b, rm, rv, dW, dg, db;
  double eps;
};

}  // namespace clfast
