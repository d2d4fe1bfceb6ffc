// fusedaccum_C::accumulate on CUDA: fold a list of gradients into a flat arena,
// acc = (first ? 0 : acc) + scale * g, in one launch per gradient dtype, optionally adding
// the sum of squares of the result to `sumsq` and raising `found_inf` when it is not finite.
//
// The gradients stay where they are: the host writes a table of (pointer, numel, arena
// offset) rows and (row, start) chunks into pinned memory and ships it with one async copy,
// so the gradient count is unbounded (no 4 KB kernel-parameter table as in apex's
// multi_tensor_apply) and nothing waits on the host. Each block takes chunks grid-stride.
//
// The statistics never use atomics on the sum: each thread keeps a double, each block writes
// its partial to the table, and the last block to finish adds the partials in block order.
// Grid and chunking depend only on the inputs and the SM count, so the result is identical
// from run to run. Launches of one call (one per grad dtype) chain their totals through a
// double in the table; the last one updates sumsq and found_inf.
//
// Under CUDA graph capture the table copy becomes a graph node that re-reads the same pinned
// host block on every replay (which also re-zeroes the counters), so captured tables are kept
// for the life of the process, as the Triton backend does.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <mutex>
#include <vector>

#include "../dispatch.h"
#include "../elementwise.h"
#include "memory.cuh"

