// CBP launchers on CUDA. The indices stay on the device: no host sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../common/launch.h"
#include "cbp.h"
#include "kernels.cuh"

namespace clfast::cuda {
namespace {

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

void launch_cbp_update(const CbpUpdate& args) {
  const double decay = args.decay;
  const CbpUtility utility_type = args.utility;
  const c10::cuda::CUDAGuard guard(args.layers[0].w_cur.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (const CbpUpdateLayer& L : args.layers) {
    const at::Tensor &h = L.features, &wn = L.w_next;
    const int64_t n = L.units, S = L.spatial, G = L.group, rows = wn.size(0);
    const at::Tensor scratch = h.new_empty({kParts * (n * G + 2 * n * S)}, h.options().dtype(at::kDouble));
    double* w_partial = scratch.data_ptr<double>();
    double* h_partial = w_partial + kParts * n * G;
    double* a_partial = h_partial + kParts * n * S;
    const double count = static_cast<double>(L.batch * S);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbp_update_", [&] {
      using T = scalar_t;
      const T eta = static_cast<T>(decay);
      const at::Tensor m_hat = h.new_empty({n});
      column_partials<T><<<dim3(blocks_for(n * G), kParts), kThreads, 0, stream>>>(
          wn.data_ptr<T>(), rows, n * G, kAbs, nullptr, G, w_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      column_partials<T><<<dim3(blocks_for(n * S), kParts), kThreads, 0, stream>>>(
          h.data_ptr<T>(), L.batch, n * S, kValue, nullptr, S, h_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      update_mean<T><<<blocks_for(n), kThreads, 0, stream>>>(L.mean.data_ptr<T>(), L.age.data_ptr<T>(),
                                                             m_hat.data_ptr<T>(), h_partial, n, S, count, eta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int op = utility_type == kContribution ? kAbs : kAbsCentered;
      column_partials<T><<<dim3(blocks_for(n * S), kParts), kThreads, 0, stream>>>(
          h.data_ptr<T>(), L.batch, n * S, op, m_hat.data_ptr<T>(), S, a_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor& wc = L.w_cur;
      update_utility<T><<<blocks_for(n), kThreads, 0, stream>>>(
          L.utility.data_ptr<T>(), a_partial, w_partial,
          utility_type == kAdaptableContribution ? wc.data_ptr<T>() : nullptr, n, S, G, wc.numel() / n, count, eta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
}

void launch_cbp_replace(const CbpReplace& R) {
  const at::Tensor &w_cur = R.w_cur, &w_next = R.w_next, &utility = R.utility, &mean = R.mean, &age = R.age;
  const at::Tensor& index = R.index;
  const double decay = R.decay;
  const int64_t maturity_threshold = R.maturity_threshold;
  const int64_t k = R.new_weights.size(0);
  const c10::cuda::CUDAGuard guard(w_cur.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor& nw = R.new_weights;
  at::Tensor taken = utility.new_zeros({R.units}, utility.options().dtype(at::kByte));
  const int64_t rows = w_next.size(0);
  AT_DISPATCH_FLOATING_TYPES(w_cur.scalar_type(), "cbp_replace_", [&] {
    using T = scalar_t;
    const T eta = static_cast<T>(decay);
    select_units<T><<<1, kThreads, 0, stream>>>(utility.data_ptr<T>(), age.data_ptr<T>(), R.units, k, eta,
                                                 static_cast<double>(maturity_threshold),
                                                 taken.data_ptr<unsigned char>(), index.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reinit_outgoing<T><<<blocks_for(rows), kThreads, 0, stream>>>(
        w_next.data_ptr<T>(), R.b_next.defined() ? R.b_next.data_ptr<T>() : nullptr, index.data_ptr<int64_t>(), k,
        mean.data_ptr<T>(), age.data_ptr<T>(), rows, w_next.numel() / rows, R.group, eta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reinit_incoming<T><<<static_cast<unsigned>(k), kThreads, 0, stream>>>(
        w_cur.data_ptr<T>(), R.b_cur.defined() ? R.b_cur.data_ptr<T>() : nullptr, index.data_ptr<int64_t>(),
        nw.data_ptr<T>(), R.fan_in, utility.data_ptr<T>(), mean.data_ptr<T>(), age.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(CbpUpdate, cuda, &launch_cbp_update);
CLFAST_REGISTER_LAUNCHER(CbpReplace, cuda, &launch_cbp_replace);

}  // namespace clfast::cuda
