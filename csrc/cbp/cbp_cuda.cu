// CBP ops on CUDA. cbp_update_: per layer, column sums of |W_next| and of the features over row partitions
// (coalesced: one thread per column), then one thread per unit folds the partitions and updates the state.
// cbp_replace_: a one-block selection of the lowest-utility mature units, one thread per row of W_next for the
// bias correction, then one block per replaced unit. The indices stay on the device: no host sync.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cbp.h"
#include "../common/multi_tensor_cuda.h"

namespace clfast::cuda {
namespace {

constexpr int kParts = 32;  // row partitions of the column sums

enum ColumnOp { kValue = 0, kAbs = 1, kAbsCentered = 2 };

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
  m_hat[i] = m / (T(1) - pow(eta, a));
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

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

void cbp_update_(at::TensorList utility, at::TensorList mean, at::TensorList age, at::TensorList features,
                 at::TensorList w_next, at::TensorList w_cur, double decay, int64_t utility_type) {
  const auto layers = check_cbp_update("cbp_update_", c10::DeviceType::CUDA, utility, mean, age, features, w_next,
                                       w_cur, utility_type);
  const c10::cuda::CUDAGuard guard(w_cur[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for (size_t l = 0; l < layers.size(); ++l) {
    const CbpLayer& L = layers[l];
    const at::Tensor h = features[l].contiguous(), wn = w_next[l].contiguous();
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
      update_mean<T><<<blocks_for(n), kThreads, 0, stream>>>(mean[l].data_ptr<T>(), age[l].data_ptr<T>(),
                                                             m_hat.data_ptr<T>(), h_partial, n, S, count, eta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const int op = utility_type == kContribution ? kAbs : kAbsCentered;
      column_partials<T><<<dim3(blocks_for(n * S), kParts), kThreads, 0, stream>>>(
          h.data_ptr<T>(), L.batch, n * S, op, m_hat.data_ptr<T>(), S, a_partial);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor wc = w_cur[l].contiguous();
      update_utility<T><<<blocks_for(n), kThreads, 0, stream>>>(
          utility[l].data_ptr<T>(), a_partial, w_partial,
          utility_type == kAdaptableContribution ? wc.data_ptr<T>() : nullptr, n, S, G, wc.numel() / n, count, eta);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
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
      const bool immature = !(static_cast<double>(age[i]) > maturity);
      T score = immature ? T(0) : utility[i] / (T(1) - pow(eta, age[i]));
      if (isnan(score)) score = INFINITY;  // NaN ranks last, as on the CPU
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
    const T m_hat = mean[i] / (T(1) - pow(eta, age[i]));
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

at::Tensor cbp_replace_(const at::Tensor& w_cur, const std::optional<at::Tensor>& b_cur, const at::Tensor& w_next,
                        const std::optional<at::Tensor>& b_next, const at::Tensor& utility, const at::Tensor& mean,
                        const at::Tensor& age, const at::Tensor& new_weights, double decay,
                        int64_t maturity_threshold) {
  const CbpReplace R = check_cbp_replace("cbp_replace_", c10::DeviceType::CUDA, w_cur, b_cur, w_next, b_next,
                                         utility, mean, age, new_weights);
  const int64_t k = new_weights.size(0);
  at::Tensor index = utility.new_empty({k}, utility.options().dtype(at::kLong));
  if (k == 0) return index;
  const c10::cuda::CUDAGuard guard(w_cur.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor nw = new_weights.contiguous();
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
        w_next.data_ptr<T>(), b_next.has_value() ? b_next->data_ptr<T>() : nullptr, index.data_ptr<int64_t>(), k,
        mean.data_ptr<T>(), age.data_ptr<T>(), rows, w_next.numel() / rows, R.group, eta);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    reinit_incoming<T><<<static_cast<unsigned>(k), kThreads, 0, stream>>>(
        w_cur.data_ptr<T>(), b_cur.has_value() ? b_cur->data_ptr<T>() : nullptr, index.data_ptr<int64_t>(),
        nw.data_ptr<T>(), R.fan_in, utility.data_ptr<T>(), mean.data_ptr<T>(), age.data_ptr<T>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return index;
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CUDA, m) {
  m.impl("cbp_update_", &cbp_update_);
  m.impl("cbp_replace_", &cbp_replace_);
}

}  // namespace clfast::cuda
