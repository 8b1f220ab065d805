// Reservoir buffer on CUDA: one thread per item computes its slot; then one block per item checks that no
// later item of the batch drew the same slot and copies its rows of every field. The draws come from a device
// generator, so adding a batch never synchronises with the host.
#include <torch/library.h>

#include "../checks.h"
#include "common.cuh"

namespace clfast::cuda {
namespace {

constexpr int kMaxFields = 8;

struct Fields {
  char* dst[kMaxFields];
  const char* src[kMaxFields];
  int64_t row_bytes[kMaxFields];
  int count;
};

__global__ void reservoir_slots(const double* draws, int64_t B, int64_t num_seen, int64_t capacity, int64_t* slot) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= B) return;
  const int64_t m = num_seen + j;
  const int64_t s = m < capacity ? m : static_cast<int64_t>(floor(draws[j] * static_cast<double>(m + 1)));
  slot[j] = s < capacity ? s : -1;
}

__global__ void reservoir_copy(Fields fields, const int64_t* slot, int64_t B) {
  const int64_t j = blockIdx.x, s = slot[j];
  if (s < 0) return;
  __shared__ int superseded;
  if (threadIdx.x == 0) superseded = 0;
  __syncthreads();
  for (int64_t later = j + 1 + threadIdx.x; later < B; later += blockDim.x)
    if (slot[later] == s) superseded = 1;  // benign race: every writer stores 1
  __syncthreads();
  if (superseded) return;
  for (int f = 0; f < fields.count; ++f) {
    const int64_t n = fields.row_bytes[f];
    char* dst = fields.dst[f] + s * n;
    const char* src = fields.src[f] + j * n;
    for (int64_t b = threadIdx.x; b < n; b += blockDim.x) dst[b] = src[b];
  }
}

void reservoir_add_(at::TensorList storage, at::TensorList batch, const at::Tensor& draws, int64_t num_seen) {
  const int64_t capacity = check_reservoir("reservoir_add_", c10::DeviceType::CUDA, storage, batch, draws, num_seen);
  TORCH_CHECK(static_cast<int>(storage.size()) <= kMaxFields, "clfast.reservoir_add_: at most ", kMaxFields,
              " fields, got ", storage.size());
  const int64_t B = batch[0].size(0);
  if (B == 0) return;
  const c10::cuda::CUDAGuard guard(storage[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor u = draws.contiguous();
  at::Tensor slot = u.new_empty({B}, u.options().dtype(at::kLong));
  std::vector<at::Tensor> src;  // kept alive until the copy kernel is queued (the allocator is stream-ordered)
  Fields fields{};
  fields.count = static_cast<int>(storage.size());
  for (size_t f = 0; f < storage.size(); ++f) {
    src.push_back(batch[f].contiguous());
    fields.dst[f] = static_cast<char*>(storage[f].data_ptr());
    fields.src[f] = static_cast<const char*>(src[f].data_ptr());
    fields.row_bytes[f] = storage[f].numel() / capacity * storage[f].element_size();
  }
  reservoir_slots<<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      u.data_ptr<double>(), B, num_seen, capacity, slot.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reservoir_copy<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(fields, slot.data_ptr<int64_t>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CUDA, m) { m.impl("reservoir_add_", &reservoir_add_); }

}  // namespace clfast::cuda
