// The project's CPU kernels: batch-1..16 matrix-vector products with packed weights (decode's hot loop), and
// the packed weights' dequantization for larger batches (prefill), which a BLAS product then consumes.
//
// Layouts are defined in compress/kernels/formats.py (the only place that knows them); in short:
//   q4_dense:    16-row tiles; byte [t, j, r] holds nibbles u[16t+r, 2j] (low) and u[16t+r, 2j+1] (high);
//                W[r, i] = (u - zero[r, g]) * scale[r, g], zero = 8 when symmetric (no zero tensor).
//   q4_sparse24: 16-row tiles; per run of 4 inputs, byte [t, k, r] holds the two kept nibbles and a 4-bit
//                position code p0 | p1 << 2 (two runs per byte of `pos`); unkept weights are zero.
//   act_sparse:  input-major fp32 or bf16 W^T (in, out): only the rows of inputs that are non-zero are read.
//   q4_input_major: 4-bit codes input by input, in blocks of 8 tiles (128 outputs): inside a block each input's
//                codes are 64 bytes (8 per tile, byte k = u[16t+k, i] | u[16t+8+k, i] << 4), inputs one after
//                another; scale/zero (groups, out padded to 16) per input group and output. The bytes of an
//                input that is zero in every batch row are not read; a group with no live input costs nothing.
//
// Each kernel has an AVX-512 path, an AVX2+FMA path and a portable one, chosen at run time from what the
// CPU reports (functions are compiled per target with GCC/Clang target attributes). Work is split over
// 16-row tiles (or output ranges) with at::parallel_for, so torch.set_num_threads governs it (the extension is
// compiled with -fopenmp: without it at::parallel_for's OpenMP pragma is ignored and everything runs on one thread).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include "isa.h"

#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace {

constexpr int64_t TILE = 16;
constexpr int64_t MAX_BATCH = 16;
constexpr int64_t PREFETCH = 4096;  // bytes ahead of the packed-weight stream the kernels prefetch

using compress_isa::Isa;
using compress_isa::chosen;
using compress_isa::detect;

// Arguments shared by the quantized kernels; pointers into contiguous tensors.
struct QArgs {
  const float* x;      // (batch, in)
  float* y;            // (batch, out)
  const uint8_t* data;
  const uint8_t* pos;  // q4_sparse24 only
  const float* scale;  // (tiles, groups, 16)
  const float* zero;   // (tiles, groups, 16) or nullptr (symmetric: 8)
  const float* xsum;   // (batch, groups) sums of x per group (q4_dense)
  int64_t batch, in, out, group;
};

inline void store_tile(const QArgs& a, int64_t t, int64_t b, const float* lanes) {
  const int64_t rows = std::min<int64_t>(TILE, a.out - t * TILE);
  std::memcpy(a.y + b * a.out + t * TILE, lanes, rows * sizeof(float));
}

// ---------------------------------------------------------------- q4_dense
void q4_dense_portable(const QArgs& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, half = a.in / 2;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      float y[TILE] = {0};
      const float* x = a.x + b * a.in;
      for (int64_t g = 0; g < groups; ++g) {
        float acc[TILE] = {0};
        for (int64_t j = g * a.group / 2; j < (g + 1) * a.group / 2; ++j) {
          const uint8_t* d = a.data + (t * half + j) * TILE;
          for (int r = 0; r < TILE; ++r) acc[r] += (d[r] & 15) * x[2 * j] + (d[r] >> 4) * x[2 * j + 1];
        }
        const float* s = a.scale + (t * groups + g) * TILE;
        const float* z = a.zero ? a.zero + (t * groups + g) * TILE : nullptr;
        for (int r = 0; r < TILE; ++r) y[r] += s[r] * (acc[r] - (z ? z[r] : 8.f) * a.xsum[b * groups + g]);
      }
      store_tile(a, t, b, y);
    }
  }
}

__attribute__((target("avx2,fma"))) void q4_dense_avx2(const QArgs& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, half = a.in / 2;
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* x = a.x + b * a.in;
      __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
        for (int64_t j = g * a.group / 2; j < (g + 1) * a.group / 2; ++j) {
          const uint8_t* d = a.data + (t * half + j) * TILE;
          const __m256i v0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)d));
          const __m256i v1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(d + 8)));
          const __m256 xe = _mm256_broadcast_ss(x + 2 * j), xo = _mm256_broadcast_ss(x + 2 * j + 1);
          a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v0, low)), xe, a0);
          a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v1, low)), xe, a1);
          c0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v0, 4)), xo, c0);
          c1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v1, 4)), xo, c1);
        }
        const float* s = a.scale + (t * groups + g) * TILE;
        const __m256 xs = _mm256_set1_ps(a.xsum[b * groups + g]);
        const __m256 z0 = a.zero ? _mm256_loadu_ps(a.zero + (t * groups + g) * TILE) : _mm256_set1_ps(8.f);
        const __m256 z1 = a.zero ? _mm256_loadu_ps(a.zero + (t * groups + g) * TILE + 8) : _mm256_set1_ps(8.f);
        y0 = _mm256_fmadd_ps(_mm256_loadu_ps(s), _mm256_fnmadd_ps(z0, xs, _mm256_add_ps(a0, c0)), y0);
        y1 = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8), _mm256_fnmadd_ps(z1, xs, _mm256_add_ps(a1, c1)), y1);
      }
      float lanes[TILE];
      _mm256_storeu_ps(lanes, y0);
      _mm256_storeu_ps(lanes + 8, y1);
      store_tile(a, t, b, lanes);
    }
  }
}

