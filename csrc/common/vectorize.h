// CLFAST_VECTORIZE marks a hot loop function for GCC function multi-versioning: it is compiled for
// x86-64-v4 (AVX-512), x86-64-v3 (AVX2) and the x86-64 baseline, and the loader picks the widest the CPU
// runs. One build runs on any x86-64 machine and uses full-width SIMD where there is one. setup.py passes
// -ffp-contract=off, so no clone fuses a multiply and an add: every clone rounds exactly like the baseline
// (the GEMMs and ATen's own kernels still pick their code by CPU). Needs GCC >= 12 (arch= levels in
// target_clones) and glibc (ifunc); elsewhere the loops are built once, for the baseline.
#pragma once
#include <cstddef>  // defines __GLIBC__ on glibc

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__GLIBC__)
#define CLFAST_VECTORIZE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLFAST_VECTORIZE
#endif

#include <type_traits>

namespace clfast::cpu {

// Calls f(std::bool_constant<flag>{}): a runtime flag as a compile-time constant, so the loop it selects has
// no branch left and vectorises.
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

}  // namespace clfast::cpu
