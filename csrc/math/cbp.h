// CBP math shared by the CPU and CUDA kernels (clfast/reference/cbp.py writes the same rules).
#pragma once
#include <cmath>

#include "host_device.h"

namespace clfast {

// Column reductions of the utility update: sum x, sum |x|, sum |x - center|.
enum ColumnOp { kValue = 0, kAbs = 1, kAbsCentered = 2 };

// An EMA with decay eta after `age` updates from zero, bias-corrected: x / (1 - eta^age).
template <typename T>
CLFAST_HD inline T cbp_unbiased(T x, T eta, T age) {
  using std::pow;
  return x / (T(1) - pow(eta, age));
}

// Replacement rank of a unit, lower first: (immature, score), ties by index. Immature units (age <= maturity)
// rank after every mature one, and a NaN score ranks last among the mature.
template <typename T>
CLFAST_HD inline T cbp_score(T utility, T age, T eta, double maturity, bool& immature) {
  immature = !(static_cast<double>(age) > maturity);
  const T score = immature ? T(0) : cbp_unbiased(utility, eta, age);
  return score != score ? T(INFINITY) : score;
}

}  // namespace clfast
