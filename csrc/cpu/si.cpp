// SI ops on the CPU: one parallel loop over all chunks of all parameter tensors per call.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../math/si.h"
#include "multi_tensor.h"

#include <algorithm>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace clfast::cpu {
namespace {

constexpr auto kCPU = c10::DeviceType::CPU;

void si_accumulate_(at::TensorList omega, at::TensorList params, at::TensorList ref, at::TensorList grads,
                    bool ref_is_delta) {
  check_lists("si_accumulate_", kCPU, {{"params", params}, {"omega", omega}, {"ref", ref}, {"grads", grads}});
  ContigList o(omega), p(params), r(ref), g(grads);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_accumulate_", [&] {
    auto O = data_ptrs<scalar_t>(o.work), P = data_ptrs<scalar_t>(p.work), R = data_ptrs<scalar_t>(r.work),
         G = data_ptrs<scalar_t>(g.work);
    for_each_chunk(numels(p.work), [&](int64_t t, int64_t b, int64_t e) {
      scalar_t* __restrict__ om = O[t];
      const scalar_t *__restrict__ pp = P[t], *__restrict__ rr = R[t], *__restrict__ gg = G[t];
      if (ref_is_delta) {
        for (int64_t i = b; i < e; ++i) om[i] = si_accumulate(om[i], rr[i], gg[i]);
      } else {
        for (int64_t i = b; i < e; ++i) om[i] = si_accumulate(om[i], pp[i] - rr[i], gg[i]);
      }
    });
  });
  o.finish();
}

void si_consolidate_(at::TensorList importance, at::TensorList prev, at::TensorList omega, at::TensorList params,
                     double epsilon) {
  check_lists("si_consolidate_", kCPU,
              {{"params", params}, {"importance", importance}, {"prev", prev}, {"omega", omega}});
  ContigList imp(importance), pr(prev), o(omega), p(params);
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_consolidate_", [&] {
    auto I = data_ptrs<scalar_t>(imp.work), V = data_ptrs<scalar_t>(pr.work), O = data_ptrs<scalar_t>(o.work),
         P = data_ptrs<scalar_t>(p.work);
    const scalar_t eps = static_cast<scalar_t>(epsilon);
    for_each_chunk(numels(p.work), [&, eps](int64_t t, int64_t b, int64_t e) {
      scalar_t *__restrict__ im = I[t], *__restrict__ pv = V[t], *__restrict__ om = O[t];
      const scalar_t* __restrict__ pp = P[t];
      for (int64_t i = b; i < e; ++i) {
        im[i] += si_importance(om[i], pp[i], pv[i], eps);
        pv[i] = pp[i];
        om[i] = scalar_t(0);
      }
    });
  });
  imp.finish();
  pr.finish();
  o.finish();
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

at::Tensor si_penalty(at::TensorList importance, at::TensorList prev, at::TensorList params) {
  check_lists("si_penalty", kCPU, {{"params", params}, {"importance", importance}, {"prev", prev}});
  ContigList imp(importance), pr(prev), p(params);
  at::Tensor out = params[0].new_empty({});
  AT_DISPATCH_FLOATING_TYPES(params[0].scalar_type(), "si_penalty", [&] {
    auto I = data_ptrs<scalar_t>(imp.work), V = data_ptrs<scalar_t>(pr.work), P = data_ptrs<scalar_t>(p.work);
    const double total = sum_chunks(numels(p.work), [&](int64_t t, int64_t b, int64_t e) {
      const scalar_t *__restrict__ im = I[t], *__restrict__ pv = V[t], *__restrict__ pp = P[t];
      // Blocks of 256 terms summed in scalar_t (short enough to stay exact to float rounding), each block
      // added to a double.
      double acc = 0.0;
      for (int64_t blk = b; blk < e; blk += 256)
        acc += static_cast<double>(penalty_block(im + blk, pp + blk, pv + blk, std::min(e, blk + 256) - blk));
      return acc;
    });
    *out.data_ptr<scalar_t>() = static_cast<scalar_t>(total);
  });
  return out;
}

// out_i = scale * 2 * importance_i * (params_i - prev_i), written (accumulate=false) or added.
void penalty_grad(const std::vector<at::Tensor>& out, const ContigList& imp, const ContigList& pr,
                  const ContigList& p, double scale, bool accumulate) {
  AT_DISPATCH_FLOATING_TYPES(p.work[0].scalar_type(), "si_penalty_grad", [&] {
    auto D = data_ptrs<scalar_t>(out), I = data_ptrs<scalar_t>(imp.work), V = data_ptrs<scalar_t>(pr.work),
         P = data_ptrs<scalar_t>(p.work);
    const scalar_t s = static_cast<scalar_t>(scale);
    for_each_chunk(numels(p.work), [&, s](int64_t t, int64_t b, int64_t e) {
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

std::vector<at::Tensor> si_penalty_backward(const at::Tensor& grad_out, at::TensorList importance,
                                            at::TensorList prev, at::TensorList params) {
  check_lists("si_penalty_backward", kCPU, {{"params", params}, {"importance", importance}, {"prev", prev}});
  TORCH_CHECK(grad_out.numel() == 1, "clfast.si_penalty_backward: grad_out must hold one element, got shape ",
              grad_out.sizes());
  ContigList imp(importance), pr(prev), p(params);
  std::vector<at::Tensor> out;
  for (const at::Tensor& t : p.work) out.push_back(t.new_empty(t.sizes()));
  penalty_grad(out, imp, pr, p, grad_out.item<double>(), /*accumulate=*/false);
  return out;
}

void si_penalty_grad_(at::TensorList grads, at::TensorList importance, at::TensorList prev, at::TensorList params,
                      double scale) {
  check_lists("si_penalty_grad_", kCPU,
              {{"params", params}, {"grads", grads}, {"importance", importance}, {"prev", prev}});
  ContigList g(grads), imp(importance), pr(prev), p(params);
  penalty_grad(g.work, imp, pr, p, scale, /*accumulate=*/true);
  g.finish();
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CPU, m) {
  m.impl("si_accumulate_", &si_accumulate_);
  m.impl("si_consolidate_", &si_consolidate_);
  m.impl("si_penalty", &si_penalty);
  m.impl("si_penalty_backward", &si_penalty_backward);
  m.impl("si_penalty_grad_", &si_penalty_grad_);
}

}  // namespace clfast::cpu
