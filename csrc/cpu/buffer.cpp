// Reservoir buffer on the CPU: slots for the whole batch from the draws, the last item of the batch winning a
// slot drawn twice, then one parallel copy of the winning rows of every field.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "../checks.h"

namespace clfast::cpu {
namespace {

void reservoir_add_(at::TensorList storage, at::TensorList batch, const at::Tensor& draws, int64_t num_seen) {
  const int64_t capacity = check_reservoir("reservoir_add_", c10::DeviceType::CPU, storage, batch, draws, num_seen);
  const int64_t B = batch[0].size(0);
  if (B == 0) return;
  const at::Tensor u = draws.contiguous();
  const double* up = u.data_ptr<double>();
  std::vector<int64_t> slot(B, -1), owner(capacity, -1);
  for (int64_t j = 0; j < B; ++j) {
    const int64_t m = num_seen + j;
    const int64_t s = m < capacity ? m : static_cast<int64_t>(std::floor(up[j] * static_cast<double>(m + 1)));
    if (s < capacity) owner[slot[j] = s] = j;  // later items overwrite: the last one owns the slot
  }
  std::vector<at::Tensor> src;
  for (const at::Tensor& b : batch) src.push_back(b.contiguous());
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      if (slot[j] < 0 || owner[slot[j]] != j) continue;
      for (size_t f = 0; f < storage.size(); ++f) {
        const int64_t row = storage[f].numel() / capacity * storage[f].element_size();
        std::memcpy(static_cast<char*>(storage[f].data_ptr()) + slot[j] * row,
                    static_cast<const char*>(src[f].data_ptr()) + j * row, row);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CPU, m) { m.impl("reservoir_add_", &reservoir_add_); }

}  // namespace clfast::cpu
