// fusedaccum_C::accumulate on CPU: fold a list of gradients into a flat arena in one
// parallel pass, acc = (first ? 0 : acc) + scale * g, optionally adding the sum of squares
// of the result to `sumsq` and raising `found_inf` when a result is not finite.
//
// The gradients are cut into fixed-size pieces (independent of the thread count) and each
// piece keeps its own double partial, summed in piece order afterwards: the norm is the
// same bit for bit on every run and every machine with the same inputs.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../dispatch.h"
#include "../elementwise.h"
#include "tile.h"

namespace fusedaccum {
namespace {

constexpr int64_t kPiece = 1 << 15;  // elements per work item

struct Piece {
  int64_t grad;   // index into the gradient list
  int64_t begin;  // element range inside that gradient
  int64_t end;
};

// A double partial of squares never overflows from finite floats (max float^2 ~ 1e77), so a
// non-finite partial means a non-finite element: the flag comes for free from the sum.
template <typename A, typename G, bool kFirst, bool kStats>
FUSEDACCUM_CPU_CLONES double fold(A* acc, const G* g, int64_t n, float scale) {
  double sum_sq = 0.0;
  if constexpr (std::is_same_v<A, float> && std::is_same_v<G, float>) {
    // All fp32: one loop over the arrays themselves, no tile copies.
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = accumulate_element(kFirst ? 0.0f : acc[i], g[i], scale, kFirst);
      if constexpr (kStats) sum_sq += static_cast<double>(acc[i]) * acc[i];
    }
    return sum_sq;
  }
  float a[kTile], x[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    load_tile(g + t, x, len);
    if constexpr (!kFirst) load_tile(acc + t, a, len);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) a[j] = accumulate_element(kFirst ? 0.0f : a[j], x[j], scale, kFirst);
    store_tile(a, acc + t, len);
    if constexpr (kStats) {
      load_tile(acc + t, a, len);  // the stored (rounded) values, as in L1 now
#pragma omp simd reduction(+ : sum_sq)
      for (int64_t j = 0; j < len; ++j) sum_sq += static_cast<double>(a[j]) * a[j];
    }
  }
  return sum_sq;
}

template <typename A, typename G>
double fold_piece(A* acc, const G* g, int64_t n, float scale, bool first, bool stats) {
  if (first) {
    return stats ? fold<A, G, true, true>(acc, g, n, scale) : fold<A, G, true, false>(acc, g, n, scale);
  }
  return stats ? fold<A, G, false, true>(acc, g, n, scale) : fold<A, G, false, false>(acc, g, n, scale);
}

void accumulate_cpu(const at::Tensor& arena, at::TensorList grads, at::IntArrayRef offsets,
                    double scale, bool first, const std::optional<at::Tensor>& sumsq,
                    const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(arena.is_contiguous() && arena.dim() == 1, "accumulate: arena must be a flat contiguous tensor");
  TORCH_CHECK(grads.size() == offsets.size(), "accumulate: one offset per gradient");

  std::vector<at::Tensor> flat;  // contiguous views (a copy only for non-contiguous grads)
  std::vector<Piece> pieces;
  flat.reserve(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] + n <= arena.numel(), "accumulate: gradient ", i,
                " does not fit in the arena at offset ", offsets[i]);
    flat.push_back(grads[i].contiguous().view(-1));
    for (int64_t b = 0; b < n; b += kPiece) {
      pieces.push_back({static_cast<int64_t>(i), b, std::min(n, b + kPiece)});
    }
  }
  const bool stats = sumsq.has_value() || found_inf.has_value();
  std::vector<double> partial(pieces.size(), 0.0);
  const float scale_f = static_cast<float>(scale);

  FUSEDACCUM_DISPATCH_FLOAT_TYPES(arena.scalar_type(), "accumulate_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* acc = arena.data_ptr<acc_t>();
    at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Piece& pc = pieces[k];
        const at::Tensor& g = flat[pc.grad];
        acc_t* dst = acc + offsets[pc.grad] + pc.begin;
        FUSEDACCUM_DISPATCH_FLOAT_TYPES(g.scalar_type(), "accumulate_cpu_grad", [&] {
          partial[k] = fold_piece(dst, g.data_ptr<scalar_t>() + pc.begin, pc.end - pc.begin,
                                  scale_f, first, stats);
        });
      }
    });
  });

  if (!stats) return;
  double total = 0.0;
  for (double p : partial) total += p;
  if (sumsq.has_value()) sumsq->add_(total);
  if (found_inf.has_value() && !std::isfinite(total)) found_inf->fill_(1.0);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("accumulate", &accumulate_cpu); }

}  // namespace fusedaccum