// Batch rows are processed B at a time (B accumulators kept in registers), each decoded weight reused B times.
template <int B>
__attribute__((target("avx512f,avx512bw"))) void q4_dense_avx512_rows(const QArgs& a, int64_t t, int64_t b0) {
  const int64_t groups = a.in / a.group, half = a.in / 2;
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 y[B];
  for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // four independent accumulators per batch row (even/odd input of two byte rows) hide the FMA latency
    __m512 ae[B], ao[B], be[B], bo[B];
    for (int b = 0; b < B; ++b) ae[b] = ao[b] = be[b] = bo[b] = _mm512_setzero_ps();
    const uint8_t* d = a.data + (t * half + g * a.group / 2) * TILE;
    const float* x = a.x + b0 * a.in + g * a.group;
    for (int64_t j = 0; j < a.group / 2; j += 2, d += 2 * TILE) {
      _mm_prefetch((const char*)(d + PREFETCH), _MM_HINT_T0);  // the stream from DRAM, a few KB ahead
      const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)d));
      const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(d + TILE)));
      // nibble -> float: vpermps reads only an index's low 4 bits, so the low nibble needs no mask
      const __m512 ve = _mm512_permutexvar_ps(v, lut), vo = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
      const __m512 ue = _mm512_permutexvar_ps(u, lut), uo = _mm512_permutexvar_ps(_mm512_srli_epi32(u, 4), lut);
      for (int b = 0; b < B; ++b) {
        const float* xb = x + b * a.in + 2 * j;
        ae[b] = _mm512_fmadd_ps(ve, _mm512_set1_ps(xb[0]), ae[b]);
        ao[b] = _mm512_fmadd_ps(vo, _mm512_set1_ps(xb[1]), ao[b]);
        be[b] = _mm512_fmadd_ps(ue, _mm512_set1_ps(xb[2]), be[b]);
        bo[b] = _mm512_fmadd_ps(uo, _mm512_set1_ps(xb[3]), bo[b]);
      }
    }
    for (int b = 0; b < B; ++b) ae[b] = _mm512_add_ps(_mm512_add_ps(ae[b], be[b]), _mm512_add_ps(ao[b], bo[b]));
    const __m512 s = _mm512_loadu_ps(a.scale + (t * groups + g) * TILE);
    const __m512 z = a.zero ? _mm512_loadu_ps(a.zero + (t * groups + g) * TILE) : _mm512_set1_ps(8.f);
    for (int b = 0; b < B; ++b) {
      const __m512 xs = _mm512_set1_ps(a.xsum[(b0 + b) * groups + g]);
      y[b] = _mm512_fmadd_ps(s, _mm512_fnmadd_ps(z, xs, ae[b]), y[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm512_storeu_ps(lanes, y[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

__attribute__((target("avx512f,avx512bw"))) void q4_dense_avx512(const QArgs& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.batch; b += 4) q4_dense_avx512_rows<4>(a, t, b);
    for (; b + 2 <= a.batch; b += 2) q4_dense_avx512_rows<2>(a, t, b);
    for (; b < a.batch; ++b) q4_dense_avx512_rows<1>(a, t, b);
  }
}

// ---------------------------------------------------------------- q4_sparse24
void q4_sparse24_portable(const QArgs& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, runs = a.in / 4;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      float y[TILE] = {0};
      const float* x = a.x + b * a.in;
      for (int64_t g = 0; g < groups; ++g) {
        const float* s = a.scale + (t * groups + g) * TILE;
        const float* z = a.zero ? a.zero + (t * groups + g) * TILE : nullptr;
        float acc[TILE] = {0};
        for (int64_t k = g * a.group / 4; k < (g + 1) * a.group / 4; ++k) {
          const uint8_t* d = a.data + (t * runs + k) * TILE;
          const uint8_t* p = a.pos + (t * (runs / 2) + k / 2) * TILE;
          for (int r = 0; r < TILE; ++r) {
            const int code = (p[r] >> (4 * (k & 1))) & 15;
            const float zr = z ? z[r] : 8.f;
            acc[r] += ((d[r] & 15) - zr) * x[4 * k + (code & 3)] + ((d[r] >> 4) - zr) * x[4 * k + (code >> 2)];
          }
        }
        for (int r = 0; r < TILE; ++r) y[r] += s[r] * acc[r];
      }
      store_tile(a, t, b, y);
    }
  }
}

__attribute__((target("avx2,fma"))) void q4_sparse24_avx2(const QArgs& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, runs = a.in / 4;
  const __m256i low = _mm256_set1_epi32(15);
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      const float* x = a.x + b * a.in;
      __m256 y0 = _mm256_setzero_ps(), y1 = _mm256_setzero_ps();
      for (int64_t g = 0; g < groups; ++g) {
        const float* zg = a.zero ? a.zero + (t * groups + g) * TILE : nullptr;
        const __m256 z0 = zg ? _mm256_loadu_ps(zg) : _mm256_set1_ps(8.f);
        const __m256 z1 = zg ? _mm256_loadu_ps(zg + 8) : _mm256_set1_ps(8.f);
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
        for (int64_t k = g * a.group / 4; k < (g + 1) * a.group / 4; k += 2) {  // 8 inputs: runs k, k+1
          // run k's four inputs in both 128-bit halves of xa (run k+1's in xb), picked by vpermilps, which
          // reads an index's low 2 bits: each 2-bit field of the position byte (p0 | p1 << 2 | p0' << 4 |
          // p1' << 6) indexes after one shift, with no mask. (The cross-lane vpermps cost a third more time
          // on Zen 3; the x loads and code streams are shared by the tile's two halves of 8 rows.)
          const __m256 xa = _mm256_broadcast_ps((const __m128*)(x + 4 * k));
          const __m256 xb = _mm256_broadcast_ps((const __m128*)(x + 4 * k + 4));
          const uint8_t* pp = a.pos + (t * (runs / 2) + k / 2) * TILE;
          const uint8_t* dp = a.data + (t * runs + k) * TILE;
          _mm_prefetch((const char*)(pp + PREFETCH), _MM_HINT_T0);
          _mm_prefetch((const char*)(dp + PREFETCH), _MM_HINT_T0);
          for (int h = 0; h < 2; ++h) {  // the tile's two halves of 8 rows
            const __m256 z = h ? z1 : z0;
            const __m256i p = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(pp + 8 * h)));
            const __m256i d0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(dp + 8 * h)));
            const __m256i d1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(dp + TILE + 8 * h)));
            const __m256 xk0 = _mm256_permutevar_ps(xa, p);
            const __m256 xk1 = _mm256_permutevar_ps(xa, _mm256_srli_epi32(p, 2));
            const __m256 xl0 = _mm256_permutevar_ps(xb, _mm256_srli_epi32(p, 4));
            const __m256 xl1 = _mm256_permutevar_ps(xb, _mm256_srli_epi32(p, 6));
            __m256& u = h ? a1 : a0;
            __m256& v = h ? c1 : c0;
            u = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d0, low)), z), xk0, u);
            v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d0, 4)), z), xk1, v);
            u = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(d1, low)), z), xl0, u);
            v = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(d1, 4)), z), xl1, v);
          }
        }
        const float* s = a.scale + (t * groups + g) * TILE;
        y0 = _mm256_fmadd_ps(_mm256_loadu_ps(s), _mm256_add_ps(a0, c0), y0);
        y1 = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8), _mm256_add_ps(a1, c1), y1);
      }
      float lanes[TILE];
      _mm256_storeu_ps(lanes, y0);
      _mm256_storeu_ps(lanes + 8, y1);
      store_tile(a, t, b, lanes);
    }
  }
}

