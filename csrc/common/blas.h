// Row-major GEMMs on raw pointers through the BLAS that libtorch_cpu carries (MKL on x86-64 wheels, OpenBLAS
// elsewhere), found at load time. at::mm costs a few microseconds of dispatch, checks and views per call, as
// much as the multiply itself at the DAN layer's sizes; this calls the same sgemm_/dgemm_ ATen's CPU GEMM
// calls, without them. Where libtorch exports no BLAS, available() is false and callers use ATen.
#pragma once
#include <ATen/ATen.h>
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace clfast::cpu::blas {

// Fortran BLAS: every argument by pointer. Integers are passed as pointers to int64 holding values below
// 2^31: an LP64 BLAS reads their low 32 bits (the value, on little-endian x86-64 and AArch64), an ILP64 one
// reads all 64, so the call is right for either integer width. The trailing lengths are the hidden lengths
// of the two character arguments, which gfortran-built libraries expect.
template <typename T>
using GemmFn = void (*)(const char*, const char*, const int64_t*, const int64_t*, const int64_t*, const T*,
                        const T*, const int64_t*, const T*, const int64_t*, const T*, T*, const int64_t*, size_t,
                        size_t);

struct Table {
  GemmFn<float> sgemm = nullptr;
  GemmFn<double> dgemm = nullptr;
};

// The BLAS ATen itself calls, looked up in the library that holds ATen (torch loads it with RTLD_LOCAL, so it
// is not in the global namespace). Nothing else: another library's BLAS would bring its own threads and
// rounding, and ATen's GEMMs are the better fallback.
inline void* find(const char* name) {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&at::globalContext), &info) == 0 || info.dli_fname == nullptr) return nullptr;
  void* lib = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
  if (lib == nullptr) return nullptr;
  void* f = dlsym(lib, name);
  dlclose(lib);  // torch keeps the library loaded; this only drops the reference dlopen added
  return f;
}

// CLFAST_DIRECT_BLAS=0 turns the direct calls off (every GEMM through ATen), for tests of that path.
inline const Table& table() {
  static const Table t = [] {
    Table r;
    const char* env = std::getenv("CLFAST_DIRECT_BLAS");
    if (env != nullptr && std::string(env) == "0") return r;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    r.sgemm = reinterpret_cast<GemmFn<float>>(find("sgemm_"));
    r.dgemm = reinterpret_cast<GemmFn<double>>(find("dgemm_"));
#endif
    return r;
  }();
  return t;
}

template <typename T>
inline GemmFn<T> fn() {
  if constexpr (std::is_same_v<T, float>) {
    return table().sgemm;
  } else {
    return table().dgemm;
  }
}

template <typename T>
inline bool available() {
  return fn<T>() != nullptr;
}

// A row-major operand's shape and strides.
struct Layout {
  int64_t rows, cols, rs, cs;
};

// How BLAS (column-major) reads a row-major operand X as X^T: 'N' with ld = rs when rows are contiguous,
// 'T' with ld = cs when columns are. A size-1 dimension's stride is free (any valid ld serves).
inline bool as_transposed(const Layout& x, char& op, int64_t& ld) {
  const int64_t rs = x.rows == 1 ? std::max<int64_t>(x.cols, 1) : x.rs, cs = x.cols == 1 ? 1 : x.cs;
  if (cs == 1 && rs >= std::max<int64_t>(x.cols, 1)) {
    op = 'N';
    ld = rs;
    return true;
  }
  const int64_t cs2 = x.cols == 1 ? std::max<int64_t>(x.rows, 1) : x.cs, rs2 = x.rows == 1 ? 1 : x.rs;
  if (rs2 == 1 && cs2 >= std::max<int64_t>(x.rows, 1)) {
    op = 'T';
    ld = cs2;
    return true;
  }
  return false;
}

// One GEMM shape, planned once and run on many operand pointers: c (row-major m x n, row stride ldc, unit
// column stride) = beta * c + alpha * a (m x k) b (k x n).
struct Plan {
  char opa = 'N', opb = 'N';
  int64_t m = 0, n = 0, k = 0, lda = 1, ldb = 1, ldc = 1;
};

// False when BLAS is unavailable or an operand has no unit stride (or a size BLAS's 32-bit ints can't hold).
template <typename T>
inline bool plan(const Layout& a, const Layout& b, int64_t ldc, Plan& p) {
  constexpr int64_t kMax = int64_t{1} << 31;
  p.m = a.rows;
  p.n = b.cols;
  p.k = a.cols;
  p.ldc = p.m > 1 ? ldc : std::max<int64_t>(p.n, 1);
  return available<T>() && as_transposed(a, p.opa, p.lda) && as_transposed(b, p.opb, p.ldb) &&
         p.ldc >= std::max<int64_t>(p.n, 1) && p.m < kMax && p.n < kMax && p.k < kMax && p.lda < kMax &&
         p.ldb < kMax && p.ldc < kMax;
}

template <typename T>
inline void run(const Plan& p, const T* a, const T* b, T beta, T* c, T alpha = T(1)) {
  if (p.m == 0 || p.n == 0) return;
  if (p.k == 0) {  // an empty sum: c = beta * c (libraries differ on the leading dimensions they accept here)
    for (int64_t i = 0; i < p.m; ++i)
      for (int64_t j = 0; j < p.n; ++j) c[i * p.ldc + j] = beta == T(0) ? T(0) : beta * c[i * p.ldc + j];
    return;
  }
  // Row-major C = A B is column-major C^T = B^T A^T.
  fn<T>()(&p.opb, &p.opa, &p.n, &p.m, &p.k, &alpha, b, &p.ldb, a, &p.lda, &beta, c, &p.ldc, 1, 1);
}

}  // namespace clfast::cpu::blas
