// Kronecker-factored quadratic forms for EWC (the front and the only implementation of the kron family) (KFAC blocks, and dense Fishers as 1x1-factored blocks). The
// work is GEMMs, so one device-agnostic implementation on ATen's matmul serves CPU (BLAS) and CUDA (cuBLAS):
// it is registered as CompositeExplicitAutograd, with its fused backward registered in clfast/_ops.py.
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

namespace clfast {
namespace {

void check_blocks(const char* op, at::TensorList a, at::TensorList g, at::TensorList v) {
  TORCH_CHECK(!v.empty(), "clfast.", op, ": expected at least one block");
  TORCH_CHECK(a.size() == v.size() && g.size() == v.size(), "clfast.", op,
              ": a, g and v must list the same blocks, got ", a.size(), ", ", g.size(), " and ", v.size());
  const at::Tensor& first = v[0];
  TORCH_CHECK(first.defined() && (first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble), "clfast.",
              op, ": v[0] must be float32 or float64, got ", first.defined() ? c10::toString(first.scalar_type()) : "None");
  for (size_t i = 0; i < v.size(); ++i) {
    for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"a", a[i]}, {"g", g[i]}, {"v", v[i]}}) {
      TORCH_CHECK(t.defined(), "clfast.", op, ": ", name, "[", i, "] is undefined (None)");
      TORCH_CHECK(t.scalar_type() == first.scalar_type(), "clfast.", op, ": ", name, "[", i, "] is ", t.scalar_type(),
                  " but v[0] is ", first.scalar_type(), "; all blocks must share one dtype");
      TORCH_CHECK(t.device() == first.device(), "clfast.", op, ": ", name, "[", i, "] is on ", t.device(),
                  " but v[0] is on ", first.device());
    }
    TORCH_CHECK(v[i].dim() == 2 && a[i].dim() == 2 && g[i].dim() == 2 && a[i].size(0) == a[i].size(1) &&
                    g[i].size(0) == g[i].size(1) && g[i].size(0) == v[i].size(0) && a[i].size(0) == v[i].size(1),
                "clfast.", op, ": block ", i, " needs g [n, n], v [n, m], a [m, m]; got g ", g[i].sizes(), ", v ",
                v[i].sizes(), ", a ", a[i].sizes());
  }
}

// sum_i <g_i v_i a_i, v_i> = sum_i tr(v_i^T g_i v_i a_i), for symmetric a_i, g_i (Fisher factors), and the
// products t_i = g_i v_i a_i: the gradient is 2 t_i, so the backward needs no further GEMM.
std::tuple<at::Tensor, std::vector<at::Tensor>> kron_quadratic(at::TensorList a, at::TensorList g, at::TensorList v) {
  check_blocks("kron_quadratic", a, g, v);
  at::Tensor total = v[0].new_zeros({});
  std::vector<at::Tensor> products;
  for (size_t i = 0; i < v.size(); ++i) {
    products.push_back(g[i].mm(v[i]).mm(a[i]));
    total.add_(products.back().mul(v[i]).sum());
  }
  return {total, products};
}

// scale * g_i v_i a_i for each block (the penalty's gradient with scale = 2 * strength; a Kronecker-factored
// preconditioner when a, g are inverses). `scale` is a 0-dim tensor so it may stay on the device.
std::vector<at::Tensor> kron_mv(const at::Tensor& scale, at::TensorList a, at::TensorList g, at::TensorList v) {
  check_blocks("kron_mv", a, g, v);
  TORCH_CHECK(scale.numel() == 1 && scale.device() == v[0].device(), "clfast.kron_mv: scale must be one element on ",
              v[0].device(), ", got shape ", scale.sizes(), " on ", scale.device());
  std::vector<at::Tensor> out;
  for (size_t i = 0; i < v.size(); ++i) out.push_back(g[i].mm(v[i]).mm(a[i]).mul_(scale));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, CompositeExplicitAutograd, m) {
  m.impl("kron_quadratic", &kron_quadratic);
  m.impl("kron_mv", &kron_mv);
}

}  // namespace clfast
