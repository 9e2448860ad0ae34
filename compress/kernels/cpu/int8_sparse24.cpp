// 2:4 GEMV on int8 inputs (the rounding and arithmetic of int8_dot.cpp's q4_dense, shared in int8_rows.h).
// q4_sparse24 keeps two codes per run of 4 inputs and a 2-bit position for each: the kernels gather each kept
// code's int8 input with a byte shuffle (vpshufb; AVX-512 transposes with vpermb first) and multiply as q4_dense does.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "int8_rows.h"

namespace {

using namespace compress_int8;

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

// 16 rows x 8 inputs (2 runs: 32 bytes of codes, 16 of positions) per step. The codes' nibbles are interleaved
// into (u0, u1) byte pairs per row, run 2j in lane 0 and run 2j+1 in lane 1; the positions, looked up (vpshufb)
// as input indexes, likewise into (p0, p1) pairs, which gather the step's 8 int8 inputs (in both lanes) with vpshufb;
// vpmaddubsw multiplies each row's pair, and a second one with ones sums the gathered inputs for the zero point.
// A row's int16 sums stay below 4 steps x 2 x 15 x 127 < 2^15 over a block.
template <int B>
__attribute__((target("avx2,fma,f16c"))) void q4_sparse24_i8_avx2_rows(const S8Args& a, int64_t t, int64_t b0) {
  const int64_t groups = a.in / a.group, blocks = a.in / BLOCK, runs = a.in / 4;
  const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi8(1);
  const __m256i lane_shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);  // lane 1 reads the high nibbles: run 2j+1
  // position code c = p0 | p1 << 2 -> the index of p0's (p1's) input among the step's 8: run 2j's in lane 0, 2j+1's in lane 1
  const __m256i first = _mm256_setr_epi8(0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3,
                                         4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7, 4, 5, 6, 7);
  const __m256i second = _mm256_setr_epi8(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3,
                                          4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  __m256 y0[B], y1[B];
  for (int b = 0; b < B; ++b) y0[b] = y1[b] = _mm256_setzero_ps();
  const uint8_t* d = a.data + t * runs * TILE;
  const uint8_t* p = a.pos + t * (runs / 2) * TILE;
  for (int64_t k = 0; k < blocks; ++k) {
    __m256i acc07[B], acc815[B], kept07[B], kept815[B];  // int16: rows 0-7 / 8-15, lane 0 run 2j, lane 1 run 2j+1
    for (int b = 0; b < B; ++b) acc07[b] = acc815[b] = kept07[b] = kept815[b] = _mm256_setzero_si256();
    for (int step = 0; step < BLOCK / 8; ++step, d += 2 * TILE, p += TILE) {
      _mm_prefetch((const char*)(d + PREFETCH), _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256((const __m256i*)d);
      const __m256i u0 = _mm256_and_si256(v, low), u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
      const __m256i w07 = _mm256_unpacklo_epi8(u0, u1), w815 = _mm256_unpackhi_epi8(u0, u1);
      const __m256i codes = _mm256_and_si256(
          _mm256_srlv_epi32(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)p)), lane_shift), low);
      const __m256i p0 = _mm256_shuffle_epi8(first, codes), p1 = _mm256_shuffle_epi8(second, codes);
      const __m256i i07 = _mm256_unpacklo_epi8(p0, p1), i815 = _mm256_unpackhi_epi8(p0, p1);
      for (int b = 0; b < B; ++b) {
        int64_t eight;
        std::memcpy(&eight, a.x->q.data() + (b0 + b) * a.in + k * BLOCK + 8 * step, 8);
        const __m256i xv = _mm256_set1_epi64x(eight);
        const __m256i g07 = _mm256_shuffle_epi8(xv, i07), g815 = _mm256_shuffle_epi8(xv, i815);
        acc07[b] = _mm256_add_epi16(acc07[b], _mm256_maddubs_epi16(w07, g07));
        acc815[b] = _mm256_add_epi16(acc815[b], _mm256_maddubs_epi16(w815, g815));
        kept07[b] = _mm256_add_epi16(kept07[b], _mm256_maddubs_epi16(ones, g07));
        kept815[b] = _mm256_add_epi16(kept815[b], _mm256_maddubs_epi16(ones, g815));
      }
    }
    const int64_t at = (t * groups + k * BLOCK / a.group) * TILE;
    const __m256 s0 = param8(a.scale, a.half, at), s1 = param8(a.scale, a.half, at + 8);
    const __m256 z0 = a.zero ? param8(a.zero, a.half, at) : _mm256_set1_ps(8.f);
    const __m256 z1 = a.zero ? param8(a.zero, a.half, at + 8) : _mm256_set1_ps(8.f);
    for (int b = 0; b < B; ++b) {
      const __m256 xd = _mm256_set1_ps(a.x->d[(b0 + b) * blocks + k]);
      const __m256 f0 = _mm256_fnmadd_ps(z0, lanes_sum(kept07[b]), lanes_sum(acc07[b]));
      const __m256 f1 = _mm256_fnmadd_ps(z1, lanes_sum(kept815[b]), lanes_sum(acc815[b]));
      y0[b] = _mm256_fmadd_ps(_mm256_mul_ps(s0, xd), f0, y0[b]);
      y1[b] = _mm256_fmadd_ps(_mm256_mul_ps(s1, xd), f1, y1[b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    float lanes[TILE];
    _mm256_storeu_ps(lanes, y0[b]);
    _mm256_storeu_ps(lanes + 8, y1[b]);
    store_tile(a, t, b0 + b, lanes);
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

// 2:4 on int8 inputs: AVX-512 VNNI + VBMI, AVX2, or the portable loop.
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
  const int64_t isa = int8_isa();
  at::parallel_for(0, data.size(0), 1, [&](int64_t t0, int64_t t1) {
    if (isa == 2) by_rows<S8Args, q4_sparse24_i8_avx512_rows<4>, q4_sparse24_i8_avx512_rows<2>, q4_sparse24_i8_avx512_rows<1>>(a, t0, t1);
    else if (isa == 1) by_rows<S8Args, q4_sparse24_i8_avx2_rows<4>, q4_sparse24_i8_avx2_rows<2>, q4_sparse24_i8_avx2_rows<1>>(a, t0, t1);
    else q4_sparse24_i8_portable(a, t0, t1);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compress_kernels, m) {
  m.def("q4_sparse24_i8_mm(Tensor x, Tensor data, Tensor pos, Tensor scale, Tensor? zero, int out, int group, int levels=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("q4_sparse24_i8_mm", &q4_sparse24_i8_mm);
}