namespace fusedaccum {
namespace {

constexpr int kVec = 8;                 // elements per vector step (16 or 32 bytes per tensor)
constexpr int64_t kMaxChunk = 1 << 16;  // elements per chunk for large inputs
constexpr int64_t kMinChunk = 1 << 12;  // smaller chunks cost more table than they balance
constexpr int64_t kChunksPerBlock = 4;  // chunks are shrunk until each block gets about this many
constexpr int kRowWords = 3;            // table row: grad data pointer, numel, arena offset
constexpr int kChunkWords = 2;          // table chunk: row index, first element in that row

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

template <typename A, typename G, bool kFirst>
__global__ void __launch_bounds__(kBlockThreads, kBlocksPerSM)
accumulate_kernel(A* arena, const int64_t* rows, const int64_t* chunks, int64_t num_chunks,
                  int64_t chunk_len, float scale, Stats stats) {
  const bool want_stats = stats.partials != nullptr;
  double sq = 0.0;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const int64_t* chunk = chunks + c * kChunkWords;
    const int64_t* row = rows + chunk[0] * kRowWords;
    const int64_t start = chunk[1];
    const int64_t left = row[1] - start;
    const int64_t n = left < chunk_len ? left : chunk_len;
    const G* src = reinterpret_cast<const G*>(row[0]) + start;
    sq += fold_chunk<A, G, kFirst>(arena + row[2] + start, src, n, scale, want_stats);
  }
  if (want_stats) finish_stats(sq, stats);
}

struct Launch {
  at::ScalarType grad_type;
  int64_t first_chunk;  // into the chunk list
  int64_t num_chunks;
  int grid;
  int64_t stats_at;  // table word of this launch's partials, then its `done` counter
};

template <typename A, typename G>
void launch(const Launch& l, A* arena, const int64_t* rows, const int64_t* chunks, int64_t chunk_len,
            float scale, bool first, const Stats& stats, cudaStream_t stream) {
  const int64_t* mine = chunks + l.first_chunk * kChunkWords;
  if (first) {
    accumulate_kernel<A, G, true><<<l.grid, kBlockThreads, 0, stream>>>(arena, rows, mine, l.num_chunks,
                                                                       chunk_len, scale, stats);
  } else {
    accumulate_kernel<A, G, false><<<l.grid, kBlockThreads, 0, stream>>>(arena, rows, mine, l.num_chunks,
                                                                        chunk_len, scale, stats);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void keep_for_graph_replays(const at::Tensor& pinned) {
  static std::mutex mutex;
  static auto* kept = new std::vector<at::Tensor>();  // never freed: no exit-time teardown race
  std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(pinned);
}

void check_flag(const std::optional<at::Tensor>& t, const at::Tensor& arena, const char* what) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == arena.device() && t->scalar_type() == at::kFloat && t->numel() == 1,
              "accumulate: ", what, " must be a one-element float32 tensor on the arena's device");
}

void accumulate_cuda(const at::Tensor& arena, at::TensorList grads, at::IntArrayRef offsets,
                     double scale, bool first, const std::optional<at::Tensor>& sumsq,
                     const std::optional<at::Tensor>& found_inf) {
  TORCH_CHECK(arena.is_cuda(), "accumulate: arena must be a CUDA tensor");
  TORCH_CHECK(arena.is_contiguous() && arena.dim() == 1, "accumulate: arena must be a flat contiguous tensor");
  TORCH_CHECK(grads.size() == offsets.size(), "accumulate: one offset per gradient");
  check_flag(sumsq, arena, "sumsq");
  check_flag(found_inf, arena, "found_inf");
  c10::cuda::CUDAGuard guard(arena.device());

  std::vector<at::Tensor> flat;  // keeps the copies of non-contiguous grads alive until launch
  flat.reserve(grads.size());
  int64_t total_elems = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    const int64_t n = g.numel();
    TORCH_CHECK(g.device() == arena.device(), "accumulate: gradient ", i, " is not on the arena's device");
    const at::ScalarType t = g.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, "accumulate: gradient ", i,
                " must be float32, bfloat16 or float16");
    TORCH_CHECK(offsets[i] >= 0 && offsets[i] <= arena.numel() - n, "accumulate: gradient ", i,
                " does not fit in the arena at offset ", offsets[i]);
    flat.push_back(g.contiguous());
    total_elems += n;
  }
  const bool stats = sumsq.has_value() || found_inf.has_value();

  // Fixed-size chunks keep the table short for big arenas; small inputs get smaller chunks
  // so that every SM still has work.
  const int device = arena.get_device();
  const int64_t most_blocks = static_cast<int64_t>(sm_count(device)) * kBlocksPerSM;
  int64_t chunk_len = kMaxChunk;
  while (chunk_len > kMinChunk && total_elems / chunk_len < most_blocks * kChunksPerBlock) chunk_len /= 2;

  // One launch per grad dtype, in a fixed dtype order so the sum order is fixed too.
  std::vector<int64_t> rows;
  std::vector<int64_t> chunks;
  std::vector<Launch> launches;
  for (at::ScalarType t : {at::kFloat, at::kBFloat16, at::kHalf}) {
    Launch l{t, static_cast<int64_t>(chunks.size()) / kChunkWords, 0, 0, 0};
    for (size_t i = 0; i < flat.size(); ++i) {
      const int64_t n = flat[i].numel();
      if (flat[i].scalar_type() != t || n == 0) continue;
      const int64_t row = static_cast<int64_t>(rows.size()) / kRowWords;
      rows.insert(rows.end(), {static_cast<int64_t>(reinterpret_cast<intptr_t>(flat[i].data_ptr())), n, offsets[i]});
      for (int64_t start = 0; start < n; start += chunk_len) chunks.insert(chunks.end(), {row, start});
    }
    l.num_chunks = static_cast<int64_t>(chunks.size()) / kChunkWords - l.first_chunk;
    if (l.num_chunks == 0) continue;
    l.grid = static_cast<int>(std::min(l.num_chunks, most_blocks));
    launches.push_back(l);
  }
  if (launches.empty()) {
    if (sumsq.has_value()) sumsq->add_(0.0);  // as the CPU kernel does (turns -0 into +0)
    return;
  }

  // Table: rows, chunks, then per launch its partials and done counter, then the total.
  const int64_t chunks_at = static_cast<int64_t>(rows.size());
  int64_t words = chunks_at + static_cast<int64_t>(chunks.size());
  const int64_t zeros_at = words;
  if (stats) {
    for (Launch& l : launches) {
      l.stats_at = words;
      words += l.grid + 1;
    }
  }
  const int64_t total_at = words++;
  // Under graph capture: a plain host tensor, kept for the process's life, because pinning
  // may query events to recycle blocks, which global-mode capture forbids, and every replay
  // copies from this address again.
  const bool capturing = c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
  at::Tensor host = at::empty({words}, at::TensorOptions().dtype(at::kLong).pinned_memory(!capturing));
  int64_t* h = host.data_ptr<int64_t>();
  std::memcpy(h, rows.data(), rows.size() * sizeof(int64_t));
  std::memcpy(h + chunks_at, chunks.data(), chunks.size() * sizeof(int64_t));
  std::fill(h + zeros_at, h + words, int64_t{0});  // counters 0, total 0.0 (all-zero bits)
  // Pinned + non_blocking: an async copy on the current stream; the caching host allocator
  // keeps `host` from being reused until that copy has run (but not until a graph is gone).
  if (capturing) keep_for_graph_replays(host);
  const at::Tensor table = host.to(arena.device(), at::kLong, /*non_blocking=*/true);
  int64_t* d = table.data_ptr<int64_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const float scale_f = static_cast<float>(scale);
  FUSEDACCUM_DISPATCH_FLOAT_TYPES(arena.scalar_type(), "accumulate_cuda", [&] {
    using acc_t = scalar_t;
    acc_t* acc = arena.data_ptr<acc_t>();
    for (size_t k = 0; k < launches.size(); ++k) {
      const Launch& l = launches[k];
      Stats s{nullptr, nullptr, nullptr, nullptr, nullptr, false};
      if (stats) {
        s.partials = reinterpret_cast<double*>(d + l.stats_at);
        s.done = reinterpret_cast<unsigned long long*>(d + l.stats_at + l.grid);
        s.total = reinterpret_cast<double*>(d + total_at);
        s.sumsq = sumsq.has_value() ? sumsq->data_ptr<float>() : nullptr;
        s.found_inf = found_inf.has_value() ? found_inf->data_ptr<float>() : nullptr;
        s.last_launch = k + 1 == launches.size();
      }
      FUSEDACCUM_DISPATCH_FLOAT_TYPES(l.grad_type, "accumulate_cuda_grad", [&] {
        launch<acc_t, scalar_t>(l, acc, d, d + chunks_at, chunk_len, scale_f, first, s, stream);
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedaccum_C, CUDA, m) { m.impl("accumulate", &accumulate_cuda); }

}  // namespace fusedaccum
