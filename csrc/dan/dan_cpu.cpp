// DAN launchers on the CPU: the passes of csrc/dan/dan.h. Each pass works on tiles of kTile columns
// of the logical [B, C] activation matrix (contiguous in both layouts), one tile per task of at::parallel_for.
// Full tiles have a compile-time width, so their row loops vectorise; column sums run in scalar_t over blocks
// of kRowBlock rows and are added up in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "dan.h"
#include "../common/blas.h"
#include "../common/launch.h"
#include "../common/vectorize.h"

namespace clfast::cpu {
namespace {

// 64 columns: a tile's row is four cache lines, or a whole neuron's row at nf <= 64, so the row walk streams
// (16-column tiles read one line per row, and their passes took ~1.6x the cycles at batch 1024). A column's
// sums do not depend on the tile width: results are the same bits for any kTile.
constexpr int64_t kTile = 64;
constexpr int64_t kRowBlock = 64;

// Calls f(W) with W the tile's width: a compile-time constant for full tiles.
template <typename F>
void with_width(int64_t w, F&& f) {
  if (w == kTile) {
    f(std::integral_constant<int64_t, kTile>{});
  } else {
    f(w);
  }
}

// out[j] += sum over rows b of add(b, acc) for j < W, where add(b, acc) adds row b's terms into acc[j]
// (scalar_t lanes); K independent sums share the pass.
template <typename T, int K, typename Wd, typename F>
inline void column_sums(int64_t B, Wd W, double (&out)[K][kTile], F&& add) {
  for (int64_t b0 = 0; b0 < B; b0 += kRowBlock) {
    T acc[K][kTile] = {};
    const int64_t b1 = std::min(B, b0 + kRowBlock);
    for (int64_t b = b0; b < b1; ++b) add(b, acc);
    for (int k = 0; k < K; ++k)
      for (int64_t j = 0; j < W; ++j) out[k][j] += acc[k][j];
  }
}

// Runs f(g, j0, width) for every tile of kTile columns, in parallel when the work is large enough.
template <typename F>
void for_tiles(int64_t B, int64_t Cg, int64_t groups, F&& f) {
  const int64_t tiles_per_group = (Cg + kTile - 1) / kTile, tiles = groups * tiles_per_group;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, B * kTile));
  at::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t / tiles_per_group, j0 = (t % tiles_per_group) * kTile;
      f(g, j0, std::min(kTile, Cg - j0));
    }
  });
}

// The loops of each pass, per tile (or per neuron for the folds), as CLFAST_VECTORIZE functions: the tile loops run
// at the CPU's full SIMD width.

// u = (h - mean) * rstd over one tile of W columns, with their mean and biased variance (two passes: the
// centred sum of squares has no cancellation). m_out / v_out point at the tile's first column.
template <typename T, typename Wd>
CLFAST_VECTORIZE void col_norm_tile(const T* hp, MatrixView hv, T* up, MatrixView uv, int64_t g, int64_t j0, Wd W, int64_t B,
                                    double eps, T* m_out, T* v_out) {
  double sum[1][kTile] = {}, sq[1][kTile] = {};
  column_sums<T>(B, W, sum, [&](int64_t b, T (&acc)[1][kTile]) {
    const T* __restrict__ hr = hp + hv.at(g, b) + j0;
    for (int64_t j = 0; j < W; ++j) acc[0][j] += hr[j];
  });
  T m[kTile], r[kTile];
  for (int64_t j = 0; j < W; ++j) m[j] = static_cast<T>(sum[0][j] / B);
  column_sums<T>(B, W, sq, [&](int64_t b, T (&acc)[1][kTile]) {
    const T* __restrict__ hr = hp + hv.at(g, b) + j0;
    for (int64_t j = 0; j < W; ++j) acc[0][j] += (hr[j] - m[j]) * (hr[j] - m[j]);
  });
  for (int64_t j = 0; j < W; ++j) {
    const double v = sq[0][j] / B;  // NaN stays NaN
    r[j] = static_cast<T>(1.0 / std::sqrt(v + eps));
    m_out[j] = m[j];
    v_out[j] = static_cast<T>(v);
  }
  for (int64_t b = 0; b < B; ++b) {
    const T* __restrict__ hr = hp + hv.at(g, b) + j0;
    T* __restrict__ ur = up + uv.at(g, b) + j0;
    for (int64_t j = 0; j < W; ++j) ur[j] = (hr[j] - m[j]) * r[j];
  }
}

