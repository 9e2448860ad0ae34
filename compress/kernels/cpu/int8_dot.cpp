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

#include "int8_rows.h"

namespace {

using namespace compress_int8;

struct I8Args {
  const Int8Rows* x;
  float* y;             // (rows / levels, out)
  const uint8_t* data;  // q4_dense: (tiles, in/2, 16)
  const void* scale;    // (tiles, groups, 16) fp32 or fp16 (half)
  const void* zero;     // (tiles, groups, 16) like scale, or nullptr (8)
  bool half;
  int64_t batch, in, out, group;  // batch: rows of Int8Rows (input rows x levels)
};

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
      const __m256 xs = _mm256_set1_ps(a.x->qsum[(b0 + b) * blocks + k]), xd = _mm256_set1_ps(a.x->d[(b0 + b) * blocks + k]);
      y0[b] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xd), _mm256_fnmadd_ps(z0, xs, lanes_sum(r07[b])), y0[b]);
      y1[b] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xd), _mm256_fnmadd_ps(z1, xs, lanes_sum(r815[b])), y1[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm256_storeu_ps(lanes, y0[b]);
    _mm256_storeu_ps(lanes + 8, y1[b]);
    store_tile(a, t, b0 + b, lanes);
  }
}

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

}  // namespace

TORCH_LIBRARY_FRAGMENT(compress_kernels, m) {
  m.def("q4_dense_i8_mm(Tensor x, Tensor data, Tensor scale, Tensor? zero, int out, int group, int levels=1) -> Tensor");
  m.def("int8_isa() -> int", &int8_isa);
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("q4_dense_i8_mm", &q4_dense_i8_mm);
}
