// DAN layer ops on the CPU: the column passes of csrc/dan.h. Each pass works on tiles of kTile columns
// of the logical [B, C] activation matrix (contiguous in both layouts), one tile per task of at::parallel_for.
// Full tiles have a compile-time width, so their row loops vectorise; column sums run in scalar_t over blocks
// of kRowBlock rows and are added up in double.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../dan.h"

namespace clfast::cpu {
namespace {

constexpr int64_t kTile = 16;
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

// Calls f(std::bool_constant<flag>{}).
template <typename F>
void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// out[j] += sum over rows b of add(b, acc) for j < W, where add(b, acc) adds row b's terms into acc[j]
// (scalar_t lanes); K independent sums share the pass.
template <typename T, int K, typename Wd, typename F>
void column_sums(int64_t B, Wd W, double (&out)[K][kTile], F&& add) {
  for (int64_t b0 = 0; b0 < B; b0 += kRowBlock) {
    T acc[K][kTile] = {};
    const int64_t b1 = std::min(B, b0 + kRowBlock);
    for (int64_t b = b0; b < b1; ++b) add(b, acc);
    for (int k = 0; k < K; ++k)
      for (int64_t j = 0; j < W; ++j) out[k][j] += acc[k][j];
  }
}

// Element (b, g * Cg + j) of a [B, C] matrix sits at base(g) + b * row + j.
struct View {
  int64_t group_base, row;
  View(bool grouped, int64_t B, int64_t C, int64_t groups)
      : group_base(grouped ? B * (C / groups) : C / groups), row(grouped ? C / groups : C) {}
  int64_t at(int64_t g, int64_t b) const { return g * group_base + b * row; }
};

// Runs f(g, j0, width) for every tile of kTile columns, in parallel when the work is large enough.
template <typename F>
void for_tiles(int64_t B, int64_t C, int64_t groups, F&& f) {
  const int64_t Cg = C / groups, tiles_per_group = (Cg + kTile - 1) / kTile, tiles = groups * tiles_per_group;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, B * kTile));
  at::parallel_for(0, tiles, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t g = t / tiles_per_group, j0 = (t % tiles_per_group) * kTile;
      f(g, j0, std::min(kTile, Cg - j0));
    }
  });
}

