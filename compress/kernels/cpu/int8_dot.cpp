// Integer dot products with packed 4-bit weights: the input is rounded to int8 once per call, per batch row and
// block of 32 inputs (d = max|x| / 127, q = round(x / d), llama.cpp's Q8_0), and each 16-row tile of a q4_dense
// layout multiplies its unsigned codes u (0..15) by q in integers, with one float multiply-add per block:
//
//   y[b, r] = sum over groups g of s[r, g] * sum over blocks k of g of d[b, k] * (sum_{i in k} u[r, i] q[b, i]
//                                                                                 - z[r, g] * sum_{i in k} q[b, i])
//
// z is the unsigned zero point (8 when symmetric), s the group scale; groups are whole blocks (group % 32 == 0).
// With `levels` 2 each input row is rounded twice (x ~ d1 q1 + d2 q2, q2 the int8 rounding of x - d1 q1, ~15 bits
// in all): the two levels are two rows of the same tile pass, summed as they are stored, so the weights are read
// once and only the integer dot products double.
// The fp32 kernels in kernels.cpp stay the reference the tests and `--act-precision fp32` use.
//
// AVX-512 (VNNI + VBMI): 64 bytes of a tile (4 input pairs x 16 rows) are transposed with one vpermb so each
// 32-bit lane holds one row's 8 codes, low nibbles the even inputs and high nibbles the odd ones; two vpdpbusd
// per 64 bytes multiply them by 4 broadcast int8 inputs each. AVX2: the low and high nibbles of 32 bytes (2
// pairs x 16 rows) are interleaved into (even, odd) byte pairs per row and vpmaddubsw multiplies them by the
// pair's two inputs; eight such int16 sums fit a block (8 x 2 x 15 x 127 < 2^15).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "isa.h"

namespace {

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
Int8Rows quantize_rows(const float* x, int64_t batch, int64_t in, bool even_odd, int64_t levels) {
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

struct I8Args {
  const Int8Rows* x;
  float* y;             // (rows / levels, out)
  const uint8_t* data;  // q4_dense: (tiles, in/2, 16)
  const void* scale;    // (tiles, groups, 16) fp32 or fp16 (half)
  const void* zero;     // (tiles, groups, 16) like scale, or nullptr (8)
  bool half;
  int64_t batch, in, out, group;  // batch: rows of Int8Rows (input rows x levels)
};

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
template <typename A>  // I8Args or S8Args
inline void store_tile(const A& a, int64_t t, int64_t b, const float* lanes) {
  const int64_t rows = std::min<int64_t>(TILE, a.out - t * TILE);
  float* y = a.y + (b / a.x->levels) * a.out + t * TILE;
  if (b % a.x->levels == 0) std::memcpy(y, lanes, rows * sizeof(float));
  else for (int64_t r = 0; r < rows; ++r) y[r] += lanes[r];
}

void q4_dense_i8_portable(const I8Args& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, half = a.in / 2;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      float y[TILE] = {0};
      const int8_t* q = a.x->q.data() + b * a.in;
      for (int64_t k = 0; k < blocks; ++k) {
        int32_t acc[TILE] = {0};
        for (int64_t i = k * BLOCK; i < (k + 1) * BLOCK; ++i) {
          const uint8_t* d = a.data + (t * half + i / 2) * TILE;
          for (int r = 0; r < TILE; ++r) acc[r] += ((d[r] >> (4 * (i & 1))) & 15) * q[i];
        }
        const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
        const float xd = a.x->d[b * blocks + k], xs = a.x->qsum[b * blocks + k];
        for (int r = 0; r < TILE; ++r)
          y[r] += param(a.scale, a.half, at + r) * xd * (acc[r] - (a.zero ? param(a.zero, a.half, at + r) : 8.f) * xs);
      }
      store_tile(a, t, b, y);
    }
  }
}

