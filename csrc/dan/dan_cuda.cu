// DAN layer ops on CUDA: the column passes of csrc/dan/dan.h (GEMMs and activations are ATen calls made there).
// Each pass over activations is one launch for all neurons: a block owns 32 columns of one neuron (coalesced along
// the columns) and 8 row lanes; column statistics are reduced in shared memory in double, and the block that
// computed a column's statistics also applies them, so a BatchNorm costs one launch and no grid-wide sync.
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/launch.h"
#include "dan.h"

namespace clfast::cuda {
namespace {

constexpr int kCols = 32, kRows = 8;

// Element (b, g * Cg + j) of a [B, C] matrix sits at g * group_base + b * row + j (flat or grouped layout).
struct View {
  int64_t group_base, row;
  __device__ int64_t at(int64_t g, int64_t b) const { return g * group_base + b * row; }
};

View make_view(bool grouped, int64_t B, int64_t C, int64_t groups) {
  return grouped ? View{B * (C / groups), C / groups} : View{C / groups, C};
}

// x: tiles of kCols columns; y: groups (neurons), at most 65535 per launch, the kernels stride over the rest.
dim3 column_grid(int64_t C, int64_t groups) {
  return dim3(static_cast<unsigned>((C / groups + kCols - 1) / kCols),
              static_cast<unsigned>(std::min<int64_t>(groups, 65535)));
}

// Column totals over the block's kRows thread rows: each thread passes its K partial sums in v; afterwards
// thread row 0 holds its column's totals (row 0's own part first, then rows 1.. in order). Every thread of the
// block calls it (it synchronises). scratch: K * kRows * kCols doubles of shared memory, free again once the
// caller has synchronised after reading the totals.
template <int K>
__device__ void block_column_sums(double* scratch, double (&v)[K]) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  for (int k = 0; k < K; ++k) scratch[(k * kRows + ty) * kCols + tx] = v[k];
  __syncthreads();
  if (ty == 0)
    for (int r = 1; r < kRows; ++r)
      for (int k = 0; k < K; ++k) v[k] += scratch[(k * kRows + r) * kCols + tx];
}

// u = normalize ? (h - mean) * rstd : h, per column of group g of h, with the column's mean and biased variance.
template <typename T>
__device__ void col_norm_group(int64_t g, const T* __restrict__ h, View hv, T* __restrict__ u, View uv, int64_t B,
                               int64_t Cg, bool normalize, double eps, T* __restrict__ mean, T* __restrict__ var) {
  __shared__ double s_part[2 * kRows * kCols];
  __shared__ T s_mean[kCols], s_rstd[kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const bool active = j < Cg;
  double sq[2] = {0.0, 0.0};  // sum, sum of squares
  if (active)
    for (int64_t b = ty; b < B; b += kRows) {
      const T a = h[hv.at(g, b) + j];
      u[uv.at(g, b) + j] = a;
      sq[0] += a;
      sq[1] += static_cast<double>(a) * a;
    }
  if (!normalize) return;  // uniform over the block
  block_column_sums(s_part, sq);
  if (ty == 0 && active) {
    const double s = sq[0], q = sq[1];
    const double mu = s / B, d = q / B - mu * mu, v = d < 0.0 ? 0.0 : d;  // NaN stays NaN, as on the CPU
    mean[g * Cg + j] = static_cast<T>(mu);
    var[g * Cg + j] = static_cast<T>(v);
    s_mean[tx] = static_cast<T>(mu);
    s_rstd[tx] = static_cast<T>(1.0 / sqrt(v + eps));
  }
  __syncthreads();
  if (!active) return;
  const T m = s_mean[tx], r = s_rstd[tx];
  for (int64_t b = ty; b < B; b += kRows) {  // the values this thread wrote above
    T* p = u + uv.at(g, b) + j;
    *p = (*p - m) * r;
  }
}

// dz = act'(.) * (normalize ? rstd * (du - mean(du) - u * mean(du * u)) : du) for group g; colsum = sum_b dz.
template <int A, typename T>
__device__ void norm_act_backward_group(int64_t g, const T* __restrict__ du, const T* __restrict__ u, View duv,
                                        const T* __restrict__ var, double eps, bool normalize,
                                        const T* __restrict__ s_act, View zv, T* __restrict__ dz, View dzv, int64_t B,
                                        int64_t Cg, T* __restrict__ colsum) {
  __shared__ double s_part[2 * kRows * kCols];
  __shared__ T s_r[kCols], s_mdu[kCols], s_mduu[kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const bool active = j < Cg;
  if (normalize) {
    double sums[2] = {0.0, 0.0};  // sum of du, sum of du * u
    if (active)
      for (int64_t b = ty; b < B; b += kRows) {
        const int64_t o = duv.at(g, b) + j;
        sums[0] += du[o];
        sums[1] += static_cast<double>(du[o]) * u[o];
      }
    block_column_sums(s_part, sums);
    if (ty == 0 && active) {
      s_r[tx] = bn_rstd(var[g * Cg + j], eps);
      s_mdu[tx] = static_cast<T>(sums[0] / B);
      s_mduu[tx] = static_cast<T>(sums[1] / B);
    }
    __syncthreads();
  }
  double cs[1] = {0.0};
  if (active) {
    const T r = normalize ? s_r[tx] : T(1), mdu = normalize ? s_mdu[tx] : T(0), mduu = normalize ? s_mduu[tx] : T(0);
    for (int64_t b = ty; b < B; b += kRows) {
      const int64_t o = duv.at(g, b) + j;
      const T dh = normalize ? r * (du[o] - mdu - u[o] * mduu) : du[o];
      const T v = A != kIdentity ? act_backward<T>(A, dh, s_act[zv.at(g, b) + j]) : dh;
      dz[dzv.at(g, b) + j] = v;
      cs[0] += v;
    }
  }
  __syncthreads();  // s_part is reused below
  block_column_sums(s_part, cs);
  if (ty == 0 && active) colsum[g * Cg + j] = static_cast<T>(cs[0]);
}

// One block per (tile of kCols columns, group); groups beyond gridDim.y are strided over.
template <typename T, typename... Args>
__global__ void __launch_bounds__(kCols* kRows) col_norm_kernel(int64_t groups, Args... args) {
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    col_norm_group<T>(g, args...);
    __syncthreads();  // the next group reuses the shared arrays
  }
}

template <int A, typename T, typename... Args>
__global__ void __launch_bounds__(kCols* kRows) norm_act_backward_kernel(int64_t groups, Args... args) {
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    norm_act_backward_group<A, T>(g, args...);
    __syncthreads();
  }
}

// One warp per row (n, r) of W [N, R, Cc]: Weff = W * s, beff = bias + W . t.
template <typename T>
__global__ void fold_kernel(const T* __restrict__ W, const T* __restrict__ bias, const T* __restrict__ g,
                            const T* __restrict__ b, const T* __restrict__ rm, const T* __restrict__ rv, double eps,
                            int64_t rows, int64_t R, int64_t Cc, T* __restrict__ Weff, T* __restrict__ beff) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;  // whole warps leave together
  const int64_t n = row / R;
  T acc = T(0);
  for (int64_t c = lane; c < Cc; c += 32) {
    T s, t;
    bn_scale_shift(g, b, rm, rv, eps, n * Cc + c, s, t);
    const T w = W[row * Cc + c];
    Weff[row * Cc + c] = w * s;
    acc += w * t;
  }
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
  if (lane == 0) beff[row] = (bias != nullptr ? bias[row] : T(0)) + acc;
}

