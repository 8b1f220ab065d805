// Every clfast schema, in one place. Each op family's front (csrc/<family>/<family>.cpp) implements its ops for
// every backend and launches the kernels of the tensors' device.
#include <Python.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

// `import clfast._C` loads this library, whose static initialisers register the ops below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(clfast, m) {
  // ---- Synaptic Intelligence (csrc/si/, clfast/reference/si.py) ----
  // omega += (params - ref) * (-grads), or omega += ref * (-grads) when ref_is_delta.
  m.def("si_accumulate_(Tensor(a!)[] omega, Tensor[] params, Tensor[] ref, Tensor[] grads, bool ref_is_delta) -> ()");
  // importance += clamp(omega / ((params - prev)^2 + epsilon), min=0); prev = params; omega = 0.
  m.def("si_consolidate_(Tensor(a!)[] importance, Tensor(b!)[] prev, Tensor(c!)[] omega, Tensor[] params, float epsilon) -> ()");
  // sum_i sum(importance_i * (params_i - prev_i)^2), a 0-dim tensor.
  m.def("si_penalty(Tensor[] importance, Tensor[] prev, Tensor[] params) -> Tensor");
  // grad_out * 2 * importance * (params - prev), one tensor per parameter.
  m.def("si_penalty_backward(Tensor grad_out, Tensor[] importance, Tensor[] prev, Tensor[] params) -> Tensor[]");
  // grads += scale * 2 * importance * (params - prev), without an autograd graph.
  m.def("si_penalty_grad_(Tensor(a!)[] grads, Tensor[] importance, Tensor[] prev, Tensor[] params, float scale) -> ()");

  // ---- Fused optimizer steps with SI accumulation (csrc/optim/, clfast/reference/optim.py) ----
  // torch.optim.SGD's update; when omega is non-empty also omega += (new - old) * (-grads).
  m.def("sgd_si_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] omega, "
        "float lr, float momentum, float dampening, float weight_decay, bool nesterov, bool init_buffers) -> ()");
  // torch.optim.Adam's update (bias corrections given by the caller); omega as above.
  m.def("adam_si_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, Tensor(c!)[] exp_avg_sq, "
        "Tensor(d!)[] omega, float lr, float beta1, float beta2, float eps, float weight_decay, "
        "float bias_correction1, float bias_correction2) -> ()");

  // ---- Continual Backpropagation (csrc/cbp/, clfast/reference/cbp.py) ----
  // Per layer l, unit i: age += 1; mean = d*mean + (1-d)*avg(h); utility = d*utility + (1-d)*new, with new from
  // utility_type ('contribution', 'zero_contribution' or 'adaptable_contribution'). features [B, n, ...];
  // w_next [rows, n * group] (Linear / Conv2d / flattened Conv2d); w_cur [n, fan_in].
  m.def("cbp_update_(Tensor(a!)[] utility, Tensor(b!)[] mean, Tensor(c!)[] age, Tensor[] features, "
        "Tensor[] w_next, Tensor[] w_cur, float decay, str utility_type) -> ()");
  // Replaces k = new_weights.size(0) units of one layer: the k lowest bias-corrected utilities
  // utility / (1 - decay^age) among units with age > maturity_threshold (ties: lower index first; ineligible units
  // rank last). For each chosen i: b_next += W_next[:, i] . m_hat_i; W_next[:, i] = 0; W_cur[i] = new_weights[j];
  // b_cur[i] = 0; utility, mean, age of i = 0. Returns the chosen indices [k] (int64, in rank order).
  m.def("cbp_replace_(Tensor(a!) w_cur, Tensor(b!)? b_cur, Tensor(c!) w_next, Tensor(d!)? b_next, "
        "Tensor(e!) utility, Tensor(f!) mean, Tensor(g!) age, Tensor new_weights, float decay, "
        "int maturity_threshold) -> Tensor");

  // ---- Reservoir replay buffer (csrc/reservoir/, clfast/reference/buffer.py) ----
  // Algorithm R for a whole batch: item j (global index m = num_seen + j) goes to slot m while m < capacity, else
  // to slot floor(draws[j] * (m + 1)) when that is < capacity; a later item wins a slot taken twice in the batch.
  // A draw outside [0, 1) (or NaN) selects no slot.
  // storage[f] [capacity, ...] and batch[f] [B, ...] per field f (any dtype); draws [B] float64 in [0, 1).
  m.def("reservoir_add_(Tensor(a!)[] storage, Tensor[] batch, Tensor draws, int num_seen) -> ()");

  // ---- EWC quadratic forms (csrc/kron/, clfast/reference/ewc.py) ----
  // sum_i <g_i v_i a_i, v_i> for symmetric factors: KFAC blocks (g [out, out], v [out, in(+1)], a [in(+1), in(+1)])
  // and dense Fishers (g = F, v = delta [P, 1], a = [[1]]); also returns the products g_i v_i a_i (half the
  // gradient, kept for the backward).
  m.def("kron_quadratic(Tensor[] a, Tensor[] g, Tensor[] v) -> (Tensor, Tensor[])");
  // scale * g_i v_i a_i per block.
  m.def("kron_mv(Tensor scale, Tensor[] a, Tensor[] g, Tensor[] v) -> Tensor[]");

  // ---- Fisher information (csrc/fisher/, clfast/reference/fisher.py) ----
  // The diagonal of a Linear layer's Fisher from its input x [B, in] and the gradients gy [B, K, out] of K
  // outputs with respect to its output: out[o * in + i] += sum_{b,k} gy[b,k,o]^2 x[b,i]^2 (the weight), then with
  // bias out[out * in + o] += sum_{b,k} gy[b,k,o]^2.
  m.def("fisher_diag_(Tensor(a!) out, Tensor x, Tensor gy, bool bias) -> ()");
  // A KFAC factor: out += scale * [x, 1]^T [x, 1] for x [rows, n], the column of ones with bias (out [n + 1, n + 1])
  // and none without (out [n, n]). Summed on and above the diagonal, then mirrored below it, so out comes out
  // exactly symmetric: for a symmetric out, the sum itself. scale: finite, non-zero, a normal number of out's dtype.
  m.def("fisher_factor_(Tensor(a!) out, Tensor x, float scale, bool bias) -> ()");

  // ---- Deep Artificial Neuron layers (csrc/dan/, clfast/reference/dan.py) ----
  // One layer of N neurons, each BN -> Linear -> act -> BN -> Linear -> act -> Linear, on stacked parameters:
  // x [B, ni] (shared) or [N, B, ni]; bn1_* [N, ni]; weight1 [N, nf, ni]; bias1 [N, nf]; bn2_* [N, nf];
  // weight2 [N, nf, nf]; bias2 [N, nf]; weight3 [N, no, nf]; bias3 [N, no]. Train mode when no running statistics
  // are given (batch statistics), eval mode otherwise. act: 'identity', 'tanh', 'relu', 'sigmoid', 'gelu' or
  // 'gelu_tanh' (GELU's tanh approximation). Returns the output [B, N * no] and the tensors the backward needs
  // (csrc/dan/dan.h: DanSaved; the last four are the BatchNorms' batch means and biased variances).
  m.def("dan_layer_forward(Tensor x, Tensor bn1_weight, Tensor bn1_bias, Tensor weight1, Tensor? bias1, "
        "Tensor bn2_weight, Tensor bn2_bias, Tensor weight2, Tensor? bias2, Tensor weight3, Tensor? bias3, "
        "Tensor? running_mean1, Tensor? running_var1, Tensor? running_mean2, Tensor? running_var2, float eps, "
        "str act) -> (Tensor, Tensor[])");
  // Gradients {x (empty unless input_grad), bn1_weight, bn1_bias, weight1, bias1, bn2_weight, bn2_bias, weight2,
  // bias2, weight3, bias3} from the forward's saved tensors.
  m.def("dan_layer_backward(Tensor grad_out, Tensor x, Tensor bn1_weight, Tensor bn1_bias, Tensor weight1, "
        "Tensor bn2_weight, Tensor bn2_bias, Tensor weight2, Tensor weight3, Tensor? running_mean1, "
        "Tensor? running_var1, Tensor? running_mean2, Tensor? running_var2, Tensor[] saved, float eps, str act, "
        "bool input_grad) -> Tensor[]");
  // The layer as modules call it: dan_layer_forward (with autograd), then in train mode dan_bn_update_. One call
  // from Python per layer, returning only the output.
  m.def("dan_layer(Tensor x, Tensor bn1_weight, Tensor bn1_bias, Tensor weight1, Tensor? bias1, Tensor bn2_weight, "
        "Tensor bn2_bias, Tensor weight2, Tensor? bias2, Tensor weight3, Tensor? bias3, Tensor(a!) running_mean1, "
        "Tensor(b!) running_var1, Tensor(c!) num_batches1, Tensor(d!) running_mean2, Tensor(e!) running_var2, "
        "Tensor(f!) num_batches2, bool training, float momentum, float eps, str act) -> Tensor");
  // nn.BatchNorm1d's running-statistics update for both BatchNorms of a layer (running [N, C], counters [N]).
  m.def("dan_bn_update_(Tensor(a!) running_mean1, Tensor(b!) running_var1, Tensor(c!) num_batches1, "
        "Tensor(d!) running_mean2, Tensor(e!) running_var2, Tensor(f!) num_batches2, Tensor mean1, Tensor var1, "
        "Tensor mean2, Tensor var2, float momentum, int batch) -> ()");
}

