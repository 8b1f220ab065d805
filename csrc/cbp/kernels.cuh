// CBP device code. cbp_update_: per layer, column sums of |W_next| and of the features over row partitions
// (coalesced: one thread per column), then one thread per unit folds the partitions and updates the state.
// cbp_replace_: a one-block selection of the lowest-utility mature units, one thread per row of W_next for the
// bias correction, then one block per replaced unit. Includes nothing from torch.
#pragma once
#include <cstdint>

#include "../common/multi_tensor.cuh"
#include "../math/cbp.h"

namespace clfast::cuda {

constexpr int kParts = 32;  // row partitions of the column sums

// partial[p, j] = sum over rows r of partition p of f(x[r, j]); grid (ceil(cols / kThreads), kParts).
template <typename T>
__global__ void __launch_bounds__(kThreads) column_partials(const T* x, int64_t rows, int64_t cols, int op,
                                                            const T* center, int64_t group, double* partial) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const int p = blockIdx.y;
  const int64_t r0 = rows * p / kParts, r1 = rows * (p + 1) / kParts;
  const T c = op == kAbsCentered ? center[j / group] : T(0);
  double acc = 0.0;
  for (int64_t r = r0; r < r1; ++r) {
    const T v = x[r * cols + j];
    acc += static_cast<double>(op == kValue ? v : abs(v - c));
  }
  partial[p * cols + j] = acc;
}

// Sum over partitions and over the unit's `group` columns: [kParts, n * group] -> value for unit i.
__device__ inline double fold(const double* partial, int64_t cols, int64_t i, int64_t group) {
  double s = 0.0;
  for (int p = 0; p < kParts; ++p)
    for (int64_t g = 0; g < group; ++g) s += partial[p * cols + i * group + g];
  return s;
}

template <typename T>
__global__ void update_mean(T* mean, T* age, T* m_hat, const double* h_partial, int64_t n, int64_t S, double count,
                            T eta) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const T a = age[i] + T(1);
  age[i] = a;
  const T m = eta * mean[i] + (T(1) - eta) * static_cast<T>(fold(h_partial, n * S, i, S) / count);
  mean[i] = m;
  m_hat[i] = cbp_unbiased(m, eta, a);
}

template <typename T>
__global__ void update_utility(T* utility, const double* act_partial, const double* w_partial, const T* w_cur,
                               int64_t n, int64_t S, int64_t G, int64_t fan_in, double count, T eta) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  double in_mag = 1.0;
  if (w_cur != nullptr) {  // adaptable_contribution: mean |W_cur[i, :]|
    double s = 0.0;
    for (int64_t k = 0; k < fan_in; ++k) s += abs(static_cast<double>(w_cur[i * fan_in + k]));
    in_mag = s / static_cast<double>(fan_in);
  }
  const T fresh = static_cast<T>(fold(act_partial, n * S, i, S) / count * fold(w_partial, n * G, i, G) / in_mag);
  utility[i] = eta * utility[i] + (T(1) - eta) * fresh;
}

// One block, k rounds: each round picks the lowest (immature, score, index) among units not yet taken. k is
// a small fraction of the units, and the whole selection stays on the device.
template <typename T>
__global__ void __launch_bounds__(kThreads) select_units(const T* utility, const T* age, int64_t n, int64_t k,
                                                         T eta, double maturity, unsigned char* taken,
                                                         int64_t* index) {
  __shared__ bool s_immature[kThreads];
  __shared__ T s_score[kThreads];
  __shared__ int64_t s_idx[kThreads];
  for (int64_t j = 0; j < k; ++j) {
    bool best_immature = true;
    T best_score = T(0);
    int64_t best = -1;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      if (taken[i]) continue;
      bool immature;
      const T score = cbp_score(utility[i], age[i], eta, maturity, immature);
      if (best < 0 || immature < best_immature || (immature == best_immature && score < best_score)) {
        best_immature = immature, best_score = score, best = i;  // i grows: ties keep the lower index
      }
    }
    s_immature[threadIdx.x] = best_immature, s_score[threadIdx.x] = best_score, s_idx[threadIdx.x] = best;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
      if (threadIdx.x < stride) {
        const int o = threadIdx.x + stride;
        const int64_t a = s_idx[threadIdx.x], b = s_idx[o];
        const bool b_wins =
            b >= 0 && (a < 0 || s_immature[o] < s_immature[threadIdx.x] ||
                       (s_immature[o] == s_immature[threadIdx.x] &&
                        (s_score[o] < s_score[threadIdx.x] || (s_score[o] == s_score[threadIdx.x] && b < a))));
        if (b_wins) s_immature[threadIdx.x] = s_immature[o], s_score[threadIdx.x] = s_score[o], s_idx[threadIdx.x] = b;
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {
      index[j] = s_idx[0];
      if (s_idx[0] >= 0) taken[s_idx[0]] = 1;
    }
    __syncthreads();
  }
}

// Row o of W_next: b_next[o] += sum_j sum_g W[o, idx_j, g] * m_hat(idx_j); then those weights = 0.
template <typename T>
__global__ void reinit_outgoing(T* w_next, T* b_next, const int64_t* idx, int64_t k, const T* mean, const T* age,
                                int64_t rows, int64_t cols, int64_t G, T eta) {
  const int64_t o = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= rows) return;
  T acc = 0;
  for (int64_t j = 0; j < k; ++j) {
    const int64_t i = idx[j];
    const T m_hat = cbp_unbiased(mean[i], eta, age[i]);
    for (int64_t g = 0; g < G; ++g) {
      T& w = w_next[o * cols + i * G + g];
      acc += w * m_hat;
      w = T(0);
    }
  }
  if (b_next != nullptr) b_next[o] += acc;
}

// Block j: row idx_j of W_cur = new_weights[j]; bias and statistics of the unit reset.
template <typename T>
__global__ void reinit_incoming(T* w_cur, T* b_cur, const int64_t* idx, const T* new_weights, int64_t fan_in,
                                T* utility, T* mean, T* age) {
  const int64_t j = blockIdx.x, i = idx[j];
  for (int64_t c = threadIdx.x; c < fan_in; c += blockDim.x) w_cur[i * fan_in + c] = new_weights[j * fan_in + c];
  if (threadIdx.x == 0) {
    if (b_cur != nullptr) b_cur[i] = T(0);
    utility[i] = mean[i] = age[i] = T(0);
  }
}

}  // namespace clfast::cuda
