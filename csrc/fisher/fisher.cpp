// Front of the Fisher ops: validation, contiguous copies where a kernel needs them, version counters; the kernels
// run in fisher_cpu.cpp and fisher_cuda.cu.
#include <torch/library.h>

#include <c10/util/safe_numerics.h>

#include <cmath>
#include <limits>

#include "../common/checks.h"
#include "../common/launch.h"
#include "fisher.h"

namespace clfast {
namespace {

void check_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(t.defined(), "clfast.", op, ": ", name, " is undefined (None)");
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), "clfast.", op, ": ", name, " is ", t.scalar_type(),
              " but out is ", out.scalar_type());
  TORCH_CHECK(t.device() == out.device(), "clfast.", op, ": ", name, " is on ", t.device(), " but out is on ",
              out.device());
}

void check_out(const char* op, const at::Tensor& out) {
  TORCH_CHECK(out.defined() && (out.scalar_type() == at::kFloat || out.scalar_type() == at::kDouble), "clfast.", op,
              ": out must be float32 or float64, got ", out.defined() ? c10::toString(out.scalar_type()) : "None");
  TORCH_CHECK(out.is_contiguous(), "clfast.", op, ": out must be contiguous (it is summed into in place), got strides ",
              out.strides());
}

void fisher_diag_(const at::Tensor& out, const at::Tensor& x, const at::Tensor& gy, bool bias) {
  constexpr const char* op = "fisher_diag_";
  check_out(op, out);
  check_tensor(op, "x", x, out);
  check_tensor(op, "gy", gy, out);
  TORCH_CHECK(x.dim() == 2 && gy.dim() == 3 && gy.size(0) == x.size(0), "clfast.", op,
              ": expected x [B, in] and gy [B, K, out], got x ", x.sizes(), " and gy ", gy.sizes());
  const int64_t O = gy.size(2), I = x.size(1);
  int64_t numel = 0;  // O * (I + bias), which a tensor's sizes can make overflow
  const bool overflows = c10::mul_overflows(O, I + (bias ? 1 : 0), &numel);
  TORCH_CHECK(!overflows && out.dim() == 1 && out.size(0) == numel, "clfast.", op, ": out must be [", O, " * ", I,
              bias ? " + " : "", bias ? std::to_string(O) : "", "] (weight then bias), got ", out.sizes());
  check_memory(op, {{"out", out, true}, {"x", x, false}, {"gy", gy, false}});
  if (x.size(0) > 0 && gy.size(1) > 0 && out.numel() > 0) launch(op, out.device(), FisherDiag{out, x, gy, bias});
  bump_versions(out);
}

void fisher_factor_(const at::Tensor& out, const at::Tensor& x, double scale, bool bias) {
  constexpr const char* op = "fisher_factor_";
  check_out(op, out);
  check_tensor(op, "x", x, out);
  TORCH_CHECK(x.dim() == 2, "clfast.", op, ": expected x [rows, n], got ", x.sizes());
  const int64_t n = x.size(1) + (bias ? 1 : 0);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == n && out.size(1) == n, "clfast.", op, ": out must be [", n, ", ", n,
              "] for x ", x.sizes(), bias ? " and a bias" : "", ", got ", out.sizes());
  // a zero scale adds nothing (BLAS then skips the product, so inf * 0 would not be NaN); a float32 out needs a
  // scale that is a normal float32
  const double lo = out.scalar_type() == at::kFloat ? std::numeric_limits<float>::min() : 0.0,
               hi = out.scalar_type() == at::kFloat ? std::numeric_limits<float>::max()
                                                    : std::numeric_limits<double>::max();
  TORCH_CHECK(std::isfinite(scale) && std::abs(scale) > 0 && std::abs(scale) >= lo && std::abs(scale) <= hi, "clfast.",
              op, ": scale must be finite, non-zero and a normal number of out's dtype (", out.scalar_type(), "), got ",
              scale);
  check_memory(op, {{"out", out, true}, {"x", x, false}});
  if (x.size(1) > 0) {  // no rows still mirrors out
    // BLAS reads an operand with a unit stride in one dimension
    const at::Tensor rows = x.stride(1) == 1 || x.stride(0) == 1 ? x : x.contiguous();
    launch(op, out.device(), FisherFactor{out, rows, scale, bias});
  } else if (bias) {  // no columns: only the corner, the number of rows
    const at::AutoDispatchBelowADInplaceOrView below;  // bumped once below
    out.add_(static_cast<double>(x.size(0)) * scale);
  }
  bump_versions(out);
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("fisher_diag_", &fisher_diag_);
  m.impl("fisher_factor_", &fisher_factor_);
}

}  // namespace clfast
