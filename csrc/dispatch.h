// The dtypes fusedaccum kernels take (fp32, bf16, fp16) and a dispatch macro over them.
// Shared by the CPU and CUDA host code. The public ops call these kernels with no Python
// check first (csrc/public_ops.cpp), so the checks here refuse everything the Python checks
// do; the Python checks then explain the refusal.
#pragma once

// Only the headers used: <ATen/ATen.h> declares every operator and was a third of each
// file's compile time (three times over in a .cu: host and each device pass).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <type_traits>

#define FUSEDACCUM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                           \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

namespace fusedaccum {

inline const at::Tensor* opt_ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? &*t : nullptr; }

inline bool is_float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

// Everything fusedaccum/ops' check_flat refuses, refused here too: the public op runs these
// kernels without the Python checks (csrc/public_ops.cpp).
// float_dtype = false: any dtype (an int16 remainder), as check_flat(float_dtype=False).
inline void check_like_param(const char* op, const char* what, const at::Tensor& t, const at::Tensor& param,
                             bool float_dtype = true) {
  TORCH_CHECK(t.layout() == at::kStrided && t.dim() == 1 && t.is_contiguous() &&
                  (!float_dtype || is_float_type(t.scalar_type())) && t.numel() == param.numel() &&
                  t.device() == param.device(),
              op, ": ", what, " must be a flat contiguous ", float_dtype ? "float32/bfloat16/float16 " : "",
              "tensor, of the parameter's size and on its device");
}

// The memory-safety checks of an optimizer step kernel, CPU or CUDA: every array (state arrays
// and the copy may be null) flat like the parameter, state in the parameter's dtype, a copy
// only as the bf16/fp16 copy of an fp32 master, and the scalars (null: absent) one-element
// float32 tensors on the parameter's device, since the kernels read them as float.
inline void check_step_tensors(const char* op, const at::Tensor& param, const at::Tensor& grad,
                               std::initializer_list<const at::Tensor*> state, const at::Tensor* param_copy,
                               std::initializer_list<const at::Tensor*> scalars) {
  check_like_param(op, "param", param, param);
  check_like_param(op, "grad", grad, param);
  // An int16 param_copy is the remainder of a bf16 parameter: the two are the fp32 master,
  // and the state is fp32 (master_weights="remainder").
  const bool remainder = param_copy != nullptr && param_copy->scalar_type() == at::kShort;
  const at::ScalarType state_type = remainder ? at::kFloat : param.scalar_type();
  for (const at::Tensor* t : state) {
    if (t == nullptr) continue;
    check_like_param(op, "optimizer state", *t, param);
    TORCH_CHECK(t->scalar_type() == state_type, op, ": optimizer state must have the parameter's dtype (float32 with a remainder)");
  }
  if (remainder) {
    check_like_param(op, "param_copy", *param_copy, param, /*float_dtype=*/false);
    TORCH_CHECK(param.scalar_type() == at::kBFloat16, op, ": an int16 param_copy is the remainder of a bfloat16 parameter");
  } else if (param_copy != nullptr) {
    check_like_param(op, "param_copy", *param_copy, param);
    TORCH_CHECK(param.scalar_type() == at::kFloat &&
                    (param_copy->scalar_type() == at::kBFloat16 || param_copy->scalar_type() == at::kHalf),
                op, ": param_copy is the bf16/fp16 copy of an fp32 master parameter");
  }
  for (const at::Tensor* t : scalars) {
    if (t == nullptr) continue;
    TORCH_CHECK(t->numel() == 1 && t->scalar_type() == at::kFloat && t->device() == param.device(), op,
                ": step, factor and found_inf must be one-element float32 tensors on the parameter's device");
  }
}

// The second half of an optimizer step's weights, its param_copy: none, the bf16/fp16 copy of
// an fp32 master (C is the copy's own type), or the int16 remainder that makes a bf16
// parameter the fp32 master (master_weights="remainder"). copy_t<C> is what param_copy holds.
struct NoCopy {};
struct Remainder {};
template <typename C>
struct CopyStorage {
  using type = C;
};
template <>
struct CopyStorage<Remainder> {
  using type = int16_t;
};
template <typename C>
using copy_t = typename CopyStorage<C>::type;

template <typename T>
struct Type {
  using type = T;
};

// Calls f(Type<P>{}, Type<S>{}, Type<G>{}, Type<C>{}) with the parameter, state and gradient
// types and the copy kind of a step, CPU or CUDA. The state has the parameter's type, except
// beside a remainder (float). Only an fp32 master has a bf16/fp16 copy and only a bf16
// parameter a remainder (check_step_tensors refuses the rest), so only those instantiate
// kernels with one.
template <typename F>
void dispatch_step_types(const at::Tensor& param, const at::Tensor& grad,
                         const std::optional<at::Tensor>& param_copy, F&& f) {
  FUSEDACCUM_DISPATCH_FLOAT_TYPES(param.scalar_type(), "fusedaccum_step", [&] {
    using P = scalar_t;
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "fusedaccum_step_grad", [&] {
      using G = scalar_t;
      if (param_copy.has_value()) {
        if constexpr (std::is_same_v<P, float>) {
          if (param_copy->scalar_type() == at::kBFloat16) return f(Type<P>{}, Type<P>{}, Type<G>{}, Type<c10::BFloat16>{});
          return f(Type<P>{}, Type<P>{}, Type<G>{}, Type<c10::Half>{});
        } else if constexpr (std::is_same_v<P, c10::BFloat16>) {
          return f(Type<P>{}, Type<float>{}, Type<G>{}, Type<Remainder>{});
        }
      }
      f(Type<P>{}, Type<P>{}, Type<G>{}, Type<NoCopy>{});
    });
  });
}

