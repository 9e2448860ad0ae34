// What the integer-dot kernels (int8_dot.cpp: q4_dense, int8_sparse24.cpp: q4_sparse24, int8_input_major.cpp:
// q4_input_major) share: the input rounded to int8 per block of 32, the fp16 / fp32 group parameters, the tile
// store, the batch loop and the argument checks. See int8_dot.cpp for the arithmetic.
#pragma once

#include <ATen/ATen.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"

namespace compress_int8 {

using compress_isa::Isa;

constexpr int64_t TILE = 16;
constexpr int64_t BLOCK = 32;  // inputs per int8 scale
constexpr int64_t MAX_BATCH = 16;
constexpr int64_t PREFETCH = 4096;

// The input as the integer kernels read it.
struct Int8Rows {
  int64_t levels;           // roundings per input row: rows (batch x levels), row b x levels + l is level l
  std::vector<int8_t> q;    // (rows, in); AVX-512 order: per 8 inputs the 4 even ones, then the 4 odd ones
  std::vector<float> d;     // (rows, blocks) scales
  std::vector<float> qsum;  // (rows, blocks) sums of q (exact integers)
};

// x (batch, in) -> Int8Rows of `levels` roundings each (level 2 rounds what level 1 left over); `even_odd`
// reorders each run of 8 inputs as the AVX-512 kernel consumes them.
inline Int8Rows quantize_rows(const float* x, int64_t batch, int64_t in, bool even_odd, int64_t levels) {
  const int64_t blocks = in / BLOCK, rows = batch * levels;
  Int8Rows r{levels, std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks), std::vector<float>(rows * blocks)};
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < blocks; ++k) {
      float left[BLOCK];  // what the levels so far have not represented
      std::memcpy(left, x + b * in + k * BLOCK, sizeof(left));
      for (int64_t l = 0; l < levels; ++l) {
        const int64_t row = b * levels + l;
        float amax = 0.f;
        for (int i = 0; i < BLOCK; ++i) amax = std::max(amax, std::fabs(left[i]));
        const float d = amax / 127.f, inv = d > 0.f ? 1.f / d : 0.f;
        int8_t* qk = r.q.data() + row * in + k * BLOCK;
        int32_t sum = 0;
        for (int i = 0; i < BLOCK; ++i) {
          const int8_t v = static_cast<int8_t>(std::nearbyint(left[i] * inv));  // ties to even, as torch.round
          sum += v;
          qk[even_odd ? (i & ~7) + (i & 1) * 4 + (i & 7) / 2 : i] = v;
          if (l + 1 < levels) left[i] -= static_cast<float>(v) * d;  // what the next level rounds
        }
        r.d[row * blocks + k] = d;
        r.qsum[row * blocks + k] = static_cast<float>(sum);
      }
    }
  }
  return r;
}

// Group scales and zero points are fp32 (folders packed before issue 25's step 0) or fp16 (as GGUF's blocks;
// zero points are small integers, exact in fp16): element i, or 8 / 16 of them from i, as fp32.
inline float param(const void* p, bool half, int64_t i) {
  return half ? static_cast<float>(static_cast<const c10::Half*>(p)[i]) : static_cast<const float*>(p)[i];
}

__attribute__((target("avx2,fma,f16c"))) inline __m256 param8(const void* p, bool half, int64_t i) {
  return half ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i)))
              : _mm256_loadu_ps(static_cast<const float*>(p) + i);
}

__attribute__((target("avx512f"))) inline __m512 param16(const void* p, bool half, int64_t i) {
  return half ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i)))
              : _mm512_loadu_ps(static_cast<const float*>(p) + i);
}

// Row b of a tile's products: written for a first level, added for a later one (a tile's rows are stored by one
// thread in order).
template <typename A>  // I8Args (int8_dot.cpp), S8Args (int8_sparse24.cpp) or ImI8Args (int8_input_major.cpp)
inline void store_tile(const A& a, int64_t t, int64_t b, const float* lanes) {
  const int64_t rows = std::min<int64_t>(TILE, a.out - t * TILE);
  float* y = a.y + (b / a.x->levels) * a.out + t * TILE;
  if (b % a.x->levels == 0) std::memcpy(y, lanes, rows * sizeof(float));
  else for (int64_t r = 0; r < rows; ++r) y[r] += lanes[r];
}

// The 8 rows of an int16 vector whose two 128-bit lanes hold partial sums of the same rows: their sum, as fp32.
__attribute__((target("avx2,fma,f16c"))) inline __m256 lanes_sum(__m256i v) {
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(v)),
                                             _mm256_cvtepi16_epi32(_mm256_extracti128_si256(v, 1))));
}

// vpermb's index: byte 4r + p of the transposed vector = byte 16p + r of the loaded one (row r's 4 pairs in lane r)
struct Transpose {
  alignas(64) uint8_t bytes[64];
  Transpose() {
    for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(16 * (i % 4) + i / 4);
  }
};
inline const Transpose kTranspose;

// Batch rows B at a time (B accumulators in registers), each loaded weight vector reused B times.
template <typename A, void (*ROWS4)(const A&, int64_t, int64_t), void (*ROWS2)(const A&, int64_t, int64_t),
          void (*ROWS1)(const A&, int64_t, int64_t)>
inline void by_rows(const A& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.batch; b += 4) ROWS4(a, t, b);
    for (; b + 2 <= a.batch; b += 2) ROWS2(a, t, b);
    for (; b < a.batch; ++b) ROWS1(a, t, b);
  }
}

// Which path the integer kernels take now: 2 AVX-512 VNNI, 1 AVX2, 0 portable.
inline int64_t int8_isa() {
  const Isa isa = compress_isa::chosen();
  if (isa == Isa::avx512 && compress_isa::has_avx512_int8()) return 2;
  return isa == Isa::portable ? 0 : 1;
}

inline void check_inputs(const at::Tensor& x, int64_t in, int64_t group, const at::Tensor& scale,
                  const c10::optional<at::Tensor>& zero, int64_t out, int64_t levels) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must be (batch, ", in, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous fp32 on CPU");
  TORCH_CHECK(x.size(0) <= MAX_BATCH, "batch ", x.size(0), " > ", MAX_BATCH, ": use the reference path");
  TORCH_CHECK(levels == 1 || levels == 2, "levels must be 1 or 2, got ", levels);
  TORCH_CHECK(group % BLOCK == 0, "integer kernels take group sizes divisible by ", BLOCK, ", got ", group);
  TORCH_CHECK((scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf) && scale.is_contiguous(),
              "scale must be contiguous fp32 or fp16");
  TORCH_CHECK(scale.size(0) * TILE >= out && scale.size(1) * group == in, "scale shape ", scale.sizes(), " does not fit");
  if (zero) TORCH_CHECK(zero->scalar_type() == scale.scalar_type() && zero->is_contiguous() && zero->sizes() == scale.sizes(),
                        "zero must match scale");
}

}  // namespace compress_int8
