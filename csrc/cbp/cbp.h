// CBP op family: the params structs the front (cbp.cpp) fills and the launchers (cbp_cpu.cpp, cbp_cuda.cu) read.
// Every tensor is validated, contiguous, and of one dtype and device.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace clfast {

// The utility of a unit (the schema's string, mapped once in the front).
enum CbpUtility : int64_t { kContribution = 0, kZeroContribution = 1, kAdaptableContribution = 2 };

struct CbpUpdateLayer {
  at::Tensor utility, mean, age;    // [units]
  at::Tensor features;              // [batch, units, spatial]
  at::Tensor w_next, w_cur;         // [rows, units * group], [units, fan_in]
  int64_t batch, units, spatial, group;
};

struct CbpUpdate {
  std::vector<CbpUpdateLayer> layers;
  double decay;
  CbpUtility utility;
};

struct CbpReplace {
  at::Tensor w_cur, b_cur, w_next, b_next;  // b_cur / b_next undefined when the layer has no bias
  at::Tensor utility, mean, age, new_weights;
  at::Tensor index;                         // [k] int64, written by the launcher
  int64_t units, fan_in, group;
  double decay;
  int64_t maturity_threshold;
};

}  // namespace clfast
