// Integer dot products with input-major 4-bit weights (q4_input_major: the layout of linears with activation
// thresholds, see kernels.cpp). The input is rounded to int8 per block of 32 (quantize_rows, as the other integer
// kernels), and only the inputs whose int8 value is not zero are read: each one's codes are one 64-byte line per
// 128 outputs (a block of 8 tiles):
//
//   y[b, o] = sum over blocks k of s[g(k), o] * d[b, k] * (sum over live i in k of u[o, i] q[b, i] - z[g(k), o] * qsum[b, k])
//
// An input that rounds to 0 adds nothing to either sum, so skipping it is exact; it skips the inputs the
// thresholds zeroed and those under half a step of their block's scale.
//
// AVX2: a block's live inputs are taken two at a time (an odd one out is paired with itself times 0). The bytes
// of the two inputs' codes for 64 outputs are interleaved (vpunpck{l,h}bw), so each 16-bit lane holds one byte
// of each, and masking the low and high nibbles gives (u[o, i], u[o, j]) pairs that one vpmaddubsw multiplies by
// the broadcast (q[i], q[j]). The int16 sums are folded into the fp32 outputs before 15 * sum |q| could pass
// 2^15 - 1 (after eight pairs at worst; a block's pairs usually fit at once). CPUs with AVX-512 take this path too.
// Where the weights come from DRAM, skipping inputs saves little: the skipped lines sit between live ones in one
// ascending stream (benchmarks/input_major.py: at 40% zero inputs no faster than at none, on a Zen 3).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "int8_rows.h"

namespace {

using namespace compress_int8;

constexpr int64_t IM_BLOCK = 8;  // tiles per block of the layout (formats.IM_BLOCK)
constexpr int64_t CHUNK = 4;     // tiles per AVX2 pass: 32 bytes of an input's codes, 64 outputs
constexpr int32_t INT16_ROOM = 32767 / 15;  // sum of |q| whose products with codes <= 15 fit an int16

// Two live inputs of one block of one input row, as the AVX2 loop reads them.
struct Pair {
  int32_t i, j;    // inputs (j == i for an odd one out, whose q is then 0)
  int16_t q;       // (uint8) q[i] | q[j] << 8: the vpmaddubsw multiplier
  bool fold;       // the int16 sums are folded into the outputs after this pair
};

// Each row's live inputs, paired, block by block: pairs (rows, blocks, BLOCK / 2), n (rows, blocks) in use.
struct LivePairs {
  std::vector<Pair> pairs;
  std::vector<int32_t> n;
};

LivePairs live_pairs(const Int8Rows& x, int64_t rows, int64_t in) {
  const int64_t blocks = in / BLOCK;
  LivePairs p{std::vector<Pair>(rows * blocks * (BLOCK / 2)), std::vector<int32_t>(rows * blocks, 0)};
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t k = 0; k < blocks; ++k) {
      const int8_t* q = x.q.data() + r * in + k * BLOCK;
      int32_t live[BLOCK], m = 0;
      for (int32_t i = 0; i < BLOCK; ++i)
        if (q[i] != 0) live[m++] = i;
      Pair* out = p.pairs.data() + (r * blocks + k) * (BLOCK / 2);
      int32_t room = INT16_ROOM, n = 0;
      for (int32_t c = 0; c < m; c += 2, ++n) {
        const int32_t i = live[c], j = c + 1 < m ? live[c + 1] : i;
        const int8_t qi = q[i], qj = c + 1 < m ? q[j] : 0;
        const int32_t mass = std::abs(qi) + std::abs(qj);
        if (mass > room) {  // this pair would not fit: fold after the last one
          out[n - 1].fold = true;
          room = INT16_ROOM;
        }
        room -= mass;
        out[n] = Pair{static_cast<int32_t>(k * BLOCK + i), static_cast<int32_t>(k * BLOCK + j),
                      static_cast<int16_t>(static_cast<uint8_t>(qi) | (static_cast<uint16_t>(static_cast<uint8_t>(qj)) << 8)),
                      false};
      }
      if (n) out[n - 1].fold = true;
      p.n[r * blocks + k] = n;
    }
  }
  return p;
}

struct ImI8Args {
  const Int8Rows* x;
  const LivePairs* live;
  float* y;             // (rows / levels, out)
  const uint8_t* data;  // blocks of (in, <= 8 tiles, 8)
  const void* scale;    // (groups, tiles * 16) fp32 or fp16 (half)
  const void* zero;     // like scale, or nullptr (8)
  bool half;
  int64_t rows, in, out, tiles, group;  // rows: of Int8Rows (input rows x levels)
};

