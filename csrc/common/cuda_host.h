// The CUDA-only host lines of the launchers, behind one switch. Under nvcc: the device guard, the current
// stream, and CLFAST_LAUNCH = <<<>>> plus the launch check. In the emulated build (CLFAST_CUEMU: the same
// launcher sources compiled by the host compiler with tests/cuemu/cuemu.h, for the test suite) the guard and
// stream are placeholders and CLFAST_LAUNCH runs the kernel on the emulator.
//
// CLFAST_LAUNCH(kernel, grid, block, shared_bytes, stream, args...): a kernel with template arguments goes in
// parentheses, with all of them given: CLFAST_LAUNCH((fold_kernel<float>), ...).
#pragma once
#include <c10/core/Device.h>

#if defined(CLFAST_CUEMU)

namespace clfast::cuda {
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
using Stream = int;
inline Stream current_stream() { return 0; }
}  // namespace clfast::cuda

#define CLFAST_LAUNCH(kernel, grid, block, shared_bytes, stream, ...) \
  ((void)(stream), ::cuemu::launch<kernel>(grid, block, shared_bytes, __VA_ARGS__))

#else

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace clfast::cuda {
using DeviceGuard = c10::cuda::CUDAGuard;
using Stream = cudaStream_t;
inline Stream current_stream() { return c10::cuda::getCurrentCUDAStream(); }
}  // namespace clfast::cuda

#define CLFAST_LAUNCH(kernel, grid, block, shared_bytes, stream, ...)  \
  do {                                                                \
    kernel<<<grid, block, shared_bytes, stream>>>(__VA_ARGS__);       \
    C10_CUDA_KERNEL_LAUNCH_CHECK();                                   \
  } while (0)

#endif
