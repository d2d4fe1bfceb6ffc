// The compiled entry of the public ops (public_ops.cpp), registered for CPU there and for
// CUDA in csrc/cuda/accumulate.cu, and the backend choice that Python pushes to it.
#pragma once

#include <torch/library.h>

#include <string>

namespace fusedaccum {

torch::CppFunction public_op_kernel();

// The ops whose CPU (and CUDA) kernel is public_op_kernel().
inline constexpr const char* kPublicOps[] = {"accumulate", "adam_step", "sgd_step", "lion_step",
                                             "linear_weight_grad", "embedding_weight_grad"};

// "" (the defaults), or the name fusedaccum.set_backend() forced.
void set_forced_backend(const std::string& name);

}  // namespace fusedaccum
