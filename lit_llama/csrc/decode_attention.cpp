// Attention of one new query per sequence over a KV cache, for CPU decoding (batch rows of one token).
//
// Why not scaled_dot_product_attention: at one query its CPU kernel reads every cache slot, masked
// or not, and spends ~100 us a layer on the embedded model's 768-slot cache (a third of a compiled
// int8 decode step). Decoding is bound by memory, so this kernel reads only what it must: the keys
// the mask lets through (the filled prefix of the cache), each key and value row once for all the
// query heads that share it (grouped-query attention), in chunks spread over the threads
// (flash-decoding: each chunk keeps its own max and sum, merged at the end).
// Where the head size is a multiple of 16 and the CPU has AVX-512, the per-key products are written
// with its intrinsics (GCC's vectorizer, tuned for 256-bit vectors here, left them 1.35-1.7x slower).
//
// q: (B, H, 1, D); k, v: (B, G, S, D), rows contiguous; mask: bool, broadcastable to (B, 1, 1, S),
// True = attend. H is a multiple of G; query head h reads key/value group h / (H / G).
// The cache is float32, bfloat16, or int8 rows of D codes followed by their float32 scale's 4 bytes
// (k, v: (B, G, S, D + 4); value d of a row is code d times the scale: llama.cpp's -ctk q8_0 idea,
// one scale per head and position). Returns (B, H, 1, D) in q's dtype, float32 arithmetic throughout.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// cache entries as float, in a form the compiler vectorizes (at::BFloat16's own conversion is
// scalar code). A float16 cache is left to SDPA: GCC 12 does not vectorize its conversion here.
inline float to_float(float x) { return x; }
inline float to_float(int8_t x) { return static_cast<float>(x); }

// the factor of a cache row's values: its scale for an int8 row (the 4 bytes after its D codes), 1 otherwise
template <typename T>
inline float row_scale(const T*, int64_t) { return 1.0f; }
template <>
inline float row_scale(const int8_t* row, int64_t D) {
  float s;
  std::memcpy(&s, row + D, 4);
  return s;
}
inline float to_float(at::BFloat16 x) {
  uint16_t b;
  std::memcpy(&b, &x, 2);
  const uint32_t u = static_cast<uint32_t>(b) << 16;  // bfloat16 is the top half of a float32
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// exp(x) for x <= 0 (a score minus its row's max), in arithmetic the compiler vectorizes (std::exp
// is a scalar call, and one per key and head cost more than reading the cache): Cephes' expf,
// x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-7 polynomial, times 2^n through the
// exponent bits. Relative error ~1e-7; below -87 (e^-87 ~ 1.6e-38) the weight is 0.
inline float exp_nonpositive(float x) {
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(x < -87.0f ? 0.0f : n) * (1 << 23);
  std::memcpy(&p, &bits, 4);
  return x < -87.0f ? 0.0f : p;
}

#if defined(__AVX512F__)
// 16 cache entries as floats
inline __m512 load_row16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load_row16(const at::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline __m512 load_row16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
#endif

constexpr int64_t kChunk = 64;  // keys per task: small enough that 2 threads share a short cache evenly

// kD: the head size when known at compile time (0: read from q), so that the per-key loops unroll
template <typename T, int64_t kD>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = kD ? kD : q.size(3), G = k.size(1), S = k.size(2), R = H / G;
  const int64_t n_chunks = (S + kChunk - 1) / kChunk;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* qp = q.data_ptr<float>();  // q is float32 and contiguous (the caller makes it so)
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const bool* mp = mask.data_ptr<bool>();
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);
  const int64_t ms0 = mask.stride(0), ms3 = mask.stride(3);
  // per (row, group, chunk, query head of the group): running max, sum of exponentials, weighted values
  std::vector<float> pmax(B * G * n_chunks * R), psum(B * G * n_chunks * R), pacc(B * G * n_chunks * R * D);

  at::parallel_for(0, B * G * n_chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(R * kChunk);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task % n_chunks, g = (task / n_chunks) % G, b = task / (n_chunks * G);
      const int64_t j0 = c * kChunk, j1 = std::min(S, j0 + kChunk);
      const float* qg = qp + (b * H + g * R) * D;
      const T* kg = kp + b * ks0 + g * ks1;
      const T* vg = vp + b * vs0 + g * vs1;
      const bool* mb = mp + b * ms0;
      float* mx = &pmax[task * R];
      float* sm = &psum[task * R];
      float* acc = &pacc[task * R * D];
      for (int64_t r = 0; r < R; ++r) mx[r] = -std::numeric_limits<float>::infinity();
      for (int64_t i = 0; i < R * kChunk; ++i) s[i] = -std::numeric_limits<float>::infinity();
      // scores q.k / sqrt(D): one pass over the chunk's keys, each row read once for the R heads
      for (int64_t j = j0; j < j1; ++j) {
        if (!mb[j * ms3]) continue;
        const T* kj = kg + j * ks2;
        for (int64_t r = 0; r < R; ++r) {
          const float* qr = qg + r * D;
          float dot = 0.0f;
#if defined(__AVX512F__)
          if constexpr (kD > 0 && kD % 16 == 0) {
            __m512 a = _mm512_setzero_ps();
            for (int64_t d = 0; d < kD; d += 16) a = _mm512_fmadd_ps(_mm512_loadu_ps(qr + d), load_row16(kj + d), a);
            dot = _mm512_reduce_add_ps(a);
          } else
#endif
          {
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_float(kj[d]);
          }
          dot *= scale * row_scale(kj, D);
          s[r * kChunk + (j - j0)] = dot;
          mx[r] = std::max(mx[r], dot);
        }
      }
      for (int64_t i = 0; i < R * D; ++i) acc[i] = 0.0f;
      for (int64_t r = 0; r < R; ++r) sm[r] = 0.0f;
      if (mx[0] == -std::numeric_limits<float>::infinity()) continue;  // every key of the chunk masked
      // p = exp(s - max) (0 for masked keys), their sum, and the p-weighted sum of the value rows
      for (int64_t r = 0; r < R; ++r) {
        float* sr = &s[r * kChunk];
        const float m = mx[r];
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < j1 - j0; ++i) {
          sr[i] = exp_nonpositive(std::max(sr[i] - m, -100.0f));
          total += sr[i];
        }
        sm[r] = total;
      }
      for (int64_t j = j0; j < j1; ++j) {
        if (!mb[j * ms3]) continue;
        const T* vj = vg + j * vs2;
        const float vscale = row_scale(vj, D);
        for (int64_t r = 0; r < R; ++r) {
          const float p = s[r * kChunk + (j - j0)] * vscale;
          float* ar = acc + r * D;
#if defined(__AVX512F__)
          if constexpr (kD > 0 && kD % 16 == 0) {
            const __m512 pv = _mm512_set1_ps(p);
            for (int64_t d = 0; d < kD; d += 16)
              _mm512_storeu_ps(ar + d, _mm512_fmadd_ps(pv, load_row16(vj + d), _mm512_loadu_ps(ar + d)));
            continue;
          }
#endif
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) ar[d] += p * to_float(vj[d]);
        }
      }
    }
  });

  // merge the chunks: rescale each by exp(its max - the overall max)
  float* op = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t r = 0; r < R; ++r) {
        const int64_t first = (b * G + g) * n_chunks;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < n_chunks; ++c) m = std::max(m, pmax[(first + c) * R + r]);
        float* o = op + (b * H + g * R + r) * D;
        for (int64_t d = 0; d < D; ++d) o[d] = 0.0f;
        float total = 0.0f;
        for (int64_t c = 0; c < n_chunks; ++c) {
          const int64_t t = (first + c) * R + r;
          if (psum[t] == 0.0f) continue;
          const float w = std::exp(pmax[t] - m);
          total += w * psum[t];
          const float* a = &pacc[t * D];
          for (int64_t d = 0; d < D; ++d) o[d] += w * a[d];
        }
        // a row whose every key is masked attends to nothing: zeros, as scaled_dot_product_attention gives
        const float inv = total > 0.0f ? 1.0f / total : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] *= inv;
      }
    }
  }
}

