// One decode position's attention over a KV cache (issue 25, step 3; compress/decode.py calls it).
//
// A query of one position against a cache of a few hundred is ~0.1 MFLOP per layer: far too small for a BLAS
// call, a thread fork-join or the compiler's generic reduction loops (~40 us per layer on a 2-core EPYC), so it
// runs here on one thread, reading only the positions before `pos`, each cached row once for the query heads
// that share it (AVX-512 / AVX2 / portable builds of one loop nest, chosen like the other kernels). The reference
// is compress/kernels/reference.py: decode_attention.
//
//   q        (H, D)               this position's queries, RoPE applied
//   keys     (KV, max_len, D)     the cache; positions [0, pos) are read
//   values   (KV, max_len, D)
//   k_new    (KV, D)              this position's key (RoPE applied) and value, not yet in the cache
//   v_new    (KV, D)
//   pos      0-d int64            how many cached positions come before this one
//   -> out   (H, D)               softmax(q·k * scaling) over [cache[0, pos), new] times the values
//
// Query head h reads key/value head h / (H / KV) (grouped-query attention, transformers' repeat_kv order).

#include <torch/library.h>
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include <immintrin.h>

#include "isa.h"

namespace {

using compress_isa::Isa;

struct AttendArgs {
  const float *q, *keys, *values, *k_new, *v_new;  // see the shapes above
  float* out;
  float* weights;  // scratch: (G, n + 1)
  int64_t D, G, n, max_len;
  float scale;
};

// a·b over n floats: one vector accumulator and one horizontal sum per ISA (the compiler's own vectorization of
// a portable reduction keeps its lanes on the stack).
__attribute__((target("avx512f"))) inline float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  float s = _mm512_reduce_add_ps(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

__attribute__((target("avx2"))) inline float sum_avx2(__m256 v) {  // the 8 lanes' sum
  __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(half, _mm_movehdup_ps(half)));
}

__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = sum_avx2(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline float dot_portable(const float* a, const float* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// out (D) = Σ_t w[t] · rows[t] over n rows of D floats: 64 outputs at a time held in registers across the rows
// (an add into memory per row would store and reload them n times).
__attribute__((target("avx512f"))) inline void weighted_sum_avx512(float* out, const float* rows, const float* w, int64_t n, int64_t D) {
  for (int64_t c = 0; c < D; c += 64) {
    __mmask16 mask[4];
    __m512 acc[4];
    for (int k = 0; k < 4; ++k) {
      const int64_t left = std::min<int64_t>(std::max<int64_t>(D - c - 16 * k, 0), 16);
      mask[k] = static_cast<__mmask16>((1u << left) - 1);
      acc[k] = _mm512_setzero_ps();
    }
    for (int64_t t = 0; t < n; ++t) {
      const __m512 wt = _mm512_set1_ps(w[t]);
      for (int k = 0; k < 4; ++k)
        acc[k] = _mm512_fmadd_ps(wt, _mm512_maskz_loadu_ps(mask[k], rows + t * D + c + 16 * k), acc[k]);
    }
    for (int k = 0; k < 4; ++k) _mm512_mask_storeu_ps(out + c + 16 * k, mask[k], acc[k]);
  }
}

__attribute__((target("avx2,fma"))) inline void weighted_sum_avx2(float* out, const float* rows, const float* w, int64_t n, int64_t D) {
  int64_t c = 0;
  for (; c + 32 <= D; c += 32) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t t = 0; t < n; ++t) {
      const __m256 wt = _mm256_set1_ps(w[t]);
      for (int k = 0; k < 4; ++k) acc[k] = _mm256_fmadd_ps(wt, _mm256_loadu_ps(rows + t * D + c + 8 * k), acc[k]);
    }
    for (int k = 0; k < 4; ++k) _mm256_storeu_ps(out + c + 8 * k, acc[k]);
  }
  for (; c < D; ++c) {  // head sizes not a multiple of 32
    float acc = 0.f;
    for (int64_t t = 0; t < n; ++t) acc += w[t] * rows[t * D + c];
    out[c] = acc;
  }
}

inline void weighted_sum_portable(float* out, const float* rows, const float* w, int64_t n, int64_t D) {
  for (int64_t c = 0; c < D; ++c) out[c] = 0.f;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < D; ++c) out[c] += w[t] * rows[t * D + c];
}

// w[t] = exp(w[t] - top) for t < n (every w[t] <= top), returning their sum. exp(x) = 2^k · e^r with
// k = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its Taylor polynomial of degree 6 (relative error ~1e-7): a
// call into libm per score cost more than the dot products (it spills, and switches SSE/AVX state).
__attribute__((target("avx512f"))) inline float exp_sum_avx512(float* w, int64_t n, float top) {
  const __m512 vtop = _mm512_set1_ps(top), log2e = _mm512_set1_ps(1.44269504f), ln2 = _mm512_set1_ps(0.693147181f);
  const float c[7] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720};
  __m512 total = _mm512_setzero_ps();
  for (int64_t t = 0; t < n; t += 16) {
    const __mmask16 m = static_cast<__mmask16>(n - t >= 16 ? 0xFFFF : (1u << (n - t)) - 1);
    const __m512 x = _mm512_max_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, w + t), vtop), _mm512_set1_ps(-87.f));
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(k, ln2, x);
    __m512 p = _mm512_set1_ps(c[6]);
    for (int i = 5; i >= 0; --i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    const __m512 e = _mm512_scalef_ps(p, k);
    _mm512_mask_storeu_ps(w + t, m, e);
    total = _mm512_add_ps(total, _mm512_maskz_mov_ps(m, e));
  }
  return _mm512_reduce_add_ps(total);
}

