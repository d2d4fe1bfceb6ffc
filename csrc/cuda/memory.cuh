// Shared pieces of the CUDA kernels: 16-byte loads and stores of float/bf16/half converted
// to and from float (and of a bf16 parameter with its int16 remainder as the fp32 master,
// master_weights="remainder"), the head/body/tail split that keeps those accesses aligned, grid sizing
// from the SM count, and a deterministic block sum in double.
//
// The kernels are memory-bound: what matters is wide coalesced accesses, enough bytes in
// flight per SM, and a grid that is resident all at once (a grid-stride loop with more
// blocks than fit leaves the late blocks running alone at the end).
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAMacros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../elementwise.h"

namespace fusedaccum {

constexpr int kBlockThreads = 256;
// __launch_bounds__(kBlockThreads, kBlocksPerSM) on every kernel caps registers at 64 so
// that kBlocksPerSM blocks are resident per SM: 1024 threads, each with 32-64 bytes of
// loads in flight, is more than the ~20 KB per SM that H100 needs to saturate HBM.
constexpr int kBlocksPerSM = 4;

inline int sm_count(int device) {
  // Queried once per device; the attribute call is cheap but not free on every launch.
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];
  int n = cache[device].load(std::memory_order_relaxed);
  if (n == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(n, std::memory_order_relaxed);
  }
  return n;
}

// Blocks for `items` units of kBlockThreads-wide work: one resident wave at most, since the
// kernels loop over the rest.
inline int grid_size(int64_t items, int device) {
  const int64_t wanted = (items + kBlockThreads - 1) / kBlockThreads;
  const int64_t most = static_cast<int64_t>(sm_count(device)) * kBlocksPerSM;
  return static_cast<int>(wanted < 1 ? 1 : (wanted < most ? wanted : most));
}

template <typename T>
C10_HOST_DEVICE inline bool aligned16(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Elements before p + head is 16-byte aligned, or n when it never is (an address that is
// not even a multiple of sizeof(T)): the caller then runs all n elements scalar.
template <typename T>
C10_HOST_DEVICE inline int64_t align_head(const T* p, int64_t n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return n;
  const int64_t head = static_cast<int64_t>((16 - a % 16) % 16 / sizeof(T));
  return head < n ? head : n;
}

// One 32-bit word as float elements and back: a float, or two 16-bit values (the lower
// address in the low half). Explicit bit moves rather than memcpy through a T array, which
// the compiler splits into narrower accesses.
template <typename T>
__device__ __forceinline__ void unpack_word(uint32_t w, float* out) {
  if constexpr (sizeof(T) == 4) {
    out[0] = __uint_as_float(w);
  } else {
    out[0] = static_cast<float>(T(static_cast<unsigned short>(w & 0xffffu), T::from_bits()));
    out[1] = static_cast<float>(T(static_cast<unsigned short>(w >> 16), T::from_bits()));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack_word(const float* in) {
  if constexpr (sizeof(T) == 4) {
    return __float_as_uint(in[0]);
  } else {
    return static_cast<uint32_t>(static_cast<T>(in[0]).x) | (static_cast<uint32_t>(static_cast<T>(in[1]).x) << 16);
  }
}

// N elements at p (16-byte aligned) as N * sizeof(T) / 16 accesses of 16 bytes, converted to
// float. N = 8 gives one access for bf16/half and two for float, so tensors of mixed dtypes
// advance in step with every access aligned. The accesses go through the cache-hint
// intrinsics because they always compile to one 16-byte global access; a plain uint4 store
// was split into four 4-byte stores by the compiler. The data is streamed once, so:
// load_vec reads through L2 only (.cg; coherent for arrays this kernel also writes),
// load_vec_ro through the read-only path (.nc; only for arrays no thread writes), and
// store_vec is an ordinary write-back store.
template <int N, typename T>
__device__ __forceinline__ void unpack_vec(const uint4& u, int a, float (&out)[N]) {
  constexpr int kPerWord = 4 / sizeof(T);
  unpack_word<T>(u.x, out + (4 * a + 0) * kPerWord);
  unpack_word<T>(u.y, out + (4 * a + 1) * kPerWord);
  unpack_word<T>(u.z, out + (4 * a + 2) * kPerWord);
  unpack_word<T>(u.w, out + (4 * a + 3) * kPerWord);
}

template <int N, typename T, bool kReadOnly = false>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "float, bf16 or half");
  static_assert(N * sizeof(T) % 16 == 0, "a vector is a whole number of 16-byte accesses");
  const uint4* q = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int a = 0; a < N * static_cast<int>(sizeof(T)) / 16; ++a) {
    unpack_vec<N, T>(kReadOnly ? __ldg(q + a) : __ldcg(q + a), a, out);
  }
}

template <int N, typename T>
__device__ __forceinline__ void load_vec_ro(const T* p, float (&out)[N]) {
  load_vec<N, T, true>(p, out);
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "float, bf16 or half");
  static_assert(N * sizeof(T) % 16 == 0, "a vector is a whole number of 16-byte accesses");
  constexpr int kPerWord = 4 / sizeof(T);
#pragma unroll
  for (int a = 0; a < N * static_cast<int>(sizeof(T)) / 16; ++a) {
    const uint4 u = make_uint4(pack_word<T>(in + (4 * a + 0) * kPerWord), pack_word<T>(in + (4 * a + 1) * kPerWord),
                               pack_word<T>(in + (4 * a + 2) * kPerWord), pack_word<T>(in + (4 * a + 3) * kPerWord));
    __stwb(reinterpret_cast<uint4*>(p) + a, u);
  }
}