// Tiles [t_lo, t_hi) (relative to the layout block starting at tile t0 with n tiles) of row r, added into y
// (that block's outputs): integers per block of 32, then the float fold.
void im_i8_tiles_portable(const ImI8Args& a, int64_t r, int64_t t0, int64_t n, int64_t t_lo, int64_t t_hi, float* y) {
  const int64_t blocks = a.in / BLOCK, width = a.tiles * TILE, stride = n * 8;
  const uint8_t* base = a.data + 8 * a.in * t0;
  const int8_t* q = a.x->q.data() + r * a.in;
  for (int64_t k = 0; k < blocks; ++k) {
    const Pair* pairs = a.live->pairs.data() + (r * blocks + k) * (BLOCK / 2);
    const int32_t np = a.live->n[r * blocks + k];
    if (np == 0) continue;  // nothing live: both sums are 0
    const float xd = a.x->d[r * blocks + k], xs = a.x->qsum[r * blocks + k];
    const int64_t g = k * BLOCK / a.group;
    for (int64_t t = t_lo; t < t_hi; ++t) {
      int32_t acc[TILE] = {0};
      for (int32_t p = 0; p < np; ++p) {
        const int32_t inputs[2] = {pairs[p].i, pairs[p].j};
        for (int h = 0; h < (pairs[p].i == pairs[p].j ? 1 : 2); ++h) {  // an odd one out is paired with itself
          const uint8_t* d = base + inputs[h] * stride + 8 * t;
          for (int c = 0; c < 8; ++c) {
            acc[c] += (d[c] & 15) * q[inputs[h]];
            acc[c + 8] += (d[c] >> 4) * q[inputs[h]];
          }
        }
      }
      const int64_t at = g * width + (t0 + t) * TILE;
      for (int o = 0; o < TILE; ++o)
        y[t * TILE + o] += param(a.scale, a.half, at + o) * xd * (acc[o] - (a.zero ? param(a.zero, a.half, at + o) : 8.f) * xs);
    }
  }
}

// 32 bytes of two inputs' codes (64 outputs) times their int8 values (q[i], q[j] in each 16-bit lane of xq),
// added to the int16 sums s0..s3 (lane l of s_m: outputs 32l + 8m .. +7).
__attribute__((target("avx2"), always_inline)) inline void pair_products(const uint8_t* u, const uint8_t* v, __m256i xq,
                                                                         __m256i& s0, __m256i& s1, __m256i& s2, __m256i& s3) {
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i uc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u));
  const __m256i vc = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(v));
  const __m256i tile_even = _mm256_unpacklo_epi8(uc, vc), tile_odd = _mm256_unpackhi_epi8(uc, vc);  // (u, v) bytes
  s0 = _mm256_add_epi16(s0, _mm256_maddubs_epi16(_mm256_and_si256(tile_even, nibble), xq));
  s1 = _mm256_add_epi16(s1, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(tile_even, 4), nibble), xq));
  s2 = _mm256_add_epi16(s2, _mm256_maddubs_epi16(_mm256_and_si256(tile_odd, nibble), xq));
  s3 = _mm256_add_epi16(s3, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(tile_odd, 4), nibble), xq));
}

// NC 64-output chunks (tiles 0 .. 4·NC - 1 of the layout block at tile t0 with n tiles) of row r, block k of
// inputs, added into y (the layout block's outputs): y += s · d · (sum of u q - z · qsum). The pairs run in
// segments whose int16 sums cannot overflow (usually one), each folded into y as fp32.
template <int NC>
__attribute__((target("avx2,fma,f16c"))) void im_i8_chunks_avx2(const ImI8Args& a, int64_t r, int64_t k, int64_t t0,
                                                                int64_t n, float* y) {
  const int64_t blocks = a.in / BLOCK, stride = n * 8;
  const uint8_t* base = a.data + 8 * a.in * t0;
  const Pair* pairs = a.live->pairs.data() + (r * blocks + k) * (BLOCK / 2);
  const int32_t np = a.live->n[r * blocks + k];
  const int64_t at = (k * BLOCK / a.group) * a.tiles * TILE + t0 * TILE;
  const __m256 xd = _mm256_set1_ps(a.x->d[r * blocks + k]);
  // the zero point's share, - d · z · qsum, comes with the first segment
  __m256 offset[8 * NC];
  const __m256 dq = _mm256_set1_ps(-a.x->d[r * blocks + k] * a.x->qsum[r * blocks + k]);
  for (int m = 0; m < 8 * NC; ++m) offset[m] = _mm256_mul_ps(dq, a.zero ? param8(a.zero, a.half, at + 8 * m) : _mm256_set1_ps(8.f));
  for (int32_t p = 0; p < np;) {
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;  // registers
    for (bool last = false; !last; ++p) {
      const uint8_t* u = base + pairs[p].i * stride;
      const uint8_t* v = base + pairs[p].j * stride;
      const __m256i xq = _mm256_set1_epi16(pairs[p].q);
      pair_products(u, v, xq, s0, s1, s2, s3);
      if constexpr (NC == 2) pair_products(u + 32, v + 32, xq, s4, s5, s6, s7);
      last = pairs[p].fold;
    }
    const __m256i s[8] = {s0, s1, s2, s3, s4, s5, s6, s7};  // s[4c + m]: chunk c, lane l: outputs 64c + 32l + 8m ..
    for (int m = 0; m < 4 * NC; ++m) {
      for (int l = 0; l < 2; ++l) {
        const int64_t o = 64 * (m / 4) + 32 * l + 8 * (m % 4);  // tile-even sums: low nibbles 16t + k, high 16t + 8 + k
        const __m128i half = l ? _mm256_extracti128_si256(s[m], 1) : _mm256_castsi256_si128(s[m]);
        const __m256 acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(half)), xd, offset[o / 8]);
        _mm256_storeu_ps(y + o, _mm256_fmadd_ps(param8(a.scale, a.half, at + o), acc, _mm256_loadu_ps(y + o)));
        offset[o / 8] = _mm256_setzero_ps();
      }
    }
  }
}

