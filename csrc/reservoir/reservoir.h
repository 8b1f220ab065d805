// Reservoir op family: the params struct the front (reservoir.cpp) fills and the launchers read.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

namespace clfast {

// storage[f] [capacity, ...] contiguous; batch[f] [B, ...] contiguous, B > 0; draws [B] float64 contiguous;
// num_seen + B does not overflow.
struct ReservoirAdd {
  std::vector<at::Tensor> storage, batch;
  at::Tensor draws;
  int64_t num_seen, capacity, batch_size;
};

}  // namespace clfast
