// Input validation shared by the CPU and CUDA implementations: every op checks its tensor lists once, at
// the boundary, with a message that names the op, the list, the index and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <utility>
#include <vector>

namespace clfast {

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool optional = false;  // may be empty instead of matching the reference list
};

// All tensors defined, float32/float64 (one dtype for all), on `device_type` and one device, each with the
// shape of ref[i]. `ref` is the first list (the parameters).
inline void check_lists(const char* op, c10::DeviceType device_type, std::initializer_list<NamedList> lists) {
  const NamedList& ref = *lists.begin();
  TORCH_CHECK(!ref.tensors.empty(), "clfast.", op, ": expected at least one tensor in '", ref.name, "'");
  const at::Tensor& first = ref.tensors[0];
  for (const NamedList& l : lists) {
    if (l.optional && l.tensors.empty()) continue;
    TORCH_CHECK(l.tensors.size() == ref.tensors.size(), "clfast.", op, ": '", l.name, "' has ", l.tensors.size(),
                " tensors but '", ref.name, "' has ", ref.tensors.size());
    for (size_t i = 0; i < l.tensors.size(); ++i) {
      const at::Tensor& t = l.tensors[i];
      TORCH_CHECK(t.defined(), "clfast.", op, ": ", l.name, "[", i, "] is undefined (None)");
      TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, "clfast.", op, ": ", l.name, "[",
                  i, "] must be float32 or float64, got ", t.scalar_type());
      TORCH_CHECK(t.scalar_type() == first.scalar_type(), "clfast.", op, ": all tensors must share one dtype; ",
                  l.name, "[", i, "] is ", t.scalar_type(), " but ", ref.name, "[0] is ", first.scalar_type());
      TORCH_CHECK(t.device().type() == device_type && t.device() == first.device(), "clfast.", op, ": ", l.name,
                  "[", i, "] is on ", t.device(), " but ", ref.name, "[0] is on ", first.device(),
                  "; all tensors must be on one device");
      TORCH_CHECK(t.sizes() == ref.tensors[i].sizes(), "clfast.", op, ": ", l.name, "[", i, "] has shape ",
                  t.sizes(), " but ", ref.name, "[", i, "] has shape ", ref.tensors[i].sizes());
    }
  }
}

// Contiguous views of a list for the kernels. For a list the op writes, finish() copies results back into
// any original that was not contiguous (the kernels address elements linearly).
struct ContigList {
  std::vector<at::Tensor> orig, work;
  explicit ContigList(at::TensorList l) : orig(l.begin(), l.end()) {
    work.reserve(orig.size());
    for (const at::Tensor& t : orig) work.push_back(t.contiguous());
  }
  void finish() {
    for (size_t i = 0; i < orig.size(); ++i)
      if (!orig[i].is_same(work[i])) orig[i].copy_(work[i]);
  }
  size_t size() const { return work.size(); }
  bool empty() const { return work.empty(); }
};

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

// ---- reservoir buffer ---------------------------------------------------------------------------------------

// storage[f] is [capacity, *batch[f].shape[1:]] with batch[f]'s dtype, all contiguous storage on one device of
// type dt; draws [B] float64. Returns the capacity.
inline int64_t check_reservoir(const char* op, c10::DeviceType dt, at::TensorList storage, at::TensorList batch,
                               const at::Tensor& draws, int64_t num_seen) {
  TORCH_CHECK(!storage.empty() && storage.size() == batch.size(), "clfast.", op,
              ": expected one batch tensor per storage field, got ", batch.size(), " for ", storage.size());
  TORCH_CHECK(num_seen >= 0, "clfast.", op, ": num_seen must be >= 0, got ", num_seen);
  const int64_t capacity = storage[0].dim() > 0 ? storage[0].size(0) : 0;
  const int64_t B = batch[0].dim() > 0 ? batch[0].size(0) : -1;
  TORCH_CHECK(capacity > 0, "clfast.", op, ": storage must have a leading capacity dimension > 0");
  for (size_t f = 0; f < storage.size(); ++f) {
    const at::Tensor &s = storage[f], &b = batch[f];
    TORCH_CHECK(s.device().type() == dt && s.device() == storage[0].device() && s.is_contiguous(), "clfast.", op,
                ": storage[", f, "] must be contiguous on ", storage[0].device(), ", got ", s.device());
    TORCH_CHECK(b.device() == s.device(), "clfast.", op, ": batch[", f, "] is on ", b.device(), " but the buffer is on ",
                s.device());
    TORCH_CHECK(s.dim() >= 1 && s.size(0) == capacity && b.dim() == s.dim() && b.size(0) == B &&
                    b.sizes().slice(1) == s.sizes().slice(1),
                "clfast.", op, ": batch[", f, "] has shape ", b.sizes(), " but the buffer holds items of shape ",
                s.sizes().slice(1), " (and every field needs the same batch size ", B, ")");
    TORCH_CHECK(b.scalar_type() == s.scalar_type(), "clfast.", op, ": batch[", f, "] is ", b.scalar_type(),
                " but the buffer stores ", s.scalar_type());
  }
  TORCH_CHECK(draws.scalar_type() == at::kDouble && draws.dim() == 1 && draws.size(0) == B &&
                  draws.device() == storage[0].device(),
              "clfast.", op, ": draws must be a float64 vector of ", B, " values on ", storage[0].device());
  return capacity;
}

}  // namespace clfast
