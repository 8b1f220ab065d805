// CBP op family: argument checks shared by the CPU and CUDA implementations.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <vector>

namespace clfast {

// ---- CBP ----------------------------------------------------------------------------------------------------

enum CbpUtility : int64_t { kContribution = 0, kZeroContribution = 1, kAdaptableContribution = 2 };

struct CbpLayer {
  int64_t batch, units, spatial, group;  // features [batch, units, spatial]; w_next [rows, units, group]
};

inline void check_same(const char* op, const at::Tensor& ref, const at::Tensor& t, const std::string& name,
                       c10::DeviceType device_type) {
  TORCH_CHECK(t.defined(), "clfast.", op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "clfast.", op, ": ", name,
              " must be float32 or float64, got ", t.scalar_type());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "clfast.", op, ": ", name, " is ", t.scalar_type(),
              " but the layer's weight is ", ref.scalar_type());
  TORCH_CHECK(t.device().type() == device_type && t.device() == ref.device(), "clfast.", op, ": ", name, " is on ",
              t.device(), " but the layer's weight is on ", ref.device());
}

inline void check_state(const char* op, const at::Tensor& ref, const at::Tensor& t, const std::string& name,
                        int64_t units, c10::DeviceType device_type) {
  check_same(op, ref, t, name, device_type);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == units && t.is_contiguous(), "clfast.", op, ": ", name,
              " must be a contiguous vector of ", units, " units, got shape ", t.sizes());
}

// Units of the next layer's input that belong to one unit of this layer: 1 (Linear), kh*kw (Conv2d), or
// H*W when a Conv2d feeds a Linear through a flatten.
inline int64_t cbp_group(const char* op, const at::Tensor& w_next, int64_t units, const std::string& name) {
  TORCH_CHECK(w_next.dim() >= 2 && w_next.size(0) > 0, "clfast.", op, ": ", name,
              " must be a Linear or Conv2d weight, got shape ", w_next.sizes());
  const int64_t per_row = w_next.numel() / w_next.size(0);
  TORCH_CHECK(per_row % units == 0 && per_row > 0, "clfast.", op, ": layers do not chain: ", name, " (shape ",
              w_next.sizes(), ") takes ", per_row, " inputs per output, not a multiple of the layer's ", units,
              " units");
  return per_row / units;
}

inline std::vector<CbpLayer> check_cbp_update(const char* op, c10::DeviceType dt, at::TensorList utility,
                                              at::TensorList mean, at::TensorList age, at::TensorList features,
                                              at::TensorList w_next, at::TensorList w_cur, int64_t utility_type) {
  const size_t L = utility.size();
  TORCH_CHECK(L > 0, "clfast.", op, ": expected at least one layer");
  TORCH_CHECK(mean.size() == L && age.size() == L && features.size() == L && w_next.size() == L &&
                  w_cur.size() == L,
              "clfast.", op, ": utility, mean, age, features, w_next and w_cur must list the same layers");
  TORCH_CHECK(utility_type >= kContribution && utility_type <= kAdaptableContribution, "clfast.", op,
              ": unknown utility type ", utility_type);
  std::vector<CbpLayer> out;
  for (size_t l = 0; l < L; ++l) {
    const std::string at = "[" + std::to_string(l) + "]";
    const at::Tensor& ref = w_cur[l];
    check_same(op, w_cur[0], ref, "w_cur" + at, dt);  // one dtype and device for all layers
    TORCH_CHECK(ref.dim() >= 2 && ref.size(0) > 0, "clfast.", op, ": w_cur", at,
                " must be a Linear or Conv2d weight with at least one unit, got shape ", ref.sizes());
    const int64_t n = ref.size(0);
    check_state(op, ref, utility[l], "utility" + at, n, dt);
    check_state(op, ref, mean[l], "mean" + at, n, dt);
    check_state(op, ref, age[l], "age" + at, n, dt);
    check_same(op, ref, features[l], "features" + at, dt);
    check_same(op, ref, w_next[l], "w_next" + at, dt);
    const at::Tensor& h = features[l];
    TORCH_CHECK(h.dim() >= 2 && h.size(1) == n && h.size(0) > 0 && h.numel() > 0, "clfast.", op, ": features", at,
                " must be [batch > 0, ", n, ", ...] (the layer's ", n, " units, non-empty), got shape ", h.sizes());
    out.push_back({h.size(0), n, h.numel() / (h.size(0) * n), cbp_group(op, w_next[l], n, "w_next" + at)});
  }
  return out;
}

struct CbpReplace {
  int64_t units, fan_in, group;
};

inline CbpReplace check_cbp_replace(const char* op, c10::DeviceType dt, const at::Tensor& w_cur,
                                  const std::optional<at::Tensor>& b_cur, const at::Tensor& w_next,
                                  const std::optional<at::Tensor>& b_next, const at::Tensor& utility,
                                  const at::Tensor& mean, const at::Tensor& age, const at::Tensor& new_weights) {
  check_same(op, w_cur, w_cur, "w_cur", dt);
  TORCH_CHECK(w_cur.dim() >= 2 && w_cur.size(0) > 0 && w_cur.numel() > 0 && w_cur.is_contiguous(), "clfast.", op,
              ": w_cur must be a contiguous, non-empty Linear or Conv2d weight, got shape ", w_cur.sizes());
  const int64_t n = w_cur.size(0), fan_in = w_cur.numel() / n;
  if (b_cur.has_value()) check_state(op, w_cur, *b_cur, "b_cur", n, dt);
  check_same(op, w_cur, w_next, "w_next", dt);
  TORCH_CHECK(w_next.is_contiguous(), "clfast.", op, ": w_next must be contiguous");
  const int64_t group = cbp_group(op, w_next, n, "w_next");
  if (b_next.has_value()) check_state(op, w_cur, *b_next, "b_next", w_next.size(0), dt);
  check_state(op, w_cur, utility, "utility", n, dt);
  check_state(op, w_cur, mean, "mean", n, dt);
  check_state(op, w_cur, age, "age", n, dt);
  check_same(op, w_cur, new_weights, "new_weights", dt);
  TORCH_CHECK(new_weights.dim() == 2 && new_weights.size(0) <= n && new_weights.size(1) == fan_in, "clfast.", op,
              ": new_weights must be [k <= ", n, ", ", fan_in, "] (one row per replaced unit), got ",
              new_weights.sizes());
  return {n, fan_in, group};
}

}  // namespace clfast
