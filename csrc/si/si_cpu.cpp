// SI launchers on the CPU: one parallel loop over all chunks of all parameter tensors per call.
#include <ATen/Dispatch.h>

#include "../common/launch.h"
#include "../common/multi_tensor_cpu.h"
#include "../math/si.h"
#include "si.h"

#include <algorithm>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace clfast::cpu {
namespace {

void launch_si_accumulate(const SiAccumulate& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_accumulate_", [&] {
    auto O = data_ptrs<scalar_t>(a.omega), P = data_ptrs<scalar_t>(a.params), R = data_ptrs<scalar_t>(a.ref),
         G = data_ptrs<scalar_t>(a.grads);
    const bool ref_is_delta = a.ref_is_delta;
    for_each_chunk(numels(a.params), [&](int64_t t, int64_t b, int64_t e) {
      scalar_t* __restrict__ om = O[t];
      const scalar_t *__restrict__ pp = P[t], *__restrict__ rr = R[t], *__restrict__ gg = G[t];
      if (ref_is_delta) {
        for (int64_t i = b; i < e; ++i) om[i] = si_accumulate(om[i], rr[i], gg[i]);
      } else {
        for (int64_t i = b; i < e; ++i) om[i] = si_accumulate(om[i], pp[i] - rr[i], gg[i]);
      }
    });
  });
}

void launch_si_consolidate(const SiConsolidate& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_consolidate_", [&] {
    auto I = data_ptrs<scalar_t>(a.importance), V = data_ptrs<scalar_t>(a.prev), O = data_ptrs<scalar_t>(a.omega),
         P = data_ptrs<scalar_t>(a.params);
    const scalar_t eps = static_cast<scalar_t>(a.epsilon);
    for_each_chunk(numels(a.params), [&, eps](int64_t t, int64_t b, int64_t e) {
      scalar_t *__restrict__ im = I[t], *__restrict__ pv = V[t], *__restrict__ om = O[t];
      const scalar_t* __restrict__ pp = P[t];
      for (int64_t i = b; i < e; ++i) {
        im[i] += si_importance(om[i], pp[i], pv[i], eps);
        pv[i] = pp[i];
        om[i] = scalar_t(0);
      }
    });
  });
}

// sum of importance * (param - prev)^2 over [0, n) for one block short enough (<= 256 terms) to be summed in
// scalar_t. For float on x86-64, four independent SSE accumulators: one accumulator's chain of dependent adds
// would bound the loop by the add latency instead of by memory bandwidth.
template <typename T>
T penalty_block(const T* __restrict__ im, const T* __restrict__ pp, const T* __restrict__ pv, int64_t n) {
  int64_t i = 0;
  T s = 0;
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    __m128 acc[4] = {_mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps(), _mm_setzero_ps()};
    for (; i + 16 <= n; i += 16)
      for (int k = 0; k < 4; ++k) {
        const __m128 d = _mm_sub_ps(_mm_loadu_ps(pp + i + 4 * k), _mm_loadu_ps(pv + i + 4 * k));
        acc[k] = _mm_add_ps(acc[k], _mm_mul_ps(_mm_loadu_ps(im + i + 4 * k), _mm_mul_ps(d, d)));
      }
    alignas(16) float lanes[4];
    _mm_store_ps(lanes, _mm_add_ps(_mm_add_ps(acc[0], acc[1]), _mm_add_ps(acc[2], acc[3])));
    s = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
  }
#endif
  for (; i < n; ++i) s += si_penalty_term(im[i], pp[i], pv[i]);
  return s;
}

void launch_si_penalty(const SiPenalty& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_penalty", [&] {
    auto I = data_ptrs<scalar_t>(a.importance), V = data_ptrs<scalar_t>(a.prev), P = data_ptrs<scalar_t>(a.params);
    const double total = sum_chunks(numels(a.params), [&](int64_t t, int64_t b, int64_t e) {
      const scalar_t *__restrict__ im = I[t], *__restrict__ pv = V[t], *__restrict__ pp = P[t];
      // Blocks of 256 terms summed in scalar_t (short enough to stay exact to float rounding), each block
      // added to a double.
      double acc = 0.0;
      for (int64_t blk = b; blk < e; blk += 256)
        acc += static_cast<double>(penalty_block(im + blk, pp + blk, pv + blk, std::min(e, blk + 256) - blk));
      return acc;
    });
    *a.out.data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
}

// out_i = scale * 2 * importance_i * (params_i - prev_i), written or added.
void launch_si_penalty_grad(const SiPenaltyGrad& a) {
  AT_DISPATCH_FLOATING_TYPES(a.params[0].scalar_type(), "si_penalty_grad", [&] {
    auto D = data_ptrs<scalar_t>(a.out), I = data_ptrs<scalar_t>(a.importance), V = data_ptrs<scalar_t>(a.prev),
         P = data_ptrs<scalar_t>(a.params);
    const scalar_t s =
        a.scale_tensor.defined() ? *a.scale_tensor.data_ptr<scalar_t>() : static_cast<scalar_t>(a.scale);
    const bool accumulate = a.accumulate;
    for_each_chunk(numels(a.params), [&, s](int64_t t, int64_t b, int64_t e) {
      scalar_t* __restrict__ d = D[t];
      const scalar_t *__restrict__ im = I[t], *__restrict__ pv = V[t], *__restrict__ pp = P[t];
      if (accumulate) {
        for (int64_t i = b; i < e; ++i) d[i] += si_penalty_grad(im[i], pp[i], pv[i], s);
      } else {
        for (int64_t i = b; i < e; ++i) d[i] = si_penalty_grad(im[i], pp[i], pv[i], s);
      }
    });
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(SiAccumulate, cpu, &launch_si_accumulate);
CLFAST_REGISTER_LAUNCHER(SiConsolidate, cpu, &launch_si_consolidate);
CLFAST_REGISTER_LAUNCHER(SiPenalty, cpu, &launch_si_penalty);
CLFAST_REGISTER_LAUNCHER(SiPenaltyGrad, cpu, &launch_si_penalty_grad);

}  // namespace clfast::cpu