__attribute__((target("avx2,fma"))) inline float exp_sum_avx2(float* w, int64_t n, float top) {
  const __m256 vtop = _mm256_set1_ps(top), log2e = _mm256_set1_ps(1.44269504f), ln2 = _mm256_set1_ps(0.693147181f);
  const float c[7] = {1.f, 1.f, 1.f / 2, 1.f / 6, 1.f / 24, 1.f / 120, 1.f / 720};
  __m256 total = _mm256_setzero_ps();
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const __m256 x = _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(w + t), vtop), _mm256_set1_ps(-87.f));
    const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(k, ln2, x);
    __m256 p = _mm256_set1_ps(c[6]);
    for (int i = 5; i >= 0; --i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c[i]));
    const __m256i two_k = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
    const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(two_k));
    _mm256_storeu_ps(w + t, e);
    total = _mm256_add_ps(total, e);
  }
  float sum = sum_avx2(total);
  for (; t < n; ++t) sum += w[t] = std::exp(w[t] - top);
  return sum;
}

inline float exp_sum_portable(float* w, int64_t n, float top) {
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += w[t] = std::exp(w[t] - top);
  return sum;
}

// The G query heads of key/value head g: each cached key row and value row is read once for all of them.
template <float (*dot)(const float*, const float*, int64_t),
          void (*weighted_sum)(float*, const float*, const float*, int64_t, int64_t), float (*exp_sum)(float*, int64_t, float)>
inline __attribute__((always_inline)) void attend(const AttendArgs& a, int64_t g) {
  const int64_t D = a.D, G = a.G, n = a.n;
  const float* Q = a.q + g * G * D;
  const float* K = a.keys + g * a.max_len * D;
  const float* V = a.values + g * a.max_len * D;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t h = 0; h < G; ++h) a.weights[h * (n + 1) + t] = dot(Q + h * D, K + t * D, D) * a.scale;
  for (int64_t h = 0; h < G; ++h) {
    float* w = a.weights + h * (n + 1);
    w[n] = dot(Q + h * D, a.k_new + g * D, D) * a.scale;
    float top = w[n];
    for (int64_t t = 0; t < n; ++t) top = std::max(top, w[t]);
    const float inv = 1.f / exp_sum(w, n + 1, top);
    for (int64_t t = 0; t <= n; ++t) w[t] *= inv;
  }
  float* O = a.out + g * G * D;
  for (int64_t h = 0; h < G; ++h) {
    const float* w = a.weights + h * (n + 1);
    weighted_sum(O + h * D, V, w, n, D);
    const float* v = a.v_new + g * D;
    for (int64_t i = 0; i < D; ++i) O[h * D + i] += w[n] * v[i];
  }
}

__attribute__((target("avx512f"))) void attend_avx512(const AttendArgs& a, int64_t g) { attend<dot_avx512, weighted_sum_avx512, exp_sum_avx512>(a, g); }
__attribute__((target("avx2,fma"))) void attend_avx2(const AttendArgs& a, int64_t g) { attend<dot_avx2, weighted_sum_avx2, exp_sum_avx2>(a, g); }
void attend_portable(const AttendArgs& a, int64_t g) { attend<dot_portable, weighted_sum_portable, exp_sum_portable>(a, g); }

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& keys, const at::Tensor& values,
                            const at::Tensor& k_new, const at::Tensor& v_new, const at::Tensor& pos, double scaling) {
  TORCH_CHECK(q.dim() == 2 && keys.dim() == 3 && values.sizes() == keys.sizes(), "decode_attention: q (H, D), keys and values (KV, max_len, D)");
  TORCH_CHECK(q.scalar_type() == at::kFloat && keys.scalar_type() == at::kFloat && values.scalar_type() == at::kFloat &&
              k_new.scalar_type() == at::kFloat && v_new.scalar_type() == at::kFloat, "decode_attention: fp32 tensors");
  const int64_t H = q.size(0), D = q.size(1), KV = keys.size(0), max_len = keys.size(1);
  TORCH_CHECK(H % KV == 0 && keys.size(2) == D && k_new.numel() == KV * D && v_new.numel() == KV * D,
              "decode_attention: shapes do not agree");
  const int64_t n = pos.item<int64_t>();
  TORCH_CHECK(n >= 0 && n <= max_len, "decode_attention: pos ", n, " outside the cache of ", max_len);
  const auto qc = q.contiguous(), kc = keys.contiguous(), vc = values.contiguous();
  const auto knc = k_new.contiguous(), vnc = v_new.contiguous();
  auto out = at::empty({H, D}, q.options());
  std::vector<float> weights((H / KV) * (n + 1));
  const AttendArgs args{qc.data_ptr<float>(), kc.data_ptr<float>(), vc.data_ptr<float>(), knc.data_ptr<float>(),
                        vnc.data_ptr<float>(), out.data_ptr<float>(), weights.data(), D, H / KV, n, max_len,
                        static_cast<float>(scaling)};
  const Isa isa = compress_isa::chosen();
  for (int64_t g = 0; g < KV; ++g) {
    if (isa == Isa::avx512) attend_avx512(args, g);
    else if (isa == Isa::avx2) attend_avx2(args, g);
    else attend_portable(args, g);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(compress_kernels, m) {
  m.def("decode_attention(Tensor q, Tensor keys, Tensor values, Tensor k_new, Tensor v_new, Tensor pos, float scaling) -> Tensor");
}

TORCH_LIBRARY_IMPL(compress_kernels, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
