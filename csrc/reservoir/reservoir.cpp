// Front of reservoir_add_: validation, contiguous batch copies, version counters; the kernels run in
// reservoir_cpu.cpp and reservoir_cuda.cu.
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "../common/launch.h"
#include "reservoir.h"

namespace clfast {
namespace {

void reservoir_add_(at::TensorList storage, at::TensorList batch, const at::Tensor& draws, int64_t num_seen) {
  constexpr const char* op = "reservoir_add_";
  TORCH_CHECK(!storage.empty() && storage.size() == batch.size(), "clfast.", op,
              ": expected one batch tensor per storage field, got ", batch.size(), " for ", storage.size());
  TORCH_CHECK(num_seen >= 0, "clfast.", op, ": num_seen must be >= 0, got ", num_seen);
  const at::Tensor& first = storage[0];
  const int64_t capacity = first.dim() > 0 ? first.size(0) : 0;
  TORCH_CHECK(capacity > 0, "clfast.", op, ": storage[0] must have a leading capacity dimension > 0, got shape ",
              first.sizes());
  const int64_t B = batch[0].dim() > 0 ? batch[0].size(0) : -1;
  for (size_t f = 0; f < storage.size(); ++f) {
    const at::Tensor &s = storage[f], &b = batch[f];
    TORCH_CHECK(s.defined() && b.defined(), "clfast.", op, ": storage[", f, "] and batch[", f, "] must be tensors");
    TORCH_CHECK(s.device() == first.device(), "clfast.", op, ": storage[", f, "] is on ", s.device(),
                " but storage[0] is on ", first.device());
    TORCH_CHECK(s.is_contiguous(), "clfast.", op, ": storage[", f,
                "] must be contiguous (rows are written in place), got strides ", s.strides());
    TORCH_CHECK(b.device() == s.device(), "clfast.", op, ": batch[", f, "] is on ", b.device(),
                " but the buffer is on ", s.device());
    TORCH_CHECK(s.dim() >= 1 && s.size(0) == capacity && b.dim() == s.dim() && b.size(0) == B &&
                    b.sizes().slice(1) == s.sizes().slice(1),
                "clfast.", op, ": batch[", f, "] has shape ", b.sizes(), " but the buffer holds items of shape ",
                s.sizes().slice(1), " (and every field needs the same batch size ", B, ")");
    TORCH_CHECK(b.scalar_type() == s.scalar_type(), "clfast.", op, ": batch[", f, "] is ", b.scalar_type(),
                " but the buffer stores ", s.scalar_type());
  }
  TORCH_CHECK(draws.defined() && draws.scalar_type() == at::kDouble && draws.dim() == 1 && draws.size(0) == B &&
                  draws.device() == first.device(),
              "clfast.", op, ": draws must be a float64 vector of ", B, " values on ", first.device());
  TORCH_CHECK(num_seen <= std::numeric_limits<int64_t>::max() - B, "clfast.", op, ": num_seen ", num_seen,
              " + a batch of ", B, " overflows the stream index");
  check_memory(op, {{"storage", storage, true}, {"batch", batch, false}, {"draws", draws, false}});
  if (B == 0) return;
  std::vector<at::Tensor> rows;
  for (const at::Tensor& b : batch) rows.push_back(b.contiguous());
  launch(op, first.device(),
         ReservoirAdd{std::vector<at::Tensor>(storage.begin(), storage.end()), rows, draws.contiguous(), num_seen,
                      capacity, B});
  bump_versions(storage);
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) { m.impl("reservoir_add_", &reservoir_add_); }

}  // namespace clfast