// N elements of a bf16 parameter and its int16 remainder (both 16-byte aligned) as the fp32
// master and back: one 16-byte access of each per 8 elements, with the cache hints of
// load_vec and store_vec. The raw bits are merged and split, never converted.
template <int N>
__device__ __forceinline__ void load_master_vec(const c10::BFloat16* hi, const int16_t* rem, float (&out)[N]) {
  static_assert(N % 8 == 0, "a vector is a whole number of 16-byte accesses");
#pragma unroll
  for (int a = 0; a < N / 8; ++a) {
    const uint4 h = __ldcg(reinterpret_cast<const uint4*>(hi) + a);
    const uint4 r = __ldcg(reinterpret_cast<const uint4*>(rem) + a);
    const uint32_t hw[4] = {h.x, h.y, h.z, h.w};
    const uint32_t rw[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      out[8 * a + 2 * k] = merge_remainder(static_cast<uint16_t>(hw[k] & 0xffffu), static_cast<int16_t>(rw[k] & 0xffffu));
      out[8 * a + 2 * k + 1] = merge_remainder(static_cast<uint16_t>(hw[k] >> 16), static_cast<int16_t>(rw[k] >> 16));
    }
  }
}

template <int N>
__device__ __forceinline__ void store_master_vec(c10::BFloat16* hi, int16_t* rem, const float (&in)[N]) {
  static_assert(N % 8 == 0, "a vector is a whole number of 16-byte accesses");
#pragma unroll
  for (int a = 0; a < N / 8; ++a) {
    uint32_t hw[4], rw[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint16_t h0, h1;
      int16_t r0, r1;
      split_remainder(in[8 * a + 2 * k], h0, r0);
      split_remainder(in[8 * a + 2 * k + 1], h1, r1);
      hw[k] = static_cast<uint32_t>(h0) | (static_cast<uint32_t>(h1) << 16);
      rw[k] = static_cast<uint32_t>(static_cast<uint16_t>(r0)) | (static_cast<uint32_t>(static_cast<uint16_t>(r1)) << 16);
    }
    __stwb(reinterpret_cast<uint4*>(hi) + a, make_uint4(hw[0], hw[1], hw[2], hw[3]));
    __stwb(reinterpret_cast<uint4*>(rem) + a, make_uint4(rw[0], rw[1], rw[2], rw[3]));
  }
}

// The parameter as the optimizer math sees it, in fp32, and back: element i, or the N elements
// from i (16-byte aligned). C says what param_copy is: nothing, the rounded copy of an fp32
// master (written by the stores only), or the remainder that with param is the fp32 master.
template <typename C, typename P>
__device__ __forceinline__ float load_weight(const P* param, const copy_t<C>* copy, int64_t i) {
  if constexpr (std::is_same_v<C, Remainder>) {
    return merge_remainder(param[i].x, copy[i]);
  } else {
    return static_cast<float>(param[i]);
  }
}

template <typename C, typename P>
__device__ __forceinline__ void store_weight(P* param, copy_t<C>* copy, int64_t i, float p) {
  if constexpr (std::is_same_v<C, Remainder>) {
    uint16_t hi;
    int16_t rem;
    split_remainder(p, hi, rem);
    param[i] = c10::BFloat16(hi, c10::BFloat16::from_bits());
    copy[i] = rem;
  } else {
    param[i] = static_cast<P>(p);
    if constexpr (!std::is_same_v<C, NoCopy>) copy[i] = static_cast<C>(p);
  }
}

template <typename C, int N, typename P>
__device__ __forceinline__ void load_weights(const P* param, const copy_t<C>* copy, int64_t i, float (&out)[N]) {
  if constexpr (std::is_same_v<C, Remainder>) {
    load_master_vec(param + i, copy + i, out);
  } else {
    load_vec(param + i, out);
  }
}

template <typename C, int N, typename P>
__device__ __forceinline__ void store_weights(P* param, copy_t<C>* copy, int64_t i, const float (&in)[N]) {
  if constexpr (std::is_same_v<C, Remainder>) {
    store_master_vec(param + i, copy + i, in);
  } else {
    store_vec(param + i, in);
    if constexpr (!std::is_same_v<C, NoCopy>) store_vec(copy + i, in);
  }
}

// Runs scalar(i) for i in [0, head) and in the tail past the last whole vector, and vec(i)
// for each vector start i in [head, ...), spreading both over `count` threads of which the
// caller is `rank` (a block's threads for one chunk, or the whole grid). Consecutive threads
// take consecutive vectors, so a warp's accesses are coalesced.
template <int N, typename Vec, typename Scalar>
__device__ __forceinline__ void split_loop(int64_t n, int64_t head, int64_t rank, int64_t count,
                                           Vec&& vec, Scalar&& scalar) {
  const int64_t body_end = head + (n - head) / N * N;
  for (int64_t i = rank; i < head; i += count) scalar(i);
  for (int64_t i = head + rank * N; i < body_end; i += count * N) vec(i);
  for (int64_t i = body_end + rank; i < n; i += count) scalar(i);
}

// Sum over the block's kBlockThreads threads, in a fixed order (so run-to-run identical);
// the result is valid in thread 0. Every thread of the block must call it.
__device__ __forceinline__ double block_sum(double v) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads <= 1024, "whole warps");
  constexpr int kWarps = kBlockThreads / 32;
  __shared__ double warp_sums[kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = 0.0;
  if (warp == 0) {
    v = lane < kWarps ? warp_sums[lane] : 0.0;
#pragma unroll
    for (int o = 16; o > 0; o /= 2) v += __shfl_down_sync(0xffffffffu, v, o);
  }
  __syncthreads();  // warp_sums may be reused by the next call
  return v;
}

}  // namespace fusedaccum