// Every argument check of fusedaccum_C::accumulate, CPU or CUDA: the public op calls the
// compiled kernel without checking in Python first (a list of thousands of gradients), and
// explains a refusal afterwards, so nothing the Python checks refuse may get through here.
inline void check_accumulate_args(const at::Tensor& arena, at::TensorList grads, at::IntArrayRef offsets,
                                  const std::optional<at::Tensor>& sumsq, const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(arena.layout() == at::kStrided && arena.dim() == 1 && arena.is_contiguous() &&
                  is_float_type(arena.scalar_type()),
              "accumulate: the arena must be a flat contiguous float32/bfloat16/float16 tensor");
  TORCH_CHECK(grads.size() == offsets.size(), "accumulate: one offset per gradient");
  const int64_t size = arena.numel();
  const at::Device device = arena.device();
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK(g.layout() == at::kStrided && is_float_type(g.scalar_type()) && g.device() == device,
                "accumulate: gradient ", i, " must be a dense float32/bfloat16/float16 tensor on the arena's device");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] <= size - g.numel(), "accumulate: gradient ", i,
                " does not fit in the arena at offset ", offsets[i]);
  }
  for (const std::optional<at::Tensor>* t : {&sumsq, &found_inf}) {
    TORCH_CHECK(!t->has_value() || ((*t)->device() == device && (*t)->scalar_type() == at::kFloat && (*t)->numel() == 1),
                "accumulate: sumsq and found_inf must be one-element float32 tensors on the arena's device");
  }
}

// True when a `rows` x `cols` block at `offset` fits in `size` elements, without forming
// rows * cols (the Python check has big integers; an int64 product could wrap).
inline bool block_fits(int64_t offset, int64_t rows, int64_t cols, int64_t size) {
  if (offset < 0 || offset > size || rows < 0 || cols < 0) return false;
  return rows == 0 || cols == 0 || rows <= (size - offset) / cols;
}

// Every argument check of fusedaccum/ops/linear_weight_grad.py, for the CPU and CUDA kernels
// (the public op calls them without the Python checks, csrc/public_ops.cpp).
inline void check_linear_weight_grad_args(const at::Tensor& arena, int64_t offset, const at::Tensor& grad_output,
                                          const at::Tensor& input) {
  TORCH_CHECK(arena.layout() == at::kStrided && arena.dim() == 1 && arena.is_contiguous() &&
                  is_float_type(arena.scalar_type()),
              "linear_weight_grad: the arena must be a flat contiguous float32/bfloat16/float16 tensor");
  for (const at::Tensor* t : {&grad_output, &input}) {
    TORCH_CHECK(t->layout() == at::kStrided && t->dim() == 2 && is_float_type(t->scalar_type()) &&
                    t->device() == arena.device(),
                "linear_weight_grad: grad_output and input must be dense 2-D float32/bfloat16/float16 tensors on "
                "the arena's device");
  }
  TORCH_CHECK(grad_output.scalar_type() == input.scalar_type(), "linear_weight_grad: grad_output and input must have one dtype");
  TORCH_CHECK(grad_output.size(0) == input.size(0), "linear_weight_grad: grad_output and input must have the same rows");
  TORCH_CHECK(block_fits(offset, grad_output.size(1), input.size(1), arena.numel()),
              "linear_weight_grad: the weight does not fit in the arena at offset ", offset);
}

// Every argument check of fusedaccum/ops/embedding_weight_grad.py, for the CPU and CUDA kernels.
// The index values are not checked here (that would need their data: a host sync on a GPU).
inline void check_embedding_weight_grad_args(const at::Tensor& arena, int64_t offset, const at::Tensor& indices,
                                             const at::Tensor& grad_output, int64_t num_weights, int64_t padding_idx) {
  TORCH_CHECK(arena.layout() == at::kStrided && arena.dim() == 1 && arena.is_contiguous() &&
                  is_float_type(arena.scalar_type()),
              "embedding_weight_grad: the arena must be a flat contiguous float32/bfloat16/float16 tensor");
  TORCH_CHECK(indices.layout() == at::kStrided && indices.dim() == 1 &&
                  (indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong) &&
                  indices.device() == arena.device(),
              "embedding_weight_grad: indices must be a 1-D int32 or int64 tensor on the arena's device");
  TORCH_CHECK(grad_output.layout() == at::kStrided && grad_output.dim() == 2 &&
                  is_float_type(grad_output.scalar_type()) && grad_output.device() == arena.device(),
              "embedding_weight_grad: grad_output must be a dense 2-D float32/bfloat16/float16 tensor on the arena's "
              "device");
  TORCH_CHECK(indices.size(0) == grad_output.size(0), "embedding_weight_grad: one index per row of grad_output");
  TORCH_CHECK(num_weights >= 0, "embedding_weight_grad: num_weights must be >= 0");
  TORCH_CHECK(padding_idx >= -1 && padding_idx < std::max<int64_t>(num_weights, 1),
              "embedding_weight_grad: padding_idx must be -1 (none) or a row of the table");
  TORCH_CHECK(block_fits(offset, num_weights, grad_output.size(1), arena.numel()),
              "embedding_weight_grad: the table does not fit in the arena at offset ", offset);
}

// Reads a one-element float tensor that lives on the CPU (step count, factor, flag).
inline float read_cpu_scalar(const at::Tensor& t) {
  return t.to(at::kFloat).item<float>();
}

}  // namespace fusedaccum
