// fusedaccum_C::accumulate on CPU: fold a list of gradients into a flat arena in one
// parallel pass, acc = (first ? 0 : acc) + scale * g, optionally adding the sum of squares
// of the result to `sumsq` and raising `found_inf` when a result is not finite.
//
// The gradients are cut into fixed-size pieces (independent of the thread count) and each
// piece keeps its own double partial, summed in piece order afterwards: the norm is the
// same bit for bit on every run and every machine with the same inputs.
#include <ATen/core/Tensor.h>
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
  if constexpr (std::is_same_v<A, float> && !std::is_same_v<G, c10::Half>) {
    // fp32 arena, fp32 or bf16 gradient (a bf16 load is a shift): one loop over the arrays
    // themselves, no tile copies; the arena holds floats, so no rounding on the store.
#pragma omp simd reduction(+ : sum_sq)
    for (int64_t i = 0; i < n; ++i) {
      acc[i] = accumulate_element(kFirst ? 0.0f : acc[i], load_float(g[i]), scale, kFirst);
      if constexpr (kStats) sum_sq += static_cast<double>(acc[i]) * acc[i];
    }
    return sum_sq;
  }
  float at[kTile], xt[kTile];
  for (int64_t t = 0; t < n; t += kTile) {
    const int64_t len = std::min(kTile, n - t);
    const float* x = tile_in(g, t, len, xt);
    float* a = kFirst ? tile_for_write(acc, t, at) : tile_in(acc, t, len, at);  // the first fold never reads the arena
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) a[j] = accumulate_element(kFirst ? 0.0f : a[j], x[j], scale, kFirst);
    tile_out(a, acc, t, len);
    if constexpr (kStats) {
      a = tile_in(acc, t, len, at);  // the stored (rounded) values, as in L1 now
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
  check_accumulate_args(arena, grads, offsets, sumsq, found_inf);

  // Contiguous gradients are read where they are (no new tensor per gradient: with thousands
  // of small gradients the host work per gradient is what a call costs).
  std::vector<at::Tensor> copies;  // contiguous copies of the others
  std::vector<const void*> data(grads.size());
  std::vector<Piece> pieces;
  int64_t total_elems = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    if (n == 0) continue;
    total_elems += n;
    if (grads[i].is_contiguous()) {
      data[i] = grads[i].const_data_ptr();
    } else {
      copies.push_back(grads[i].contiguous());
      data[i] = copies.back().const_data_ptr();
    }
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
    auto fold_pieces = [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const Piece& pc = pieces[k];
        acc_t* dst = acc + offsets[pc.grad] + pc.begin;
        FUSEDACCUM_DISPATCH_FLOAT_TYPES(grads[pc.grad].scalar_type(), "accumulate_cpu_grad", [&] {
          partial[k] = fold_piece(dst, static_cast<const scalar_t*>(data[pc.grad]) + pc.begin, pc.end - pc.begin,
                                  scale_f, first, stats);
        });
      }
    };
    // Waking the thread pool costs more than folding a few pages.
    if (total_elems < kPiece) {
      fold_pieces(0, static_cast<int64_t>(pieces.size()));
    } else {
      at::parallel_for(0, static_cast<int64_t>(pieces.size()), 1, fold_pieces);
    }
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
