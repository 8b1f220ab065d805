// Validation shared by every op front: each op checks all its arguments once, before anything is written, with
// a message that names the op, the argument, the index and what was expected.
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace clfast {

struct NamedList {
  const char* name;
  at::TensorList tensors;
  bool optional = false;  // may be empty instead of matching the reference list
};

// All tensors defined, float32/float64 (one dtype for all), on the device of ref[0], each with the shape of
// ref[i]. `ref` is the first list (the parameters).
inline void check_lists(const char* op, std::initializer_list<NamedList> lists) {
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
      TORCH_CHECK(t.device() == first.device(), "clfast.", op, ": ", l.name, "[", i, "] is on ", t.device(), " but ",
                  ref.name, "[0] is on ", first.device(), "; all tensors must be on one device");
      TORCH_CHECK(t.sizes() == ref.tensors[i].sizes(), "clfast.", op, ": ", l.name, "[", i, "] has shape ",
                  t.sizes(), " but ", ref.name, "[", i, "] has shape ", ref.tensors[i].sizes());
    }
  }
}

// The byte addresses of t's elements, sorted.
inline std::vector<uintptr_t> element_addresses(const at::Tensor& t) {
  std::vector<uintptr_t> out;
  out.reserve(t.numel());
  const auto base = reinterpret_cast<uintptr_t>(t.data_ptr());
  const int64_t dims = t.dim(), item = static_cast<int64_t>(t.element_size());
  std::vector<int64_t> index(dims, 0);
  for (int64_t n = 0; n < t.numel(); ++n) {
    int64_t offset = 0;
    for (int64_t d = 0; d < dims; ++d) offset += index[d] * t.stride(d);
    out.push_back(base + static_cast<uintptr_t>(offset * item));
    for (int64_t d = dims - 1; d >= 0 && ++index[d] == t.size(d); --d) index[d] = 0;
  }
  std::sort(out.begin(), out.end());
  return out;
}

constexpr int64_t kExactOverlapLimit = int64_t(1) << 20;  // elements: beyond, an undecided case counts as overlap

// True when two elements of t share one address (an expanded or otherwise self-overlapping view). Dims sorted by
// stride, each stride stepping past every offset the smaller dims reach proves there is none; a layout that fails
// that test is settled by its element addresses.
inline bool overlaps_itself(const at::Tensor& t) {
  if (t.numel() <= 1 || t.is_non_overlapping_and_dense()) return false;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims with size > 1
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  std::sort(dims.begin(), dims.end());
  int64_t reach = 0;
  bool proven = true;
  for (const auto& [stride, size] : dims) {
    if (stride <= reach) {
      proven = false;
      break;
    }
    reach += stride * (size - 1);
  }
  if (proven) return false;
  if (t.numel() > kExactOverlapLimit) return true;
  const std::vector<uintptr_t> a = element_addresses(t);
  return std::adjacent_find(a.begin(), a.end()) != a.end();
}

// Whether two tensors whose address ranges meet share an element. Two dense tensors do; otherwise their element
// addresses are compared (sorted), which tells interleaved views of one buffer (w[:, :3] and w[:, 3:]) apart.
// Beyond 2^20 elements, or for different element sizes, they are taken to overlap.
inline bool share_an_element(const at::Tensor& x, const at::Tensor& y) {
  if (x.is_non_overlapping_and_dense() && y.is_non_overlapping_and_dense()) return true;
  if (x.numel() > kExactOverlapLimit || y.numel() > kExactOverlapLimit || x.element_size() != y.element_size())
    return true;
  const std::vector<uintptr_t> a = element_addresses(x), b = element_addresses(y);
  for (size_t i = 0, j = 0; i < a.size() && j < b.size();) {
    if (a[i] == b[j]) return true;
    a[i] < b[j] ? ++i : ++j;
  }
  return false;
}

// What an op writes and what it only reads, for check_memory.
struct Access {
  const char* name;
  at::TensorList tensors;
  bool written;
};

// Every written tensor can be written (it does not overlap itself; not an inference tensor outside inference
// mode), and shares no memory with any other argument: an output that aliases an input or another output would
// make the fused result depend on the order of the element loops and threads. Address ranges are compared after
// a sort, so the check is O(n log n) in the number of tensors; where two ranges meet, share_an_element decides.
inline void check_memory(const char* op, std::initializer_list<Access> args) {
  struct Range {
    uintptr_t lo, hi;
    const Access* arg;
    size_t index;
  };
  std::vector<Range> ranges;
  for (const Access& a : args)
    for (size_t i = 0; i < a.tensors.size(); ++i) {
      const at::Tensor& t = a.tensors[i];
      if (!t.defined() || t.numel() == 0) continue;
      if (a.written) {
        TORCH_CHECK(!overlaps_itself(t), "clfast.", op, ": ", a.name, "[", i,
                    "] cannot be written: several of its elements share memory (an expanded or stride-0 view); "
                    "pass a tensor that owns its elements, e.g. .clone()");
        TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), "clfast.", op, ": ", a.name, "[", i,
                    "] is an inference tensor; in-place updates to it are only allowed inside InferenceMode");
      }
      int64_t extent = 1;
      for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
      const auto lo = reinterpret_cast<uintptr_t>(t.data_ptr());
      ranges.push_back({lo, lo + static_cast<uintptr_t>(extent) * t.element_size(), &a, i});
    }
  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& x, const Range& y) { return x.lo < y.lo; });
  std::vector<const Range*> open;
  for (const Range& r : ranges) {
    open.erase(std::remove_if(open.begin(), open.end(), [&](const Range* o) { return o->hi <= r.lo; }), open.end());
    for (const Range* o : open) {
      if (!o->arg->written && !r.arg->written) continue;
      if (!share_an_element(o->arg->tensors[o->index], r.arg->tensors[r.index])) continue;
      const std::string what = (o->arg->written && r.arg->written) ? "two outputs" : "an output and an input";
      TORCH_CHECK(false, "clfast.", op, ": ", o->arg->name, "[", o->index, "] and ", r.arg->name, "[", r.index,
                  "] share memory; ", what, " of this op must not overlap (pass separate tensors, e.g. .clone())");
    }
    open.push_back(&r);
  }
}

// What ATen's in-place ops do after writing: autograd then refuses a backward through a saved older value.
inline void bump_versions(at::TensorList written) {
  for (const at::Tensor& t : written)
    if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
}

inline void bump_version(const std::optional<at::Tensor>& t) {
  if (t.has_value() && t->defined()) t->unsafeGetTensorImpl()->bump_version();
}

// Copies the kernels' contiguous working copy back into the tensor the caller passed, if they differ. Below
// ADInplaceOrView: the front bumps each version once, as ATen does.
inline void write_back(const at::Tensor& orig, const at::Tensor& work) {
  if (orig.defined() && !orig.is_same(work)) {
    const at::AutoDispatchBelowADInplaceOrView below;
    orig.copy_(work);
  }
}

// Contiguous views of a list for the kernels. For a list the op writes, finish() copies results back into
// any original that was not contiguous (the kernels address elements linearly). The front has checked that
// such a copy cannot fail.
struct ContigList {
  std::vector<at::Tensor> orig, work;
  explicit ContigList(at::TensorList l) : orig(l.begin(), l.end()) {
    work.reserve(orig.size());
    for (const at::Tensor& t : orig) work.push_back(t.contiguous());
  }
  void finish() {
    for (size_t i = 0; i < orig.size(); ++i) write_back(orig[i], work[i]);
  }
  size_t size() const { return work.size(); }
  bool empty() const { return work.empty(); }
};

}  // namespace clfast
