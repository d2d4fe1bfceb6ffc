// Declares the kernel ops of the compiled extension. Each op has one CPU kernel
// (csrc/cpu/<op>.cpp) and, in a CUDA build, one CUDA kernel (csrc/cuda/<op>.cu).
//
// These are the kernels behind the public ops fusedaccum::<op>, whose schemas, fake
// kernels, argument checks and backend table live in fusedaccum/ops/<op>.py. The schemas
// here must equal those (tests/test_ops.py checks it).
#include <torch/library.h>

TORCH_LIBRARY(fusedaccum_C, m) {
  m.def(
      "accumulate(Tensor(a!) arena, Tensor[] grads, int[] offsets, float scale, bool first, "
      "Tensor(b!)? sumsq, Tensor(c!)? found_inf) -> ()");
  m.def(
      "adam_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!)? param_copy, Tensor step, Tensor factor, "
      "Tensor? found_inf, float lr, float beta1, float beta2, float eps, float weight_decay, "
      "bool decoupled_weight_decay, bool maximize) -> ()");
  m.def(
      "sgd_step(Tensor(a!) param, Tensor grad, Tensor(b!)? momentum_buffer, "
      "Tensor(c!)? param_copy, Tensor step, Tensor factor, Tensor? found_inf, float lr, "
      "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize) -> ()");
  m.def(
      "lion_step(Tensor(a!) param, Tensor grad, Tensor(b!) exp_avg, Tensor(c!)? param_copy, Tensor factor, "
      "Tensor? found_inf, float lr, float beta1, float beta2, float weight_decay, bool maximize) -> ()");
  m.def(
      "linear_weight_grad(Tensor(a!) arena, int offset, Tensor grad_output, Tensor input, float scale, "
      "bool first) -> ()");
  m.def(
      "embedding_weight_grad(Tensor(a!) arena, int offset, Tensor indices, Tensor grad_output, int num_weights, "
      "int padding_idx, bool scale_grad_by_freq, float scale, bool first) -> ()");
}
