// Products of a few rows of activations with a bfloat16 or float16 weight, for CPU decoding of a
// half-precision model (--precision bf16-true / 16-true).
//
// Why: a decode step reads every weight once, so its speed is the memory's; MKL's half-precision
// matrix-vector product streamed a 7B-shaped bfloat16 model at about half the bandwidth llama.cpp
// reaches on its F16 file, and its fast layout (column-major) needs a copy of the weights in
// anonymous memory. This reads the checkpoint's own row-major weight (memory-mapped, no copy):
// per 16 weights one conversion (bfloat16: a shift; float16: vcvtph2ps) and one fused multiply-add,
// float32 accumulation.
//
// dense_matvec(x (M, K), w (N, K) bfloat16 / float16, contiguous) -> (M, N) float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace {

inline float half_to_float(at::BFloat16 v) {
  uint16_t b;
  std::memcpy(&b, &v, 2);
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float half_to_float(at::Half v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const at::BFloat16* p) {
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#endif

// y[i] = x[i] . w for the M rows of x, one row w of K weights
template <typename T>
void row_products(const float* x, const T* w, int64_t M, int64_t K, float* y, int64_t y_stride) {
  for (int64_t i = 0; i < M; ++i) {
    const float* xi = x + i * K;
    int64_t k = 0;
    float total = 0.0f;
#if defined(__AVX512F__)
    // four accumulators: four independent chains of multiply-adds keep the pipes busy
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (; k + 64 <= K; k += 64)
      for (int u = 0; u < 4; ++u)
        acc[u] = _mm512_fmadd_ps(_mm512_loadu_ps(xi + k + 16 * u), load16(w + k + 16 * u), acc[u]);
    total = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#endif
    for (; k < K; ++k) total += xi[k] * half_to_float(w[k]);
    y[i * y_stride] = total;
  }
}

// y[n0..n0+4) for one row x: four rows of w at once, so that four streams of loads are in flight
// (one row at a time reached 90% of the bandwidth of this)
template <typename T>
void four_rows(const float* x, const T* w, int64_t K, float* y) {
  int64_t k = 0;
  float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#if defined(__AVX512F__)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; k + 16 <= K; k += 16) {
    const __m512 xv = _mm512_loadu_ps(x + k);
    for (int r = 0; r < 4; ++r) acc[r] = _mm512_fmadd_ps(xv, load16(w + r * K + k), acc[r]);
  }
  for (int r = 0; r < 4; ++r) total[r] = _mm512_reduce_add_ps(acc[r]);
#endif
  for (; k < K; ++k)
    for (int r = 0; r < 4; ++r) total[r] += x[k] * half_to_float(w[r * K + k]);
  for (int r = 0; r < 4; ++r) y[r] = total[r];
}

at::Tensor dense_matvec(const at::Tensor& x, const at::Tensor& w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "dense_matvec: x (M, K) and w (N, K)");
  TORCH_CHECK(w.is_contiguous() && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kHalf),
              "dense_matvec: w must be contiguous bfloat16 or float16");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = w.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // rows of w spread over the threads, 16 a task (each thread streams its own run of rows)
  auto rows = [&](auto* wp) {
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      int64_t n = n0;
      if (M == 1)
        for (; n + 4 <= n1; n += 4) four_rows(xp, wp + n * K, K, yp + n);
      for (; n < n1; ++n) row_products(xp, wp + n * K, M, K, yp + n, N);
    });
  };
  if (w.scalar_type() == at::kBFloat16)
    rows(w.data_ptr<at::BFloat16>());
  else
    rows(w.data_ptr<at::Half>());
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lit_llama, m) {
  m.def("dense_matvec(Tensor x, Tensor w) -> Tensor");
}

TORCH_LIBRARY_IMPL(lit_llama, CPU, m) {
  m.impl("dense_matvec", &dense_matvec);
}