// One thread per column (n, c): dW = dWeff * s + dbeff t^T, and the gradients of the BN affine parameters.
template <typename T>
__global__ void unfold_backward_kernel(const T* __restrict__ dWeff, const T* __restrict__ dbeff,
                                       const T* __restrict__ W, const T* __restrict__ g, const T* __restrict__ b,
                                       const T* __restrict__ rm, const T* __restrict__ rv, double eps, int64_t N,
                                       int64_t R, int64_t Cc, T* __restrict__ dW, T* __restrict__ dg,
                                       T* __restrict__ db) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= N * Cc) return;
  const int64_t n = i / Cc, c = i % Cc;
  T s, t;
  bn_scale_shift(g, b, rm, rv, eps, i, s, t);
  T P = T(0), Q = T(0);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t o = (n * R + r) * Cc + c;
    const T dwe = dWeff[o], w = W[o], dbr = dbeff[n * R + r];
    dW[o] = dwe * s + dbr * t;
    P += dwe * w;
    Q += dbr * w;
  }
  dg[i] = bn_gamma_grad(P, Q, rm, rv, eps, i);
  db[i] = Q;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

struct CudaKernels {
  // out[g] = bias[g] (broadcast over rows, if defined) + a[g] b[g] for every neuron g, as one batched GEMM (one
  // plain GEMM for a batch of one, the layer-wide first Linear: cuBLASLt can fuse its bias there).
  static void gemm(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
    if (out.size(0) == 1) {
      dan_detail::gemm_per_neuron(out, bias, a, b);
    } else if (bias.defined()) {
      at::baddbmm_out(const_cast<at::Tensor&>(out), bias.unsqueeze(1), a, b);
    } else {
      at::bmm_out(const_cast<at::Tensor&>(out), a, b);
    }
  }