// xtab[(b * runs + k) * 32 + c] = x[b, 4k + (c & 3)] and [.. + 16 + c] = x[b, 4k + (c >> 2)] for the 16
// position codes c = p0 | p1 << 2: one vpermps per kept weight then fetches its input, whatever its position.
__attribute__((target("avx512f,avx512bw"))) void sparse24_x_tables_avx512(const float* x, float* xtab, int64_t rows, int64_t in) {
  const __m512i i0 = _mm512_setr_epi32(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3);
  const __m512i i1 = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t b = 0; b < rows; ++b)
    for (int64_t k = 0; k < in / 4; ++k) {
      const __m512 xv = _mm512_castps128_ps512(_mm_loadu_ps(x + b * in + 4 * k));
      _mm512_storeu_ps(xtab + (b * (in / 4) + k) * 32, _mm512_permutexvar_ps(i0, xv));
      _mm512_storeu_ps(xtab + (b * (in / 4) + k) * 32 + 16, _mm512_permutexvar_ps(i1, xv));
    }
}

template <int B>
__attribute__((target("avx512f,avx512bw"))) void q4_sparse24_avx512_rows(const QArgs& a, const float* xtab, int64_t t, int64_t b0) {
  const int64_t groups = a.in / a.group, runs = a.in / 4;
  const __m512 lut = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 y[B];
  for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    const __m512 z = a.zero ? _mm512_loadu_ps(a.zero + (t * groups + g) * TILE) : _mm512_set1_ps(8.f);
    __m512 acc0[B], acc1[B];
    for (int b = 0; b < B; ++b) acc0[b] = acc1[b] = _mm512_setzero_ps();
    for (int64_t k = g * a.group / 4; k < (g + 1) * a.group / 4; k += 2) {  // runs k, k+1 share a byte of codes
      const uint8_t* pos = a.pos + (t * (runs / 2) + k / 2) * TILE;
      _mm_prefetch((const char*)(pos + PREFETCH), _MM_HINT_T0);
      _mm_prefetch((const char*)(a.data + (t * runs + k) * TILE + PREFETCH), _MM_HINT_T0);
      const __m512i p = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)pos));
      for (int q = 0; q < 2; ++q) {
        const __m512i code = q ? _mm512_srli_epi32(p, 4) : p;  // vpermps reads the low 4 bits only
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(a.data + (t * runs + k + q) * TILE)));
        const __m512 w0 = _mm512_sub_ps(_mm512_permutexvar_ps(d, lut), z);
        const __m512 w1 = _mm512_sub_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d, 4), lut), z);
        for (int b = 0; b < B; ++b) {
          const float* tab = xtab + ((b0 + b) * runs + k + q) * 32;
          acc0[b] = _mm512_fmadd_ps(w0, _mm512_permutexvar_ps(code, _mm512_loadu_ps(tab)), acc0[b]);
          acc1[b] = _mm512_fmadd_ps(w1, _mm512_permutexvar_ps(code, _mm512_loadu_ps(tab + 16)), acc1[b]);
        }
      }
    }
    const __m512 s = _mm512_loadu_ps(a.scale + (t * groups + g) * TILE);
    for (int b = 0; b < B; ++b) y[b] = _mm512_fmadd_ps(s, _mm512_add_ps(acc0[b], acc1[b]), y[b]);
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm512_storeu_ps(lanes, y[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

__attribute__((target("avx512f,avx512bw"))) void q4_sparse24_avx512(const QArgs& a, const float* xtab, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.batch; b += 4) q4_sparse24_avx512_rows<4>(a, xtab, t, b);
    for (; b + 2 <= a.batch; b += 2) q4_sparse24_avx512_rows<2>(a, xtab, t, b);
    for (; b < a.batch; ++b) q4_sparse24_avx512_rows<1>(a, xtab, t, b);
  }
}

