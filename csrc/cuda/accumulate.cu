// fusedaccum_C::accumulate on CUDA: fold a list of gradients into a flat arena,
// acc = (first ? 0 : acc) + scale * g, in one launch per gradient dtype (and per 1,000
// gradients), optionally adding the sum of squares of the result to `sumsq` and raising
// `found_inf` when it is not finite.
//
// The gradients stay where they are. Their table (address, numel, arena offset, first chunk)
// travels as the kernel's parameter (a __grid_constant__ struct of up to ~28 KB, which CUDA
// 12.1+ allows), so a call copies nothing from the host: no pinned staging, no H2D copy, and
// under CUDA graph capture the table is part of the captured kernel node, owned by the graph.
// A block finds its chunk's gradient by binary search over the first-chunk prefix (uniform
// across the block, so the reads are constant-cache broadcasts).
//
// The statistics never use atomics on the sum: each thread keeps a double, each block writes
// its partial to a workspace, and the last block to finish adds the partials in block order.
// Grid and chunking depend only on the inputs and the SM count, so the result is identical
// from run to run. Launches of one call chain their totals through a double in the
// workspace; the last one updates sumsq and found_inf. The workspace comes from the caching
// allocator on the current stream and is zeroed with cudaMemsetAsync (both capturable).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../dispatch.h"
#include "../public_ops.h"
#include "../elementwise.h"
#include "memory.cuh"

namespace fusedaccum {
namespace {

constexpr int kVec = 8;                 // elements per vector step (16 or 32 bytes per tensor)
constexpr int64_t kMaxChunk = 1 << 16;  // elements per chunk for large inputs
constexpr int64_t kMinChunk = 1 << 12;  // smaller chunks cost more table than they balance
constexpr int64_t kChunksPerBlock = 4;  // chunks are shrunk until each block gets about this many
constexpr int kMaxRows = 1000;          // gradients per launch: keeps the table under 32 KB of parameters

struct Row {
  const void* data;
  int64_t numel;
  int64_t arena_offset;
};

// The kernel's parameter: rows [0, num_rows), row r owns chunks [first_chunk[r], first_chunk[r + 1]).
struct Table {
  Row rows[kMaxRows];
  int32_t first_chunk[kMaxRows + 1];
  int32_t num_rows;
};
static_assert(sizeof(Table) < 28 * 1024, "kernel parameters must stay under CUDA's 32 KB");

struct Stats {
  double* partials;          // one per block of this launch; nullptr when no statistics
  unsigned long long* done;  // blocks of this launch whose partial is written
  double* total;             // running total over this call's launches, starts at 0
  float* sumsq;              // nullable
  float* found_inf;          // nullable
  bool last_launch;
};

template <typename A>
__device__ __forceinline__ float rounded(float x) {
  return static_cast<float>(static_cast<A>(x));
}

// The block's threads fold one chunk: n elements of src into dst. Returns this thread's
// sum of squares of the values it stored (0 unless stats).
template <typename A, typename G, bool kFirst>
__device__ __forceinline__ double fold_chunk(A* dst, const G* src, int64_t n, float scale, bool stats) {
  // Arena views sit at arbitrary offsets: vectorize only when both sides align together.
  int64_t head = align_head(dst, n);
  if (!aligned16(src + head)) head = n;
  double sq = 0.0;
  auto scalar = [&](int64_t i) {
    const float prev = kFirst ? 0.0f : static_cast<float>(dst[i]);
    const A out = static_cast<A>(accumulate_element(prev, static_cast<float>(src[i]), scale, kFirst));
    dst[i] = out;
    if (stats) {
      const double q = static_cast<float>(out);
      sq += q * q;
    }
  };
  auto vec = [&](int64_t i) {
    float g[kVec];
    float acc[kVec];
    load_vec_ro(src + i, g);
    if constexpr (kFirst) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) acc[j] = 0.0f;  // first never reads the arena
    } else {
      load_vec(dst + i, acc);
    }
#pragma unroll
    for (int j = 0; j < kVec; ++j) acc[j] = rounded<A>(accumulate_element(acc[j], g[j], scale, kFirst));
    store_vec(dst + i, acc);  // exact: acc already holds A values
    if (stats) {
#pragma unroll
      for (int j = 0; j < kVec; ++j) sq += static_cast<double>(acc[j]) * acc[j];
    }
  };
  split_loop<kVec>(n, head, threadIdx.x, blockDim.x, vec, scalar);
  return sq;
}

