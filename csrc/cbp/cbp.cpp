// Front of the CBP ops: validation, contiguous copies (any memory format, e.g. channels_last Conv2d weights),
// version counters; the kernels run in cbp_cpu.cpp and cbp_cuda.cu.
#include <torch/library.h>

#include <string>

#include "../common/checks.h"
#include "../common/launch.h"
#include "cbp.h"

namespace clfast {
namespace {

CbpUtility parse_utility(const char* op, c10::string_view name) {
  if (name == "contribution") return kContribution;
  if (name == "zero_contribution") return kZeroContribution;
  if (name == "adaptable_contribution") return kAdaptableContribution;
  TORCH_CHECK(false, "clfast.", op, ": utility must be 'contribution', 'zero_contribution' or "
              "'adaptable_contribution', got '", std::string(name), "'");
}

void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const std::string& name) {
  TORCH_CHECK(t.defined(), "clfast.", op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "clfast.", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "clfast.", op, ": ", name, " is ", t.scalar_type(),
              " but the layer's weight is ", ref.scalar_type());
  TORCH_CHECK(t.device() == ref.device(), "clfast.", op, ": ", name, " is on ", t.device(),
              " but the layer's weight is on ", ref.device());
}

void check_state(const char* op, const at::Tensor& ref, const at::Tensor& t, const std::string& name, int64_t units) {
  check_same(op, ref, t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == units, "clfast.", op, ": ", name, " must be a vector of ", units,
              " units, got shape ", t.sizes());
}

// Inputs of the next layer that belong to one unit of this layer: 1 (Linear), kh*kw (Conv2d), or H*W when a
// Conv2d feeds a Linear through a flatten.
int64_t cbp_group(const char* op, const at::Tensor& w_next, int64_t units, const std::string& name) {
  TORCH_CHECK(w_next.dim() >= 2 && w_next.size(0) > 0, "clfast.", op, ": ", name,
              " must be a Linear or Conv2d weight, got shape ", w_next.sizes());
  const int64_t per_row = w_next.numel() / w_next.size(0);
  TORCH_CHECK(per_row % units == 0 && per_row > 0, "clfast.", op, ": layers do not chain: ", name, " (shape ",
              w_next.sizes(), ") takes ", per_row, " inputs per output, not a multiple of the layer's ", units,
              " units");
  return per_row / units;
}

// Contiguous in the default (row-major) order, which the kernels address: a channels_last weight is copied.
at::Tensor rowmajor(const at::Tensor& t) { return t.contiguous(); }

void cbp_update_(at::TensorList utility, at::TensorList mean, at::TensorList age, at::TensorList features,
                 at::TensorList w_next, at::TensorList w_cur, double decay, c10::string_view utility_name) {
  constexpr const char* op = "cbp_update_";
  const size_t L = utility.size();
  TORCH_CHECK(L > 0, "clfast.", op, ": expected at least one layer");
  TORCH_CHECK(mean.size() == L && age.size() == L && features.size() == L && w_next.size() == L &&
                  w_cur.size() == L,
              "clfast.", op, ": utility, mean, age, features, w_next and w_cur must list the same layers");
  CbpUpdate args{{}, decay, parse_utility(op, utility_name)};
  for (size_t l = 0; l < L; ++l) {
    const std::string at = "[" + std::to_string(l) + "]";
    const at::Tensor& ref = w_cur[l];
    check_same(op, w_cur[0], ref, "w_cur" + at);  // one dtype and device for all layers
    TORCH_CHECK(ref.dim() >= 2 && ref.size(0) > 0, "clfast.", op, ": w_cur", at,
                " must be a Linear or Conv2d weight with at least one unit, got shape ", ref.sizes());
    const int64_t n = ref.size(0);
    check_state(op, ref, utility[l], "utility" + at, n);
    check_state(op, ref, mean[l], "mean" + at, n);
    check_state(op, ref, age[l], "age" + at, n);
    check_same(op, ref, features[l], "features" + at);
    check_same(op, ref, w_next[l], "w_next" + at);
    const at::Tensor& h = features[l];
    TORCH_CHECK(h.dim() >= 2 && h.size(1) == n && h.size(0) > 0 && h.numel() > 0, "clfast.", op, ": features", at,
                " must be [batch > 0, ", n, ", ...] (the layer's ", n, " units, non-empty), got shape ", h.sizes());
    const int64_t group = cbp_group(op, w_next[l], n, "w_next" + at);
    args.layers.push_back({utility[l], mean[l], age[l], h, w_next[l], ref, h.size(0), n,
                           h.numel() / (h.size(0) * n), group});
  }
  check_memory(op, {{"utility", utility, true}, {"mean", mean, true}, {"age", age, true},
                    {"features", features, false}, {"w_next", w_next, false}, {"w_cur", w_cur, false}});
  for (CbpUpdateLayer& layer : args.layers) {
    layer.utility = rowmajor(layer.utility), layer.mean = rowmajor(layer.mean), layer.age = rowmajor(layer.age);
    layer.features = rowmajor(layer.features), layer.w_next = rowmajor(layer.w_next);
    layer.w_cur = rowmajor(layer.w_cur);
  }
  launch(op, w_cur[0].device(), args);
  for (size_t l = 0; l < L; ++l) {
    write_back(utility[l], args.layers[l].utility);
    write_back(mean[l], args.layers[l].mean);
    write_back(age[l], args.layers[l].age);
  }
  bump_versions(utility);
  bump_versions(mean);
  bump_versions(age);
}

at::Tensor cbp_replace_(const at::Tensor& w_cur, const std::optional<at::Tensor>& b_cur, const at::Tensor& w_next,
                        const std::optional<at::Tensor>& b_next, const at::Tensor& utility, const at::Tensor& mean,
                        const at::Tensor& age, const at::Tensor& new_weights, double decay,
                        int64_t maturity_threshold) {
  constexpr const char* op = "cbp_replace_";
  check_same(op, w_cur, w_cur, "w_cur");
  TORCH_CHECK(w_cur.dim() >= 2 && w_cur.size(0) > 0 && w_cur.numel() > 0, "clfast.", op,
              ": w_cur must be a non-empty Linear or Conv2d weight, got shape ", w_cur.sizes());
  const int64_t n = w_cur.size(0), fan_in = w_cur.numel() / n;
  const bool has_b_cur = b_cur.has_value() && b_cur->defined(), has_b_next = b_next.has_value() && b_next->defined();
  if (has_b_cur) check_state(op, w_cur, *b_cur, "b_cur", n);
  check_same(op, w_cur, w_next, "w_next");
  const int64_t group = cbp_group(op, w_next, n, "w_next");
  if (has_b_next) check_state(op, w_cur, *b_next, "b_next", w_next.size(0));
  check_state(op, w_cur, utility, "utility", n);
  check_state(op, w_cur, mean, "mean", n);
  check_state(op, w_cur, age, "age", n);
  check_same(op, w_cur, new_weights, "new_weights");
  TORCH_CHECK(new_weights.dim() == 2 && new_weights.size(0) <= n && new_weights.size(1) == fan_in, "clfast.", op,
              ": new_weights must be [k <= ", n, ", ", fan_in, "] (one row per replaced unit), got ",
              new_weights.sizes());
  const at::Tensor none;
  const at::Tensor& bc = has_b_cur ? *b_cur : none;
  const at::Tensor& bn = has_b_next ? *b_next : none;
  check_memory(op, {{"w_cur", w_cur, true}, {"b_cur", bc, true}, {"w_next", w_next, true}, {"b_next", bn, true},
                    {"utility", utility, true}, {"mean", mean, true}, {"age", age, true},
                    {"new_weights", new_weights, false}});
  const int64_t k = new_weights.size(0);
  at::Tensor index = utility.new_empty({k}, utility.options().dtype(at::kLong));
  if (k == 0) return index;
  CbpReplace args{rowmajor(w_cur), has_b_cur ? rowmajor(bc) : none, rowmajor(w_next), has_b_next ? rowmajor(bn) : none,
                  rowmajor(utility), rowmajor(mean), rowmajor(age), rowmajor(new_weights), index, n, fan_in, group,
                  decay, maturity_threshold};
  launch(op, w_cur.device(), args);
  write_back(w_cur, args.w_cur);
  write_back(bc, args.b_cur);
  write_back(w_next, args.w_next);
  write_back(bn, args.b_next);
  write_back(utility, args.utility);
  write_back(mean, args.mean);
  write_back(age, args.age);
  bump_versions({w_cur, bc, w_next, bn, utility, mean, age});
  return index;
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("cbp_update_", &cbp_update_);
  m.impl("cbp_replace_", &cbp_replace_);
}

}  // namespace clfast
