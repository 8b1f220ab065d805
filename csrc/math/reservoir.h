// Algorithm R's slot for one item, shared by the CPU and CUDA kernels (the reference writes the same rule).
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace clfast {

// Item with global index m: slot m while the buffer fills, else floor(draw * (m + 1)) when that is a slot.
// -1: not stored (also for a draw outside [0, 1) or NaN, which select no slot).
CLFAST_HD inline int64_t reservoir_slot(int64_t m, int64_t capacity, double draw) {
  if (m < capacity) return m;
  const double s = floor(draw * static_cast<double>(m + 1));
  return s >= 0.0 && s < static_cast<double>(capacity) ? static_cast<int64_t>(s) : -1;
}

}  // namespace clfast
