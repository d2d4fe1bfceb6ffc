// fusedaccum_C::embedding_weight_grad on CUDA: an Embedding's weight gradient, rows only, added
// into its arena slice (zeroed first on the window's first contribution).
//
// Deterministic, with no atomics and no host sync:
//   1. a stable sort of the indices (at::sort) gives the row positions grouped by index, each
//      group in row order: one segment per index that occurs;
//   2. a segment starts wherever the sorted index changes; a cumulative count of those starts
//      numbers the segments, and a second pass writes each segment's first position (plus
//      `rows` after the last), so the segment count stays on the device;
//   3. one warp per (segment, 32 columns) sums the segment's grad_output rows in order, in
//      fp32, and updates its table row once (embedding_row_element, shared with the CPU kernel).
// Segments are distinct table rows, so no two warps write one element. The grid is sized from
// the upper bound (one segment per row) and loops over the work the device count says exists.
//
// Out-of-range indices are skipped, not reported (reporting them needs their values on the
// host); the forward embedding lookup has already asserted them on the device. Nothing
// outside the table is ever touched.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/cumsum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "../dispatch.h"
#include "../elementwise.h"
#include "memory.cuh"

namespace fusedaccum {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kRowsInFlight = 4;  // grad_output loads each lane issues before adding them, in order
constexpr int kSegmentBlocksPerSM = 16;  // 16 x 128 threads: a full SM

// is_start[p] = 1 where a segment begins in the sorted order, else 0.
__global__ void mark_segment_starts(const int64_t* sorted, int64_t rows, int64_t* is_start) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < rows;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    is_start[p] = p == 0 || sorted[p] != sorted[p - 1];
  }
}

// starts[s] = first position of segment s, from the running count of starts; starts[count] = rows.
__global__ void write_segment_starts(const int64_t* is_start, const int64_t* count, int64_t rows, int64_t* starts) {
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < rows;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    if (is_start[p]) starts[count[p] - 1] = p;
    if (p == rows - 1) starts[count[p]] = rows;
  }
}

// Work item w is segment w / chunks, columns [32 * (w % chunks), +32). Lane j of a warp owns one
// column: consecutive lanes read consecutive elements of a grad_output row (row_stride apart
// from one row to the next, unit stride along dim).
template <typename A, typename G>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
add_segments_kernel(A* table, const G* grad, int64_t row_stride, int64_t dim, const int64_t* sorted,
                    const int64_t* perm, const int64_t* starts, const int64_t* num_segments, int64_t num_weights,
                    int64_t padding_idx, bool by_freq, float scale) {
  const int64_t chunks = (dim + 31) / 32;
  const int64_t items = *num_segments * chunks;
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; w < items; w += warps) {
    const int64_t seg = w / chunks;
    const int64_t col = (w - seg * chunks) * 32 + lane;
    const int64_t begin = starts[seg];
    const int64_t end = starts[seg + 1];
    const int64_t u = sorted[begin];
    if (u == padding_idx || u < 0 || u >= num_weights || col >= dim) continue;  // no block-wide sync below
    float sum = 0.0f;
    int64_t p = begin;
    for (; p + kRowsInFlight <= end; p += kRowsInFlight) {
      float g[kRowsInFlight];
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) g[k] = load_float(grad[perm[p + k] * row_stride + col]);
#pragma unroll
      for (int k = 0; k < kRowsInFlight; ++k) sum += g[k];  // still one row after another
    }
    for (; p < end; ++p) sum += load_float(grad[perm[p] * row_stride + col]);
    const float count = by_freq ? static_cast<float>(end - begin) : 1.0f;
    A* dst = table + u * dim + col;
    *dst = store_as<A>(embedding_row_element(load_float(*dst), sum, scale, count));
  }
}

void embedding_weight_grad_cuda(const at::Tensor& arena, int64_t offset, const at::Tensor& indices,
                                const at::Tensor& grad_output, int64_t num_weights, int64_t padding_idx,
                                bool scale_grad_by_freq, double scale, bool first) {
  TORCH_CHECK(arena.is_cuda(), "embedding_weight_grad: arena must be a CUDA tensor");
  check_embedding_weight_grad_args(arena, offset, indices, grad_output, num_weights, padding_idx);
  c10::cuda::CUDAGuard guard(arena.device());
  const int64_t rows = indices.size(0);
  const int64_t dim = grad_output.size(1);
  at::Tensor table = arena.narrow(0, offset, num_weights * dim);
  if (first) table.zero_();
  if (rows == 0 || dim == 0 || num_weights == 0) return;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int device = arena.get_device();
  at::Tensor sorted, perm;  // the indices in order, and where each came from (ties in row order)
  std::tie(sorted, perm) = at::sort(indices.to(at::kLong), /*stable=*/true, /*dim=*/0, /*descending=*/false);
  sorted = sorted.contiguous();
  perm = perm.contiguous();
  at::Tensor is_start = at::empty({rows}, sorted.options());
  const int grid = grid_size(rows, device);
  mark_segment_starts<<<grid, kBlockThreads, 0, stream>>>(sorted.const_data_ptr<int64_t>(), rows,
                                                          is_start.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const at::Tensor count = at::cumsum(is_start, 0);  // count[p] = segments begun by position p
  at::Tensor starts = at::empty({rows + 1}, sorted.options());
  write_segment_starts<<<grid, kBlockThreads, 0, stream>>>(is_start.const_data_ptr<int64_t>(),
                                                           count.const_data_ptr<int64_t>(), rows,
                                                           starts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // Rows are read with unit stride along dim; any other layout (a transposed grad_output) is
  // copied once, which costs what one pass over it costs.
  const at::Tensor grad = dim > 1 && grad_output.stride(1) != 1 ? grad_output.contiguous() : grad_output;
  const int64_t row_stride = grad.stride(0);
  const int64_t most_warps = rows * ((dim + 31) / 32);  // one segment per row at most
  const int64_t blocks = std::min<int64_t>((most_warps + kWarpsPerBlock - 1) / kWarpsPerBlock,
                                           static_cast<int64_t>(sm_count(device)) * kSegmentBlocksPerSM);
  const float scale_f = static_cast<float>(scale);

  FUSEDACCUM_DISPATCH_FLOAT_TYPES(arena.scalar_type(), "embedding_weight_grad_cuda", [&] {
    using acc_t = scalar_t;
    FUSEDACCUM_DISPATCH_FLOAT_TYPES(grad.scalar_type(), "embedding_weight_grad_cuda_grad", [&] {
      add_segments_kernel<acc_t, scalar_t><<<static_cast<int>(blocks), kWarpsPerBlock * 32, 0, stream>>>(
          table.data_ptr<acc_t>(), grad.const_data_ptr<scalar_t>(), row_stride, dim,
          sorted.const_data_ptr<int64_t>(), perm.const_data_ptr<int64_t>(), starts.const_data_ptr<int64_t>(),
          count.const_data_ptr<int64_t>() + (rows - 1), num_weights, padding_idx, scale_grad_by_freq, scale_f);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("embedding_weight_grad", &embedding_weight_grad_cuda); }

}  // namespace fusedaccum
