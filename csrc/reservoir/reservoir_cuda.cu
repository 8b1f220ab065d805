// Reservoir launcher on CUDA. The draws come from a device generator, so adding a batch never synchronises with
// the host.

#include <algorithm>

#include "../common/cuda_host.h"
#include "../common/launch.h"
#include "../common/multi_tensor.cuh"
#include "kernels.cuh"
#include "reservoir.h"

namespace clfast::cuda {
namespace {

void launch_reservoir_add(const ReservoirAdd& a) {
  const int64_t B = a.batch_size;
  const DeviceGuard guard(a.storage[0].device());
  const Stream stream = current_stream();
  at::Tensor slot = a.draws.new_empty({B}, a.draws.options().dtype(at::kLong));
  CLFAST_LAUNCH(reservoir_slots, static_cast<unsigned>((B + kThreads - 1) / kThreads), kThreads, 0, stream,
                a.draws.data_ptr<double>(), B, a.num_seen, a.capacity, slot.data_ptr<int64_t>());
  // One copy launch per kMaxFields fields (the field table travels as a kernel argument).
  for (size_t first = 0; first < a.storage.size(); first += kMaxFields) {
    Fields fields{};
    fields.count = static_cast<int>(std::min<size_t>(kMaxFields, a.storage.size() - first));
    for (int f = 0; f < fields.count; ++f) {
      const at::Tensor &dst = a.storage[first + f], &src = a.batch[first + f];
      fields.dst[f] = static_cast<char*>(dst.data_ptr());
      fields.src[f] = static_cast<const char*>(src.data_ptr());
      fields.row_bytes[f] = dst.numel() / a.capacity * dst.element_size();
    }
    CLFAST_LAUNCH(reservoir_copy, static_cast<unsigned>(B), kThreads, 0, stream, fields, slot.data_ptr<int64_t>(), B);
  }
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(ReservoirAdd, cuda, &launch_reservoir_add);

}  // namespace clfast::cuda
