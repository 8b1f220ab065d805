// DAN launchers on CUDA: the passes of csrc/dan/dan.h, the column passes and folds as the kernels of
// kernels.cuh, the GEMMs as cuBLAS calls through ATen.
#include <ATen/Dispatch.h>

#include <algorithm>

#include "../common/cuda_host.h"
#include "../common/launch.h"
#include "dan.h"
#include "kernels.cuh"

namespace clfast::cuda {
namespace {

// x: tiles of kCols columns; y: groups (neurons), at most 65535 per launch, the kernels stride over the rest.
dim3 column_grid(int64_t Cg, int64_t groups) {
  return dim3(static_cast<unsigned>((Cg + kCols - 1) / kCols),
              static_cast<unsigned>(std::min<int64_t>(groups, 65535)));
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// One batched GEMM for all neurons; one plain GEMM for a batch of one, the layer-wide first Linear (cuBLASLt can
// fuse its bias there).
void launch_dan_gemm(const DanGemm& p) {
  at::Tensor out = p.out;
  if (out.size(0) == 1) {
    dan_detail::gemm_per_neuron(out, p.bias, p.a, p.b);
  } else if (p.bias.defined()) {
    at::baddbmm_out(out, p.bias.unsqueeze(1), p.a, p.b);
  } else {
    at::bmm_out(out, p.a, p.b);
  }
}

void launch_dan_col_norm(const DanColNorm& p) {
  const DeviceGuard guard(p.h.device());
  AT_DISPATCH_FLOATING_TYPES(p.h.scalar_type(), "dan_col_norm", [&] {
    CLFAST_LAUNCH(col_norm_kernel<scalar_t>, column_grid(p.Cg, p.groups), dim3(kCols, kRows), 0, current_stream(),
                  p.groups, p.h.data_ptr<scalar_t>(), p.hv, p.u.data_ptr<scalar_t>(), p.uv, p.B, p.Cg, p.normalize,
                  p.eps, p.normalize ? p.mean.data_ptr<scalar_t>() : nullptr,
                  p.normalize ? p.var.data_ptr<scalar_t>() : nullptr);
  });
}

void launch_dan_norm_act_backward(const DanNormActBackward& p) {
  const DeviceGuard guard(p.du.device());
  const Stream stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES(p.du.scalar_type(), "dan_norm_act_backward", [&] {
    with_act(p.act, [&](auto A) {
      CLFAST_LAUNCH((norm_act_backward_kernel<decltype(A)::value, scalar_t>), column_grid(p.Cg, p.groups),
                    dim3(kCols, kRows), 0, stream, p.groups, p.du.data_ptr<scalar_t>(),
                    p.normalize ? p.u.data_ptr<scalar_t>() : nullptr, p.duv,
                    p.normalize ? p.var.data_ptr<scalar_t>() : nullptr, p.eps, p.normalize,
                    p.act != kIdentity ? p.s_act.data_ptr<scalar_t>() : nullptr, p.zv, p.dz.data_ptr<scalar_t>(),
                    p.dzv, p.B, p.Cg, p.colsum.data_ptr<scalar_t>());
    });
  });
}

void launch_dan_fold(const DanFold& p) {
  const DeviceGuard guard(p.W.device());
  const int64_t N = p.W.size(0), R = p.W.size(1), Cc = p.W.size(2), rows = N * R;
  constexpr int kWarps = 8;
  AT_DISPATCH_FLOATING_TYPES(p.W.scalar_type(), "dan_fold", [&] {
    CLFAST_LAUNCH(fold_kernel<scalar_t>, static_cast<unsigned>((rows + kWarps - 1) / kWarps), 32 * kWarps, 0,
                  current_stream(), p.W.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(p.bias), p.g.data_ptr<scalar_t>(),
                  p.b.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(p.rm), ptr_or_null<scalar_t>(p.rv), p.eps, rows, R,
                  Cc, p.Weff.data_ptr<scalar_t>(), p.beff.data_ptr<scalar_t>());
  });
}

void launch_dan_unfold_backward(const DanUnfoldBackward& p) {
  const DeviceGuard guard(p.W.device());
  const int64_t N = p.W.size(0), R = p.W.size(1), Cc = p.W.size(2);
  constexpr int kThreadsPerBlock = 256;
  AT_DISPATCH_FLOATING_TYPES(p.W.scalar_type(), "dan_unfold_backward", [&] {
    CLFAST_LAUNCH(unfold_backward_kernel<scalar_t>,
                  static_cast<unsigned>((N * Cc + kThreadsPerBlock - 1) / kThreadsPerBlock), kThreadsPerBlock, 0,
                  current_stream(), p.dWeff.data_ptr<scalar_t>(), p.dbeff.data_ptr<scalar_t>(),
                  p.W.data_ptr<scalar_t>(), p.g.data_ptr<scalar_t>(), p.b.data_ptr<scalar_t>(),
                  ptr_or_null<scalar_t>(p.rm), ptr_or_null<scalar_t>(p.rv), p.eps, N, R, Cc, p.dW.data_ptr<scalar_t>(),
                  p.dg.data_ptr<scalar_t>(), p.db.data_ptr<scalar_t>());
  });
}

// dan_bn_update_ on CUDA: a few element-wise ATen ops per BatchNorm.
void launch_dan_bn_update(const DanBnUpdate& a) {
  const double unbias = static_cast<double>(a.batch) / static_cast<double>(a.batch - 1);
  for (const DanBnUpdate::One& bn : a.bn) {
    const int64_t C = bn.running_mean.size(1);
    at::Tensor rm = bn.running_mean, rv = bn.running_var, nb = bn.num_batches;
    const at::AutoDispatchBelowADInplaceOrView below;  // the front bumps each version once
    rm.mul_(1.0 - a.momentum).add_(bn.mean.view({-1, C}), a.momentum);
    rv.mul_(1.0 - a.momentum).add_(bn.var.view({-1, C}), a.momentum * unbias);
    nb.add_(1);
  }
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(DanGemm, cuda, &launch_dan_gemm);
CLFAST_REGISTER_LAUNCHER(DanColNorm, cuda, &launch_dan_col_norm);
CLFAST_REGISTER_LAUNCHER(DanNormActBackward, cuda, &launch_dan_norm_act_backward);
CLFAST_REGISTER_LAUNCHER(DanFold, cuda, &launch_dan_fold);
CLFAST_REGISTER_LAUNCHER(DanUnfoldBackward, cuda, &launch_dan_unfold_backward);
CLFAST_REGISTER_LAUNCHER(DanBnUpdate, cuda, &launch_dan_bn_update);

}  // namespace clfast::cuda