// dz = act'(s) * dh over one tile, with dh = du (kNorm false) or BatchNorm's input gradient
// rstd * (du - mean(du) - u * mean(du * u)) (kNorm true); colsum_out = the tile's column sums of dz.
template <typename T, int kAct, bool kNorm, typename Wd>
CLFAST_VECTORIZE void norm_act_backward_tile(const T* dup, const T* upp, MatrixView duv, const T* zp, MatrixView zv, T* dzp,
                                             MatrixView dzv, int64_t g, int64_t j0, Wd W, int64_t B, const T* var,
                                             double eps, T* colsum_out) {
  T r[kTile] = {}, mdu[kTile] = {}, mduu[kTile] = {};
  if constexpr (kNorm) {
    double sums[2][kTile] = {};
    column_sums<T>(B, W, sums, [&](int64_t b, T (&acc)[2][kTile]) {
      const T* __restrict__ dr = dup + duv.at(g, b) + j0;
      const T* __restrict__ ur = upp + duv.at(g, b) + j0;
      for (int64_t j = 0; j < W; ++j) {
        acc[0][j] += dr[j];
        acc[1][j] += dr[j] * ur[j];
      }
    });
    for (int64_t j = 0; j < W; ++j) {
      r[j] = bn_rstd(var[j], eps);
      mdu[j] = static_cast<T>(sums[0][j] / B);
      mduu[j] = static_cast<T>(sums[1][j] / B);
    }
  }
  double cs[1][kTile] = {};
  column_sums<T>(B, W, cs, [&](int64_t b, T (&acc)[1][kTile]) {
    const T* __restrict__ dr = dup + duv.at(g, b) + j0;
    T* __restrict__ out = dzp + dzv.at(g, b) + j0;
    const T* __restrict__ ur = kNorm ? upp + duv.at(g, b) + j0 : nullptr;
    const T* __restrict__ zr = kAct != kIdentity ? zp + zv.at(g, b) + j0 : nullptr;
    for (int64_t j = 0; j < W; ++j) {
      T dh = dr[j];
      if constexpr (kNorm) dh = r[j] * (dr[j] - mdu[j] - ur[j] * mduu[j]);
      const T v = kAct != kIdentity ? act_backward<T>(kAct, dh, zr[j]) : dh;
      out[j] = v;
      acc[0][j] += v;
    }
  });
  for (int64_t j = 0; j < W; ++j) colsum_out[j] = static_cast<T>(cs[0][j]);
}

// One neuron's fold: we = W * s per column, be = c + W t, for R rows of Cc columns. The dot product W t runs
// in kLanes fixed lanes added up in a fixed tree, so it vectorises at any SIMD width and rounds the same on
// every CPU.
template <typename T>
CLFAST_VECTORIZE void fold_neuron(const T* __restrict__ wp, const T* c, const T* __restrict__ s,
                                  const T* __restrict__ t, int64_t R, int64_t Cc, T* __restrict__ wep,
                                  T* __restrict__ bep) {
  constexpr int kLanes = 16;
  const int64_t full = Cc / kLanes * kLanes;
  for (int64_t r = 0; r < R; ++r) {
    const T* wr = wp + r * Cc;
    T* we = wep + r * Cc;
    for (int64_t k = 0; k < Cc; ++k) we[k] = wr[k] * s[k];
    T lanes[kLanes] = {};
    for (int64_t k0 = 0; k0 < full; k0 += kLanes)
      for (int k = 0; k < kLanes; ++k) lanes[k] += wr[k0 + k] * t[k0 + k];
    for (int64_t k = full; k < Cc; ++k) lanes[k - full] += wr[k] * t[k];
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int k = 0; k < w; ++k) lanes[k] += lanes[k + w];
    bep[r] = (c ? c[r] : T(0)) + lanes[0];
  }
}

