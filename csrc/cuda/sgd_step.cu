// fusedaccum_C::sgd_step on CUDA: one pass over a flat arena for SGD with momentum,
// dampening, nesterov, weight decay and maximize, writing the fp32 master's low-precision
// copy in the same pass when there is one. An int16 param_copy is instead the remainder that
// with the bf16 parameter makes the fp32 master (fp32 buffer). Nothing is written when
// found_inf is set.
//
// As in adam_step.cu, step, factor and found_inf are read on the device: whether the
// momentum buffer starts as a copy of the gradient is decided there, from the step count.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <type_traits>

#include "../dispatch.h"
#include "../elementwise.h"
#include "memory.cuh"

namespace fusedaccum {
namespace {

constexpr int kVec = 8;  // elements per vector step: one 16-byte access for bf16/half, two for fp32

struct SgdArgs {
  double lr, momentum, dampening, weight_decay;
  bool nesterov, maximize;
};

// S is the buffer's type: P's, or float with a remainder (C = Remainder, P = bf16).
template <typename P, typename S, typename G, typename C>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSM)
sgd_kernel(P* param, const G* grad, S* momentum_buffer, copy_t<C>* param_copy, int64_t n, int64_t head,
           const float* step, const float* factor, const float* found_inf, SgdArgs a) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: write nothing
  const SgdConstants c = sgd_constants(*step, a.lr, a.momentum, a.dampening, a.weight_decay,
                                       a.nesterov, a.maximize);
  const float f = *factor;
  const bool has_buf = c.momentum != 0.0f;  // the buffer is touched only with momentum, as on CPU

  auto scalar = [&](int64_t i) {
    float p = load_weight<C>(param, param_copy, i);
    float buf = has_buf ? static_cast<float>(momentum_buffer[i]) : 0.0f;
    sgd_element(p, static_cast<float>(grad[i]), buf, f, c);
    store_weight<C>(param, param_copy, i, p);
    if (has_buf) momentum_buffer[i] = static_cast<S>(buf);
  };
  auto vec = [&](int64_t i) {
    float p[kVec], g[kVec], buf[kVec];
    load_weights<C>(param, param_copy, i, p);
    load_vec_ro(grad + i, g);
    if (has_buf) {
      load_vec(momentum_buffer + i, buf);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) buf[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) sgd_element(p[j], g[j], buf[j], f, c);
    store_weights<C>(param, param_copy, i, p);
    if (has_buf) store_vec(momentum_buffer + i, buf);
  };
  split_loop<kVec>(n, head, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * blockDim.x, vec, scalar);
}

struct SgdTensors {
  at::Tensor param, grad;
  std::optional<at::Tensor> momentum_buffer, param_copy;
  at::Tensor step, factor;
  std::optional<at::Tensor> found_inf;
};

template <typename P, typename S, typename G, typename C>
void launch(const SgdTensors& t, const SgdArgs& a) {
  const int64_t n = t.param.numel();
  P* p = t.param.data_ptr<P>();
  const G* g = t.grad.data_ptr<G>();
  // An unused buffer stays out of the kernel, so it cannot spoil the alignment either.
  S* buf = a.momentum != 0.0 ? t.momentum_buffer->data_ptr<S>() : nullptr;
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = t.param_copy->data_ptr<copy_t<C>>();
  // Vectorize from where the parameter is 16-byte aligned if every other arena is aligned
  // there too; arena views at odd offsets fall back to scalar accesses throughout.
  int64_t head = align_head(p, n);
  const bool together = aligned16(g + head) && (buf == nullptr || aligned16(buf + head)) &&
                        (copy == nullptr || aligned16(copy + head));
  if (!together) head = n;
  const int grid = grid_size((n + kVec - 1) / kVec, t.param.get_device());
  const float* found_inf = t.found_inf.has_value() ? t.found_inf->data_ptr<float>() : nullptr;
  sgd_kernel<P, S, G, C><<<grid, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, g, buf, copy, n, head, t.step.data_ptr<float>(), t.factor.data_ptr<float>(), found_inf, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void sgd_step_cuda(const at::Tensor& param, const at::Tensor& grad,
                   const std::optional<at::Tensor>& momentum_buffer,
                   const std::optional<at::Tensor>& param_copy, const at::Tensor& step,
                   const at::Tensor& factor, const std::optional<at::Tensor>& found_inf, double lr,
                   double momentum, double dampening, double weight_decay, bool nesterov,
                   bool maximize) {
  TORCH_CHECK(param.is_cuda(), "sgd_step: param must be a CUDA tensor");
  const int64_t n = param.numel();
  check_step_tensors("sgd_step", param, grad, {opt_ptr(momentum_buffer)}, opt_ptr(param_copy),
                     {&step, &factor, opt_ptr(found_inf)});
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "sgd_step: momentum needs a buffer");
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(param.device());

  const SgdTensors t{param, grad, momentum_buffer, param_copy, step, factor, found_inf};
  const SgdArgs a{lr, momentum, dampening, weight_decay, nesterov, maximize};
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    launch<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
           typename decltype(c_t)::type>(t, a);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("sgd_step", &sgd_step_cuda); }

}  // namespace fusedaccum
