// fusedaccum_C::embedding_weight_grad on CPU: an Embedding's weight gradient, rows only, added
// into its arena slice (zeroed first on the window's first contribution).
//
// Deterministic by construction: the row positions are stably sorted by index, so each index
// owns one segment of positions in row order; a segment's grad_output rows are summed in fp32
// in that order, and its table row is updated once (embedding_row_element, shared with the CUDA
// kernel), rounded once to the arena dtype. Segments are distinct table rows, so threads can
// take whole segments with no races and no atomics, and the result does not depend on the
// thread count.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "../dispatch.h"
#include "../elementwise.h"
#include "tile.h"

namespace fusedaccum {
namespace {

constexpr int64_t kGrainElements = 1 << 15;  // grad_output elements per thread's share, at least

// Segments [begin, end): segment s is positions order[starts[s]] .. order[starts[s + 1] - 1]
// of grad_output, every one with the index index[order[starts[s]]]. `sum` holds dim floats.
template <typename A, typename G>
FUSEDACCUM_CPU_CLONES void add_segments(A* __restrict table, const G* __restrict grad, int64_t row_stride,
                                        int64_t dim, const int64_t* index, const int64_t* order,
                                        const int64_t* starts, int64_t begin, int64_t end, int64_t padding_idx,
                                        bool by_freq, float scale, float* __restrict sum) {
  for (int64_t s = begin; s < end; ++s) {
    const int64_t first_pos = starts[s];
    const int64_t end_pos = starts[s + 1];
    const int64_t u = index[order[first_pos]];
    if (u == padding_idx) continue;
    std::fill(sum, sum + dim, 0.0f);
    for (int64_t p = first_pos; p < end_pos; ++p) {  // row order: the sum is the same every run
      const G* __restrict g = grad + order[p] * row_stride;
#pragma omp simd
      for (int64_t j = 0; j < dim; ++j) sum[j] += load_float(g[j]);
    }
    const float count = by_freq ? static_cast<float>(end_pos - first_pos) : 1.0f;
    A* __restrict row = table + u * dim;
#pragma omp simd
    for (int64_t j = 0; j < dim; ++j) row[j] = store_as<A>(embedding_row_element(load_float(row[j]), sum[j], scale, count));
  }
}

void embedding_weight_grad_cpu(const at::Tensor& arena, int64_t offset, const at::Tensor& indices,
                               const at::Tensor& grad_output, int64_t num_weights, int64_t padding_idx,
                               bool scale_grad_by_freq, double scale, bool first) {
  check_embedding_weight_grad_args(arena, offset, indices, grad_output, num_weights, padding_idx);
  const int64_t rows = indices.size(0);
  const int64_t dim = grad_output.size(1);
  const at::Tensor index = indices.to(at::kLong).contiguous();  // no copy for contiguous int64
  const int64_t* idx = index.const_data_ptr<int64_t>();
  // Before anything is written: a refused call leaves the arena as it was.
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_INDEX(idx[r] >= 0 && idx[r] < num_weights, "embedding_weight_grad: index ", idx[r],
                      " is out of range for a table of ", num_weights, " rows");
  }
  at::Tensor table = arena.narrow(0, offset, num_weights * dim);
  if (first) table.zero_();
  if (rows == 0 || dim == 0) return;

  // Positions sorted by index, ties in row order; a segment starts wherever the index changes.
  std::vector<int64_t> order(rows);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [idx](int64_t a, int64_t b) { return idx[a] < idx[b]; });
  std::vector<int64_t> starts;
  for (int64_t p = 0; p < rows; ++p) {
    if (p == 0 || idx[order[p]] != idx[order[p - 1]]) starts.push_back(p);
  }
  const int64_t num_segments = static_cast<int64_t>(starts.size());
  starts.push_back(rows);

  // Rows are read with unit stride along dim; any other layout (a transposed grad_output) is
  // copied once, which costs what one pass over it costs.
  const at::Tensor grad = dim > 1 && grad_output.stride(1) != 1 ? grad_output.contiguous() : grad_output;
  const int64_t row_stride = grad.stride(0);
  // A thread's share is at least kGrainElements of grad_output on average; below one share the
  // pool is not woken.
  const int64_t per_segment = std::max<int64_t>(1, rows / num_segments * dim);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / per_segment);
  const float scale_f = static_cast<float>(scale);

  FUSEDACCUM_DISPATCH_FLOAT_TYPES(arena.scalar_type(), "embedding_weight_grad_cpu", [&] {
    using acc_t = scalar_t;
    acc_t* tp = table.data_ptr<acc_t>();
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "embedding_weight_grad_cpu_grad", [&] {
      const scalar_t* gp = grad.const_data_ptr<scalar_t>();
      auto run = [&](int64_t begin, int64_t end) {
        std::vector<float> sum(dim);
        add_segments(tp, gp, row_stride, dim, idx, order.data(), starts.data(), begin, end, padding_idx,
                     scale_grad_by_freq, scale_f, sum.data());
      };
      if (rows * dim < kGrainElements) {
        run(0, num_segments);
      } else {
        at::parallel_for(0, num_segments, grain, run);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CPU, m) { m.impl("embedding_weight_grad", &embedding_weight_grad_cpu); }

}  // namespace fusedaccum