namespace {

// With every tensor list empty, the dispatcher has no device to choose a kernel by and reports "There were no
// tensor arguments to this function". The ops whose tensors all come in lists check that case here, at
// BackendSelect (always in the key set), and pass every other call on to the kernel of its tensors' device.
void require_a_tensor(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  const size_t n = op.schema().arguments().size();
  bool any = false;
  for (size_t i = stack->size() - n; i < stack->size() && !any; ++i) {
    const c10::IValue& v = (*stack)[i];
    any = (v.isTensor() && v.toTensor().defined()) || (v.isTensorList() && !v.toTensorList().empty());
  }
  TORCH_CHECK(any, "clfast.", op.schema().name().substr(op.schema().name().find("::") + 2),
              ": expected at least one tensor, got only empty lists");
  op.redispatchBoxed(keys & c10::DispatchKeySet(c10::DispatchKeySet::FULL_AFTER, c10::DispatchKey::BackendSelect),
                     stack);
}

}  // namespace

TORCH_LIBRARY_IMPL(clfast, BackendSelect, m) {
  for (const char* op : {"si_accumulate_", "si_consolidate_", "si_penalty", "si_penalty_grad_", "sgd_si_step_",
                         "adam_si_step_", "cbp_update_", "reservoir_add_", "kron_quadratic"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&require_a_tensor>());
}