template <typename T>
void dispatch_head_size(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, at::Tensor& out) {
  switch (q.size(3)) {
    case 64: attend<T, 64>(q, k, v, mask, out); break;
    case 128: attend<T, 128>(q, k, v, mask, out); break;
    default: attend<T, 0>(q, k, v, mask, out);
  }
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1, "decode_attention: q must be (B, H, 1, D)");
  const int64_t extra = k.scalar_type() == at::kChar ? 4 : 0;  // an int8 row's scale
  TORCH_CHECK(k.dim() == 4 && v.sizes() == k.sizes() && k.size(0) == q.size(0) && k.size(3) == q.size(3) + extra,
              "decode_attention: k and v must be (B, G, S, D) matching q (D + 4 for an int8 cache)");
  TORCH_CHECK(q.size(1) % k.size(1) == 0, "decode_attention: the query heads must be a multiple of the key groups");
  TORCH_CHECK(k.stride(3) == 1 && v.stride(3) == 1, "decode_attention: cache rows must be contiguous");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v must have one dtype");
  TORCH_CHECK(mask.scalar_type() == at::kBool, "decode_attention: the mask must be bool");
  const auto B = q.size(0), S = k.size(2);
  const at::Tensor m = mask.dim() == 2 ? mask.view({mask.size(0), 1, 1, mask.size(1)}) : mask;
  const at::Tensor mb = m.expand({B, 1, 1, S});
  const at::Tensor qf = q.to(at::kFloat).contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options().dtype(at::kFloat));
  switch (k.scalar_type()) {
    case at::kFloat: dispatch_head_size<float>(qf, k, v, mb, out); break;
    case at::kBFloat16: dispatch_head_size<at::BFloat16>(qf, k, v, mb, out); break;
    case at::kChar: dispatch_head_size<int8_t>(qf, k, v, mb, out); break;
    default: TORCH_CHECK(false, "decode_attention: the cache must be float32, bfloat16 or int8");
  }
  return out.to(q.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lit_llama, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask) -> Tensor");
}

TORCH_LIBRARY_IMPL(lit_llama, CPU, m) {
  m.impl("decode_attention", &decode_attention);
}
