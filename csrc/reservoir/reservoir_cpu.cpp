// Reservoir launcher on the CPU: slots for the whole batch from the draws, the last item of the batch winning a
// slot drawn twice, then one parallel copy of the winning rows of every field.
#include <ATen/Parallel.h>

#include <cstring>
#include <vector>

#include "../common/launch.h"
#include "../math/reservoir.h"
#include "reservoir.h"

namespace clfast::cpu {
namespace {

void launch_reservoir_add(const ReservoirAdd& a) {
  const int64_t B = a.batch_size, capacity = a.capacity;
  const double* up = a.draws.data_ptr<double>();
  std::vector<int64_t> slot(B, -1), owner(capacity, -1);
  for (int64_t j = 0; j < B; ++j) {
    slot[j] = reservoir_slot(a.num_seen + j, capacity, up[j]);
    if (slot[j] >= 0) owner[slot[j]] = j;  // later items overwrite: the last one owns the slot
  }
  at::parallel_for(0, B, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) {
      if (slot[j] < 0 || owner[slot[j]] != j) continue;
      for (size_t f = 0; f < a.storage.size(); ++f) {
        const int64_t row = a.storage[f].numel() / capacity * a.storage[f].element_size();
        std::memcpy(static_cast<char*>(a.storage[f].data_ptr()) + slot[j] * row,
                    static_cast<const char*>(a.batch[f].data_ptr()) + j * row, row);
      }
    }
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(ReservoirAdd, cpu, &launch_reservoir_add);

}  // namespace clfast::cpu