// Layout block `blk` (tiles 8·blk .. +7, 128 outputs), every row.
template <bool AVX2>
void im_i8_block(const ImI8Args& a, int64_t blk) {
  const int64_t t0 = blk * IM_BLOCK, n = std::min(IM_BLOCK, a.tiles - t0), blocks = a.in / BLOCK;
  const int64_t chunks = AVX2 ? n / CHUNK : 0, param_bytes = a.half ? 2 : 4;
  for (int64_t r = 0; r < a.rows; ++r) {
    alignas(64) float y[IM_BLOCK * TILE] = {0};
    for (int64_t k = 0; chunks && k < blocks; ++k) {
      if (a.live->n[r * blocks + k] == 0) continue;
      if (k + 1 < blocks) {  // the next block's scales: a row of the (groups, outputs) table, out of the codes' stream
        const char* scales = static_cast<const char*>(a.scale) + param_bytes * (((k + 1) * BLOCK / a.group) * a.tiles * TILE + t0 * TILE);
        for (int64_t o = 0; o < n * TILE * param_bytes; o += 64) _mm_prefetch(scales + o, _MM_HINT_T0);
      }
      if (chunks == 2) im_i8_chunks_avx2<2>(a, r, k, t0, n, y);
      else im_i8_chunks_avx2<1>(a, r, k, t0, n, y);
    }
    if (chunks * CHUNK < n) im_i8_tiles_portable(a, r, t0, n, chunks * CHUNK, n, y);
    for (int64_t t = 0; t < n; ++t) store_tile(a, t0 + t, r, y + t * TILE);  // a later level adds to the first
  }
}

at::Tensor q4_input_major_i8_mm(const at::Tensor& x, const at::Tensor& data, const at::Tensor& scale,
                                const c10::optional<at::Tensor>& zero, int64_t out, int64_t group, int64_t levels) {
  TORCH_CHECK(scale.dim() == 2 && scale.is_contiguous() && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kHalf),
              "scale must be contiguous fp32 or fp16 (groups, tiles * 16)");
  if (zero) TORCH_CHECK(zero->scalar_type() == scale.scalar_type() && zero->is_contiguous() && zero->sizes() == scale.sizes(),
                        "zero must match scale");
  TORCH_CHECK(group > 0 && group % BLOCK == 0, "integer kernels take group sizes divisible by ", BLOCK, ", got ", group);
  const int64_t in = scale.size(0) * group, tiles = scale.size(1) / TILE;
  TORCH_CHECK(scale.size(1) % TILE == 0 && tiles * TILE >= out, "scale shape ", scale.sizes(), " does not fit ", out, " outputs");
  TORCH_CHECK(data.scalar_type() == at::kByte && data.is_contiguous() && data.numel() == in * tiles * 8,
              "packed data must be contiguous uint8 of in * tiles * 8 bytes");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == in, "x must be (batch, ", in, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.device().is_cpu(), "x must be contiguous fp32 on CPU");
  TORCH_CHECK(x.size(0) <= MAX_BATCH, "batch ", x.size(0), " > ", MAX_BATCH, ": use the reference path");
  TORCH_CHECK(levels == 1 || levels == 2, "levels must be 1 or 2, got ", levels);
  const Int8Rows rows = quantize_rows(x.data_ptr<float>(), x.size(0), in, false, levels);
  const LivePairs live = live_pairs(rows, x.size(0) * levels, in);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  const ImI8Args a{&rows, &live, y.data_ptr<float>(), data.data_ptr<uint8_t>(), scale.data_ptr(), zero ? zero->data_ptr() : nullptr,
                   scale.scalar_type() == at::kHalf, x.size(0) * levels, in, out, tiles, group};
  const bool avx2 = int8_isa() >= 1;
  at::parallel_for(0, (tiles + IM_BLOCK - 1) / IM_BLOCK, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk) avx2 ? im_i8_block<true>(a, blk) : im_i8_block<false>(a, blk);
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compress_kernels, m) {
  m.def("q4_input_major_i8_mm(Tensor x, Tensor data, Tensor scale, Tensor? zero, int out, int group, int levels=1) -> Tensor");
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("q4_input_major_i8_mm", &q4_input_major_i8_mm);
}