// ---------------------------------------------------------------- act_sparse (input-major W^T)
// y[b, o0:o1] += x[b, i] * WT[i, o0:o1] over the inputs i that are non-zero in some batch row.
template <typename W>
inline float widen(W w);
template <>
inline float widen<float>(float w) { return w; }
template <>
inline float widen<uint16_t>(uint16_t w) {
  uint32_t bits = uint32_t(w) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

template <typename W>
void act_sparse_portable(const float* x, const W* wt, float* y, const int64_t* idx, int64_t n_idx, int64_t batch,
                         int64_t in, int64_t out, int64_t o0, int64_t o1) {
  for (int64_t n = 0; n < n_idx; ++n) {
    const int64_t i = idx[n];
    const W* row = wt + i * out;
    for (int64_t b = 0; b < batch; ++b) {
      const float v = x[b * in + i];
      float* yb = y + b * out;
      for (int64_t o = o0; o < o1; ++o) yb[o] += v * widen(row[o]);
    }
  }
}

__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
__attribute__((target("avx512f,avx512bw"))) inline __m512 load16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

// Four inputs per pass over the output range: y is read and written once per four weight rows.
template <typename W>
__attribute__((target("avx512f,avx512bw"))) void act_sparse_avx512(const float* x, const W* wt, float* y, const int64_t* idx,
                                                                   int64_t n_idx, int64_t batch, int64_t in, int64_t out,
                                                                   int64_t o0, int64_t o1) {
  const int64_t vec_end = o0 + (o1 - o0) / 16 * 16;
  int64_t n = 0;
  for (; n + 4 <= n_idx; n += 4) {
    const W* r0 = wt + idx[n] * out;
    const W* r1 = wt + idx[n + 1] * out;
    const W* r2 = wt + idx[n + 2] * out;
    const W* r3 = wt + idx[n + 3] * out;
    for (int64_t b = 0; b < batch; ++b) {
      const float* xb = x + b * in;
      const __m512 v0 = _mm512_set1_ps(xb[idx[n]]), v1 = _mm512_set1_ps(xb[idx[n + 1]]);
      const __m512 v2 = _mm512_set1_ps(xb[idx[n + 2]]), v3 = _mm512_set1_ps(xb[idx[n + 3]]);
      float* yb = y + b * out;
      for (int64_t o = o0; o < vec_end; o += 16) {
        __m512 acc = _mm512_loadu_ps(yb + o);
        acc = _mm512_fmadd_ps(v0, load16(r0 + o), acc);
        acc = _mm512_fmadd_ps(v1, load16(r1 + o), acc);
        acc = _mm512_fmadd_ps(v2, load16(r2 + o), acc);
        acc = _mm512_fmadd_ps(v3, load16(r3 + o), acc);
        _mm512_storeu_ps(yb + o, acc);
      }
    }
    if (vec_end < o1) act_sparse_portable(x, wt, y, idx + n, 4, batch, in, out, vec_end, o1);
  }
  for (; n < n_idx; ++n) {
    const W* r0 = wt + idx[n] * out;
    for (int64_t b = 0; b < batch; ++b) {
      const __m512 v0 = _mm512_set1_ps(x[b * in + idx[n]]);
      float* yb = y + b * out;
      for (int64_t o = o0; o < vec_end; o += 16) _mm512_storeu_ps(yb + o, _mm512_fmadd_ps(v0, load16(r0 + o), _mm512_loadu_ps(yb + o)));
    }
    if (vec_end < o1) act_sparse_portable(x, wt, y, idx + n, 1, batch, in, out, vec_end, o1);
  }
}

__attribute__((target("avx2,fma"))) inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) inline __m256 load8(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

template <typename W>
__attribute__((target("avx2,fma"))) void act_sparse_avx2(const float* x, const W* wt, float* y, const int64_t* idx,
                                                         int64_t n_idx, int64_t batch, int64_t in, int64_t out,
                                                         int64_t o0, int64_t o1) {
  const int64_t vec_end = o0 + (o1 - o0) / 8 * 8;
  int64_t n = 0;
  for (; n + 2 <= n_idx; n += 2) {
    const W* r0 = wt + idx[n] * out;
    const W* r1 = wt + idx[n + 1] * out;
    for (int64_t b = 0; b < batch; ++b) {
      const __m256 v0 = _mm256_set1_ps(x[b * in + idx[n]]), v1 = _mm256_set1_ps(x[b * in + idx[n + 1]]);
      float* yb = y + b * out;
      for (int64_t o = o0; o < vec_end; o += 8)
        _mm256_storeu_ps(yb + o, _mm256_fmadd_ps(v1, load8(r1 + o), _mm256_fmadd_ps(v0, load8(r0 + o), _mm256_loadu_ps(yb + o))));
    }
    if (vec_end < o1) act_sparse_portable(x, wt, y, idx + n, 2, batch, in, out, vec_end, o1);
  }
  if (n < n_idx) act_sparse_portable(x, wt, y, idx + n, 1, batch, in, out, o0, o1);
}

// ---------------------------------------------------------------- q4_input_major
// Per batch row and input group: acc[o] = sum over the group's live inputs i of x[i] * u[o, i], then
// y[o] += scale[g, o] * (acc[o] - zero[g, o] * sum of the group's x). Zero inputs add nothing to either sum, so
// skipping them is exact; the scale is applied once per group, after the skipped and kept inputs alike.
struct ImArgs {
  const float* x;       // (batch, in)
  float* y;             // (batch, out)
  const uint8_t* data;  // blocks of (in, <= 8 tiles, 8)
  const float* scale;   // (groups, tiles * 16)
  const float* zero;    // (groups, tiles * 16) or nullptr (8)
  const float* xsum;    // (batch, groups)
  const int64_t* live;  // live inputs, ascending
  const int64_t* group_start;  // (groups + 1): live[group_start[g] .. group_start[g+1]) are in group g
  int64_t n_live, batch, in, out, tiles, group;
};

constexpr int64_t IM_PREFETCH = 8;  // live inputs ahead
constexpr int64_t IM_BLOCK = 8;     // tiles per block (formats.IM_BLOCK)

// Where tile t of input i starts, and the distance from one input's codes to the next in t's block.
inline const uint8_t* im_tile(const ImArgs& a, int64_t i, int64_t t, int64_t* row_bytes) {
  const int64_t t0 = t / IM_BLOCK * IM_BLOCK, n = std::min(IM_BLOCK, a.tiles - t0);
  *row_bytes = n * 8;
  return a.data + 8 * (a.in * t0 + i * n + (t - t0));
}

void q4_input_major_portable(const ImArgs& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, width = a.tiles * TILE;
  for (int64_t b = 0; b < a.batch; ++b) {
    const float* x = a.x + b * a.in;
    for (int64_t t = t0; t < t1; ++t) {
      float y[TILE] = {0};
      for (int64_t g = 0; g < groups; ++g) {
        if (a.group_start[g] == a.group_start[g + 1]) continue;
        float acc[TILE] = {0};
        for (int64_t n = a.group_start[g]; n < a.group_start[g + 1]; ++n) {
          int64_t row_bytes;
          const uint8_t* d = im_tile(a, a.live[n], t, &row_bytes);
          const int64_t i = a.live[n];
          for (int k = 0; k < 8; ++k) {
            acc[k] += (d[k] & 15) * x[i];
            acc[k + 8] += (d[k] >> 4) * x[i];
          }
        }
        const float* s = a.scale + g * width + t * TILE;
        const float* z = a.zero ? a.zero + g * width + t * TILE : nullptr;
        for (int r = 0; r < TILE; ++r) y[r] += s[r] * (acc[r] - (z ? z[r] : 8.f) * a.xsum[b * groups + g]);
      }
      const int64_t rows = std::min<int64_t>(TILE, a.out - t * TILE);
      std::memcpy(a.y + b * a.out + t * TILE, y, rows * sizeof(float));
    }
  }
}

// NT tiles (16·NT outputs, 8·NT bytes of each live input) of one batch row; NT is a compile-time constant so the
// 2·NT accumulators stay in registers.
template <int NT>
__attribute__((target("avx2,fma"))) void q4_input_major_avx2_tiles(const ImArgs& a, int64_t b, int64_t t) {
  const int64_t groups = a.in / a.group, width = a.tiles * TILE;
  int64_t stride;
  const uint8_t* base = im_tile(a, 0, t, &stride);  // input i's codes for tiles t.. are at base + i * stride
  const __m256i low = _mm256_set1_epi32(15);
  const float* x = a.x + b * a.in;
  __m256 y[2 * NT];
  for (int k = 0; k < 2 * NT; ++k) y[k] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    if (a.group_start[g] == a.group_start[g + 1]) continue;
    __m256 acc[2 * NT];
    for (int k = 0; k < 2 * NT; ++k) acc[k] = _mm256_setzero_ps();
    for (int64_t n = a.group_start[g]; n < a.group_start[g + 1]; ++n) {
      const int64_t i = a.live[n];
      const uint8_t* d = base + i * stride;
      // the next live inputs' lines are not adjacent when inputs are skipped: ask for them a few inputs ahead
      if (n + IM_PREFETCH < a.n_live) _mm_prefetch((const char*)(base + a.live[n + IM_PREFETCH] * stride), _MM_HINT_T0);
      const __m256 xi = _mm256_broadcast_ss(x + i);
      for (int q = 0; q < NT; ++q) {
        const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(d + 8 * q)));
        acc[2 * q] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), xi, acc[2 * q]);
        acc[2 * q + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), xi, acc[2 * q + 1]);
      }
    }
    const __m256 xs = _mm256_set1_ps(a.xsum[b * groups + g]);
    const float* s = a.scale + g * width + t * TILE;
    const float* z = a.zero ? a.zero + g * width + t * TILE : nullptr;
    for (int k = 0; k < 2 * NT; ++k) {
      const __m256 zk = z ? _mm256_loadu_ps(z + 8 * k) : _mm256_set1_ps(8.f);
      y[k] = _mm256_fmadd_ps(_mm256_loadu_ps(s + 8 * k), _mm256_fnmadd_ps(zk, xs, acc[k]), y[k]);
    }
  }
  float lanes[NT * TILE];
  for (int k = 0; k < 2 * NT; ++k) _mm256_storeu_ps(lanes + 8 * k, y[k]);
  const int64_t rows = std::min<int64_t>(NT * TILE, a.out - t * TILE);
  std::memcpy(a.y + b * a.out + t * TILE, lanes, rows * sizeof(float));
}

