// Per-element math shared by the C++ CPU kernels (csrc/cpu) and the CUDA kernels (csrc/cuda).
//
// Everything here is a C10_HOST_DEVICE inline function on floats, so the math the CUDA
// kernels run is the same code the CPU kernels run (and CI tests) on machines without a GPU.
// Loads and stores convert to and from float once; all arithmetic is in fp32, as torch.optim
// does for fp32 tensors. The formulas follow torch.optim's single-tensor implementations
// operation by operation, so results agree with torch.optim to fp32 rounding.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace fusedaccum {

C10_HOST_DEVICE inline bool is_finite(float x) {
  // x - x is 0 for finite x and NaN for +-inf or NaN; works under fast-math, unlike isfinite.
  return (x - x) == 0.0f;
}

// One element of a micro-batch fold: acc = (first ? 0 : acc) + scale * g.
// The first micro-batch of a window overwrites, so the arena never needs zeroing.
C10_HOST_DEVICE inline float accumulate_element(float acc, float g, float scale, bool first) {
  return first ? scale * g : acc + scale * g;
}

// One element of an embedding row's update (embedding_weight_grad): the row's fp32 sum over the
// rows of grad_output that hit it, divided by their count under scale_grad_by_freq (count = 1
// otherwise: an exact division), scaled, added to what the arena holds. On a window's first
// contribution the table is zeroed beforehand, so old is 0 there, as in the reference.
C10_HOST_DEVICE inline float embedding_row_element(float old, float sum, float scale, float count) {
  return old + (sum / count) * scale;
}

// Step-wide Adam constants, computed once per launch from the (device-side) step count in
// double precision, as torch.optim computes them in Python floats.
struct AdamConstants {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;  // 1 - beta rounded once from double, as torch.optim's Python floats are
  float one_minus_beta2;
  float eps;
  float grad_sign;              // -1 to maximize, else 1 (exact either way)
  float coupled_weight_decay;   // Adam's L2 term; 0 for AdamW (g + 0 * p == g exactly)
  float decay_factor;           // AdamW's 1 - lr * weight_decay; 1 for Adam (p * 1 == p exactly)
  float step_size;              // lr / (1 - beta1^step)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^step)
  bool amsgrad;
};

C10_HOST_DEVICE inline AdamConstants adam_constants(
    double step, double lr, double beta1, double beta2, double eps, double weight_decay,
    bool decoupled, bool maximize, bool amsgrad) {
  AdamConstants c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.eps = static_cast<float>(eps);
  c.grad_sign = maximize ? -1.0f : 1.0f;
  c.coupled_weight_decay = decoupled ? 0.0f : static_cast<float>(weight_decay);
  c.decay_factor = decoupled ? static_cast<float>(1.0 - lr * weight_decay) : 1.0f;
  c.step_size = static_cast<float>(lr / (1.0 - pow(beta1, step)));
  c.bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(beta2, step)));
  c.amsgrad = amsgrad;
  return c;
}

// One Adam/AdamW element. g is the raw accumulated gradient; factor folds 1/N (or
// 1/items), the inverse loss scale and the clip coefficient into one multiply.
// max_v is read and written only when c.amsgrad. No branch depends on the data or on the
// options except amsgrad (the options are folded into exact multiplies by 1 and adds of 0), so
// the CPU loops vectorize.
C10_HOST_DEVICE inline void adam_element(
    float& p, float g, float& m, float& v, float& max_v, float factor, const AdamConstants& c) {
  g = g * factor * c.grad_sign;
  g += c.coupled_weight_decay * p;  // torch: grad = grad.add(param, alpha=weight_decay)
  p *= c.decay_factor;              // torch (AdamW): param.mul_(1 - lr * weight_decay)
  m += (g - m) * c.one_minus_beta1;  // torch: exp_avg.lerp_(grad, 1 - beta1)
  v = v * c.beta2 + c.one_minus_beta2 * g * g;
  const float running_max = max_v > v ? max_v : v;  // a NaN in v propagates, as torch.maximum does
  max_v = c.amsgrad ? running_max : max_v;            // selects, not branches: the loops vectorize
  const float denom = sqrtf(c.amsgrad ? running_max : v) / c.bias_correction2_sqrt + c.eps;
  p += -c.step_size * (m / denom);
}

struct SgdConstants {
  float lr;
  float momentum;
  float one_minus_dampening;
  float weight_decay;
  float grad_sign;   // -1 to maximize, else 1
  bool nesterov;
  bool first_step;  // torch.optim starts the momentum buffer as a copy of the gradient
};

C10_HOST_DEVICE inline SgdConstants sgd_constants(
    double step, double lr, double momentum, double dampening, double weight_decay,
    bool nesterov, bool maximize) {
  SgdConstants c;
  c.lr = static_cast<float>(lr);
  c.momentum = static_cast<float>(momentum);
  c.one_minus_dampening = static_cast<float>(1.0 - dampening);
  c.weight_decay = static_cast<float>(weight_decay);
  c.nesterov = nesterov;
  c.grad_sign = maximize ? -1.0f : 1.0f;
  c.first_step = step <= 1.0;  // the count already includes this step
  return c;
}