// One neuron's unfold backward: dW = dWeff * s + dbeff t^T, P = sum_r dWeff * W, Q = sum_r dbeff * W.
template <typename T>
CLFAST_VECTORIZE void unfold_backward_neuron(const T* __restrict__ dwe, const T* __restrict__ dbeff,
                                             const T* __restrict__ w, const T* __restrict__ s,
                                             const T* __restrict__ t, int64_t R, int64_t Cc, T* __restrict__ dw,
                                             T* __restrict__ P, T* __restrict__ Q) {
  for (int64_t c = 0; c < Cc; ++c) P[c] = Q[c] = T(0);
  for (int64_t r = 0; r < R; ++r) {
    const T dbr = dbeff[r];
    const int64_t o = r * Cc;
    for (int64_t c = 0; c < Cc; ++c) {
      dw[o + c] = dwe[o + c] * s[c] + dbr * t[c];
      P[c] += dwe[o + c] * w[o + c];
      Q[c] += dbr * w[o + c];
    }
  }
}

// out[g] = bias[g] (broadcast over rows, if given) + a[g] b[g] straight through BLAS (csrc/common/blas.h), one call
// per neuron (BLAS threads each call as it sees fit). Returns false, having written nothing, when BLAS is not
// reachable or a matrix has no unit stride.
template <typename T>
bool blas_gemm(const at::Tensor& out, const at::Tensor& bias, const at::Tensor& a, const at::Tensor& b) {
  const auto layout = [](const at::Tensor& t) { return blas::Layout{t.size(1), t.size(2), t.stride(1), t.stride(2)}; };
  blas::Plan plan;
  if ((out.size(2) > 1 && out.stride(2) != 1) || (bias.defined() && !bias.is_contiguous()) ||
      !blas::plan<T>(layout(a), layout(b), out.stride(1), plan))
    return false;
  const int64_t m = plan.m, n = plan.n;
  T* op = out.data_ptr<T>();
  const T *ap = a.data_ptr<T>(), *bp = b.data_ptr<T>(), *cp = bias.defined() ? bias.data_ptr<T>() : nullptr;
  for (int64_t g = 0; g < out.size(0); ++g) {
    T* o = op + g * out.stride(0);
    if (cp != nullptr)  // the bias, which the GEMM (beta = 1) adds to
      for (int64_t i = 0; i < m; ++i) std::copy_n(cp + g * n, n, o + i * plan.ldc);
    blas::run<T>(plan, ap + g * a.stride(0), bp + g * b.stride(0), cp != nullptr ? T(1) : T(0), o);
  }
  return true;
}

// One GEMM per neuron, straight through BLAS where it can be reached, else through ATen (at these sizes ATen's
// batched GEMM costs more than the loop). BLAS writes a view of out in place.
void launch_dan_gemm(const DanGemm& p) {
  bool done = false;
  AT_DISPATCH_FLOATING_TYPES(p.out.scalar_type(), "dan_gemm", [&] { done = blas_gemm<scalar_t>(p.out, p.bias, p.a, p.b); });
  if (!done) dan_detail::gemm_per_neuron(p.out, p.bias, p.a, p.b);
}

void launch_dan_col_norm(const DanColNorm& p) {
  AT_DISPATCH_FLOATING_TYPES(p.h.scalar_type(), "dan_col_norm", [&] {
    const scalar_t* hp = p.h.data_ptr<scalar_t>();
    scalar_t* up = p.u.data_ptr<scalar_t>();
    scalar_t* mp = p.normalize ? p.mean.data_ptr<scalar_t>() : nullptr;
    scalar_t* vp = p.normalize ? p.var.data_ptr<scalar_t>() : nullptr;
    const MatrixView hv = p.hv, uv = p.uv;
    const int64_t B = p.B, Cg = p.Cg;
    for_tiles(B, Cg, p.groups, [&](int64_t g, int64_t j0, int64_t w) {
      if (!p.normalize) {
        for (int64_t b = 0; b < B; ++b) std::copy_n(hp + hv.at(g, b) + j0, w, up + uv.at(g, b) + j0);
        return;
      }
      with_width(w, [&](auto W) {
        col_norm_tile<scalar_t>(hp, hv, up, uv, g, j0, W, B, p.eps, mp + g * Cg + j0, vp + g * Cg + j0);
      });
    });
  });
}