__attribute__((target("avx2,fma"))) void q4_input_major_avx2(const ImArgs& a, int64_t t0, int64_t t1) {
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t t = t0;
    for (; t + 4 <= t1; t += 4) q4_input_major_avx2_tiles<4>(a, b, t);
    switch (t1 - t) {
      case 3: q4_input_major_avx2_tiles<3>(a, b, t); break;
      case 2: q4_input_major_avx2_tiles<2>(a, b, t); break;
      case 1: q4_input_major_avx2_tiles<1>(a, b, t); break;
      default: break;
    }
  }
}

// ---------------------------------------------------------------- entry points
void check_x(const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must be (batch, ", in, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous fp32 on CPU");
  TORCH_CHECK(x.size(0) <= MAX_BATCH, "batch ", x.size(0), " > ", MAX_BATCH, ": use the reference path");
}

QArgs q_args(const at::Tensor& x, at::Tensor& y, const at::Tensor& data, const at::Tensor& scale,
             const c10::optional<at::Tensor>& zero, int64_t out, int64_t group) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(), "packed data must be contiguous uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous(), "scale must be contiguous fp32");
  if (zero) TORCH_CHECK(zero->scalar_type() == at::kFloat && zero->is_contiguous() && zero->sizes() == scale.sizes(), "zero must match scale");
  QArgs a{};
  a.x = x.data_ptr<float>();
  a.y = y.data_ptr<float>();
  a.data = data.data_ptr<uint8_t>();
  a.scale = scale.data_ptr<float>();
  a.zero = zero ? zero->data_ptr<float>() : nullptr;
  a.batch = x.size(0);
  a.in = x.size(1);
  a.out = out;
  a.group = group;
  TORCH_CHECK(scale.size(0) * TILE >= out && scale.size(1) * group == a.in, "scale shape ", scale.sizes(), " does not fit");
  return a;
}

