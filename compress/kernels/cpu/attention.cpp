// One decode position's attention over a KV cache (issue 25, step 3; compress/decode.py calls it).
//
// A query of one position against a cache of a few hundred is ~0.1 MFLOP per layer: far too small for a BLAS
// call, a thread fork-join or the compiler's generic reduction loops (~40 us per layer on a 2-core EPYC), so it
// runs here on one thread, reading only the positions before `pos`. The reference is
// compress/kernels/reference.py: decode_attention.
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

namespace {

float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

void add_scaled(float* out, const float* v, float w, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) out[i] += w * v[i];
}

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
  auto out = at::zeros({H, D}, q.options());
  const float *Q = qc.data_ptr<float>(), *K = kc.data_ptr<float>(), *V = vc.data_ptr<float>();
  const float *Kn = knc.data_ptr<float>(), *Vn = vnc.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  std::vector<float> w(n + 1);
  for (int64_t h = 0; h < H; ++h) {
    const int64_t g = h / (H / KV);
    const float* qh = Q + h * D;
    const float* Kg = K + g * max_len * D;
    const float* Vg = V + g * max_len * D;
    float top = w[n] = dot(qh, Kn + g * D, D) * scale;
    for (int64_t t = 0; t < n; ++t) top = std::max(top, w[t] = dot(qh, Kg + t * D, D) * scale);
    float total = 0.f;
    for (int64_t t = 0; t <= n; ++t) total += w[t] = std::exp(w[t] - top);
    float* oh = O + h * D;
    for (int64_t t = 0; t < n; ++t) add_scaled(oh, Vg + t * D, w[t] / total, D);
    add_scaled(oh, Vn + g * D, w[n] / total, D);
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