void launch_dan_norm_act_backward(const DanNormActBackward& p) {
  AT_DISPATCH_FLOATING_TYPES(p.du.scalar_type(), "dan_norm_act_backward", [&] {
    const scalar_t* dup = p.du.data_ptr<scalar_t>();
    const scalar_t* upp = p.normalize ? p.u.data_ptr<scalar_t>() : nullptr;
    const scalar_t* vp = p.normalize ? p.var.data_ptr<scalar_t>() : nullptr;
    const scalar_t* zp = p.act != kIdentity ? p.s_act.data_ptr<scalar_t>() : nullptr;
    scalar_t* dzp = p.dz.data_ptr<scalar_t>();
    scalar_t* cp = p.colsum.data_ptr<scalar_t>();
    const MatrixView duv = p.duv, zv = p.zv, dzv = p.dzv;
    const int64_t B = p.B, Cg = p.Cg;
    with_act(p.act, [&](auto A) {
      with_flag(p.normalize, [&](auto Norm) {
        for_tiles(B, Cg, p.groups, [&](int64_t g, int64_t j0, int64_t w) {
          with_width(w, [&](auto W) {
            norm_act_backward_tile<scalar_t, A.value, Norm.value>(dup, upp, duv, zp, zv, dzp, dzv, g, j0, W, B,
                                                                  vp ? vp + g * Cg + j0 : nullptr, p.eps,
                                                                  cp + g * Cg + j0);
          });
        });
      });
    });
  });
}

// (s, t) of one neuron's BN for its `cols` columns.
template <typename T>
void scale_shift(const T* g, const T* b, const T* rm, const T* rv, double eps, int64_t cols, T* s, T* t) {
  for (int64_t c = 0; c < cols; ++c) bn_scale_shift(g, b, rm, rv, eps, c, s[c], t[c]);
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

void launch_dan_fold(const DanFold& p) {
  const int64_t N = p.W.size(0), R = p.W.size(1), Cc = p.W.size(2);
  AT_DISPATCH_FLOATING_TYPES(p.W.scalar_type(), "dan_fold", [&] {
    const scalar_t *wp = p.W.data_ptr<scalar_t>(), *cp = ptr_or_null<scalar_t>(p.bias);
    const scalar_t *gp = p.g.data_ptr<scalar_t>(), *bp = p.b.data_ptr<scalar_t>();
    const scalar_t *rmp = ptr_or_null<scalar_t>(p.rm), *rvp = ptr_or_null<scalar_t>(p.rv);
    scalar_t* wep = p.Weff.data_ptr<scalar_t>();
    scalar_t* bep = p.beff.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / (R * Cc)), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> s(Cc), t(Cc);
      for (int64_t n = lo; n < hi; ++n) {
        scale_shift(gp + n * Cc, bp + n * Cc, rmp ? rmp + n * Cc : nullptr, rvp ? rvp + n * Cc : nullptr, p.eps, Cc,
                    s.data(), t.data());
        fold_neuron<scalar_t>(wp + n * R * Cc, cp ? cp + n * R : nullptr, s.data(), t.data(), R, Cc,
                              wep + n * R * Cc, bep + n * R);
      }
    });
  });
}

