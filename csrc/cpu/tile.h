// Tiles of float for the CPU loops: convert a few hundred elements of any storage type into
// float arrays, run the float math over the arrays, convert back. GCC vectorizes each of the
// three loops on its own, but not one loop that mixes 16-bit storage with float math.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../dispatch.h"
#include "../elementwise.h"

namespace fusedaccum {

constexpr int64_t kTile = 512;

// The CPU loops are compiled for AVX2 too and picked at load time by the CPU they run on
// (GCC function multi-versioning), so a build still runs on any x86-64. FMA stays off
// (-ffp-contract=off): the same roundings as the reference and the CUDA kernels.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FUSEDACCUM_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FUSEDACCUM_CPU_CLONES
#endif

template <typename T>
inline void load_tile(const T* __restrict src, float* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = load_float(src[j]);
}

template <typename T>
inline void store_tile(const float* __restrict src, T* __restrict dst, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = store_as<T>(src[j]);
}

// n elements of `data` from t, as float: the array itself where it holds float, else `tile`
// filled with them. A float array is never copied into a tile: GCC turns that copy into
// `rep movsq`, which on the AMD host here made each copied array cost as much as the math
// (the bf16 + remainder Adam step ran at half the speed of the fp32 master's).
template <typename T>
inline auto tile_in(T* data, int64_t t, int64_t n, float* tile) {
  if constexpr (std::is_same_v<std::remove_const_t<T>, float>) {
    return data + t;
  } else {
    load_tile(data + t, tile, n);
    return static_cast<std::conditional_t<std::is_const_v<T>, const float*, float*>>(tile);
  }
}

// Where to write n new floats for `data` (no read: the first fold of a window overwrites): the
// array itself where it holds float, else `tile`, stored by tile_out.
template <typename T>
inline float* tile_for_write(T* data, int64_t t, float* tile) {
  if constexpr (std::is_same_v<T, float>) {
    return data + t;
  } else {
    return tile;
  }
}

// Writes back what tile_in or tile_for_write gave for `data`: nothing where that was the array itself.
template <typename T>
inline void tile_out(const float* tile, T* data, int64_t t, int64_t n) {
  if constexpr (!std::is_same_v<T, float>) store_tile(tile, data + t, n);
}

// The weights a step reads and writes, as float: the parameter (with, on store, the
// low-precision copy of an fp32 master), or a bf16 parameter and its int16 remainder, which
// together are the fp32 master (C = Remainder; dispatch.h). Offsets rather than shifted
// pointers: `copy` is null when there is none.
template <typename C, typename P>
inline float* weights_in(P* param, const copy_t<C>* copy, int64_t t, int64_t n, float* tile) {
  if constexpr (std::is_same_v<C, Remainder>) {
    static_assert(std::is_same_v<P, c10::BFloat16>, "a remainder goes with a bf16 parameter");
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) tile[j] = merge_remainder(param[t + j].x, copy[t + j]);
    return tile;
  } else {
    return tile_in(param, t, n, tile);
  }
}

template <typename C, typename P>
inline void weights_out(const float* __restrict src, P* __restrict param, copy_t<C>* __restrict copy, int64_t t,
                        int64_t n) {
  if constexpr (std::is_same_v<C, Remainder>) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      uint16_t hi;
      split_remainder(src[j], hi, copy[t + j]);
      param[t + j].x = hi;
    }
  } else {
    tile_out(src, param, t, n);
    if constexpr (!std::is_same_v<C, NoCopy>) store_tile(src, copy + t, n);
  }
}

}  // namespace fusedaccum
