// CBP ops on the CPU. cbp_update_: per-unit statistics of all layers in one call (each matrix read once, in
// row partitions summed in a fixed order, so results do not depend on the thread count). cbp_replace_:
// selection of the lowest-utility mature units and their re-initialisation, in one call.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../common/launch.h"
#include "../math/cbp.h"
#include "cbp.h"

namespace clfast::cpu {
namespace {

constexpr int64_t kParts = 16;  // fixed row partitions: deterministic sums

// out[j] = sum_r op(x[r, j]) for a row-major [rows, cols] matrix (kAbsCentered: |x[r, j] - center[j]|).
// Rows are split into kParts partitions accumulated in scalar_t lanes (vectorised), then added in double.
template <ColumnOp Op, typename T>
std::vector<double> column_sums(const T* x, int64_t rows, int64_t cols, const T* center = nullptr) {
  const int64_t parts = std::min<int64_t>(kParts, std::max<int64_t>(rows, 1));
  std::vector<T> partial(parts * cols, T(0));
  at::parallel_for(0, parts, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      T* __restrict__ acc = partial.data() + p * cols;
      const T* __restrict__ c = center;
      for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
        const T* __restrict__ row = x + r * cols;
        for (int64_t j = 0; j < cols; ++j) {
          if constexpr (Op == kValue) acc[j] += row[j];
          if constexpr (Op == kAbs) acc[j] += std::abs(row[j]);
          if constexpr (Op == kAbsCentered) acc[j] += std::abs(row[j] - c[j]);
        }
      }
    }
  });
  std::vector<double> out(cols, 0.0);
  for (int64_t p = 0; p < parts; ++p)
    for (int64_t j = 0; j < cols; ++j) out[j] += static_cast<double>(partial[p * cols + j]);
  return out;
}

// Sums groups of `group` consecutive columns: [n * group] -> [n].
std::vector<double> group_sums(const std::vector<double>& v, int64_t n, int64_t group) {
  std::vector<double> out(n, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t g = 0; g < group; ++g) out[i] += v[i * group + g];
  return out;
}

void launch_cbp_update(const CbpUpdate& args) {
  const double decay = args.decay;
  const CbpUtility utility_type = args.utility;
  for (const CbpUpdateLayer& L : args.layers) {
    const at::Tensor &h = L.features, &wn = L.w_next;
    const at::Tensor &u = L.utility, &m = L.mean, &a = L.age;
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbp_update_", [&] {
      using T = scalar_t;
      const T eta = static_cast<T>(decay);
      const int64_t n = L.units, S = L.spatial, G = L.group;
      const double count = static_cast<double>(L.batch * S);
      // sum_k |W_next[k, i, g]| over rows and the unit's column group
      const auto w_mag = group_sums(column_sums<kAbs>(wn.data_ptr<T>(), wn.size(0), n * G), n, G);
      const auto h_sum = group_sums(column_sums<kValue>(h.data_ptr<T>(), L.batch, n * S), n, S);
      T *up = u.data_ptr<T>(), *mp = m.data_ptr<T>(), *ap = a.data_ptr<T>();
      std::vector<T> m_hat(n);
      for (int64_t i = 0; i < n; ++i) {
        ap[i] += T(1);
        mp[i] = eta * mp[i] + (T(1) - eta) * static_cast<T>(h_sum[i] / count);
        m_hat[i] = cbp_unbiased(mp[i], eta, ap[i]);
      }
      std::vector<double> act;  // mean over batch and space of |h| or |h - m_hat|
      if (utility_type == kContribution) {
        act = group_sums(column_sums<kAbs>(h.data_ptr<T>(), L.batch, n * S), n, S);
      } else {
        std::vector<T> center(n * S);
        for (int64_t j = 0; j < n * S; ++j) center[j] = m_hat[j / S];
        act = group_sums(column_sums<kAbsCentered>(h.data_ptr<T>(), L.batch, n * S, center.data()), n, S);
      }
      std::vector<double> in_mag(n, 1.0);
      if (utility_type == kAdaptableContribution) {
        const at::Tensor& wc = L.w_cur;
        const T* w = wc.data_ptr<T>();
        const int64_t K = wc.numel() / n;
        at::parallel_for(0, n, 16, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) {
            double s = 0;
            for (int64_t k = 0; k < K; ++k) s += std::abs(static_cast<double>(w[i * K + k]));
            in_mag[i] = s / static_cast<double>(K);
          }
        });
      }
      for (int64_t i = 0; i < n; ++i) {
        const T fresh = static_cast<T>(act[i] / count * w_mag[i] / in_mag[i]);
        up[i] = eta * up[i] + (T(1) - eta) * fresh;
      }
    });
  }
}