void launch_dan_unfold_backward(const DanUnfoldBackward& p) {
  const int64_t N = p.W.size(0), R = p.W.size(1), Cc = p.W.size(2);
  AT_DISPATCH_FLOATING_TYPES(p.W.scalar_type(), "dan_unfold_backward", [&] {
    const scalar_t *dwep = p.dWeff.data_ptr<scalar_t>(), *dbp = p.dbeff.data_ptr<scalar_t>();
    const scalar_t *wp = p.W.data_ptr<scalar_t>(), *gp = p.g.data_ptr<scalar_t>(), *bp = p.b.data_ptr<scalar_t>();
    const scalar_t *rmp = ptr_or_null<scalar_t>(p.rm), *rvp = ptr_or_null<scalar_t>(p.rv);
    scalar_t* dwp = p.dW.data_ptr<scalar_t>();
    scalar_t* dgp = p.dg.data_ptr<scalar_t>();
    scalar_t* dbbp = p.db.data_ptr<scalar_t>();
    at::parallel_for(0, N, std::max<int64_t>(1, 32768 / (R * Cc)), [&](int64_t lo, int64_t hi) {
      std::vector<scalar_t> s(Cc), t(Cc), P(Cc);
      for (int64_t n = lo; n < hi; ++n) {
        scale_shift(gp + n * Cc, bp + n * Cc, rmp ? rmp + n * Cc : nullptr, rvp ? rvp + n * Cc : nullptr, p.eps, Cc,
                    s.data(), t.data());
        // Q (beta's gradient) goes straight to db.
        unfold_backward_neuron<scalar_t>(dwep + n * R * Cc, dbp + n * R, wp + n * R * Cc, s.data(), t.data(), R,
                                         Cc, dwp + n * R * Cc, P.data(), dbbp + n * Cc);
        for (int64_t c = 0; c < Cc; ++c)
          dgp[n * Cc + c] = bn_gamma_grad(P[c], dbbp[n * Cc + c], rmp ? rmp + n * Cc : nullptr,
                                          rvp ? rvp + n * Cc : nullptr, p.eps, c);
      }
    });
  });
}

// One BatchNorm's running statistics: rm = rm * (1 - momentum) + momentum * mean, rv likewise with the unbiased
// variance, in the composite's (csrc/dan/dan.cpp) operation order (ATen's add may fuse the last multiply-add, so
// the two can differ in the last bit). The S batch statistics (S = C when the layer's
// input is shared, N * C otherwise) update every S-sized block of the n running values.
template <typename T>
CLFAST_VECTORIZE void bn_update_loop(T* __restrict__ rm, T* __restrict__ rv, const T* __restrict__ mean,
                                     const T* __restrict__ var, int64_t n, int64_t S, T keep, T m, T mv) {
  for (int64_t off = 0; off < n; off += S)
    for (int64_t k = 0; k < S; ++k) {
      rm[off + k] = rm[off + k] * keep + m * mean[k];
      rv[off + k] = rv[off + k] * keep + mv * var[k];
    }
}

void bn_update_one(const at::Tensor& rm, const at::Tensor& rv, const at::Tensor& nb, const at::Tensor& mean,
                   const at::Tensor& var, double momentum, int64_t batch) {
  const double unbias = static_cast<double>(batch) / static_cast<double>(batch - 1);
  AT_DISPATCH_FLOATING_TYPES(rm.scalar_type(), "dan_bn_update_", [&] {
    bn_update_loop<scalar_t>(rm.data_ptr<scalar_t>(), rv.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                             var.data_ptr<scalar_t>(), rm.numel(), mean.numel(),
                             static_cast<scalar_t>(1.0 - momentum), static_cast<scalar_t>(momentum),
                             static_cast<scalar_t>(momentum * unbias));
  });
  int64_t* counters = nb.data_ptr<int64_t>();
  for (int64_t i = 0; i < nb.numel(); ++i) counters[i] += 1;
}

// dan_bn_update_ on the CPU: one loop per BatchNorm instead of five ATen calls.
void launch_dan_bn_update(const DanBnUpdate& a) {
  for (const DanBnUpdate::One& bn : a.bn)
    bn_update_one(bn.running_mean, bn.running_var, bn.num_batches, bn.mean, bn.var, a.momentum, a.batch);
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(DanGemm, cpu, &launch_dan_gemm);
CLFAST_REGISTER_LAUNCHER(DanColNorm, cpu, &launch_dan_col_norm);
CLFAST_REGISTER_LAUNCHER(DanNormActBackward, cpu, &launch_dan_norm_act_backward);
CLFAST_REGISTER_LAUNCHER(DanFold, cpu, &launch_dan_fold);
CLFAST_REGISTER_LAUNCHER(DanUnfoldBackward, cpu, &launch_dan_unfold_backward);
CLFAST_REGISTER_LAUNCHER(DanBnUpdate, cpu, &launch_dan_bn_update);

}  // namespace clfast::cpu
