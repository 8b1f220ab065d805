// Fisher launchers on the CPU: the squares and sums in at::parallel_for loops (each sum in one fixed order, so
// the result does not depend on the thread count), the products through BLAS (csrc/common/blas.h), else ATen.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include "../common/blas.h"
#include "../common/launch.h"
#include "fisher.h"

namespace clfast::cpu {
namespace {

// c (row-major, row stride ldc) = beta * c + alpha * a b, for row-major operands given as layouts; through ATen
// where BLAS cannot take them.
template <typename T>
void gemm(const blas::Layout& la, const T* a, const blas::Layout& lb, const T* b, T beta, T* c, int64_t ldc, T alpha,
          const at::TensorOptions& options) {
  blas::Plan plan;
  if (blas::plan<T>(la, lb, ldc, plan)) {
    blas::run<T>(plan, a, b, beta, c, alpha);
    return;
  }
  const auto view = [&](const blas::Layout& l, const T* ptr) {
    return at::from_blob(const_cast<T*>(ptr), {l.rows, l.cols}, {l.rs, l.cs}, options);
  };
  at::Tensor out = at::from_blob(c, {la.rows, lb.cols}, {ldc, 1}, options);
  const at::AutoDispatchBelowADInplaceOrView below;  // the front bumps the version once
  out.addmm_(view(la, a), view(lb, b), beta, alpha);
}

void launch_fisher_diag(const FisherDiag& p) {
  const int64_t B = p.x.size(0), I = p.x.size(1), K = p.gy.size(1), O = p.gy.size(2);
  AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "fisher_diag_", [&] {
    using T = scalar_t;
    at::Tensor g2 = at::empty({B, O}, p.out.options()), x2 = at::empty({B, I}, p.out.options());
    T *g2p = g2.data_ptr<T>(), *x2p = x2.data_ptr<T>(), *out = p.out.data_ptr<T>();
    const T *gy = p.gy.data_ptr<T>(), *x = p.x.data_ptr<T>();
    const int64_t sb = p.gy.stride(0), sk = p.gy.stride(1), so = p.gy.stride(2), xb = p.x.stride(0), xi = p.x.stride(1);
    at::parallel_for(0, B, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        for (int64_t o = 0; o < O; ++o) {
          T s = 0;
          for (int64_t k = 0; k < K; ++k) {
            const T v = gy[b * sb + k * sk + o * so];
            s += v * v;
          }
          g2p[b * O + o] = s;
        }
        for (int64_t i = 0; i < I; ++i) {
          const T v = x[b * xb + i * xi];
          x2p[b * I + i] = v * v;
        }
      }
    });
    // the weight: out [O, I] += g2^T x2
    gemm<T>({O, B, 1, O}, g2p, {B, I, I, 1}, x2p, T(1), out, I, T(1), p.out.options());
    if (p.bias) {
      T* ob = out + O * I;
      at::parallel_for(0, O, 64, [&](int64_t lo, int64_t hi) {
        for (int64_t b = 0; b < B; ++b)
          for (int64_t o = lo; o < hi; ++o) ob[o] += g2p[b * O + o];
      });
    }
  });
}

// The upper triangle of out's top-left n x n block += scale * x^T x, in row blocks of one GEMM each (rows
// [i0, i1) times columns [i0, n)): about 5/8 of a full product's work at four blocks. The diagonal blocks also
// write below the diagonal, which the mirror then overwrites.
template <typename T>
void add_upper_product(const at::Tensor& x, T scale, T* out, int64_t ldo, const at::TensorOptions& options) {
  const int64_t rows = x.size(0), n = x.size(1), rs = x.stride(0), cs = x.stride(1);
  const T* xp = x.data_ptr<T>();
  const int64_t block = n <= 128 ? n : std::max<int64_t>(64, (n + 3) / 4);
  for (int64_t i0 = 0; i0 < n; i0 += block) {
    const int64_t i1 = std::min(n, i0 + block);
    gemm<T>({i1 - i0, rows, cs, rs}, xp + i0 * cs, {rows, n - i0, rs, cs}, xp + i0 * cs, T(1), out + i0 * ldo + i0,
            ldo, scale, options);
  }
}

void launch_fisher_factor(const FisherFactor& p) {
  const int64_t rows = p.x.size(0), n = p.x.size(1), N = p.out.size(0);
  AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "fisher_factor_", [&] {
    using T = scalar_t;
    const T scale = static_cast<T>(p.scale);
    T* out = p.out.data_ptr<T>();
    add_upper_product<T>(p.x, scale, out, N, p.out.options());
    if (p.bias) {  // the column of ones: column sums on the last column, the number of rows at the corner
      const T* xp = p.x.data_ptr<T>();
      const int64_t rs = p.x.stride(0), cs = p.x.stride(1);
      // partial sums over fixed blocks of rows (read along the rows), then over the blocks in order: the same sum
      // at any thread count
      constexpr int64_t kRows = 1024;
      const int64_t blocks = (rows + kRows - 1) / kRows;
      at::Tensor partial = at::zeros({blocks, n}, p.out.options());
      T* pp = partial.data_ptr<T>();
      at::parallel_for(0, blocks, 1, [&](int64_t lo, int64_t hi) {
        for (int64_t blk = lo; blk < hi; ++blk)
          for (int64_t r = blk * kRows; r < std::min(rows, (blk + 1) * kRows); ++r)
            for (int64_t j = 0; j < n; ++j) pp[blk * n + j] += xp[r * rs + j * cs];
      });
      for (int64_t blk = 0; blk < blocks; ++blk)
        for (int64_t j = 0; j < n; ++j) out[j * N + n] += scale * pp[blk * n + j];
      out[n * N + n] += scale * static_cast<T>(rows);
    }
    // below the diagonal: the mirror of the upper triangle, in tiles so that reading a column stays in cache
    constexpr int64_t kTile = 32;
    at::parallel_for(0, (N + kTile - 1) / kTile, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t i0 = lo * kTile; i0 < std::min(N, hi * kTile); i0 += kTile)
        for (int64_t j0 = 0; j0 <= i0; j0 += kTile)
          for (int64_t i = i0; i < std::min(N, i0 + kTile); ++i)
            for (int64_t j = j0; j < std::min(i, j0 + kTile); ++j) out[i * N + j] = out[j * N + i];
    });
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(FisherDiag, cpu, &launch_fisher_diag);
CLFAST_REGISTER_LAUNCHER(FisherFactor, cpu, &launch_fisher_factor);

}  // namespace clfast::cpu