struct CpuKernels {
  // u = normalize ? (h - mean) * rstd : h per column of the [B, C] matrix h, with its mean and biased variance
  // (two passes: the centred sum of squares has no cancellation).
  static void col_norm(const at::Tensor& h, bool h_grouped, const at::Tensor& u, bool u_grouped, int64_t B, int64_t C,
                       int64_t groups, bool normalize, double eps, const at::Tensor& mean, const at::Tensor& var) {
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "dan_col_norm", [&] {
      const scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* up = u.data_ptr<scalar_t>();
      scalar_t* mp = normalize ? mean.data_ptr<scalar_t>() : nullptr;
      scalar_t* vp = normalize ? var.data_ptr<scalar_t>() : nullptr;
      const View hv(h_grouped, B, C, groups), uv(u_grouped, B, C, groups);
      const int64_t Cg = C / groups;
      for_tiles(B, C, groups, [&](int64_t g, int64_t j0, int64_t w) {
        if (!normalize) {
          for (int64_t b = 0; b < B; ++b) std::copy_n(hp + hv.at(g, b) + j0, w, up + uv.at(g, b) + j0);
          return;
        }
        with_width(w, [&](auto W) {
          double sum[1][kTile] = {}, sq[1][kTile] = {};
          column_sums<scalar_t>(B, W, sum, [&](int64_t b, scalar_t (&acc)[1][kTile]) {
            const scalar_t* __restrict__ hr = hp + hv.at(g, b) + j0;
            for (int64_t j = 0; j < W; ++j) acc[0][j] += hr[j];
          });
          scalar_t m[kTile], r[kTile];
          for (int64_t j = 0; j < W; ++j) m[j] = static_cast<scalar_t>(sum[0][j] / B);
          column_sums<scalar_t>(B, W, sq, [&](int64_t b, scalar_t (&acc)[1][kTile]) {
            const scalar_t* __restrict__ hr = hp + hv.at(g, b) + j0;
            for (int64_t j = 0; j < W; ++j) acc[0][j] += (hr[j] - m[j]) * (hr[j] - m[j]);
          });
          for (int64_t j = 0; j < W; ++j) {
            const double v = sq[0][j] / B;  // NaN stays NaN
            r[j] = static_cast<scalar_t>(1.0 / std::sqrt(v + eps));
            mp[g * Cg + j0 + j] = m[j];
            vp[g * Cg + j0 + j] = static_cast<scalar_t>(v);
          }
          for (int64_t b = 0; b < B; ++b) {
            const scalar_t* __restrict__ hr = hp + hv.at(g, b) + j0;
            scalar_t* __restrict__ ur = up + uv.at(g, b) + j0;
            for (int64_t j = 0; j < W; ++j) ur[j] = (hr[j] - m[j]) * r[j];
          }
        });
      });
    });
  }

  static void norm_act_backward(const at::Tensor& du, const at::Tensor& u, bool du_grouped, const at::Tensor& var,
                                double eps, bool normalize, const at::Tensor& s_act, bool z_grouped, int64_t act,
                                const at::Tensor& dz, bool dz_grouped, int64_t B, int64_t C, int64_t groups,
                                const at::Tensor& colsum) {
    AT_DISPATCH_FLOATING_TYPES(du.scalar_type(), "dan_norm_act_backward", [&] {
      const scalar_t* dup = du.data_ptr<scalar_t>();
      const scalar_t* upp = normalize ? u.data_ptr<scalar_t>() : nullptr;
      const scalar_t* vp = normalize ? var.data_ptr<scalar_t>() : nullptr;
      const scalar_t* zp = act != kIdentity ? s_act.data_ptr<scalar_t>() : nullptr;
      scalar_t* dzp = dz.data_ptr<scalar_t>();
      scalar_t* cp = colsum.data_ptr<scalar_t>();
      const View duv(du_grouped, B, C, groups), zv(z_grouped, B, C, groups), dzv(dz_grouped, B, C, groups);
      const int64_t Cg = C / groups;
      with_act(act, [&](auto A) {
        with_flag(normalize, [&](auto Norm) {
          for_tiles(B, C, groups, [&](int64_t g, int64_t j0, int64_t w) {
            with_width(w, [&](auto W) {
              scalar_t r[kTile] = {}, mdu[kTile] = {}, mduu[kTile] = {};
              if constexpr (Norm.value) {
                double sums[2][kTile] = {};
                column_sums<scalar_t>(B, W, sums, [&](int64_t b, scalar_t (&acc)[2][kTile]) {
                  const scalar_t* __restrict__ dr = dup + duv.at(g, b) + j0;
                  const scalar_t* __restrict__ ur = upp + duv.at(g, b) + j0;
                  for (int64_t j = 0; j < W; ++j) {
                    acc[0][j] += dr[j];
                    acc[1][j] += dr[j] * ur[j];
                  }
                });
                for (int64_t j = 0; j < W; ++j) {
                  r[j] = bn_rstd(vp[g * Cg + j0 + j], eps);
                  mdu[j] = static_cast<scalar_t>(sums[0][j] / B);
                  mduu[j] = static_cast<scalar_t>(sums[1][j] / B);
                }
              }
              double cs[1][kTile] = {};
              column_sums<scalar_t>(B, W, cs, [&](int64_t b, scalar_t (&acc)[1][kTile]) {
                const scalar_t* __restrict__ dr = dup + duv.at(g, b) + j0;
                scalar_t* __restrict__ out = dzp + dzv.at(g, b) + j0;
                const scalar_t* __restrict__ ur = Norm.value ? upp + duv.at(g, b) + j0 : nullptr;
                const scalar_t* __restrict__ zr = A.value != kIdentity ? zp + zv.at(g, b) + j0 : nullptr;
                for (int64_t j = 0; j < W; ++j) {
                  scalar_t dh = dr[j];
                  if constexpr (Norm.value) dh = r[j] * (dr[j] - mdu[j] - ur[j] * mduu[j]);
                  const scalar_t v = A.value != kIdentity ? act_backward<scalar_t>(A.value, dh, zr[j]) : dh;
                  out[j] = v;
                  acc[0][j] += v;
                }
              });
              for (int64_t j = 0; j < W; ++j) cp[g * Cg + j0 + j] = static_cast<scalar_t>(cs[0][j]);
            });
          });
        });
      });
    });
  }

  // (s, t) of one neuron's BN for its `cols` columns.
  template <typename T>
  static void scale_shift(const T* g, const T* b, const T* rm, const T* rv, double eps, int64_t cols, T* s, T* t) {
    for (int64_t c = 0; c < cols; ++c) bn_scale_shift(g, b, rm, rv, eps, c, s[c], t[c]);
  }

  static void fold(const at::Tensor& W, const at::Tensor& bias, const at::Tensor& g, const at::Tensor& b,
                   const at::Tensor& rm, const at::Tensor& rv, double eps, const at::Tensor& Weff, const at::Tensor& beff) {
    const int64_t N = W.size(0), R = W.size(1), Cc = W.size(2);
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dan_fold", [&] {
      const scalar_t* wp = W.data_ptr<scalar_t>();
      const scalar_t* cp = bias.defined() ? bias.data_ptr<scalar_t>() : nullptr;
      const scalar_t* rmp = rm.defined() ? rm.data_ptr<scalar_t>() : nullptr;
      const scalar_t* rvp = rv.defined() ? rv.data_ptr<scalar_t>() : nullptr;
      scalar_t* wep = Weff.data_ptr<scalar_t>();
      scalar_t* bep = beff.data_ptr<scalar_t>();
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / (R * Cc)), [&](int64_t lo, int64_t hi) {
        std::vector<scalar_t> s(Cc), t(Cc);
        for (int64_t n = lo; n < hi; ++n) {
          scale_shift(g.data_ptr<scalar_t>() + n * Cc, b.data_ptr<scalar_t>() + n * Cc,
                      rmp ? rmp + n * Cc : nullptr, rvp ? rvp + n * Cc : nullptr, eps, Cc, s.data(), t.data());
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t* __restrict__ wr = wp + (n * R + r) * Cc;
            scalar_t* __restrict__ we = wep + (n * R + r) * Cc;
            scalar_t lanes[8] = {};  // 8 partial sums: the dot product vectorises without reassociation flags
            int64_t c = 0;
            for (; c + 8 <= Cc; c += 8)
              for (int k = 0; k < 8; ++k) {
                we[c + k] = wr[c + k] * s[c + k];
                lanes[k] += wr[c + k] * t[c + k];
              }
            scalar_t acc = cp ? cp[n * R + r] : scalar_t(0);
            for (; c < Cc; ++c) {
              we[c] = wr[c] * s[c];
              acc += wr[c] * t[c];
            }
            for (int k = 0; k < 8; ++k) acc += lanes[k];
            bep[n * R + r] = acc;
          }
        }
      });
    });
  }

  static void unfold_backward(const at::Tensor& dWeff, const at::Tensor& dbeff, const at::Tensor& W,
                              const at::Tensor& g, const at::Tensor& b, const at::Tensor& rm, const at::Tensor& rv,
                              double eps, const at::Tensor& dW, const at::Tensor& dg, const at::Tensor& db) {
    const int64_t N = W.size(0), R = W.size(1), Cc = W.size(2);
    AT_DISPATCH_FLOATING_TYPES(W.scalar_type(), "dan_unfold_backward", [&] {
      const scalar_t* dwep = dWeff.data_ptr<scalar_t>();
      const scalar_t* dbp = dbeff.data_ptr<scalar_t>();
      const scalar_t* wp = W.data_ptr<scalar_t>();
      const scalar_t* rmp = rm.defined() ? rm.data_ptr<scalar_t>() : nullptr;
      const scalar_t* rvp = rv.defined() ? rv.data_ptr<scalar_t>() : nullptr;
      scalar_t* dwp = dW.data_ptr<scalar_t>();
      scalar_t* dgp = dg.data_ptr<scalar_t>();
      scalar_t* dbbp = db.data_ptr<scalar_t>();
      at::parallel_for(0, N, std::max<int64_t>(1, 32768 / (R * Cc)), [&](int64_t lo, int64_t hi) {
        std::vector<scalar_t> s(Cc), t(Cc), P(Cc), Q(Cc);
        for (int64_t n = lo; n < hi; ++n) {
          scale_shift(g.data_ptr<scalar_t>() + n * Cc, b.data_ptr<scalar_t>() + n * Cc,
                      rmp ? rmp + n * Cc : nullptr, rvp ? rvp + n * Cc : nullptr, eps, Cc, s.data(), t.data());
          std::fill(P.begin(), P.end(), scalar_t(0));
          std::fill(Q.begin(), Q.end(), scalar_t(0));
          scalar_t* __restrict__ Pp = P.data();
          scalar_t* __restrict__ Qp = Q.data();
          const scalar_t* __restrict__ sp = s.data();
          const scalar_t* __restrict__ tp = t.data();
          for (int64_t r = 0; r < R; ++r) {
            const scalar_t* __restrict__ dwe = dwep + (n * R + r) * Cc;
            const scalar_t* __restrict__ wr = wp + (n * R + r) * Cc;
            scalar_t* __restrict__ out = dwp + (n * R + r) * Cc;
            const scalar_t dbr = dbp[n * R + r];
            for (int64_t c = 0; c < Cc; ++c) {
              out[c] = dwe[c] * sp[c] + dbr * tp[c];
              Pp[c] += dwe[c] * wr[c];
              Qp[c] += dbr * wr[c];
            }
          }
          for (int64_t c = 0; c < Cc; ++c) {
            dgp[n * Cc + c] = bn_gamma_grad(Pp[c], Qp[c], rmp ? rmp + n * Cc : nullptr, rvp ? rvp + n * Cc : nullptr,
                                            eps, c);
            dbbp[n * Cc + c] = Qp[c];
          }
        }
      });
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CPU, m) {
  m.impl("dan_layer_forward", &dan_layer_forward_impl<CpuKernels>);
  m.impl("dan_layer_backward", &dan_layer_backward_impl<CpuKernels>);
}

}  // namespace clfast::cpu
