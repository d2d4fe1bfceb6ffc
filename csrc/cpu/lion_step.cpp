// fusedaccum_C::lion_step on CPU: one pass over a flat arena for Lion (decoupled weight decay,
// maximize), writing the fp32 master's low-precision copy in the same pass when there is one.
// Nothing is written when found_inf is set.
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

// The copy kind is a template parameter so that the loops have no conditional stores and
// vectorize (tile.h says why they work on tiles). S is the state's type and C the copy kind
// (dispatch.h dispatch_step_types).
template <typename P, typename S, typename G, typename C>
FUSEDACCUM_CPU_CLONES void lion_loop(P* __restrict param, const G* __restrict grad, S* __restrict exp_avg,
                                     copy_t<C>* __restrict param_copy, int64_t begin, int64_t end, float factor,
                                     const LionConstants c) {
  float pt[kTile], gt[kTile], mt[kTile];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    float* p = weights_in<C>(param, param_copy, t, n, pt);
    const float* g = tile_in(grad, t, n, gt);
    float* m = tile_in(exp_avg, t, n, mt);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) lion_element(p[j], g[j], m[j], factor, c);
    weights_out<C>(p, param, param_copy, t, n);
    tile_out(m, exp_avg, t, n);
  }
}

template <typename P, typename S, typename G, typename C>
void lion_run(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
              const std::optional<at::Tensor>& param_copy, float factor, const LionConstants& c) {
  P* p = param.data_ptr<P>();
  const G* g = grad.data_ptr<G>();
  S* m = exp_avg.data_ptr<S>();
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = param_copy->data_ptr<copy_t<C>>();
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    lion_loop<P, S, G, C>(p, g, m, copy, begin, end, factor, c);
  });
}

void lion_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const std::optional<at::Tensor>& param_copy, const at::Tensor& factor,
                   const std::optional<at::Tensor>& found_inf, double lr, double beta1, double beta2,
                   double weight_decay, bool maximize) {
  check_step_tensors("lion_step", param, grad, {&exp_avg}, opt_ptr(param_copy), {&factor, opt_ptr(found_inf)});
  if (found_inf.has_value() && read_cpu_scalar(*found_inf) != 0.0f) return;

  const LionConstants c = lion_constants(lr, beta1, beta2, weight_decay, maximize);
  const float f = read_cpu_scalar(factor);
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    lion_run<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
             typename decltype(c_t)::type>(param, grad, exp_avg, param_copy, f, c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("lion_step", &lion_step_cpu); }

}  // namespace fusedaccum
