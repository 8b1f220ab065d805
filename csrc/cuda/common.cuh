// Multi-tensor apply for CUDA: the chunks of every tensor in N parallel lists are processed by one launch
// (more only when a launch's argument block is full), like PyTorch's MultiTensorApply. Tensor addresses travel
// as a kernel argument, so a launch needs no host-to-device copy and no sync.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <vector>

namespace clfast::cuda {

constexpr int kThreads = 256;
constexpr int64_t kChunk = 16 * 1024;  // elements per block: 64 per thread, enough blocks to fill an H100
constexpr int kMaxBlocks = 320;
// Tensors per launch for N lists, keeping the argument block under the 4 KB kernel-parameter limit.
constexpr int max_tensors(int n) { return n == 1 ? 110 : n == 2 ? 64 : n == 3 ? 48 : n == 4 ? 36 : 30; }

template <int N>
struct TensorListMeta {
  void* ptr[N][max_tensors(N)];
  int64_t numel[max_tensors(N)];
  unsigned char block_tensor[kMaxBlocks];  // which tensor slot each block works on
  int32_t block_chunk[kMaxBlocks];         // which chunk of that tensor
  int64_t block_base;                      // index of this launch's first block among all launches
};

static_assert(max_tensors(1) <= 255, "block_tensor is an unsigned char");
static_assert(sizeof(TensorListMeta<1>) < 4000 && sizeof(TensorListMeta<2>) < 4000 &&
                  sizeof(TensorListMeta<3>) < 4000 && sizeof(TensorListMeta<4>) < 4000 &&
                  sizeof(TensorListMeta<5>) < 4000,
              "kernel arguments must stay under 4 KB");

template <int N, typename Functor, typename... Args>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorListMeta<N> meta, Functor f, Args... args) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  const int64_t end = min(meta.numel[t], begin + kChunk);
  f(meta, t, begin, end, meta.block_base + blockIdx.x, args...);
}

// Total number of blocks multi_tensor_apply will launch for tensors of these sizes (for per-block outputs).
inline int64_t total_blocks(const std::vector<at::Tensor>& ref) {
  int64_t n = 0;
  for (const at::Tensor& t : ref) n += (t.numel() + kChunk - 1) / kChunk;
  return n;
}

// lists[d][i]: list d, tensor i; all contiguous, of equal numel per i, on the current device.
template <int N, typename Functor, typename... Args>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists, Functor f, Args... args) {
  TORCH_CHECK(lists.size() == N, "multi_tensor_apply: expected ", N, " lists");
  const c10::cuda::CUDAGuard guard(lists[0][0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  TensorListMeta<N> meta;
  meta.block_base = 0;
  int slots = 0, blocks = 0;
  auto launch = [&] {
    multi_tensor_kernel<N><<<blocks, kThreads, 0, stream>>>(meta, f, args...);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    meta.block_base += blocks;
    blocks = 0;
  };
  for (size_t i = 0; i < lists[0].size(); ++i) {
    const int64_t n = lists[0][i].numel();
    if (n == 0) continue;
    for (int d = 0; d < N; ++d) meta.ptr[d][slots] = lists[d][i].data_ptr();
    meta.numel[slots] = n;
    ++slots;
    const int64_t chunks = (n + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<unsigned char>(slots - 1);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c == chunks - 1;
      if (blocks == kMaxBlocks || (last_chunk && slots == max_tensors(N))) {
        launch();
        if (last_chunk) {
          slots = 0;
        } else {  // the tensor continues in the next launch, in slot 0
          for (int d = 0; d < N; ++d) meta.ptr[d][0] = meta.ptr[d][slots - 1];
          meta.numel[0] = meta.numel[slots - 1];
          slots = 1;
        }
      }
    }
  }
  if (blocks > 0) launch();
}

// Sum of a double over the block, valid in thread 0. Every thread of the block must call it.
__device__ inline double block_sum(double v) {
  __shared__ double warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // a previous call's readers are done with warp_sums
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.0;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace clfast::cuda