at::Tensor q4_dense_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                       const c10::optional<at::Tensor>& zero, int64_t out, int64_t group) {
  check_x(x, data.size(1) * 2);
  TORCH_CHECK(group % 4 == 0, "q4_dense kernels take group sizes divisible by 4, got ", group);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  QArgs a = q_args(x, y, data, scale, zero, out, group);
  std::vector<float> xsum(a.batch * (a.in / group), 0.f);  // (batch, groups); a loop, not an ATen call per product
  for (int64_t b = 0; b < a.batch; ++b)
    for (int64_t i = 0; i < a.in; ++i) xsum[b * (a.in / group) + i / group] += a.x[b * a.in + i];
  a.xsum = xsum.data();
  const Isa isa = chosen();
  at::parallel_for(0, data.size(0), 1, [&](int64_t t0, int64_t t1) {
    if (isa == Isa::avx512) q4_dense_avx512(a, t0, t1);
    else if (isa == Isa::avx2) q4_dense_avx2(a, t0, t1);
    else q4_dense_portable(a, t0, t1);
  });
  return y;
}

at::Tensor q4_sparse24_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& pos, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& zero, int64_t out, int64_t group) {
  check_x(x, data.size(1) * 4);
  TORCH_CHECK(group % 8 == 0, "q4_sparse24 kernels take group sizes divisible by 8, got ", group);
  TORCH_CHECK(pos.scalar_type() == at::kByte && pos.is_contiguous() && pos.size(1) * 2 == data.size(1), "pos does not match data");
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  QArgs a = q_args(x, y, data, scale, zero, out, group);
  a.pos = pos.data_ptr<uint8_t>();
  const Isa isa = chosen();
  std::vector<float> xtab;
  if (isa == Isa::avx512) {
    xtab.resize(x.size(0) * x.size(1) * 8);
    sparse24_x_tables_avx512(a.x, xtab.data(), x.size(0), x.size(1));
  }
  at::parallel_for(0, data.size(0), 1, [&](int64_t t0, int64_t t1) {
    if (isa == Isa::avx512) q4_sparse24_avx512(a, xtab.data(), t0, t1);
    else if (isa == Isa::avx2) q4_sparse24_avx2(a, t0, t1);
    else q4_sparse24_portable(a, t0, t1);
  });
  return y;
}

at::Tensor act_sparse_mm(const at::Tensor& x, const at::Tensor& wt) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "wt must be contiguous (in, out)");
  TORCH_CHECK(wt.scalar_type() == at::kFloat || wt.scalar_type() == at::kBFloat16, "wt must be fp32 or bf16");
  check_x(x, wt.size(0));
  const int64_t batch = x.size(0), in = wt.size(0), out = wt.size(1);
  at::Tensor live = (x != 0).any(0).nonzero().view(-1).contiguous();  // inputs some batch row needs
  at::Tensor y = at::zeros({batch, out}, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t* idx = live.data_ptr<int64_t>();
  const int64_t n_idx = live.numel();
  const Isa isa = chosen();
  // output ranges in multiples of 64 floats (whole cache lines) per task
  at::parallel_for(0, (out + 63) / 64, 1, [&](int64_t c0, int64_t c1) {
    const int64_t o0 = c0 * 64, o1 = std::min(out, c1 * 64);
    if (wt.scalar_type() == at::kFloat) {
      const float* w = wt.data_ptr<float>();
      if (isa == Isa::avx512) act_sparse_avx512(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
      else if (isa == Isa::avx2) act_sparse_avx2(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
      else act_sparse_portable(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
    } else {
      const uint16_t* w = reinterpret_cast<const uint16_t*>(wt.data_ptr<at::BFloat16>());
      if (isa == Isa::avx512) act_sparse_avx512(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
      else if (isa == Isa::avx2) act_sparse_avx2(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
      else act_sparse_portable(xp, w, yp, idx, n_idx, batch, in, out, o0, o1);
    }
  });
  return y;
}

at::Tensor q4_input_major_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& zero, int64_t out, int64_t group) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2, "scale must be contiguous fp32 (groups, tiles * 16)");
  if (zero) TORCH_CHECK(zero->scalar_type() == at::kFloat && zero->is_contiguous() && zero->sizes() == scale.sizes(), "zero must match scale");
  const int64_t in = scale.size(0) * group, tiles = scale.size(1) / TILE;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == in * tiles * 8,
              "packed data must be contiguous uint8 of in * tiles * 8 bytes");
  check_x(x, in);
  TORCH_CHECK(group > 0 && scale.size(1) % TILE == 0 && tiles * TILE >= out, "scale shape ", scale.sizes(), " does not fit");
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  // the inputs some batch row needs, group by group, and each row's sum per group: one pass over x, no ATen
  // calls (a decode step's products are small enough that a few of those would cost more than the product)
  const int64_t batch = x.size(0), groups = in / group;
  const float* xp = x.data_ptr<float>();
  std::vector<int64_t> live, starts(groups + 1, 0);
  std::vector<float> xsum(batch * groups, 0.f);
  live.reserve(in);
  for (int64_t g = 0; g < groups; ++g) {
    starts[g] = static_cast<int64_t>(live.size());
    for (int64_t i = g * group; i < (g + 1) * group; ++i) {
      bool needed = false;
      for (int64_t b = 0; b < batch; ++b) {
        const float v = xp[b * in + i];
        xsum[b * groups + g] += v;
        needed |= v != 0.f;
      }
      if (needed) live.push_back(i);
    }
  }
  starts[groups] = static_cast<int64_t>(live.size());
  ImArgs a{xp, y.data_ptr<float>(), data.data_ptr<uint8_t>(), scale.data_ptr<float>(),
           zero ? zero->data_ptr<float>() : nullptr, xsum.data(), live.data(), starts.data(),
           static_cast<int64_t>(live.size()), batch, in, out, tiles, group};
  const Isa isa = chosen();
  // eight tiles (128 outputs) per task: one cache line of each live input's row, read by the AVX2 path in two
  // passes of four tiles
  at::parallel_for(0, (tiles + 7) / 8, 1, [&](int64_t c0, int64_t c1) {
    const int64_t t0 = c0 * 8, t1 = std::min(tiles, c1 * 8);
    if (isa != Isa::portable) q4_input_major_avx2(a, t0, t1);  // AVX-512 CPUs run the AVX2 path
    else q4_input_major_portable(a, t0, t1);
  });
  return y;
}

// fp32 weights (out, in) of a q4_input_major layout (prefill: one BLAS product after it).
at::Tensor q4_input_major_unpack(const at::Tensor& data, const at::Tensor& scale, const c10::optional<at::Tensor>& zero,
                                 int64_t out, int64_t group) {
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.dim() == 2, "scale must be contiguous fp32 (groups, tiles * 16)");
  if (zero) TORCH_CHECK(zero->scalar_type() == at::kFloat && zero->is_contiguous() && zero->sizes() == scale.sizes(), "zero must match scale");
  const int64_t in = scale.size(0) * group, tiles = scale.size(1) / TILE, width = tiles * TILE;
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == in * tiles * 8,
              "packed data must be contiguous uint8 of in * tiles * 8 bytes");
  TORCH_CHECK(group > 0 && scale.size(1) % TILE == 0 && width >= out, "scale shape ", scale.sizes(), " does not fit");
  at::Tensor w = at::empty({out, in}, scale.options());
  ImArgs a{};
  a.data = data.data_ptr<uint8_t>();
  a.in = in;
  a.tiles = tiles;
  const float* s = scale.data_ptr<float>();
  const float* z = zero ? zero->data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t t = row / TILE, lane = row % TILE, k = lane % 8, shift = lane < 8 ? 0 : 4;
      int64_t stride;
      const uint8_t* base = im_tile(a, 0, t, &stride);
      float* wr = wp + row * in;
      for (int64_t i = 0; i < in; ++i) {
        const int64_t g = i / group;
        const float zp = z ? z[g * width + row] : 8.0f;
        wr[i] = (float((base[i * stride + k] >> shift) & 15) - zp) * s[g * width + row];
      }
    }
  });
  return w;
}

