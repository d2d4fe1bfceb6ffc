// fusedaccum_C::sgd_step on CPU: one pass over a flat arena for SGD with momentum,
// dampening, nesterov, weight decay and maximize, writing the fp32 master's low-precision
// copy in the same pass when there is one (or the bf16 parameter and int16 remainder that
// are the master together). Nothing is written when found_inf is set.
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

// Momentum and the copy kind are template parameters so that the loops have no conditional
// loads or stores and vectorize (tile.h says why they work on tiles). S is the state's type and
// C the copy kind (dispatch.h dispatch_step_types).
template <typename P, typename S, typename G, typename C, bool kMomentum>
FUSEDACCUM_CPU_CLONES void sgd_loop(P* __restrict param, const G* __restrict grad, S* __restrict momentum_buffer,
              copy_t<C>* __restrict param_copy, int64_t begin, int64_t end,
              float factor, const SgdConstants c) {
  float pt[kTile], gt[kTile];
  float buft[kTile] = {};  // stands in for the buffer without momentum (sgd_element does not read it then)
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    float* p = weights_in<C>(param, param_copy, t, n, pt);
    const float* g = tile_in(grad, t, n, gt);
    float* buf = kMomentum ? tile_in(momentum_buffer, t, n, buft) : buft;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sgd_element(p[j], g[j], buf[j], factor, c);
    weights_out<C>(p, param, param_copy, t, n);
    if constexpr (kMomentum) tile_out(buf, momentum_buffer, t, n);
  }
}

template <typename P, typename S, typename G, typename C>
void sgd_run(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
             const std::optional<at::Tensor>& param_copy, float factor, const SgdConstants& c) {
  P* p = param.data_ptr<P>();
  const G* g = grad.data_ptr<G>();
  S* buf = momentum_buffer.has_value() ? momentum_buffer->data_ptr<S>() : nullptr;
  copy_t<C>* copy = nullptr;
  if constexpr (!std::is_same_v<C, NoCopy>) copy = param_copy->data_ptr<copy_t<C>>();
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    c.momentum != 0.0f ? sgd_loop<P, S, G, C, true>(p, g, buf, copy, begin, end, factor, c)
                       : sgd_loop<P, S, G, C, false>(p, g, buf, copy, begin, end, factor, c);
  });
}

void sgd_step_cpu(const at::Tensor& param, const at::Tensor& grad,
                  const std::optional<at::Tensor>& momentum_buffer,
                  const std::optional<at::Tensor>& param_copy, const at::Tensor& step,
                  const at::Tensor& factor, const std::optional<at::Tensor>& found_inf, double lr,
                  double momentum, double dampening, double weight_decay, bool nesterov,
                  bool maximize) {
  check_step_tensors("sgd_step", param, grad, {opt_ptr(momentum_buffer)}, opt_ptr(param_copy),
                     {&step, &factor, opt_ptr(found_inf)});
  TORCH_CHECK(momentum == 0.0 || momentum_buffer.has_value(), "sgd_step: momentum needs a buffer");
  if (found_inf.has_value() && read_cpu_scalar(*found_inf) != 0.0f) return;

  const SgdConstants c = sgd_constants(read_cpu_scalar(step), lr, momentum, dampening,
                                       weight_decay, nesterov, maximize);
  const float f = read_cpu_scalar(factor);
  dispatch_step_types(param, grad, param_copy, [&](auto p_t, auto s_t, auto g_t, auto c_t) {
    sgd_run<typename decltype(p_t)::type, typename decltype(s_t)::type, typename decltype(g_t)::type,
            typename decltype(c_t)::type>(param, grad, momentum_buffer, param_copy, f, c);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("sgd_step", &sgd_step_cpu); }

}  // namespace fusedaccum