  static void col_norm(const at::Tensor& h, bool h_grouped, const at::Tensor& u, bool u_grouped, int64_t B, int64_t C,
                       int64_t groups, bool normalize, double eps, const at::Tensor& mean, const at::Tensor& var) {
    const c10::cuda::CUDAGuard guard(h.device());
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dan_col_norm", [&] {
      col_norm_kernel<scalar_t><<<column_grid(C, groups), dim3(kCols, kRows), 0, c10::cuda::getCurrentCUDAStream()>>>(
          groups, h.data_ptr<scalar_t>(), make_view(h_grouped, B, C, groups), u.data_ptr<scalar_t>(),
          make_view(u_grouped, B, C, groups), B, C / groups, normalize, eps,
          normalize ? mean.data_ptr<scalar_t>() : nullptr, normalize ? var.data_ptr<scalar_t>() : nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void norm_act_backward(const at::Tensor& du, const at::Tensor& u, bool du_grouped, const at::Tensor& var,
                                double eps, bool normalize, const at::Tensor& s_act, bool z_grouped, int64_t act,
                                const at::Tensor& dz, bool dz_grouped, int64_t B, int64_t C, int64_t groups,
                                const at::Tensor& colsum) {
    const c10::cuda::CUDAGuard guard(du.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES(du.scalar_type(), "dan_norm_act_backward", [&] {
      with_act(act, [&](auto A) {
        norm_act_backward_kernel<decltype(A)::value, scalar_t>
            <<<column_grid(C, groups), dim3(kCols, kRows), 0, stream>>>(
                groups, du.data_ptr<scalar_t>(), normalize ? u.data_ptr<scalar_t>() : nullptr,
                make_view(du_grouped, B, C, groups), normalize ? var.data_ptr<scalar_t>() : nullptr, eps, normalize,
                act != kIdentity ? s_act.data_ptr<scalar_t>() : nullptr, make_view(z_grouped, B, C, groups),
                dz.data_ptr<scalar_t>(), make_view(dz_grouped, B, C, groups), B, C / groups,
                colsum.data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }

  static void fold(const at::Tensor& W, const at::Tensor& bias, const at::Tensor& g, const at::Tensor& b,
                   const at::Tensor& rm, const at::Tensor& rv, double eps, const at::Tensor& Weff, const at::Tensor& beff) {
    const c10::cuda::CUDAGuard guard(W.device());
    const int64_t N = W.size(0), R = W.size(1), Cc = W.size(2), rows = N * R;
    constexpr int kWarps = 8;
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dan_fold", [&] {
      fold_kernel<scalar_t><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), 32 * kWarps, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
          W.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(bias), g.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
          ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv), eps, rows, R, Cc, Weff.data_ptr<scalar_t>(),
          beff.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void unfold_backward(const at::Tensor& dWeff, const at::Tensor& dbeff, const at::Tensor& W,
                              const at::Tensor& g, const at::Tensor& b, const at::Tensor& rm, const at::Tensor& rv,
                              double eps, const at::Tensor& dW, const at::Tensor& dg, const at::Tensor& db) {
    const c10::cuda::CUDAGuard guard(W.device());
    const int64_t N = W.size(0), R = W.size(1), Cc = W.size(2);
    constexpr int kThreadsPerBlock = 256;
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dan_unfold_backward", [&] {
      unfold_backward_kernel<scalar_t><<<static_cast<unsigned>((N * Cc + kThreadsPerBlock - 1) / kThreadsPerBlock),
                                         kThreadsPerBlock, 0, c10::cuda::getCurrentCUDAStream()>>>(
          dWeff.data_ptr<scalar_t>(), dbeff.data_ptr<scalar_t>(), W.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
          b.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(rm), ptr_or_null<scalar_t>(rv), eps, N, R, Cc,
          dW.data_ptr<scalar_t>(), dg.data_ptr<scalar_t>(), db.data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

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

CLFAST_REGISTER_LAUNCHER(DanBnUpdate, cuda, &launch_dan_bn_update);

TORCH_LIBRARY_IMPL(clfast, CUDA, m) {
  m.impl("dan_layer_forward", &dan_layer_forward_impl<CudaKernels>);
  m.impl("dan_layer_backward", &dan_layer_backward_impl<CudaKernels>);
}

}  // namespace clfast::cuda