// Called by every thread of every block once its chunks are done.
__device__ void finish_stats(double thread_sq, const Stats& s) {
  __shared__ bool last_block;
  const double block = block_sum(thread_sq);
  if (threadIdx.x == 0) {
    s.partials[blockIdx.x] = block;
    __threadfence();  // the partial is visible device-wide before the count admits it
    last_block = atomicAdd(s.done, 1ull) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last_block) return;
  __threadfence();
  double v = 0.0;
  for (int64_t b = threadIdx.x; b < gridDim.x; b += blockDim.x) v += __ldcg(s.partials + b);  // L2, not a stale L1
  const double launch_total = block_sum(v);
  if (threadIdx.x != 0) return;
  const double total = __ldcg(s.total) + launch_total;
  if (!s.last_launch) {
    *s.total = total;  // the next launch on this stream picks it up
    return;
  }
  if (s.sumsq != nullptr) *s.sumsq += static_cast<float>(total);
  // Squares of finite floats cannot overflow a double, so a non-finite total means a
  // non-finite element. (x - x) == 0 is the finiteness test that survives fast-math.
  if (s.found_inf != nullptr && !((total - total) == 0.0)) *s.found_inf = 1.0f;
}

// The row whose chunks include chunk c (first_chunk is increasing, first_chunk[0] = 0).
__device__ __forceinline__ int find_row(const Table& t, int32_t c) {
  int lo = 0, hi = t.num_rows - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (t.first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename A, typename G, bool kFirst>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSM)
accumulate_kernel(A* arena, const __grid_constant__ Table table, int64_t chunk_len, float scale, Stats stats) {
  const bool want_stats = stats.partials != nullptr;
  const int32_t num_chunks = table.first_chunk[table.num_rows];
  double sq = 0.0;
  for (int32_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int r = find_row(table, c);
    const Row& row = table.rows[r];
    // int64 before the multiply: a gradient may pass 2^31 elements.
    const int64_t start = static_cast<int64_t>(c - table.first_chunk[r]) * chunk_len;
    const int64_t left = row.numel - start;
    const int64_t n = left < chunk_len ? left : chunk_len;
    const G* src = static_cast<const G*>(row.data) + start;
    sq += fold_chunk<A, G, kFirst>(arena + row.arena_offset + start, src, n, scale, want_stats);
  }
  if (want_stats) finish_stats(sq, stats);
}

struct Launch {
  at::ScalarType grad_type;
  size_t begin, end;  // gradients [begin, end) of the call's dtype-ordered list
  int grid;
  int64_t stats_at;  // workspace word of this launch's partials, then its `done` counter
};

template <typename A, typename G>
void launch(const Table& table, int grid, A* arena, int64_t chunk_len, float scale, bool first,
            const Stats& stats, cudaStream_t stream) {
  if (first) {
    accumulate_kernel<A, G, true><<<grid, kBlockThreads, 0, stream>>>(arena, table, chunk_len, scale, stats);
  } else {
    accumulate_kernel<A, G, false><<<grid, kBlockThreads, 0, stream>>>(arena, table, chunk_len, scale, stats);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void accumulate_cuda(const at::Tensor& arena, at::TensorList grads, at::IntArrayRef offsets,
                     double scale, bool first, const std::optional<at::Tensor>& sumsq,
                     const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(arena.is_cuda(), "accumulate: arena must be a CUDA tensor");
  check_accumulate_args(arena, grads, offsets, sumsq, found_inf);
  c10::cuda::CUDAGuard guard(arena.device());

  // The non-empty gradients in launch order (fp32, bf16, fp16: a fixed order, so the sum of
  // squares adds up the same way every time). Contiguous ones are read where they are; the
  // others are copied, and the copies live until the launches are queued (the caching
  // allocator orders their reuse after them on this stream).
  std::vector<at::Tensor> copies;
  std::vector<Row> rows;
  std::vector<at::ScalarType> types;
  int64_t total_elems = 0;
  for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
    for (size_t i = 0; i < grads.size(); ++i) {
      const at::Tensor& g = grads[i];
      const int64_t n = g.numel();
      if (g.scalar_type() != t || n == 0) continue;
      const void* data = g.const_data_ptr();
      if (!g.is_contiguous()) {
        copies.push_back(g.contiguous());
        data = copies.back().const_data_ptr();
      }
      rows.push_back({data, n, offsets[i]});
      types.push_back(t);
      total_elems += n;
    }
  }
  if (rows.empty()) {
    if (sumsq.has_value()) sumsq->add_(0.0);  // as the CPU kernel does (turns -0 into +0)
    return;
  }
  const bool stats = sumsq.has_value() || found_inf.has_value();

  // Fixed-size chunks keep the chunk count low for big arenas; small inputs get smaller
  // chunks so that every SM still has work.
  const int device = arena.get_device();
  const int64_t most_blocks = static_cast<int64_t>(sm_count(device)) * kBlocksPerSM;
  int64_t chunk_len = kMaxChunk;
  while (chunk_len > kMinChunk && total_elems / chunk_len < most_blocks * kChunksPerBlock) chunk_len /= 2;

  // One launch per run of at most kMaxRows gradients of one dtype.
  std::vector<Launch> launches;
  for (size_t i = 0; i < rows.size();) {
    Launch l{types[i], i, i, 0, 0};
    int64_t chunks = 0;
    while (l.end < rows.size() && types[l.end] == l.grad_type && l.end - l.begin < static_cast<size_t>(kMaxRows)) {
      chunks += (rows[l.end].numel + chunk_len - 1) / chunk_len;
      ++l.end;
    }
    TORCH_CHECK(chunks < (int64_t{1} << 31), "accumulate: too many chunks in one launch");
    l.grid = static_cast<int>(std::min<int64_t>(chunks, most_blocks));
    launches.push_back(l);
    i = l.end;
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Workspace: per launch its partials and done counter, then the running total.
  at::Tensor workspace;
  int64_t* w = nullptr;
  int64_t total_at = 0;
  if (stats) {
    int64_t words = 0;
    for (Launch& l : launches) {
      l.stats_at = words;
      words += l.grid + 1;
    }
    total_at = words++;
    workspace = at::empty({words}, arena.options().dtype(at::kLong));
    w = workspace.data_ptr<int64_t>();
    C10_CUDA_CHECK(cudaMemsetAsync(w, 0, words * sizeof(int64_t), stream));  // counters 0, totals 0.0
  }

  const float scale_f = static_cast<float>(scale);
  Table table;
  FUSEDACCUM_DISPATCH_FLOAT_TYPES(arena.scalar_type(), "accumulate_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* acc = arena.data_ptr<acc_t>();
    for (size_t k = 0; k < launches.size(); ++k) {
      const Launch& l = launches[k];
      table.num_rows = static_cast<int32_t>(l.end - l.begin);
      int32_t chunk = 0;
      for (size_t r = l.begin; r < l.end; ++r) {
        table.rows[r - l.begin] = rows[r];
        table.first_chunk[r - l.begin] = chunk;
        chunk += static_cast<int32_t>((rows[r].numel + chunk_len - 1) / chunk_len);
      }
      table.first_chunk[table.num_rows] = chunk;
      Stats s{nullptr, nullptr, nullptr, nullptr, nullptr, false};
      if (stats) {
        s.partials = reinterpret_cast<double*>(w + l.stats_at);
        s.done = reinterpret_cast<unsigned long long*>(w + l.stats_at + l.grid);
        s.total = reinterpret_cast<double*>(w + total_at);
        s.sumsq = sumsq.has_value() ? sumsq->data_ptr<float>() : nullptr;
        s.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
        s.last_launch = k + 1 == launches.size();
      }
      FUSEDACCUM_DISPATCH_FLOAT_TYPES(l.grad_type, "accumulate_cuda_grad", [&] {
        launch<acc_t, scalar_t>(table, l.grid, acc, chunk_len, scale_f, first, s, stream);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("accumulate", &accumulate_cuda); }

// The public op's compiled entry on CUDA (csrc/public_ops.cpp).
TORCH_LIBRARY_IMPL(fusedaccum, CUDA, m) {
  for (const char* op : kPublicOps) m.impl(op, public_op_kernel());
}

}  // namespace fusedaccum
