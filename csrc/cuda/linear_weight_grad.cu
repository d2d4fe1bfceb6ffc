// fusedaccum_C::linear_weight_grad on CUDA: a Linear layer's weight gradient written straight
// into its arena slice, W = (first ? 0 : W) + scale * grad_output^T @ input, by one cuBLAS GEMM
// that accumulates in fp32 (the GEMM of Megatron-LM's gradient_accumulation_fusion): beta = 0
// on the window's first contribution, so what W held (NaN included) is never read, beta = 1
// after. bf16/fp16 inputs go in as they are (cublasGemmEx reads 16-bit A and B into an fp32
// C), so nothing is widened or rounded before the sum. An fp32 arena is C itself; a bf16/fp16
// arena gets an fp32 temporary (W widened, unless first) rounded into it once at the end.
//
// cublasGemmEx rather than at::cuda::blas::gemm: libtorch_cuda does not export the latter, and
// aten::addmm's out_dtype overload is not stable across torch versions in what `self` may be.
// The handle is torch's (current stream, torch's workspace, and torch's TF32 setting for fp32
// inputs through its math mode), so the call is ordered and capturable like torch's own GEMMs.
// cublasGemmEx itself resolves through libtorch_cuda's own dependency on libcublas.
//
// cuBLAS is column-major. The row-major out x in W is the column-major in x out matrix
// W^T = input^T @ grad_output, so that is the product asked for: m = in, n = out, k = rows,
// ldc = in. Each input is read in place when it is row-major or column-major with a usable
// leading dimension (a transposed activation included) and copied only otherwise.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/cuda/Exceptions.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>

#include "../dispatch.h"

namespace fusedaccum {
namespace {

// A rows x cols tensor as cuBLAS can read it: element [r][c] at data + r * ld + c (row-major)
// or at data + r + c * ld (column-major), ld within cuBLAS's int.
struct Operand {
  const char* data;
  bool row_major;
  int64_t ld;
};

// Reads t in place when its strides allow, else a contiguous copy of it (kept alive in `keep`).
// A size-1 dimension's stride is meaningless (torch leaves it arbitrary), so it is ignored.
Operand operand_of(const at::Tensor& t, at::Tensor& keep) {
  const int64_t rows = t.size(0), cols = t.size(1);
  const int64_t s0 = t.stride(0), s1 = t.stride(1);
  const char* data = static_cast<const char*>(t.const_data_ptr());
  if ((s1 == 1 || cols == 1) && (rows == 1 || (s0 >= std::max<int64_t>(1, cols) && s0 <= INT_MAX))) {
    return {data, true, rows == 1 ? std::max<int64_t>(1, cols) : s0};
  }
  if ((s0 == 1 || rows == 1) && (cols == 1 || (s1 >= std::max<int64_t>(1, rows) && s1 <= INT_MAX))) {
    return {data, false, cols == 1 ? std::max<int64_t>(1, rows) : s1};
  }
  keep = t.contiguous();
  return {static_cast<const char*>(keep.const_data_ptr()), true, std::max<int64_t>(1, cols)};
}

cudaDataType_t cuda_type(at::ScalarType t) {
  return t == at::kFloat ? CUDA_R_32F : t == at::kBFloat16 ? CUDA_R_16BF : CUDA_R_16F;
}

void linear_weight_grad_cuda(const at::Tensor& arena, int64_t offset, const at::Tensor& grad_output,
                             const at::Tensor& input, double scale, bool first) {
  TORCH_CHECK(arena.is_cuda(), "linear_weight_grad: arena must be a CUDA tensor");
  check_linear_weight_grad_args(arena, offset, grad_output, input);
  c10::cuda::CUDAGuard guard(arena.device());
  const int64_t rows = grad_output.size(0);
  const int64_t out_features = grad_output.size(1);
  const int64_t in_features = input.size(1);
  if (out_features == 0 || in_features == 0) return;
  at::Tensor weight = arena.narrow(0, offset, out_features * in_features).view({out_features, in_features});
  if (rows == 0) {  // an empty sum: the first contribution is zeros, a later one adds nothing
    if (first) weight.zero_();
    return;
  }
  TORCH_CHECK(out_features <= INT_MAX && in_features <= INT_MAX,
              "linear_weight_grad: a weight dimension over 2^31 - 1 is more than cuBLAS takes");

  at::Tensor keep_x, keep_dy;
  const Operand x = operand_of(input, keep_x);
  const Operand dy = operand_of(grad_output, keep_dy);
  at::Tensor acc = weight;
  if (weight.scalar_type() != at::kFloat) {
    acc = first ? at::empty({out_features, in_features}, weight.options().dtype(at::kFloat)) : weight.to(at::kFloat);
  }

  // op(A) = input^T (in x rows): a row-major input is that matrix column-major; a column-major
  // one is its transpose. op(B) = grad_output (rows x out): the other way round.
  const cublasOperation_t trans_a = x.row_major ? CUBLAS_OP_N : CUBLAS_OP_T;
  const cublasOperation_t trans_b = dy.row_major ? CUBLAS_OP_T : CUBLAS_OP_N;
  const cudaDataType_t in_type = cuda_type(input.scalar_type());
  const int64_t elem = input.element_size();
  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  const float alpha = static_cast<float>(scale);
  // k is an int in cuBLAS: more rows than that are summed in slices, all into the fp32 C.
  for (int64_t r0 = 0; r0 < rows; r0 += INT_MAX) {
    const int64_t k = std::min<int64_t>(INT_MAX, rows - r0);
    const float beta = first && r0 == 0 ? 0.0f : 1.0f;
    const char* a = x.data + (x.row_major ? r0 * x.ld : r0) * elem;
    const char* b = dy.data + (dy.row_major ? r0 * dy.ld : r0) * elem;
    TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, trans_a, trans_b, static_cast<int>(in_features),
                                      static_cast<int>(out_features), static_cast<int>(k), &alpha, a, in_type,
                                      static_cast<int>(x.ld), b, in_type, static_cast<int>(dy.ld), &beta,
                                      acc.data_ptr<float>(), CUDA_R_32F, static_cast<int>(in_features),
                                      CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (!acc.is_same(weight)) weight.copy_(acc);  // the one rounding to the arena dtype (to nearest even)
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("linear_weight_grad", &linear_weight_grad_cuda); }

}  // namespace fusedaccum
