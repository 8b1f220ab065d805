// Kernels that exercise the emulator itself (tests/test_cuemu.py), built into the emulated library only:
// torch.ops.clfast_cuemu.emu_selftest(case, n) runs one case and returns what its kernel wrote.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "common/cuda_host.h"
#include "common/multi_tensor.cuh"

namespace clfast::cuda {
namespace {

// out[b * blockDim + t] = the block's barrier results: __syncthreads_or/and/count over (t % 3 == 0).
__global__ void votes(int64_t* out) {
  const int t = threadIdx.x;
  const int p = t % 3 == 0;
  const int o = __syncthreads_or(p), a = __syncthreads_and(p), c = __syncthreads_count(p);
  out[(blockIdx.x * blockDim.x + t) * 3 + 0] = o;
  out[(blockIdx.x * blockDim.x + t) * 3 + 1] = a;
  out[(blockIdx.x * blockDim.x + t) * 3 + 2] = c;
}

// Shared memory and a barrier: each thread reads its neighbour's value, written before the barrier.
__global__ void neighbours(int64_t* out) {
  __shared__ int64_t s[256];
  const int t = threadIdx.x;
  s[t] = blockIdx.x * 1000 + t;
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// neighbours without its barrier: a race, which TSan must report (tests/test_cuemu.py, sanitizer runs only).
__global__ void racy_neighbours(int64_t* out) {
  __shared__ int64_t s[256];
  const int t = threadIdx.x;
  s[t] = blockIdx.x * 1000 + t;
  out[blockIdx.x * blockDim.x + t] = s[(t + 1) % blockDim.x];
}

// A shared array indexed one past its end, which UBSan must report (sanitizer runs only).
__global__ void shared_out_of_bounds(int64_t* out, int n) {
  __shared__ int64_t s[32];
  s[threadIdx.x % 32] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[threadIdx.x % 32 + n];
}

// Warp exchange: for each lane, shfl_down(1), shfl_up(1), shfl_xor(3), shfl(lane 5), ballot(odd), any, all.
__global__ void warp_ops(int64_t* out) {
  const int lane = threadIdx.x % 32;
  const unsigned full = 0xffffffffu;
  int64_t* o = out + threadIdx.x * 7;
  o[0] = __shfl_down_sync(full, lane * 10, 1);
  o[1] = __shfl_up_sync(full, lane * 10, 1);
  o[2] = __shfl_xor_sync(full, lane * 10, 3);
  o[3] = __shfl_sync(full, lane * 10, 5);
  o[4] = __ballot_sync(full, lane % 2);
  o[5] = __any_sync(full, lane == 7);
  o[6] = __all_sync(full, lane < 31);
  __syncwarp();
}

// The block order: each block takes the next number.
__global__ void order(int64_t* counter, int64_t* out) {
  if (threadIdx.x == 0) out[blockIdx.x] = atomicAdd(counter, int64_t(1));
}

// The thread schedule: each thread takes the next number when it first runs.
__global__ void thread_order(int64_t* counter, int64_t* out) { out[threadIdx.x] = atomicAdd(counter, int64_t(1)); }

// csrc's block_sum twice in a row, as its contract allows: out[2 b], out[2 b + 1] (256 threads per block).
__global__ void block_sum_twice(double* out) {
  const double t = threadIdx.x;
  const double first = block_sum(t + 1), second = block_sum(2 * t + blockIdx.x);
  if (threadIdx.x == 0) {
    out[2 * blockIdx.x] = first;
    out[2 * blockIdx.x + 1] = second;
  }
}

// Every thread of every block adds 1 to one counter.
__global__ void count_all(int64_t* counter) { atomicAdd(counter, int64_t(1)); }

// Threads below `split` wait at one barrier, the others at another: an error.
__global__ void divergent_barrier(int split) {
  if (static_cast<int>(threadIdx.x) < split) {
    __syncthreads();
  } else {
    __syncthreads();
  }
}

// Threads below `split` leave; the rest meet at a barrier: fine, exited threads do not hold it.
__global__ void barrier_after_exit(int split, int64_t* out) {
  if (static_cast<int>(threadIdx.x) < split) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lanes below `split` leave, the rest shuffle with a full mask: can never complete.
__global__ void shuffle_after_exit(int split, int64_t* out) {
  if (static_cast<int>(threadIdx.x) < split) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int64_t>(threadIdx.x), 1);
}

// Lanes 16.. call a shuffle whose mask leaves them out.
__global__ void mask_without_caller(int64_t* out) {
  out[threadIdx.x] = __shfl_sync(0x0000ffffu, static_cast<int64_t>(threadIdx.x), 0);
}

// Lane 15 reads lane 16, which the mask leaves out.
__global__ void read_outside_mask(int64_t* out) {
  if (threadIdx.x < 16) out[threadIdx.x] = __shfl_down_sync(0x0000ffffu, static_cast<int64_t>(threadIdx.x), 1);
}

struct Big {
  char bytes[5000];
};
__global__ void big_params(Big b, int64_t* out) { out[0] = b.bytes[0]; }

at::Tensor emu_selftest(c10::string_view which, int64_t n) {
  const std::string c(which);
  const auto longs = at::TensorOptions().dtype(at::kLong);
  if (c == "votes") {
    at::Tensor out = at::full({2 * n * 3}, -1, longs);
    CLFAST_LAUNCH(votes, 2, static_cast<unsigned>(n), 0, 0, out.data_ptr<int64_t>());
    return out.view({2, n, 3});
  }
  if (c == "neighbours") {
    at::Tensor out = at::full({3 * n}, -1, longs);
    CLFAST_LAUNCH(neighbours, 3, static_cast<unsigned>(n), 0, 0, out.data_ptr<int64_t>());
    return out.view({3, n});
  }
  if (c == "racy_neighbours") {
    at::Tensor out = at::full({2 * n}, -1, longs);
    CLFAST_LAUNCH(racy_neighbours, 2, static_cast<unsigned>(n), 0, 0, out.data_ptr<int64_t>());
    return out.view({2, n});
  }
  if (c == "shared_out_of_bounds") {
    at::Tensor out = at::full({32}, -1, longs);
    CLFAST_LAUNCH(shared_out_of_bounds, 1, 32, 0, 0, out.data_ptr<int64_t>(), static_cast<int>(n));
    return out;
  }
  if (c == "warp_ops") {
    at::Tensor out = at::full({n * 7}, -1, longs);
    CLFAST_LAUNCH(warp_ops, 1, static_cast<unsigned>(n), 0, 0, out.data_ptr<int64_t>());
    return out.view({n, 7});
  }
  if (c == "order") {
    at::Tensor counter = at::zeros({1}, longs), out = at::full({n}, -1, longs);
    CLFAST_LAUNCH(order, static_cast<unsigned>(n), 32, 0, 0, counter.data_ptr<int64_t>(), out.data_ptr<int64_t>());
    return out;
  }
  if (c == "thread_order") {
    at::Tensor counter = at::zeros({1}, longs), out = at::full({n}, -1, longs);
    CLFAST_LAUNCH(thread_order, 1, static_cast<unsigned>(n), 0, 0, counter.data_ptr<int64_t>(), out.data_ptr<int64_t>());
    return out;
  }
  if (c == "block_sum_twice") {
    at::Tensor out = at::full({2 * n}, -1.0, at::TensorOptions().dtype(at::kDouble));
    CLFAST_LAUNCH(block_sum_twice, static_cast<unsigned>(n), kThreads, 0, 0, out.data_ptr<double>());
    return out.view({n, 2});
  }
  if (c == "count_all") {
    at::Tensor counter = at::zeros({1}, longs);
    CLFAST_LAUNCH(count_all, static_cast<unsigned>(n), 128, 0, 0, counter.data_ptr<int64_t>());
    return counter;
  }
  if (c == "divergent_barrier") {
    CLFAST_LAUNCH(divergent_barrier, 1, 64, 0, 0, static_cast<int>(n));
    return at::Tensor();
  }
  if (c == "barrier_after_exit") {
    at::Tensor out = at::zeros({64}, longs);
    CLFAST_LAUNCH(barrier_after_exit, 1, 64, 0, 0, static_cast<int>(n), out.data_ptr<int64_t>());
    return out;
  }
  if (c == "shuffle_after_exit") {
    at::Tensor out = at::zeros({32}, longs);
    CLFAST_LAUNCH(shuffle_after_exit, 1, 32, 0, 0, static_cast<int>(n), out.data_ptr<int64_t>());
    return out;
  }
  if (c == "mask_without_caller") {
    at::Tensor out = at::zeros({32}, longs);
    CLFAST_LAUNCH(mask_without_caller, 1, 32, 0, 0, out.data_ptr<int64_t>());
    return out;
  }
  if (c == "read_outside_mask") {
    at::Tensor out = at::zeros({32}, longs);
    CLFAST_LAUNCH(read_outside_mask, 1, 32, 0, 0, out.data_ptr<int64_t>());
    return out;
  }
  if (c == "block_too_large") {
    at::Tensor out = at::zeros({1}, longs);
    CLFAST_LAUNCH(count_all, 1, static_cast<unsigned>(n), 0, 0, out.data_ptr<int64_t>());
    return out;
  }
  if (c == "grid_y_too_large") {
    at::Tensor out = at::zeros({1}, longs);
    CLFAST_LAUNCH(count_all, dim3(1, static_cast<unsigned>(n)), 32, 0, 0, out.data_ptr<int64_t>());
    return out;
  }
  if (c == "params_too_large") {
    at::Tensor out = at::zeros({1}, longs);
    CLFAST_LAUNCH(big_params, 1, 1, 0, 0, Big{}, out.data_ptr<int64_t>());
    return out;
  }
  TORCH_CHECK(false, "emu_selftest: unknown case ", c);
}

}  // namespace
}  // namespace clfast::cuda

TORCH_LIBRARY_FRAGMENT(clfast, m) { m.def("emu_selftest(str case, int n) -> Tensor", &clfast::cuda::emu_selftest); }
