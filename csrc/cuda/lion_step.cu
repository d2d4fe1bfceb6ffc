// fusedaccum_C::lion_step on CUDA: one pass over a flat arena for Lion (decoupled weight decay,
// maximize), writing the fp32 master's low-precision copy in the same pass when there is one.
// An int16 param_copy is instead the remainder that with the bf16 parameter makes the fp32
// master (fp32 exp_avg). Nothing is written when found_inf is set. factor and found_inf are
// read on the device.
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

// S is exp_avg's type: P's, or float with a remainder (C = Remainder, P = bf16).
template <typename P, typename S, typename G, typename C>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSM)
lion_kernel(P* param, const G* grad, S* exp_avg, copy_t<C>* param_copy, int64_t n, int64_t head, const float* factor,
            const float* found_inf, LionConstants c) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: write nothing
  const float f = *factor;

  auto scalar = [&](int64_t i) {
    float p = load_weight<C>(param, param_copy, i);
    float m = static_cast<float>(exp_avg[i]);
    lion_element(p, static_cast<float>(grad[i]), m, f, c);
    store_weight<C>(param, param_copy, i, p);
    exp_avg[i] = static_cast<S>(m);
  };
  auto vec = [&](int64_t i) {
    float p[kVec], g[kVec], m[kVec];
    load_weights<C>(param, param_copy, i, p);
    load_vec_ro(grad + i, g);
    load_vec(exp_avg + i, m);
#pragma unroll
    for (int j = 0; j < kVec; ++j) lion_element(p[j], g[j], m[j], f, c);
    store_weights<C>(param, param_copy, i, p);
    store_vec(exp_avg + i, m);
  };
  split_loop<kVec>(n, head, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * blockDim.x, vec, scalar);
}

struct LionTensors {
  at::Tensor param, grad, exp_avg;
  std::optional<at::Tensor> param_copy;
  at::Tensor factor;
  std::optional<at::Tensor> found_inf;
};

template <typename P, typename S, typename G, typename C>
void launch(const LionTensors& t, const LionConstants& c) {
  const int64_t n = t.param.numel();
  P* p = t.param.data_ptr<P>();
  const G* g = t.grad.data_ptr<G>();
  S* m = t.exp_avg.data_ptr<S>();
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = t.param_copy->data_ptr<copy_t<C>>();
  // Vectorize from where the parameter is 16-byte aligned if every other arena is aligned
  // there too; arena views at odd offsets fall back to scalar accesses throughout.
  int64_t head = align_head(p, n);
  const bool together = aligned16(g + head) && aligned16(m + head) && (copy == nullptr || aligned16(copy + head));
  if (!together) head = n;
  const int grid = grid_size((n + kVec - 1) / kVec, t.param.get_device());
  const float* found_inf = t.found_inf.has_value() ? t.found_inf->data_ptr<float>() : nullptr;
  lion_kernel<P, S, G, C><<<grid, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, g, m, copy, n, head, t.factor.data_ptr<float>(), found_inf, c);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void lion_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const std::optional<at::Tensor>& param_copy, const at::Tensor& factor,
                    const std::optional<at::Tensor>& found_inf, double lr, double beta1, double beta2,
                    double weight_decay, bool maximize) {
  TORCH_CHECK(param.is_cuda(), "lion_step: param must be a CUDA tensor");
  check_step_tensors("lion_step", param, grad, {&exp_avg}, opt_ptr(param_copy), {&factor, opt_ptr(found_inf)});
  if (param.numel() == 0) return;
  c10::cuda::CUDAGuard guard(param.device());

  const LionTensors t{param, grad, exp_avg, param_copy, factor, found_inf};
  const LionConstants c = lion_constants(lr, beta1, beta2, weight_decay, maximize);
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    launch<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
           typename decltype(c_t)::type>(t, c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("lion_step", &lion_step_cuda); }

}  // namespace fusedaccum
