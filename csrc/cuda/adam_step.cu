// fusedaccum_C::adam_step on CUDA: one pass over a flat arena updating the parameter (or its
// fp32 master and the low-precision copy, or a bf16 parameter and the int16 remainder that
// make the fp32 master together), exp_avg, exp_avg_sq and, for amsgrad, max_exp_avg_sq.
// Adam and AdamW differ only in decoupled_weight_decay.
//
// step, factor and found_inf are read by the kernel itself, so an optimizer step never waits
// on the host (and the step count can live on the device). Every thread derives the step
// constants on its own: a few double ops per thread beat a second launch or a host read.
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

struct AdamArgs {
  double lr, beta1, beta2, eps, weight_decay;
  bool decoupled, maximize, amsgrad;
};

// S is the state's type: P's, or float with a remainder (C = Remainder, P = bf16).
template <typename P, typename S, typename G, typename C>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSM)
adam_kernel(P* param, const G* grad, S* exp_avg, S* exp_avg_sq, S* max_exp_avg_sq, copy_t<C>* param_copy,
            int64_t n, int64_t head, const float* step, const float* factor, const float* found_inf,
            AdamArgs a) {
  if (found_inf != nullptr && *found_inf != 0.0f) return;  // skipped step: write nothing
  const AdamConstants c = adam_constants(*step, a.lr, a.beta1, a.beta2, a.eps, a.weight_decay,
                                         a.decoupled, a.maximize, a.amsgrad);
  const float f = *factor;

  auto scalar = [&](int64_t i) {
    float p = load_weight<C>(param, param_copy, i);
    float m = static_cast<float>(exp_avg[i]);
    float v = static_cast<float>(exp_avg_sq[i]);
    float vmax = c.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
    adam_element(p, static_cast<float>(grad[i]), m, v, vmax, f, c);
    store_weight<C>(param, param_copy, i, p);
    exp_avg[i] = static_cast<S>(m);
    exp_avg_sq[i] = static_cast<S>(v);
    if (c.amsgrad) max_exp_avg_sq[i] = static_cast<S>(vmax);
  };
  auto vec = [&](int64_t i) {
    float p[kVec], g[kVec], m[kVec], v[kVec], vmax[kVec];
    load_weights<C>(param, param_copy, i, p);
    load_vec_ro(grad + i, g);
    load_vec(exp_avg + i, m);
    load_vec(exp_avg_sq + i, v);
    if (c.amsgrad) {
      load_vec(max_exp_avg_sq + i, vmax);
    } else {
#pragma unroll
      for (int j = 0; j < kVec; ++j) vmax[j] = 0.0f;
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) adam_element(p[j], g[j], m[j], v[j], vmax[j], f, c);
    store_weights<C>(param, param_copy, i, p);
    store_vec(exp_avg + i, m);
    store_vec(exp_avg_sq + i, v);
    if (c.amsgrad) store_vec(max_exp_avg_sq + i, vmax);
  };
  split_loop<kVec>(n, head, static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x,
                   static_cast<int64_t>(gridDim.x) * blockDim.x, vec, scalar);
}

struct AdamTensors {
  at::Tensor param, grad, exp_avg, exp_avg_sq;
  std::optional<at::Tensor> max_exp_avg_sq, param_copy;
  at::Tensor step, factor;
  std::optional<at::Tensor> found_inf;
};

template <typename T>
T* ptr_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

template <typename P, typename S, typename G, typename C>
void launch(const AdamTensors& t, const AdamArgs& a) {
  const int64_t n = t.param.numel();
  P* p = t.param.data_ptr<P>();
  const G* g = t.grad.data_ptr<G>();
  S* m = t.exp_avg.data_ptr<S>();
  S* v = t.exp_avg_sq.data_ptr<S>();
  S* vmax = ptr_or_null<S>(t.max_exp_avg_sq);
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = t.param_copy->data_ptr<copy_t<C>>();
  // Vectorize from where the parameter is 16-byte aligned if every other arena is aligned
  // there too; arena views at odd offsets fall back to scalar accesses throughout.
  int64_t head = align_head(p, n);
  const bool together = aligned16(g + head) && aligned16(m + head) && aligned16(v + head) &&
                        (vmax == nullptr || aligned16(vmax + head)) && (copy == nullptr || aligned16(copy + head));
  if (!together) head = n;
  const int grid = grid_size((n + kVec - 1) / kVec, t.param.get_device());
  adam_kernel<P, S, G, C><<<grid, kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p, g, m, v, vmax, copy, n, head, t.step.data_ptr<float>(), t.factor.data_ptr<float>(),
      ptr_or_null<float>(t.found_inf), a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void adam_step_cuda(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                    const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                    const std::optional<at::Tensor>& param_copy, const at::Tensor& step,
                    const at::Tensor& factor, const std::optional<at::Tensor>& found_inf,
                    double lr, double beta1, double beta2, double eps, double weight_decay,
                    bool decoupled_weight_decay, bool maximize) {
  TORCH_CHECK(param.is_cuda(), "adam_step: param must be a CUDA tensor");
  const int64_t n = param.numel();
  check_step_tensors("adam_step", param, grad, {&exp_avg, &exp_avg_sq, opt_ptr(max_exp_avg_sq)},
                     opt_ptr(param_copy), {&step, &factor, opt_ptr(found_inf)});
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (n == 0) return;
  c10::cuda::CUDAGuard guard(param.device());

  const AdamTensors t{param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, step, factor, found_inf};
  const AdamArgs a{lr, beta1, beta2, eps, weight_decay, decoupled_weight_decay, maximize, amsgrad};
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    launch<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
           typename decltype(c_t)::type>(t, a);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("adam_step", &adam_step_cuda); }

}  // namespace fusedaccum
