// fusedaccum_C::adam_step on CPU: one pass over a flat arena updating the parameter (or its
// fp32 master and the low-precision copy, or a bf16 parameter and the int16 remainder that
// make the fp32 master together), exp_avg, exp_avg_sq and, for amsgrad, max_exp_avg_sq.
// Adam and AdamW differ only in decoupled_weight_decay.
//
// step, factor and found_inf are one-element tensors so that the CUDA kernel can read them
// on the device without a host sync; here they are plain CPU reads. When found_inf is set
// nothing is written at all.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>

#include "../dispatch.h"
#include "../elementwise.h"
#include "tile.h"

namespace fusedaccum {
namespace {

constexpr int64_t kGrain = 1 << 14;

// amsgrad and the copy kind are template parameters so that the loops have no conditional
// loads or stores; the options inside adam_element are branch-free selects, so the float loop
// vectorizes (tile.h says why it works on tiles). S is the state's type and C the copy kind
// (dispatch.h dispatch_step_types).
template <typename P, typename S, typename G, typename C, bool kAmsgrad>
FUSEDACCUM_CPU_CLONES void adam_loop(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg, S* __restrict exp_avg_sq,
               S* __restrict max_exp_avg_sq, copy_t<C>* __restrict param_copy,
               int64_t begin, int64_t end, float factor, const AdamConstants c) {
  float pt[kTile], gt[kTile], mt[kTile], vt[kTile];
  float vmaxt[kTile] = {};  // without amsgrad, adam_element still reads max_v (then drops it): zeros, not garbage
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    float* p = weights_in<C>(param, param_copy, t, n, pt);
    const float* g = tile_in(grad, t, n, gt);
    float* m = tile_in(exp_avg, t, n, mt);
    float* v = tile_in(exp_avg_sq, t, n, vt);
    float* vmax = kAmsgrad ? tile_in(max_exp_avg_sq, t, n, vmaxt) : vmaxt;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) adam_element(p[j], g[j], m[j], v[j], vmax[j], factor, c);
    weights_out<C>(p, param, param_copy, t, n);
    tile_out(m, exp_avg, t, n);
    tile_out(v, exp_avg_sq, t, n);
    if constexpr (kAmsgrad) tile_out(vmax, max_exp_avg_sq, t, n);
  }
}

template <typename P, typename S, typename G, typename C>
void adam_run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
              const std::optional<at::Tensor>& max_exp_avg_sq, const std::optional<at::Tensor>& param_copy,
              float factor, const AdamConstants& c) {
  P* p = param.data_ptr<P>();
  const G* g = grad.data_ptr<G>();
  S* m = exp_avg.data_ptr<S>();
  S* v = exp_avg_sq.data_ptr<S>();
  S* vmax = c.amsgrad ? max_exp_avg_sq->data_ptr<S>() : nullptr;
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = param_copy->data_ptr<copy_t<C>>();
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    c.amsgrad ? adam_loop<P, S, G, C, true>(p, g, m, v, vmax, copy, begin, end, factor, c)
              : adam_loop<P, S, G, C, false>(p, g, m, v, vmax, copy, begin, end, factor, c);
  });
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const std::optional<at::Tensor>& param_copy, const at::Tensor& step,
                   const at::Tensor& factor, const std::optional<at::Tensor>& found_inf,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled_weight_decay, bool maximize) {
  check_step_tensors("adam_step", param, grad, {&exp_avg, &exp_avg_sq, opt_ptr(max_exp_avg_sq)},
                     opt_ptr(param_copy), {&step, &factor, opt_ptr(found_inf)});
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (found_inf.has_value() && read_cpu_scalar(*found_inf) != 0.0f) return;

  const AdamConstants c = adam_constants(read_cpu_scalar(step), lr, beta1, beta2, eps, weight_decay,
                                         decoupled_weight_decay, maximize, amsgrad);
  const float f = read_cpu_scalar(factor);
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    adam_run<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
             typename decltype(c_t)::type>(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, param_copy, f, c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

}  // namespace fusedaccum