// Dequantized fp32 weights (out, in) of a q4_dense (pos undefined) or q4_sparse24 layout: prefill's path, where
// one BLAS product over many rows beats any GEMV kernel and the dequantization is a small share of the time.
at::Tensor q4_unpack(const at::Tensor& data, const c10::optional<at::Tensor>& pos, const at::Tensor& stored_scale,
                     const c10::optional<at::Tensor>& stored_zero, int64_t out, int64_t group) {
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.dim() == 3, "packed data must be contiguous uint8 (tiles, k, 16)");
  TORCH_CHECK(stored_scale.scalar_type() == at::kFloat || stored_scale.scalar_type() == at::kHalf, "scale must be fp32 or fp16");
  // fp16 scales and zero points (issue 25's step 0) as fp32: a copy of 1/16 to 1/64 of the unpacked weights' size
  const at::Tensor scale = stored_scale.to(at::kFloat).contiguous();
  const c10::optional<at::Tensor> zero = stored_zero ? c10::optional<at::Tensor>(stored_zero->to(at::kFloat).contiguous()) : c10::nullopt;
  if (zero) TORCH_CHECK(zero->sizes() == scale.sizes(), "zero must match scale");
  const bool sparse = pos.has_value();
  const int64_t in = data.size(1) * (sparse ? 4 : 2), groups = scale.size(1);
  TORCH_CHECK(groups * group == in && scale.size(0) == data.size(0) && data.size(0) * TILE >= out, "scale shape ", scale.sizes(), " does not fit");
  if (sparse) TORCH_CHECK(pos->scalar_type() == at::kByte && pos->is_contiguous() && pos->size(1) * 2 == data.size(1), "pos does not match data");
  at::Tensor w = at::empty({out, in}, scale.options());
  const uint8_t* d = data.data_ptr<uint8_t>();
  const uint8_t* p = sparse ? pos->data_ptr<uint8_t>() : nullptr;
  const float* s = scale.data_ptr<float>();
  const float* z = zero ? zero->data_ptr<float>() : nullptr;
  float* wp = w.data_ptr<float>();
  const int64_t k = data.size(1);
  at::parallel_for(0, out, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t row = r0; row < r1; ++row) {
      const int64_t t = row / TILE, lane = row % TILE;
      const uint8_t* dt = d + t * k * TILE + lane;
      const float* st = s + t * groups * TILE + lane;
      const float* zt = z ? z + t * groups * TILE + lane : nullptr;
      float* wr = wp + row * in;
      for (int64_t g = 0; g < groups; ++g) {
        const float sc = st[g * TILE], zp = zt ? zt[g * TILE] : 8.0f;
        if (!sparse) {
          for (int64_t j = g * group / 2; j < (g + 1) * group / 2; ++j) {
            const uint8_t b = dt[j * TILE];
            wr[2 * j] = (float(b & 15) - zp) * sc;
            wr[2 * j + 1] = (float(b >> 4) - zp) * sc;
          }
        } else {
          for (int64_t run = g * group / 4; run < (g + 1) * group / 4; ++run) {
            const uint8_t b = dt[run * TILE];
            const uint8_t code = (p[t * (k / 2) * TILE + (run / 2) * TILE + lane] >> (4 * (run % 2))) & 15;
            float* w4 = wr + 4 * run;
            w4[0] = w4[1] = w4[2] = w4[3] = 0.0f;
            w4[code & 3] = (float(b & 15) - zp) * sc;
            w4[code >> 2] = (float(b >> 4) - zp) * sc;
          }
        }
      }
    }
  });
  return w;
}

// A CPU allocator that keeps freed large blocks for reuse by the next allocation of the same size.
//
// The calibration forward allocates and frees gigabytes of same-shaped activations per block. glibc either
// keeps such blocks in per-thread heaps that fragment (peak RSS 3x the live set, measured) or, above a fixed
// mmap threshold, returns them to the kernel, and every new one costs a page fault per 4 KB (a third of the
// run's CPU time in the kernel, measured). Exact-size reuse needs neither: the same shapes come back every
// chunk. Blocks at least `min_bytes` long are cached up to `cap` bytes in all; smaller ones, and anything over
// the cap, are freed at once. Each block carries its size in a 64-byte header.
class CachingCpuAllocator final : public c10::Allocator {
 public:
  static constexpr size_t HEADER = 64;  // keeps the 64-byte alignment of c10::alloc_cpu

