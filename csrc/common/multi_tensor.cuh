// Multi-tensor apply for CUDA: the chunks of every tensor in N parallel lists are processed by one launch
// (more only when a launch's argument block is full), like PyTorch's MultiTensorApply. Tensor addresses travel
// as a kernel argument, so a launch needs no host-to-device copy and no sync.
//
// This header is the device side and includes nothing from torch; multi_tensor_cuda.h launches it.
#pragma once
#include <cstdint>

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
