// fusedaccum_C::linear_weight_grad on CPU: a Linear layer's weight gradient written straight
// into its arena slice, W = (first ? 0 : W) + scale * grad_output^T @ input, by one fp32 GEMM
// with beta = 0 on the window's first contribution (so what W held, NaN included, is never
// read) and beta = 1 after.
//
// The GEMM is torch's (at::addmm_out, MKL or OpenBLAS underneath), which reads transposed and
// strided inputs in place where BLAS can and copies them only where it cannot, and writes a
// row-major W without a copy. torch's CPU BLAS layer has bf16 x bf16 -> fp32 and fp16 x fp16
// -> fp32 GEMMs (at::native::cpublas::gemm), but libtorch_cpu does not export them (only their
// dispatch stubs), and aten::addmm's out_dtype overload has no CPU kernel. So 16-bit inputs are
// widened to fp32 first: exact, and rows x (out + in) elements, little next to the
// rows x out x in GEMM. An fp32 arena is the GEMM's output itself; a bf16/fp16 arena gets an
// fp32 temporary (W widened, unless first) that is rounded into it once at the end.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/addmm.h>
#include <torch/library.h>

#include "../dispatch.h"

namespace fusedaccum {
namespace {

void linear_weight_grad_cpu(const at::Tensor& arena, int64_t offset, const at::Tensor& grad_output,
                            const at::Tensor& input, double scale, bool first) {
  check_linear_weight_grad_args(arena, offset, grad_output, input);
  const int64_t out_features = grad_output.size(1);
  const int64_t in_features = input.size(1);
  if (out_features == 0 || in_features == 0) return;
  at::Tensor weight = arena.narrow(0, offset, out_features * in_features).view({out_features, in_features});
  if (grad_output.size(0) == 0) {  // an empty sum: the first contribution is zeros, a later one adds nothing
    if (first) weight.zero_();
    return;
  }

  // .to() keeps the strides of a dense tensor, so a transposed input stays transposed and
  // addmm still reads it without a second copy.
  const at::Tensor dy = grad_output.scalar_type() == at::kFloat ? grad_output : grad_output.to(at::kFloat);
  const at::Tensor x = input.scalar_type() == at::kFloat ? input : input.to(at::kFloat);
  at::Tensor acc = weight;
  if (weight.scalar_type() != at::kFloat) {
    acc = first ? at::empty({out_features, in_features}, weight.options().dtype(at::kFloat)) : weight.to(at::kFloat);
  }
  at::addmm_out(acc, acc, dy.t(), x, /*beta=*/first ? 0.0 : 1.0, /*alpha=*/scale);
  if (!acc.is_same(weight)) weight.copy_(acc);  // the one rounding to the arena dtype (to nearest even)
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("linear_weight_grad", &linear_weight_grad_cpu); }

}  // namespace fusedaccum