  // Every block, cached or not, carries the header (0 for blocks too small to cache): raw_deleter() promises
  // one deleter for all of this allocator's blocks, and oneDNN's bf16 kernels free small raw allocations with it.
  c10::DataPtr allocate(size_t n) override {
    const bool cacheable = n >= min_bytes_;
    const size_t size = cacheable ? (n + 4095) / 4096 * 4096 : n;
    char* base = nullptr;
    if (cacheable) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(size);
      if (it != free_.end() && !it->second.empty()) {
        base = it->second.back();
        it->second.pop_back();
        cached_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (base == nullptr) {
      base = static_cast<char*>(c10::alloc_cpu(size + HEADER));
      *reinterpret_cast<size_t*>(base) = cacheable ? size : 0;
    }
    void* data = base + HEADER;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

  static CachingCpuAllocator& instance() {
    static CachingCpuAllocator a;
    return a;
  }

  // cap > 0: install (or resize) with that many cached bytes at most; cap == 0: empty the cache and put the
  // replaced allocator back (blocks still alive keep their own deleter, so either is safe at any time).
  void configure(size_t cap, size_t min_bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (fallback_ == nullptr) fallback_ = c10::GetCPUAllocator();  // put back by cap == 0
    cap_ = cap;
    min_bytes_ = std::max<size_t>(min_bytes, 4096);
    trim_locked(cap);
    c10::SetCPUAllocator(cap > 0 ? static_cast<c10::Allocator*>(this) : fallback_, /*priority=*/1);
  }

  void trim() {
    std::lock_guard<std::mutex> lock(mu_);
    trim_locked(0);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_, misses_, static_cast<int64_t>(cached_), static_cast<int64_t>(cap_)};
  }

 private:
  static void release(void* data) {
    if (data == nullptr) return;
    char* base = static_cast<char*>(data) - HEADER;
    const size_t size = *reinterpret_cast<size_t*>(base);
    CachingCpuAllocator& self = instance();
    if (size > 0) {
      std::lock_guard<std::mutex> lock(self.mu_);
      if (self.cached_ + size <= self.cap_) {
        self.free_[size].push_back(base);
        self.cached_ += size;
        return;
      }
    }
    c10::free_cpu(base);
  }

  void trim_locked(size_t keep) {
    for (auto& [size, blocks] : free_) {
      while (cached_ > keep && !blocks.empty()) {
        c10::free_cpu(blocks.back());
        blocks.pop_back();
        cached_ -= size;
      }
    }
  }

  std::mutex mu_;
  std::unordered_map<size_t, std::vector<char*>> free_;
  size_t cached_ = 0, cap_ = 0, min_bytes_ = 1 << 20;
  int64_t hits_ = 0, misses_ = 0;
  c10::Allocator* fallback_ = nullptr;
};

int64_t cpu_cache(int64_t cap, int64_t min_bytes) {
  TORCH_CHECK(cap >= 0 && min_bytes >= 0, "cpu_cache takes sizes >= 0");
  CachingCpuAllocator::instance().configure(static_cast<size_t>(cap), static_cast<size_t>(min_bytes));
  return cap;
}

std::vector<int64_t> cpu_cache_stats() { return CachingCpuAllocator::instance().stats(); }

int64_t cpu_cache_trim() {
  CachingCpuAllocator::instance().trim();
  return 0;
}

// 0 portable, 1 AVX2, 2 AVX-512; set_isa forces one (for tests of every path on one machine).
int64_t isa() { return static_cast<int64_t>(chosen()); }
int64_t set_isa(int64_t level) {
  const Isa best = detect();
  TORCH_CHECK(level >= 0 && level <= static_cast<int64_t>(best), "this CPU supports ISA levels up to ", static_cast<int64_t>(best));
  chosen() = static_cast<Isa>(level);
  return level;
}

}  // namespace

// The tensor ops are CPU kernels of their schema (not composite), so torch.compile can trace them with a fake
// (shape-only) implementation: kernels/compiled.py registers those.
TORCH_LIBRARY(compress_kernels, m) {
  m.def("q4_dense_mm(Tensor x, Tensor data, Tensor scale, Tensor? zero, int out, int group) -> Tensor");
  m.def("q4_sparse24_mm(Tensor x, Tensor data, Tensor pos, Tensor scale, Tensor? zero, int out, int group) -> Tensor");
  m.def("act_sparse_mm(Tensor x, Tensor wt) -> Tensor");
  m.def("q4_input_major_mm(Tensor x, Tensor data, Tensor scale, Tensor? zero, int out, int group) -> Tensor");
  m.def("q4_input_major_unpack(Tensor data, Tensor scale, Tensor? zero, int out, int group) -> Tensor");
  m.def("q4_unpack(Tensor data, Tensor? pos, Tensor scale, Tensor? zero, int out, int group) -> Tensor");
  m.def("cpu_cache(int cap, int min_bytes) -> int", &cpu_cache);
  m.def("cpu_cache_stats() -> int[]", &cpu_cache_stats);
  m.def("cpu_cache_trim() -> int", &cpu_cache_trim);
  m.def("isa() -> int", &isa);
  m.def("set_isa(int level) -> int", &set_isa);
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("q4_dense_mm", &q4_dense_mm);
  m.impl("q4_sparse24_mm", &q4_sparse24_mm);
  m.impl("act_sparse_mm", &act_sparse_mm);
  m.impl("q4_input_major_mm", &q4_input_major_mm);
  m.impl("q4_input_major_unpack", &q4_input_major_unpack);
  m.impl("q4_unpack", &q4_unpack);
}
