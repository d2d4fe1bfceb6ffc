// fusedaccum_C::adam_step on CPU: one pass over a flat arena updating the parameter (or its
// fp32 master and the low-precision copy), exp_avg, exp_avg_sq and, for amsgrad,
// max_exp_avg_sq. Adam and AdamW differ only in decoupled_weight_decay.
//
// step, factor and found_inf are one-element tensors so that the CUDA kernel can read them
// on the device without a host sync; here they are plain CPU reads. When found_inf is set
// nothing is written at all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../dispatch.h"
#include "../elementwise.h"

namespace fusedaccum {
namespace {

constexpr int64_t kGrain = 1 << 14;

template <typename P, typename G, typename C>
void adam_loop(P* param, const G* grad, P* exp_avg, P* exp_avg_sq, P* max_exp_avg_sq,
               C* param_copy, int64_t begin, int64_t end, float factor, const AdamConstants& c) {
  for (int64_t i = begin; i < end; ++i) {
    float p = static_cast<float>(param[i]);
    float m = static_cast<float>(exp_avg[i]);
    float v = static_cast<float>(exp_avg_sq[i]);
    float vmax = c.amsgrad ? static_cast<float>(max_exp_avg_sq[i]) : 0.0f;
    adam_element(p, static_cast<float>(grad[i]), m, v, vmax, factor, c);
    param[i] = static_cast<P>(p);
    exp_avg[i] = static_cast<P>(m);
    exp_avg_sq[i] = static_cast<P>(v);
    if (c.amsgrad) max_exp_avg_sq[i] = static_cast<P>(vmax);
    if (param_copy != nullptr) param_copy[i] = static_cast<C>(p);
  }
}

void adam_step_cpu(const at::Tensor& param, const at::Tensor& grad, const at::Tensor& exp_avg,
                   const at::Tensor& exp_avg_sq, const std::optional<at::Tensor>& max_exp_avg_sq,
                   const std::optional<at::Tensor>& param_copy, const at::Tensor& step,
                   const at::Tensor& factor, const std::optional<at::Tensor>& found_inf,
                   double lr, double beta1, double beta2, double eps, double weight_decay,
                   bool decoupled_weight_decay, bool maximize) {
  const int64_t n = param.numel();
  for (const at::Tensor* t : {&param, &grad, &exp_avg, &exp_avg_sq}) {
    TORCH_CHECK(t->is_contiguous() && t->numel() == n, "adam_step: tensors must be contiguous and of one size");
  }
  TORCH_CHECK(exp_avg.scalar_type() == param.scalar_type() && exp_avg_sq.scalar_type() == param.scalar_type(),
              "adam_step: optimizer state must have the parameter's dtype");
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (amsgrad) {
    TORCH_CHECK(max_exp_avg_sq->is_contiguous() && max_exp_avg_sq->numel() == n &&
                max_exp_avg_sq->scalar_type() == param.scalar_type(), "adam_step: bad max_exp_avg_sq");
  }
  if (param_copy.has_value()) {
    TORCH_CHECK(param_copy->is_contiguous() && param_copy->numel() == n, "adam_step: bad param_copy");
  }
  if (found_inf.has_value() && read_cpu_scalar(*found_inf) != 0.0f) return;

  const AdamConstants c = adam_constants(read_cpu_scalar(step), lr, beta1, beta2, eps, weight_decay,
                                         decoupled_weight_decay, maximize, amsgrad);
  const float f = read_cpu_scalar(factor);
  // With no copy the copy type is irrelevant; float keeps the instantiation count down.
  const at::ScalarType copy_type = param_copy.has_value() ? param_copy->scalar_type() : at::kFloat;

  FUSEDACCUM_DISPATCH_FLOAT_TYPES(param.scalar_type(), "adam_step_cpu", [&] {
    using p_t = scalar_t;
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "adam_step_cpu_grad", [&] {
      using g_t = scalar_t;
      FUSEDACCUM_DISPATCH_FLOAT_TYPES(copy_type, "adam_step_cpu_copy", [&] {
        using c_t = scalar_t;
        p_t* p = param.data_ptr<p_t>();
        const g_t* g = grad.data_ptr<g_t>();
        p_t* m = exp_avg.data_ptr<p_t>();
        p_t* v = exp_avg_sq.data_ptr<p_t>();
        p_t* vmax = amsgrad ? max_exp_avg_sq->data_ptr<p_t>() : nullptr;
        c_t* copy = param_copy.has_value() ? param_copy->data_ptr<c_t>() : nullptr;
        at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
          adam_loop(p, g, m, v, vmax, copy, begin, end, f, c);
        });
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

}  // namespace fusedaccum