template <int B>
__attribute__((target("avx2,fma,f16c"))) void q4_dense_i8_avx2_rows(const I8Args& a, int64_t t, int64_t b0) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, half = a.in / 2;
  const __m256i low = _mm256_set1_epi8(15);
  // lane 0 takes inputs (0, 1) of the 4 loaded, lane 1 inputs (2, 3): the two input pairs of the 32 bytes
  const __m256i pair = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                        2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
  __m256 y0[B], y1[B];
  for (int b = 0; b < B; ++b) y0[b] = y1[b] = _mm256_setzero_ps();
  const uint8_t* d = a.data + t * half * TILE;
  for (int64_t k = 0; k < blocks; ++k) {
    __m256i r07[B], r815[B];  // int16 sums: rows 0-7 / 8-15, lane 0 even pairs, lane 1 odd pairs
    for (int b = 0; b < B; ++b) r07[b] = r815[b] = _mm256_setzero_si256();
    for (int step = 0; step < BLOCK / 4; ++step, d += 2 * TILE) {
      _mm_prefetch((const char*)(d + PREFETCH), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256((const __m256i*)d);
      const __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const __m256i w07 = _mm256_unpacklo_epi8(lo, hi), w815 = _mm256_unpackhi_epi8(lo, hi);
      for (int b = 0; b < B; ++b) {
        int32_t four;
        std::memcpy(&four, a.x->q.data() + (b0 + b) * a.in + k * BLOCK + 4 * step, 4);
        const __m256i xv = _mm256_shuffle_epi8(_mm256_set1_epi32(four), pair);
        r07[b] = _mm256_add_epi16(r07[b], _mm256_maddubs_epi16(w07, xv));
        r815[b] = _mm256_add_epi16(r815[b], _mm256_maddubs_epi16(w815, xv));
      }
    }
    const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
    const __m256 s0 = param8(a.scale, a.half, at), s1 = param8(a.scale, a.half, at + 8);
    const __m256 z0 = a.zero ? param8(a.zero, a.half, at) : _mm256_set1_ps(8.f);
    const __m256 z1 = a.zero ? param8(a.zero, a.half, at + 8) : _mm256_set1_ps(8.f);
    for (int b = 0; b < B; ++b) {
      const __m256i i07 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(r07[b])),
                                           _mm256_cvtepi16_epi32(_mm256_extracti128_si256(r07[b], 1)));
      const __m256i i815 = _mm256_add_epi32(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(r815[b])),
                                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(r815[b], 1)));
      const __m256 xs = _mm256_set1_ps(a.x->qsum[(b0 + b) * blocks + k]), xd = _mm256_set1_ps(a.x->d[(b0 + b) * blocks + k]);
      y0[b] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xd), _mm256_fnmadd_ps(z0, xs, _mm256_cvtepi32_ps(i07)), y0[b]);
      y1[b] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xd), _mm256_fnmadd_ps(z1, xs, _mm256_cvtepi32_ps(i815)), y1[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm256_storeu_ps(lanes, y0[b]);
    _mm256_storeu_ps(lanes + 8, y1[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

// vpermb's index: byte 4r + p of the transposed vector = byte 16p + r of the loaded one (row r's 4 pairs in lane r)
struct Transpose {
  alignas(64) uint8_t bytes[64];
  Transpose() {
    for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(16 * (i % 4) + i / 4);
  }
};
const Transpose kTranspose;

template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) void q4_dense_i8_avx512_rows(const I8Args& a, int64_t t,
                                                                                                int64_t b0) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, half = a.in / 2;
  const __m512i transpose = _mm512_load_si512(kTranspose.bytes), low = _mm512_set1_epi8(15);
  __m512 y[B];
  for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
  const uint8_t* d = a.data + t * half * TILE;
  for (int64_t k = 0; k < blocks; ++k) {
    __m512i even[B], odd[B];
    for (int b = 0; b < B; ++b) even[b] = odd[b] = _mm512_setzero_si512();
    for (int step = 0; step < BLOCK / 8; ++step, d += 4 * TILE) {
      _mm_prefetch((const char*)(d + PREFETCH), _MM_HINT_T0);
      const __m512i v = _mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(d));
      const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
      for (int b = 0; b < B; ++b) {
        const int8_t* q = a.x->q.data() + (b0 + b) * a.in + k * BLOCK + 8 * step;  // 4 even, then 4 odd inputs
        int32_t e, o;
        std::memcpy(&e, q, 4);
        std::memcpy(&o, q + 4, 4);
        even[b] = _mm512_dpbusd_epi32(even[b], lo, _mm512_set1_epi32(e));
        odd[b] = _mm512_dpbusd_epi32(odd[b], hi, _mm512_set1_epi32(o));
      }
    }
    const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
    const __m512 s = param16(a.scale, a.half, at);
    const __m512 z = a.zero ? param16(a.zero, a.half, at) : _mm512_set1_ps(8.f);
    for (int b = 0; b < B; ++b) {
      const __m512 acc = _mm512_cvtepi32_ps(_mm512_add_epi32(even[b], odd[b]));
      const __m512 xs = _mm512_set1_ps(a.x->qsum[(b0 + b) * blocks + k]), xd = _mm512_set1_ps(a.x->d[(b0 + b) * blocks + k]);
      y[b] = _mm512_fmadd_ps(_mm512_mul_ps(s, xd), _mm512_fnmadd_ps(z, xs, acc), y[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm512_storeu_ps(lanes, y[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

// Batch rows B at a time (B accumulators in registers), each loaded weight vector reused B times.
template <typename A, void (*ROWS4)(const A&, int64_t, int64_t), void (*ROWS2)(const A&, int64_t, int64_t),
          void (*ROWS1)(const A&, int64_t, int64_t)>
void by_rows(const A& a, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t) {
    int64_t b = 0;
    for (; b + 4 <= a.batch; b += 4) ROWS4(a, t, b);
    for (; b + 2 <= a.batch; b += 2) ROWS2(a, t, b);
    for (; b < a.batch; ++b) ROWS1(a, t, b);
  }
}

// ---------------------------------------------------------------- q4_sparse24 on int8 inputs
// Per run of 4 inputs a row keeps two codes (u0 at position p0, u1 at p1); a kept slot whose weight is zero
// holds the zero point, so y = sum over kept slots of (u - z) q = sum u q - z * (sum of the kept slots' q).
struct S8Args {
  const Int8Rows* x;
  float* y;
  const uint8_t* data;  // (tiles, in/4, 16): u0 | u1 << 4 per run and row
  const uint8_t* pos;   // (tiles, in/8, 16): position codes p0 | p1 << 2 of runs 2j (low) and 2j+1 (high)
  const void* scale;    // as in I8Args
  const void* zero;
  bool half;
  int64_t batch, in, out, group;  // batch: rows of Int8Rows (input rows x levels)
};

void q4_sparse24_i8_portable(const S8Args& a, int64_t t0, int64_t t1) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, runs = a.in / 4;
  for (int64_t t = t0; t < t1; ++t) {
    for (int64_t b = 0; b < a.batch; ++b) {
      float y[TILE] = {0};
      const int8_t* q = a.x->q.data() + b * a.in;
      for (int64_t k = 0; k < blocks; ++k) {
        int32_t acc[TILE] = {0}, kept[TILE] = {0};
        for (int64_t run = k * BLOCK / 4; run < (k + 1) * BLOCK / 4; ++run) {
          const uint8_t* d = a.data + (t * runs + run) * TILE;
          const uint8_t* p = a.pos + (t * (runs / 2) + run / 2) * TILE;
          for (int r = 0; r < TILE; ++r) {
            const int code = (p[r] >> (4 * (run & 1))) & 15;
            const int8_t x0 = q[4 * run + (code & 3)], x1 = q[4 * run + (code >> 2)];
            acc[r] += (d[r] & 15) * x0 + (d[r] >> 4) * x1;
            kept[r] += x0 + x1;
          }
        }
        const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
        const float xd = a.x->d[b * blocks + k];
        for (int r = 0; r < TILE; ++r)
          y[r] += param(a.scale, a.half, at + r) * xd * (acc[r] - (a.zero ? param(a.zero, a.half, at + r) : 8.f) * kept[r]);
      }
      store_tile(a, t, b, y);
    }
  }
}

// vpermb's index for 32 position bytes [2 pairs of runs][16 rows]: lane r = (pos[0][r], pos[1][r], -, -)
struct PosTranspose {
  alignas(64) uint8_t bytes[64];
  PosTranspose() {
    for (int i = 0; i < 64; ++i) bytes[i] = static_cast<uint8_t>(i % 4 == 1 ? 16 + i / 4 : i / 4);
  }
};
const PosTranspose kPosTranspose;

// 16 rows x 16 inputs (4 runs, 64 bytes of codes, 32 of positions) per step: one vpermb transposes the codes
// to one row per 32-bit lane, vpmultishiftqb spreads the two nibbles of two runs over 4 bytes (and the 2-bit
// positions likewise into input indexes), vpshufb gathers each kept slot's int8 input from the step's 16, and
// vpdpbusd multiplies; a second vpdpbusd with ones sums the kept slots' inputs for the zero point.
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) void q4_sparse24_i8_avx512_rows(const S8Args& a,
                                                                                                   int64_t t, int64_t b0) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, runs = a.in / 4;
  const __m512i transpose = _mm512_load_si512(kTranspose.bytes), pos_t = _mm512_load_si512(kPosTranspose.bytes);
  // bit offsets inside each 64-bit pair of lanes: codes of runs (0, 1) and (2, 3); positions likewise
  const __m512i codes01 = _mm512_set1_epi64(0x2c2824200c080400LL), codes23 = _mm512_set1_epi64(0x3c3834301c181410LL);
  const __m512i pos01 = _mm512_set1_epi64(0x2624222006040200LL), pos23 = _mm512_set1_epi64(0x2e2c2a280e0c0a08LL);
  const __m512i base01 = _mm512_set1_epi32(0x04040000), base23 = _mm512_set1_epi32(0x0c0c0808);
  const __m512i low = _mm512_set1_epi8(15), three = _mm512_set1_epi8(3), ones = _mm512_set1_epi8(1);
  __m512 y[B];
  for (int b = 0; b < B; ++b) y[b] = _mm512_setzero_ps();
  const uint8_t* d = a.data + t * runs * TILE;
  const uint8_t* p = a.pos + t * (runs / 2) * TILE;
  for (int64_t k = 0; k < blocks; ++k) {
    __m512i acc[B], kept[B];
    for (int b = 0; b < B; ++b) acc[b] = kept[b] = _mm512_setzero_si512();
    for (int step = 0; step < BLOCK / 16; ++step, d += 4 * TILE, p += 2 * TILE) {
      _mm_prefetch((const char*)(d + PREFETCH), _MM_HINT_T0);
      const __m512i v = _mm512_permutexvar_epi8(transpose, _mm512_loadu_si512(d));
      const __m512i w01 = _mm512_and_si512(_mm512_multishift_epi64_epi8(codes01, v), low);
      const __m512i w23 = _mm512_and_si512(_mm512_multishift_epi64_epi8(codes23, v), low);
      const __m512i ps = _mm512_permutexvar_epi8(pos_t, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i*)p)));
      const __m512i i01 = _mm512_add_epi8(_mm512_and_si512(_mm512_multishift_epi64_epi8(pos01, ps), three), base01);
      const __m512i i23 = _mm512_add_epi8(_mm512_and_si512(_mm512_multishift_epi64_epi8(pos23, ps), three), base23);
      for (int b = 0; b < B; ++b) {
        const __m512i xs = _mm512_broadcast_i32x4(
            _mm_loadu_si128((const __m128i*)(a.x->q.data() + (b0 + b) * a.in + k * BLOCK + 16 * step)));
        const __m512i g01 = _mm512_shuffle_epi8(xs, i01), g23 = _mm512_shuffle_epi8(xs, i23);
        acc[b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc[b], w01, g01), w23, g23);
        kept[b] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(kept[b], ones, g01), ones, g23);
      }
    }
    const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
    const __m512 s = param16(a.scale, a.half, at);
    const __m512 z = a.zero ? param16(a.zero, a.half, at) : _mm512_set1_ps(8.f);
    for (int b = 0; b < B; ++b) {
      const __m512 f = _mm512_fnmadd_ps(z, _mm512_cvtepi32_ps(kept[b]), _mm512_cvtepi32_ps(acc[b]));
      y[b] = _mm512_fmadd_ps(_mm512_mul_ps(s, _mm512_set1_ps(a.x->d[(b0 + b) * blocks + k])), f, y[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm512_storeu_ps(lanes, y[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

// Which path the integer kernels take now: 2 AVX-512 VNNI, 1 AVX2, 0 portable.
int64_t int8_isa() {
  const Isa isa = compress_isa::chosen();
  if (isa == Isa::avx512 && compress_isa::has_avx512_int8()) return 2;
  return isa == Isa::portable ? 0 : 1;
}

void check_inputs(const at::Tensor& x, int64_t in, int64_t group, const at::Tensor& scale,
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

at::Tensor q4_dense_i8_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                          const c10::optional<at::Tensor>& zero, int64_t out, int64_t group, int64_t levels) {
  const int64_t in = data.size(1) * 2;
  check_inputs(x, in, group, scale, zero, out, levels);
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous(), "packed data must be contiguous uint8");
  const int64_t isa = int8_isa();
  const Int8Rows rows = quantize_rows(x.data_ptr<float>(), x.size(0), in, isa == 2, levels);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  const I8Args a{&rows, y.data_ptr<float>(), data.data_ptr<uint8_t>(), scale.data_ptr(), zero ? zero->data_ptr() : nullptr,
                 scale.scalar_type() == at::kHalf, x.size(0) * levels, in, out, group};
  at::parallel_for(0, data.size(0), 1, [&](int64_t t0, int64_t t1) {
    if (isa == 2) by_rows<I8Args, q4_dense_i8_avx512_rows<4>, q4_dense_i8_avx512_rows<2>, q4_dense_i8_avx512_rows<1>>(a, t0, t1);
    else if (isa == 1) by_rows<I8Args, q4_dense_i8_avx2_rows<4>, q4_dense_i8_avx2_rows<2>, q4_dense_i8_avx2_rows<1>>(a, t0, t1);
    else q4_dense_i8_portable(a, t0, t1);
  });
  return y;
}

// 2:4 on int8 inputs: AVX-512 VNNI + VBMI, else the portable loop (callers use it on AVX-512 machines only).
at::Tensor q4_sparse24_i8_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& pos, const at::Tensor& scale,
                             const c10::optional<at::Tensor>& zero, int64_t out, int64_t group, int64_t levels) {
  const int64_t in = data.size(1) * 4;
  check_inputs(x, in, group, scale, zero, out, levels);
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && pos.scalar_type() == at::kByte &&
              pos.is_contiguous() && pos.size(1) * 8 == in, "packed data and positions must be contiguous uint8 of a 2:4 layout");
  const Int8Rows rows = quantize_rows(x.data_ptr<float>(), x.size(0), in, false, levels);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  const S8Args a{&rows, y.data_ptr<float>(), data.data_ptr<uint8_t>(), pos.data_ptr<uint8_t>(), scale.data_ptr(),
                 zero ? zero->data_ptr() : nullptr, scale.scalar_type() == at::kHalf, x.size(0) * levels, in, out, group};
  const bool vnni = int8_isa() == 2;
  at::parallel_for(0, data.size(0), 1, [&](int64_t t0, int64_t t1) {
    if (vnni) by_rows<S8Args, q4_sparse24_i8_avx512_rows<4>, q4_sparse24_i8_avx512_rows<2>, q4_sparse24_i8_avx512_rows<1>>(a, t0, t1);
    else q4_sparse24_i8_portable(a, t0, t1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compress_kernels, m) {
  m.def("q4_dense_i8_mm(Tensor x, Tensor data, Tensor scale, Tensor? zero, int out, int group, int levels=1) -> Tensor");
  m.def("q4_sparse24_i8_mm(Tensor x, Tensor data, Tensor pos, Tensor scale, Tensor? zero, int out, int group, int levels=1) -> Tensor");
  m.def("int8_isa() -> int", &int8_isa);
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("q4_dense_i8_mm", &q4_dense_i8_mm);
  m.impl("q4_sparse24_i8_mm", &q4_sparse24_i8_mm);
}
