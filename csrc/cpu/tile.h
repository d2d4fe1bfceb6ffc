// Tiles of float for the CPU loops: convert a few hundred elements of any storage type into
// float arrays, run the float math over the arrays, convert back. GCC vectorizes each of the
// three loops on its own, but not one loop that mixes 16-bit storage with float math.
#pragma once

#include <cstdint>

#include "../elementwise.h"

namespace fusedaccum {

constexpr int64_t kTile = 512;

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
