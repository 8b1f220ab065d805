// DAN CUDA kernels: the column passes and the BatchNorm fold of csrc/dan/dan.h. A column pass is one launch for
// all neurons: a block owns kCols columns of one neuron (coalesced along the columns) and kRows row lanes;
// column statistics are reduced in shared memory in double, and the block that computed a column's statistics
// also applies them, so a BatchNorm costs one launch and no grid-wide sync. Includes nothing from torch.
#pragma once
#include <cstdint>

#include "../math/dan.h"

namespace clfast::cuda {

constexpr int kCols = 32, kRows = 8;

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
__device__ void col_norm_group(int64_t g, const T* __restrict__ h, MatrixView hv, T* __restrict__ u, MatrixView uv, int64_t B,
                               int64_t Cg, bool normalize, double eps, T* __restrict__ mean, T* __restrict__ var) {
  __shared__ double s_part[2 * kRows * kCols];
  __shared__ T s_mean[kCols], s_rstd[kCols];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kCols + tx;
  const bool active = j < Cg;
  // Sums of (h - k) and its square, shifted by the column's first value k: the variance's cancellation then
  // depends on how far the mean lies from one sample, a few standard deviations, not on the mean's magnitude.
  const double k = active ? static_cast<double>(h[hv.at(g, 0) + j]) : 0.0;
  double sq[2] = {0.0, 0.0};
  if (active)
    for (int64_t b = ty; b < B; b += kRows) {
      const T a = h[hv.at(g, b) + j];
      u[uv.at(g, b) + j] = a;
      const double d = static_cast<double>(a) - k;
      sq[0] += d;
      sq[1] += d * d;
    }
  if (!normalize) return;  // uniform over the block
  block_column_sums(s_part, sq);
  if (ty == 0 && active) {
    const double ds = sq[0] / B, d = sq[1] / B - ds * ds;
    const double mu = k + ds, v = d < 0.0 ? 0.0 : d;  // NaN stays NaN, as on the CPU
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
__device__ void norm_act_backward_group(int64_t g, const T* __restrict__ du, const T* __restrict__ u, MatrixView duv,
                                        const T* __restrict__ var, double eps, bool normalize,
                                        const T* __restrict__ s_act, MatrixView zv, T* __restrict__ dz, MatrixView dzv, int64_t B,
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
    __syncthreads();  // also orders the reads of s_part above before its reuse below
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
  block_column_sums(s_part, cs);
  if (ty == 0 && active) colsum[g * Cg + j] = static_cast<T>(cs[0]);
}

// One block per (tile of kCols columns, group); groups beyond gridDim.y are strided over.
template <typename T>
__global__ void __launch_bounds__(kCols* kRows)
    col_norm_kernel(int64_t groups, const T* __restrict__ h, MatrixView hv, T* __restrict__ u, MatrixView uv, int64_t B,
                    int64_t Cg, bool normalize, double eps, T* __restrict__ mean, T* __restrict__ var) {
  // No barrier between groups: a group's reads of s_part come before its second barrier, and its reads of
  // s_mean/s_rstd before the next group's first, which every thread must reach before they are rewritten.
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y)
    col_norm_group<T>(g, h, hv, u, uv, B, Cg, normalize, eps, mean, var);
}

// At least 3 blocks per SM, so at most 85 registers per thread: left to itself, ptxas gives the double GELU
// backward 48 on sm_80 and spills; at 64 the float tanh-GELU one spills.
template <int A, typename T>
__global__ void __launch_bounds__(kCols* kRows, 3)
    norm_act_backward_kernel(int64_t groups, const T* __restrict__ du, const T* __restrict__ u, MatrixView duv,
                             const T* __restrict__ var, double eps, bool normalize, const T* __restrict__ s_act,
                             MatrixView zv, T* __restrict__ dz, MatrixView dzv, int64_t B, int64_t Cg,
                             T* __restrict__ colsum) {
  for (int64_t g = blockIdx.y; g < groups; g += gridDim.y) {
    norm_act_backward_group<A, T>(g, du, u, duv, var, eps, normalize, s_act, zv, dz, dzv, B, Cg, colsum);
    __syncthreads();  // thread row 0 reads s_part last: the next group's first writes must wait for it
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

}  // namespace clfast::cuda
