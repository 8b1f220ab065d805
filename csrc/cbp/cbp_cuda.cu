// CBP launchers on CUDA. The indices stay on the device: no host sync.
#include <ATen/Dispatch.h>

#include "../common/cuda_host.h"
#include "../common/launch.h"
#include "cbp.h"
#include "kernels.cuh"

namespace clfast::cuda {
namespace {

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

void launch_cbp_update(const CbpUpdate& args) {
  const double decay = args.decay;
  const CbpUtility utility_type = args.utility;
  const DeviceGuard guard(args.layers[0].w_cur.device());
  const Stream stream = current_stream();
  for (const CbpUpdateLayer& L : args.layers) {
    const at::Tensor &h = L.features, &wn = L.w_next;
    const int64_t n = L.units, S = L.spatial, G = L.group, rows = wn.size(0);
    const at::Tensor scratch = h.new_empty({kParts * (n * G + 2 * n * S)}, h.options().dtype(at::kDouble));
    double* w_partial = scratch.data_ptr<double>();
    double* h_partial = w_partial + kParts * n * G;
    double* a_partial = h_partial + kParts * n * S;
    const double count = static_cast<double>(L.batch * S);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "cbp_update_", [&] {
      using T = scalar_t;
      const T eta = static_cast<T>(decay);
      const at::Tensor m_hat = h.new_empty({n});
      CLFAST_LAUNCH(column_partials<T>, dim3(blocks_for(n * G), kParts), kThreads, 0, stream, wn.data_ptr<T>(), rows,
                    n * G, kAbs, nullptr, G, w_partial);
      CLFAST_LAUNCH(column_partials<T>, dim3(blocks_for(n * S), kParts), kThreads, 0, stream, h.data_ptr<T>(), L.batch,
                    n * S, kValue, nullptr, S, h_partial);
      CLFAST_LAUNCH(update_mean<T>, blocks_for(n), kThreads, 0, stream, L.mean.data_ptr<T>(), L.age.data_ptr<T>(),
                    m_hat.data_ptr<T>(), h_partial, n, S, count, eta);
      const int op = utility_type == kContribution ? kAbs : kAbsCentered;
      CLFAST_LAUNCH(column_partials<T>, dim3(blocks_for(n * S), kParts), kThreads, 0, stream, h.data_ptr<T>(), L.batch,
                    n * S, op, m_hat.data_ptr<T>(), S, a_partial);
      const at::Tensor& wc = L.w_cur;
      CLFAST_LAUNCH(update_utility<T>, blocks_for(n), kThreads, 0, stream, L.utility.data_ptr<T>(), a_partial,
                    w_partial, utility_type == kAdaptableContribution ? wc.data_ptr<T>() : nullptr, n, S, G,
                    wc.numel() / n, count, eta);
    });
  }
}

void launch_cbp_replace(const CbpReplace& R) {
  const at::Tensor &w_cur = R.w_cur, &w_next = R.w_next, &utility = R.utility, &mean = R.mean, &age = R.age;
  const at::Tensor& index = R.index;
  const double decay = R.decay;
  const int64_t maturity_threshold = R.maturity_threshold;
  const int64_t k = R.new_weights.size(0);
  const DeviceGuard guard(w_cur.device());
  const Stream stream = current_stream();
  const at::Tensor& nw = R.new_weights;
  at::Tensor taken = utility.new_zeros({R.units}, utility.options().dtype(at::kByte));
  const int64_t rows = w_next.size(0);
  AT_DISPATCH_FLOATING_TYPES(w_cur.scalar_type(), "cbp_replace_", [&] {
    using T = scalar_t;
    const T eta = static_cast<T>(decay);
    CLFAST_LAUNCH(select_units<T>, 1, kThreads, 0, stream, utility.data_ptr<T>(), age.data_ptr<T>(), R.units, k, eta,
                  static_cast<double>(maturity_threshold), taken.data_ptr<unsigned char>(), index.data_ptr<int64_t>());
    CLFAST_LAUNCH(reinit_outgoing<T>, blocks_for(rows), kThreads, 0, stream, w_next.data_ptr<T>(),
                  R.b_next.defined() ? R.b_next.data_ptr<T>() : nullptr, index.data_ptr<int64_t>(), k,
                  mean.data_ptr<T>(), age.data_ptr<T>(), rows, w_next.numel() / rows, R.group, eta);
    CLFAST_LAUNCH(reinit_incoming<T>, static_cast<unsigned>(k), kThreads, 0, stream, w_cur.data_ptr<T>(),
                  R.b_cur.defined() ? R.b_cur.data_ptr<T>() : nullptr, index.data_ptr<int64_t>(), nw.data_ptr<T>(),
                  R.fan_in, utility.data_ptr<T>(), mean.data_ptr<T>(), age.data_ptr<T>());
  });
}

}  // namespace

CLFAST_REGISTER_LAUNCHER(CbpUpdate, cuda, &launch_cbp_update);
CLFAST_REGISTER_LAUNCHER(CbpReplace, cuda, &launch_cbp_replace);

}  // namespace clfast::cuda
