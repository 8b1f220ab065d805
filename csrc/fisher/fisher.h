// Fisher op family: the params structs the front (fisher.cpp) fills and the launchers read.
#pragma once
#include <ATen/core/Tensor.h>

namespace clfast {

// fisher_diag_: out [O * I (+ O)] contiguous; x [B, I], gy [B, K, O] with any strides; B, K, O, I > 0.
struct FisherDiag {
  at::Tensor out, x, gy;
  bool bias;
};

// fisher_factor_: out [n (+ 1), n (+ 1)] contiguous; x [rows, n] with a unit stride; n > 0; scale != 0.
struct FisherFactor {
  at::Tensor out, x;
  double scale;
  bool bias;
};

}  // namespace clfast
