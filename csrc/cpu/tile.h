// Tiles of float for the CPU loops: convert a few hundred elements of any storage type into
// float arrays, run the float math over the arrays, convert back. GCC vectorizes each of the
// three loops on its own, but not one loop that mixes 16-bit storage with float math.
#pragma once

#include <cstdint>

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

}  // namespace fusedaccum
