// Launcher tables. An op's front validates its arguments, fills a params struct and calls launch(): the CPU
// launchers register themselves from <family>_cpu.cpp, the CUDA ones from <family>_cuda.cu when CUDA is built,
// so the front needs no build switch and a device without kernels is a clear error.
#pragma once
#include <c10/core/Device.h>
#include <c10/util/Exception.h>

namespace clfast {

template <typename Params>
struct Launchers {
  void (*cpu)(const Params&) = nullptr;
  void (*cuda)(const Params&) = nullptr;
};

template <typename Params>
Launchers<Params>& launchers() {
  static Launchers<Params> table;
  return table;
}

template <typename Params>
void launch(const char* op, const c10::Device& device, const Params& params) {
  const Launchers<Params>& table = launchers<Params>();
#if defined(CLFAST_CUEMU)  // the emulated build (csrc/common/cuda_host.h): CPU tensors stand for the CUDA device
  void (*fn)(const Params&) = device.is_cpu() ? table.cuda : nullptr;
#else
  void (*fn)(const Params&) = device.is_cpu() ? table.cpu : device.is_cuda() ? table.cuda : nullptr;
#endif
  TORCH_CHECK(fn != nullptr, "clfast.", op, ": no kernel for tensors on ", device,
              device.is_cuda() ? " (this build of clfast has no CUDA kernels)" : "");
  fn(params);
}

#define CLFAST_STRINGIFY_(x) #x
#define CLFAST_STRINGIFY(x) CLFAST_STRINGIFY_(x)
// The op namespace as a string: "clfast", or the emulated build's, which renames the namespace.
#define CLFAST_NAMESPACE CLFAST_STRINGIFY(clfast)

#define CLFAST_CONCAT_(a, b) a##b
#define CLFAST_CONCAT(a, b) CLFAST_CONCAT_(a, b)
// CLFAST_REGISTER_LAUNCHER(SiAccumulate, cpu, &launch_si_accumulate): at library load time.
#define CLFAST_REGISTER_LAUNCHER(Params, backend, fn)                                              \
  static const bool CLFAST_CONCAT(clfast_launcher_, __COUNTER__) = [] {                            \
    ::clfast::launchers<Params>().backend = fn;                                                    \
    return true;                                                                                   \
  }()

}  // namespace clfast
