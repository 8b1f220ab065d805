// Reservoir device code: one thread per item computes its slot; then one block per item checks that no later
// item of the batch drew the same slot and copies its rows of every field. Includes nothing from torch.
#pragma once
#include <cstdint>

#include "../math/reservoir.h"

namespace clfast::cuda {

constexpr int kMaxFields = 8;

struct Fields {
  char* dst[kMaxFields];
  const char* src[kMaxFields];
  int64_t row_bytes[kMaxFields];
  int count;
};

__global__ void reservoir_slots(const double* draws, int64_t B, int64_t num_seen, int64_t capacity, int64_t* slot) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < B) slot[j] = reservoir_slot(num_seen + j, capacity, draws[j]);
}

__global__ void reservoir_copy(Fields fields, const int64_t* slot, int64_t B) {
  const int64_t j = blockIdx.x, s = slot[j];
  if (s < 0) return;  // the whole block leaves: no thread waits at the barrier below
  bool later_wins = false;
  for (int64_t later = j + 1 + threadIdx.x; later < B; later += blockDim.x) later_wins |= slot[later] == s;
  if (__syncthreads_or(later_wins)) return;
  for (int f = 0; f < fields.count; ++f) {
    const int64_t n = fields.row_bytes[f];
    char* dst = fields.dst[f] + s * n;
    const char* src = fields.src[f] + j * n;
    for (int64_t b = threadIdx.x; b < n; b += blockDim.x) dst[b] = src[b];
  }
}

}  // namespace clfast::cuda
