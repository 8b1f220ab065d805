// Fisher device code: the squares of the diagonal, column sums and the factor's update, in grid-stride loops (the
// products are cuBLAS GEMMs, fisher_cuda.cu). Includes nothing from torch.
#pragma once
#include <cstdint>


namespace clfast::cuda {

constexpr int kFisherThreads = 256;

// g2[b, o] = sum_k gy[b, k, o]^2 (k in order) for e < B * O, then x2[b, i] = x[b, i]^2.
template <typename T>
__global__ void fisher_squares_kernel(const T* gy, int64_t sb, int64_t sk, int64_t so, const T* x, int64_t xb,
                                      int64_t xi, int64_t B, int64_t K, int64_t O, int64_t I, T* g2, T* x2) {
  const int64_t total = B * O + B * I, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    if (e < B * O) {
      const int64_t b = e / O, o = e % O;
      T s = 0;
      for (int64_t k = 0; k < K; ++k) {
        const T v = gy[b * sb + k * sk + o * so];
        s += v * v;
      }
      g2[e] = s;
    } else {
      const int64_t f = e - B * O, b = f / I, i = f % I;
      const T v = x[b * xb + i * xi];
      x2[f] = v * v;
    }
  }
}

// dst[j] = sum_r src[r * rs + j * cs] (r in order), or dst[j] += that when accumulate: one thread per column,
// adjacent threads on adjacent columns.
template <typename T>
__global__ void fisher_column_sums_kernel(const T* src, int64_t rows, int64_t cols, int64_t rs, int64_t cs, T* dst,
                                          bool accumulate) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; j < cols; j += step) {
    T s = 0;
    for (int64_t r = 0; r < rows; ++r) s += src[r * rs + j * cs];
    dst[j] = accumulate ? dst[j] + s : s;
  }
}

// out's upper triangle += scale * [x, 1]^T [x, 1], from the product x^T x [n, n] (read in its upper triangle) and
// the column sums of x; each sum also written below the diagonal, so out comes out exactly symmetric. One thread
// per element on or above the diagonal.
template <typename T>
__global__ void fisher_factor_kernel(T* out, const T* product, const T* colsum, int64_t n, int64_t rows, int64_t N,
                                     T scale) {
  const int64_t total = N * N, step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < total; e += step) {
    const int64_t i = e / N, j = e % N;
    if (i > j) continue;
    const T add = j < n ? product[i * n + j] : i < n ? colsum[i] : static_cast<T>(rows);
    const T v = out[e] + scale * add;
    out[e] = v;
    out[j * N + i] = v;
  }
}

}  // namespace clfast::cuda