// One SGD element; buf is read and written only when c.momentum != 0.
C10_HOST_DEVICE inline void sgd_element(
    float& p, float g, float& buf, float factor, const SgdConstants& c) {
  g = g * factor * c.grad_sign;
  g += c.weight_decay * p;  // exact no-op when weight_decay == 0
  if (c.momentum != 0.0f) {
    buf = c.first_step ? g : buf * c.momentum + c.one_minus_dampening * g;
    g = c.nesterov ? g + c.momentum * buf : buf;
  }
  p += -c.lr * g;
}

// Lion (Chen et al. 2023): the update is the sign of an interpolation of the momentum and the
// gradient; the momentum then moves toward the gradient with the second beta.
struct LionConstants {
  float lr;
  float beta1;
  float beta2;
  float one_minus_beta1;
  float one_minus_beta2;
  float decay_factor;  // 1 - lr * weight_decay (decoupled, as AdamW)
  float grad_sign;     // -1 to maximize, else 1
};

C10_HOST_DEVICE inline LionConstants lion_constants(double lr, double beta1, double beta2, double weight_decay,
                                                    bool maximize) {
  LionConstants c;
  c.lr = static_cast<float>(lr);
  c.beta1 = static_cast<float>(beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  c.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
  c.grad_sign = maximize ? -1.0f : 1.0f;
  return c;
}

// sign(x) with sign(0) = 0 and NaN kept (as torch.sign), by selects, not branches.
C10_HOST_DEVICE inline float sign_of(float x) {
  const float s = static_cast<float>(x > 0.0f) - static_cast<float>(x < 0.0f);
  return x != x ? x : s;
}

// One Lion element: c = beta1 * m + (1 - beta1) * g; p = p * (1 - lr * wd) - lr * sign(c);
// m = beta2 * m + (1 - beta2) * g.
C10_HOST_DEVICE inline void lion_element(float& p, float g, float& m, float factor, const LionConstants& c) {
  g = g * factor * c.grad_sign;
  const float interp = c.beta1 * m + c.one_minus_beta1 * g;
  p *= c.decay_factor;
  p += -c.lr * sign_of(interp);
  m = c.beta2 * m + c.one_minus_beta2 * g;
}

// fp32 -> bf16 rounding to nearest even without a branch (c10::BFloat16's constructor tests
// for NaN with a branch, which keeps CPU loops scalar). Same bits as c10's.
C10_HOST_DEVICE inline c10::BFloat16 to_bf16(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = static_cast<uint16_t>((x != x) ? 0x7FC0u : rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// master_weights="remainder": a bf16 parameter and an int16 remainder are together its fp32
// master, bit for bit. The remainder is the master's low 16 bits; the bf16 is its high half,
// rounded half up in magnitude (so it is the master rounded to nearest, ties aside, and its
// sign bit says whether it was rounded up: reconstruction subtracts that one back).
// Every non-NaN float survives split then merge exactly (an fp32 near FLT_MAX shows as an
// infinite bf16, as rounding to nearest does); a NaN stays a NaN, its payload not kept.
C10_HOST_DEVICE inline float merge_remainder(uint16_t hi, int16_t rem) {
  // Sign-extended: a negative remainder adds 0xFFFF0000 + low, i.e. takes one off the high half.
  const uint32_t u = (static_cast<uint32_t>(hi) << 16) + static_cast<uint32_t>(static_cast<int32_t>(rem));
  float x;
  memcpy(&x, &u, sizeof(x));
  return x;
}

C10_HOST_DEVICE inline void split_remainder(float x, uint16_t& hi, int16_t& rem) {
  uint32_t u;
  memcpy(&u, &x, sizeof(u));
  rem = static_cast<int16_t>(static_cast<uint16_t>(u & 0xFFFFu));
  const uint32_t up = (u >> 16) + ((u >> 15) & 1u);  // no carry past 16 bits: that top half is a NaN's
  hi = static_cast<uint16_t>((x != x) ? ((u >> 16) | 0x0040u) : up);  // selects: CPU loops vectorize
}

// storage type -> float, vectorizable on CPU (bf16 is the top half of an fp32).
C10_HOST_DEVICE inline float load_float(float x) { return x; }
C10_HOST_DEVICE inline float load_float(c10::Half x) { return static_cast<float>(x); }
C10_HOST_DEVICE inline float load_float(c10::BFloat16 x) {
  const uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  memcpy(&f, &u, sizeof(f));
  return f;
}

// float -> storage type T, vectorizable on CPU.
template <typename T>
C10_HOST_DEVICE inline T store_as(float x) {
  return static_cast<T>(x);
}
template <>
C10_HOST_DEVICE inline c10::BFloat16 store_as<c10::BFloat16>(float x) {
  return to_bf16(x);
}

}  // namespace fusedaccum
