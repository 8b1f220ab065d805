// Input validation shared by the CPU and CUDA implementations: every op checks its tensor lists once, at
// the boundary, with a message that names the op, the list, the index and what was expected.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

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

}  // namespace clfast
