// Reservoir launcher on CUDA. The draws come from a device generator, so adding a batch never synchronises with
// the host.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/launch.h"
#include "../common/multi_tensor.cuh"
#include "kernels.cuh"
#include "reservoir.h"

namespace clfast::cuda {
namespace {

void launch_reservoir_add(const ReservoirAdd& a) {
  TORCH_CHECK(static_cast<int>(a.storage.size()) <= kMaxFields, "clfast.reservoir_add_: at most ", kMaxFields,
              " fields on CUDA, got ", a.storage.size());
  const int64_t B = a.batch_size;
  const c10::cuda::CUDAGuard guard(a.storage[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor slot = a.draws.new_empty({B}, a.draws.options().dtype(at::kLong));
  Fields fields{};
  fields.count = static_cast<int>(a.storage.size());
  for (size_t f = 0; f < a.storage.size(); ++f) {
    fields.dst[f] = static_cast<char*>(a.storage[f].data_ptr());
    fields.src[f] = static_cast<const char*>(a.batch[f].data_ptr());
    fields.row_bytes[f] = a.storage[f].numel() / a.capacity * a.storage[f].element_size();
  }
  reservoir_slots<<<static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      a.draws.data_ptr<double>(), B, a.num_seen, a.capacity, slot.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  reservoir_copy<<<static_cast<unsigned>(B), kThreads, 0, stream>>>(fields, slot.data_ptr<int64_t>(), B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(ReservoirAdd, cuda, &launch_reservoir_add);

}  // namespace clfast::cuda
