// Fisher launchers on CUDA: the kernels of kernels.cuh around cuBLAS GEMMs through ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>

#include "../common/cuda_host.h"
#include "../common/launch.h"
#include "fisher.h"
#include "kernels.cuh"

namespace clfast::cuda {
namespace {

unsigned blocks_for(int64_t work) {
  return static_cast<unsigned>(std::clamp<int64_t>((work + kFisherThreads - 1) / kFisherThreads, 1, 4096));
}

void launch_fisher_diag(const FisherDiag& p) {
  const DeviceGuard guard(p.out.device());
  const Stream stream = current_stream();
  const int64_t B = p.x.size(0), I = p.x.size(1), K = p.gy.size(1), O = p.gy.size(2);
  at::Tensor g2 = at::empty({B, O}, p.out.options()), x2 = at::empty({B, I}, p.out.options());
  AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "fisher_diag_", [&] {
    CLFAST_LAUNCH(fisher_squares_kernel<scalar_t>, blocks_for(B * (O + I)), kFisherThreads, 0, stream,
                  p.gy.data_ptr<scalar_t>(), p.gy.stride(0), p.gy.stride(1), p.gy.stride(2), p.x.data_ptr<scalar_t>(),
                  p.x.stride(0), p.x.stride(1), B, K, O, I, g2.data_ptr<scalar_t>(), x2.data_ptr<scalar_t>());
  });
  {
    const at::AutoDispatchBelowADInplaceOrView below;  // the front bumps out once
    at::Tensor weight = p.out.narrow(0, 0, O * I).view({O, I});
    weight.addmm_(g2.t(), x2);
  }
  if (p.bias) {
    AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "fisher_diag_", [&] {
      CLFAST_LAUNCH(fisher_column_sums_kernel<scalar_t>, blocks_for(O), kFisherThreads, 0, stream,
                    g2.data_ptr<scalar_t>(), B, O, O, int64_t{1}, p.out.data_ptr<scalar_t>() + O * I, true);
    });
  }
}

void launch_fisher_factor(const FisherFactor& p) {
  const DeviceGuard guard(p.out.device());
  const Stream stream = current_stream();
  const int64_t rows = p.x.size(0), n = p.x.size(1), N = p.out.size(0);
  const at::Tensor product = at::mm(p.x.t(), p.x);  // [n, n]; the kernel reads its upper triangle
  at::Tensor colsum = at::empty({p.bias ? n : 0}, p.out.options());
  AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "fisher_factor_", [&] {
    if (p.bias)
      CLFAST_LAUNCH(fisher_column_sums_kernel<scalar_t>, blocks_for(n), kFisherThreads, 0, stream,
                    p.x.data_ptr<scalar_t>(), rows, n, p.x.stride(0), p.x.stride(1), colsum.data_ptr<scalar_t>(),
                    false);
    CLFAST_LAUNCH(fisher_factor_kernel<scalar_t>, blocks_for(N * N), kFisherThreads, 0, stream,
                  p.out.data_ptr<scalar_t>(), product.data_ptr<scalar_t>(), colsum.data_ptr<scalar_t>(), n, rows, N,
                  static_cast<scalar_t>(p.scale));
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(FisherDiag, cuda, &launch_fisher_diag);
CLFAST_REGISTER_LAUNCHER(FisherFactor, cuda, &launch_fisher_factor);

}  // namespace clfast::cuda
