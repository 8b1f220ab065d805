// Host side of the CUDA multi-tensor apply (see multi_tensor.cuh): packs the tensor addresses of N lists into
// kernel arguments and launches on the current stream.
#pragma once
#include <ATen/core/Tensor.h>

#include <vector>

#include "cuda_host.h"
#include "multi_tensor.cuh"

namespace clfast::cuda {

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
  const DeviceGuard guard(lists[0][0].device());
  const Stream stream = current_stream();
  TensorListMeta<N> meta;
  meta.block_base = 0;
  int slots = 0, blocks = 0;
  auto launch = [&] {
    CLFAST_LAUNCH((multi_tensor_kernel<N, Functor, Args...>), blocks, kThreads, 0, stream, meta, f, args...);
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

}  // namespace clfast::cuda
