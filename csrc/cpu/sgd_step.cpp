// fusedaccum_C::sgd_step on CPU: one pass over a flat arena for SGD with momentum,
// dampening, nesterov, weight decay and maximize, writing the fp32 master's low-precision
// copy in the same pass when there is one (or the bf16 parameter and int16 remainder that
// are the master together). Nothing is written when found_inf is set.
#include <ATen/ATen.h>
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

// Momentum and the copy are template flags so that the loops have no conditional loads or
// stores and vectorize (tile.h says why they work on tiles). S is the state's type: P's, or
// float when C is int16_t (a bf16 parameter whose remainder makes it the fp32 master).
template <typename P, typename S, typename G, typename C, bool kMomentum, bool kCopy>
FUSEDACCUM_CPU_CLONES void sgd_loop(P* __restrict param, const G* __restrict grad, S* __restrict momentum_buffer,
              C* __restrict param_copy, int64_t begin, int64_t end,
              float factor, const SgdConstants c) {
  if constexpr (std::is_same_v<P, float> && std::is_same_v<G, float>) {
    // fp32 parameter (or master) and gradient: the math runs on the arrays themselves; only
    // the low-precision copy of a master goes through a tile.
    for (int64_t t = begin; t < end; t += kTile) {
      const int64_t stop = std::min(t + kTile, end);
#pragma omp simd
      for (int64_t i = t; i < stop; ++i) {
        float p = param[i];
        float buf = kMomentum ? momentum_buffer[i] : 0.0f;
        sgd_element(p, grad[i], buf, factor, c);
        param[i] = p;
        if constexpr (kMomentum) momentum_buffer[i] = buf;
      }
      if constexpr (kCopy) store_tile(param + t, param_copy + t, stop - t);
    }
    return;
  }
  float p[kTile], g[kTile], buf[kTile];
  for (int64_t t = begin; t < end; t += kTile) {
    const int64_t n = std::min(kTile, end - t);
    load_weights(param, param_copy, t, p, n);
    load_tile(grad + t, g, n);
    if constexpr (kMomentum) load_tile(momentum_buffer + t, buf, n);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) sgd_element(p[j], g[j], buf[j], factor, c);
    store_weights<P, C, kCopy>(p, param, param_copy, t, n);
    if constexpr (kMomentum) store_tile(buf, momentum_buffer + t, n);
  }
}

template <typename P, typename S, typename G, typename C>
void sgd_run(const at::Tensor& param, const at::Tensor& grad, const std::optional<at::Tensor>& momentum_buffer,
             const std::optional<at::Tensor>& param_copy, float factor, const SgdConstants& c) {
  P* p = param.data_ptr<P>();
  const G* g = grad.data_ptr<G>();
  S* buf = momentum_buffer.has_value() ? momentum_buffer->data_ptr<S>() : nullptr;
  C* copy = param_copy.has_value() ? param_copy->data_ptr<C>() : nullptr;
  const bool with_copy = copy != nullptr;
  at::parallel_for(0, param.numel(), kGrain, [&](int64_t begin, int64_t end) {
    if (c.momentum != 0.0f) {
      with_copy ? sgd_loop<P, S, G, C, true, true>(p, g, buf, copy, begin, end, factor, c)
                : sgd_loop<P, S, G, C, true, false>(p, g, buf, copy, begin, end, factor, c);
    } else {
      with_copy ? sgd_loop<P, S, G, C, false, true>(p, g, buf, copy, begin, end, factor, c)
                : sgd_loop<P, S, G, C, false, false>(p, g, buf, copy, begin, end, factor, c);
    }
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
  if (param_copy.has_value() && param_copy->scalar_type() == at::kShort) {
    // master_weights="remainder": bf16 parameter + int16 remainder = the fp32 master; fp32 state.
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "sgd_step_cpu_grad", [&] {
      sgd_run<c10::BFloat16, float, scalar_t, int16_t>(param, grad, momentum_buffer, param_copy, f, c);
    });
    return;
  }
  const at::ScalarType copy_type = param_copy.has_value() ? param_copy->scalar_type() : at::kFloat;
  FUSEDACCUM_DISPATCH_FLOAT_TYPES(param.scalar_type(), "sgd_step_cpu", [&] {
    using p_t = scalar_t;
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "sgd_step_cpu_grad", [&] {
      using g_t = scalar_t;
      FUSEDACCUM_DISPATCH_FLOAT_TYPES(copy_type, "sgd_step_cpu_copy", [&] {
        sgd_run<p_t, p_t, g_t, scalar_t>(param, grad, momentum_buffer, param_copy, f, c);
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("sgd_step", &sgd_step_cpu); }

}  // namespace fusedaccum