// The k lowest bias-corrected utilities among mature units; ties by index; immature units rank last.
template <typename T>
std::vector<int64_t> select_units(const T* u, const T* age, int64_t n, int64_t k, T eta, double maturity) {
  std::vector<std::pair<bool, T>> key(n);
  for (int64_t i = 0; i < n; ++i) {
    bool immature;
    const T score = cbp_score(u[i], age[i], eta, maturity, immature);
    key[i] = {immature, score};
  }
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  std::partial_sort(order.begin(), order.begin() + k, order.end(),
                    [&](int64_t a, int64_t b) { return key[a] != key[b] ? key[a] < key[b] : a < b; });
  order.resize(k);
  return order;
}

void launch_cbp_replace(const CbpReplace& R) {
  const at::Tensor &w_cur = R.w_cur, &w_next = R.w_next, &utility = R.utility, &mean = R.mean, &age = R.age;
  const double decay = R.decay;
  const int64_t maturity_threshold = R.maturity_threshold;
  const int64_t k = R.new_weights.size(0);
  const at::Tensor& nw = R.new_weights;
  int64_t* ix = R.index.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(w_cur.scalar_type(), "cbp_replace_", [&] {
    using T = scalar_t;
    const T eta = static_cast<T>(decay);
    T *up = utility.data_ptr<T>(), *mm = mean.data_ptr<T>(), *aa = age.data_ptr<T>();
    const auto chosen = select_units(up, aa, R.units, k, eta, static_cast<double>(maturity_threshold));
    std::vector<T> m_hat(k);
    for (int64_t j = 0; j < k; ++j) {
      ix[j] = chosen[j];
      m_hat[j] = cbp_unbiased(mm[ix[j]], eta, aa[ix[j]]);
    }
    // Outgoing weights: the next layer's bias absorbs the unit's mean contribution, then the weights go to 0.
    T* wn = w_next.data_ptr<T>();
    T* bn = R.b_next.defined() ? R.b_next.data_ptr<T>() : nullptr;
    const int64_t rows = w_next.size(0), G = R.group, cols = w_next.numel() / rows;
    at::parallel_for(0, rows, 64, [&](int64_t lo, int64_t hi) {
      for (int64_t o = lo; o < hi; ++o) {
        T acc = 0;
        for (int64_t j = 0; j < k; ++j)
          for (int64_t g = 0; g < G; ++g) {
            T& w = wn[o * cols + ix[j] * G + g];
            acc += w * m_hat[j];
            w = T(0);
          }
        if (bn != nullptr) bn[o] += acc;
      }
    });
    // Incoming weights from the caller's draws, incoming bias 0, statistics reset.
    T* wc = w_cur.data_ptr<T>();
    T* bc = R.b_cur.defined() ? R.b_cur.data_ptr<T>() : nullptr;
    const T* src = nw.data_ptr<T>();
    const int64_t K = R.fan_in;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = ix[j];
      for (int64_t c = 0; c < K; ++c) wc[i * K + c] = src[j * K + c];
      if (bc != nullptr) bc[i] = T(0);
      up[i] = mm[i] = aa[i] = T(0);
    }
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(CbpUpdate, cpu, &launch_cbp_update);
CLFAST_REGISTER_LAUNCHER(CbpReplace, cpu, &launch_cbp_replace);

}  // namespace clfast::cpu
