// The dtypes fusedaccum kernels take (fp32, bf16, fp16) and a dispatch macro over them.
// Shared by the CPU and CUDA host code; the Python op layer rejects other dtypes with a
// message before any kernel runs, the TORCH_CHECKs here only guard memory safety.
#pragma once

#include <ATen/Dispatch.h>

#define FUSEDACCUM_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                    \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                           \
                     AT_DISPATCH_CASE(at::ScalarType::Float, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::ScalarType::BFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::ScalarType::Half, __VA_ARGS__))

namespace fusedaccum {

// Reads a one-element float tensor that lives on the CPU (step count, factor, flag).
inline float read_cpu_scalar(const at::Tensor& t) {
  return t.to(at::kFloat).item<float>();
}

}  // namespace fusedaccum
