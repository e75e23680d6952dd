// Matrix-vector products with 4- and 8-bit weights, for CPU decoding (a few rows of activations).
//
// Why not torch's _weight_int4pack_mm_for_cpu: it takes bfloat16 activations (slow where the CPU
// lacks native bfloat16) and, at one row, streams the weights at about half the memory bandwidth.
// Decoding reads every weight once per token, so this kernel does as little as it can besides
// reading them: float32 activations, one fused multiply-add per weight, the group's scale and
// offset applied once per group.
//
// Layout, for N outputs (rows of W, a multiple of 16) and K inputs, groups of GS inputs (16, 32, 64,
// 128; 16 is GGUF's Q6_K, whose head most 4-bit files keep),
// BITS = 4 or 8 bits a code (unsigned: 0..15 or 0..255), P = 32 / BITS codes a 32-bit word:
//   codes (N/16, K/P, 64) uint8: a tile of 16 rows; for each block of P inputs, 16 little-endian
//         32-bit words, word l holding row 16t + l's P codes, input Pb + n in bits BITS n.. The 16
//         rows of a tile are the 16 lanes of a vector, so a tile's output is one register (no
//         horizontal sums), and one 64-byte load brings 16 P codes.
//   sm    (N/16, K/GS, NSM, 16) float16 (or float32, where float16 would round them): per tile and
//         group, the 16 rows' scales s, then (NSM = 2) their offsets m. NSM = 1 is a symmetric
//         layout, m = -(F/2) s (GGUF's Q4_0, Q8_0 and Q6_K, our int8): the offsets are not stored,
//         so a step reads as many bytes as the GGUF file's blocks hold.
//   w[n, k] = q[n, k] * s[n, k / GS] + m[n, k / GS]   (GGUF's Q4_1 form; Q4_0 is m = -8 s)
//
// A code becomes a float without a conversion instruction: its bits placed at the top of a float's
// mantissa under the exponent of 1.0 give f = 1 + q / F, F = 2^BITS, exactly (a shift and one
// bitwise select). Then w = F s f + (m - F s), and y[n] = sum over groups of F s (f . x) + (m - F s) sum(x):
// per weight a shift, a select and a multiply-add, half the floating-point work of converting.
//
// lowbit_matmul(x (M, K), codes, sm, GS, BITS) -> (M, N) float32; lowbit_dequantize(codes, sm, GS,
// BITS) -> (N, K) float32, W, for products of many rows (prefill), which the caller gives to a
// matrix multiplication (faster than the kernel row by row from about 64 rows on).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

// the operators' namespace: lit_llama; tests build this file again for other instruction sets under another
#ifndef LIT_LLAMA_OPS
#define LIT_LLAMA_OPS lit_llama
#endif

namespace {

constexpr int64_t kRows = 16;  // rows per tile: the lanes of an AVX-512 float register
constexpr int64_t kPrefetch = 2048;  // bytes ahead of the codes being multiplied that are prefetched
constexpr uint32_t kOne = 0x3F800000u;  // 1.0f

// the codes of a BITS-bit layout: P a word, the mask of a float's top BITS mantissa bits (..22), and
// the shifts that bring code n of a word to them (left by 23 - BITS - BITS n, right beyond)
template <int BITS>
struct Codes;
template <>
struct Codes<4> {
  static constexpr int P = 8;
  static constexpr uint32_t kMantissa = 0x00780000u;
#define SHIFTS_4(F) F(0, slli, 19) F(1, slli, 15) F(2, slli, 11) F(3, slli, 7) F(4, slli, 3) F(5, srli, 1) F(6, srli, 5) F(7, srli, 9)
};
template <>
struct Codes<8> {
  static constexpr int P = 4;
  static constexpr uint32_t kMantissa = 0x007F8000u;
#define SHIFTS_8(F) F(0, slli, 15) F(1, slli, 7) F(2, srli, 1) F(3, srli, 9)
};
// F(n, direction, bits) for each code n of a word of a BITS-bit layout
#define EACH_CODE(F)      \
  if constexpr (BITS == 4) { \
    SHIFTS_4(F)           \
  } else {                \
    SHIFTS_8(F)           \
  }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

// y[0..16) = one tile's outputs for one row of activations x (K = groups * GS), xsum: x's group sums;
// NSM: 2 (scales and offsets) or 1 (scales, symmetric)
template <int BITS, int GS, int NSM, typename S>
void tile_product(const uint8_t* __restrict codes, const S* __restrict sm, const float* __restrict x,
                  const float* __restrict xsum, float* __restrict y, int64_t groups) {
#if defined(__AVX512F__)
  constexpr int P = Codes<BITS>::P;
  const __m512i mantissa = _mm512_set1_epi32(Codes<BITS>::kMantissa), one = _mm512_set1_epi32(kOne);
  const __m512 F = _mm512_set1_ps(static_cast<float>(1 << BITS));
  __m512 out = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g) {
    // four accumulators: four independent chains of multiply-adds keep the pipes busy
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < GS / P; ++b) {
      const uint8_t* cb = codes + (g * GS / P + b) * kRows * 4;
      // the codes a few kilobytes ahead (this tile's or the next, which follows it in memory): the
      // multiply-adds of a 4-bit block keep too few loads in flight for the memory's bandwidth alone
      _mm_prefetch(reinterpret_cast<const char*>(cb + kPrefetch), _MM_HINT_T0);
      const __m512i w = _mm512_loadu_si512(cb);
      const float* xb = x + g * GS + b * P;
      // (shifted & mantissa) | one: ternary logic 0xEA; f = 1 + q / F
#define STEP(n, dir, bits)                                                                          \
  acc[n % 4] = _mm512_fmadd_ps(                                                                     \
      _mm512_castsi512_ps(_mm512_ternarylogic_epi32(_mm512_##dir##_epi32(w, bits), mantissa, one, 0xEA)), \
      _mm512_set1_ps(xb[n]), acc[n % 4]);
      EACH_CODE(STEP)
#undef STEP
    }
    const S* h = sm + g * NSM * kRows;
    const __m512 s16 = _mm512_mul_ps(load16(h), F);
    // m - F s; symmetric: m = -(F/2) s, so -1.5 F s
    const __m512 m = NSM == 2 ? _mm512_sub_ps(load16(h + kRows), s16) : _mm512_mul_ps(s16, _mm512_set1_ps(-1.5f));
    out = _mm512_fmadd_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])), s16, out);
    out = _mm512_fmadd_ps(m, _mm512_set1_ps(xsum[g]), out);
  }
  _mm512_storeu_ps(y, out);
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
  // the tile as two halves of 8 rows
  constexpr int P = Codes<BITS>::P;
  const __m256i mantissa = _mm256_set1_epi32(Codes<BITS>::kMantissa), one = _mm256_set1_epi32(kOne);
  const __m256 F = _mm256_set1_ps(static_cast<float>(1 << BITS));
  __m256 out[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g = 0; g < groups; ++g) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int b = 0; b < GS / P; ++b) {
      const uint8_t* c = codes + (g * GS / P + b) * kRows * 4;
      const float* xb = x + g * GS + b * P;
      for (int half = 0; half < 2; ++half) {
        const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + half * 32));
#define STEP(n, dir, bits)                                                                                   \
  acc[2 * half + n % 2] = _mm256_fmadd_ps(                                                                   \
      _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(_mm256_##dir##_epi32(w, bits), mantissa), one)), \
      _mm256_set1_ps(xb[n]), acc[2 * half + n % 2]);
        EACH_CODE(STEP)
#undef STEP
      }
    }
    const S* h = sm + g * NSM * kRows;
    const __m256 xs = _mm256_set1_ps(xsum[g]);
    for (int half = 0; half < 2; ++half) {
      const __m256 s16 = _mm256_mul_ps(load8(h + 8 * half), F);
      const __m256 m = NSM == 2 ? _mm256_sub_ps(load8(h + kRows + 8 * half), s16) : _mm256_mul_ps(s16, _mm256_set1_ps(-1.5f));
      out[half] = _mm256_fmadd_ps(_mm256_add_ps(acc[2 * half], acc[2 * half + 1]), s16, out[half]);
      out[half] = _mm256_fmadd_ps(m, xs, out[half]);
    }
  }
  _mm256_storeu_ps(y, out[0]);
  _mm256_storeu_ps(y + 8, out[1]);
#else
  float out[kRows] = {0};
  for (int64_t g = 0; g < groups; ++g) {
    constexpr int P = Codes<BITS>::P;
    float acc[kRows] = {0};
    for (int b = 0; b < GS / P; ++b) {
      const uint8_t* c = codes + (g * GS / P + b) * kRows * 4;
      const float* xb = x + g * GS + b * P;
      for (int64_t l = 0; l < kRows; ++l) {
        uint32_t w;
        std::memcpy(&w, c + 4 * l, 4);
        for (int n = 0; n < P; ++n) acc[l] += static_cast<float>((w >> (BITS * n)) & ((1u << BITS) - 1)) * xb[n];
      }
    }
    const S* h = sm + g * NSM * kRows;
    for (int64_t l = 0; l < kRows; ++l) {
      const float s = static_cast<float>(h[l]);
      const float m = NSM == 2 ? static_cast<float>(h[kRows + l]) : -static_cast<float>(1 << (BITS - 1)) * s;
      out[l] += acc[l] * s + m * xsum[g];
    }
  }
  for (int64_t l = 0; l < kRows; ++l) y[l] = out[l];
#endif
}

void check_layout(const at::Tensor& codes, const at::Tensor& sm, int64_t groupsize, int64_t bits) {
  TORCH_CHECK(bits == 4 || bits == 8, "lowbit_matmul: codes of 4 or 8 bits");
  TORCH_CHECK(groupsize == 16 || groupsize == 32 || groupsize == 64 || groupsize == 128,
              "lowbit_matmul: groups of 16, 32, 64 or 128 inputs");
  TORCH_CHECK(codes.dim() == 3 && codes.size(2) == kRows * 4 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "lowbit_matmul: codes must be contiguous uint8 (N/16, K/P, 64)");
  const int64_t K = codes.size(1) * (32 / bits);
  TORCH_CHECK(K % groupsize == 0, "lowbit_matmul: the inputs must be whole groups");
  TORCH_CHECK(sm.dim() == 4 && sm.size(0) == codes.size(0) && sm.size(1) == K / groupsize &&
              (sm.size(2) == 1 || sm.size(2) == 2) && sm.size(3) == kRows &&
              (sm.scalar_type() == at::kHalf || sm.scalar_type() == at::kFloat) && sm.is_contiguous(),
              "lowbit_matmul: scales and offsets must be contiguous float16 or float32 (N/16, K/groupsize, 1 or 2, 16)");
}

template <int BITS, int NSM, typename S>
void matmul_rows(const at::Tensor& xf, const at::Tensor& codes, const at::Tensor& sm, int64_t groupsize,
                 const std::vector<float>& xsum, at::Tensor& y) {
  const int64_t tiles = codes.size(0), K = xf.size(1), N = tiles * kRows, G = K / groupsize, M = xf.size(0);
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* sp = sm.data_ptr<S>();
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  auto product = groupsize == 16   ? tile_product<BITS, 16, NSM, S>
                 : groupsize == 32 ? tile_product<BITS, 32, NSM, S>
                 : groupsize == 64 ? tile_product<BITS, 64, NSM, S>
                                   : tile_product<BITS, 128, NSM, S>;
  const int64_t tile_bytes = K * BITS * kRows / 8;
  // tiles spread over the threads; 4 tiles a task keeps the tasks many and the scheduling cheap
  at::parallel_for(0, tiles, 4, [&](int64_t t0, int64_t t1) {
    float out[kRows];
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t i = 0; i < M; ++i) {
        product(cp + t * tile_bytes, sp + t * G * NSM * kRows, xp + i * K, xsum.data() + i * G, out, G);
        for (int64_t l = 0; l < kRows; ++l) yp[i * N + t * kRows + l] = out[l];
      }
    }
  });
}

// f(bits, nsm, a scale value) with bits and nsm as compile-time constants and the scales' C++ type
template <typename F>
void dispatch_layout(const at::Tensor& codes, const at::Tensor& sm, int64_t bits, F&& f) {
  const bool half = sm.scalar_type() == at::kHalf, sym = sm.size(2) == 1;
  auto with_scale = [&](auto bits_c, auto nsm_c) {
    if (half)
      f(bits_c, nsm_c, at::Half());
    else
      f(bits_c, nsm_c, 0.0f);
  };
  auto with_nsm = [&](auto bits_c) {
    if (sym)
      with_scale(bits_c, std::integral_constant<int, 1>());
    else
      with_scale(bits_c, std::integral_constant<int, 2>());
  };
  if (bits == 4)
    with_nsm(std::integral_constant<int, 4>());
  else
    with_nsm(std::integral_constant<int, 8>());
}

at::Tensor lowbit_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& sm, int64_t groupsize,
                         int64_t bits) {
  check_layout(codes, sm, groupsize, bits);
  const int64_t K = codes.size(1) * (32 / bits), N = codes.size(0) * kRows, G = K / groupsize;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "lowbit_matmul: x must be (M, K)");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = xf.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  // the group sums of x, once, for the offsets
  std::vector<float> xsum(M * G, 0.0f);
  const float* xp = xf.data_ptr<float>();
  for (int64_t i = 0; i < M * G; ++i)
    for (int64_t k = 0; k < groupsize; ++k) xsum[i] += xp[i * groupsize + k];
  dispatch_layout(codes, sm, bits, [&](auto bits_c, auto nsm_c, auto scale) {
    matmul_rows<decltype(bits_c)::value, decltype(nsm_c)::value, decltype(scale)>(xf, codes, sm, groupsize, xsum, y);
  });
  return y;
}

// the weight, (N, K): each thread writes whole rows, one after another (the caller multiplies
// x @ w.T; writing the transpose instead scatters every store across the rows of (K, N) and ran at
// a tenth of the memory's speed). Rows are read from the tile's words, which stay in the L1 cache.
template <int NSM, typename S>
void dequantize_tiles(const at::Tensor& codes, const at::Tensor& sm, int64_t groupsize, int bits, at::Tensor& w) {
  const int P = 32 / bits;
  const uint32_t mask = (1u << bits) - 1;
  const int64_t tiles = codes.size(0), K = codes.size(1) * P, G = K / groupsize, blocks = groupsize / P;
  const uint8_t* cp = codes.data_ptr<uint8_t>();
  const S* sp = sm.data_ptr<S>();
  float* wp = w.data_ptr<float>();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t l = 0; l < kRows; ++l) {
        float* row = wp + (t * kRows + l) * K;
        for (int64_t g = 0; g < G; ++g) {
          const S* h = sp + (t * G + g) * NSM * kRows;
          const float s = static_cast<float>(h[l]);
          const float m = NSM == 2 ? static_cast<float>(h[kRows + l]) : -static_cast<float>(1 << (bits - 1)) * s;
          for (int64_t b = g * blocks; b < (g + 1) * blocks; ++b) {
            uint32_t word;
            std::memcpy(&word, cp + ((t * (K / P) + b) * kRows + l) * 4, 4);
            float* out = row + b * P;
            for (int n = 0; n < P; ++n) out[n] = static_cast<float>((word >> (bits * n)) & mask) * s + m;
          }
        }
      }
  });
}

at::Tensor lowbit_dequantize(const at::Tensor& codes, const at::Tensor& sm, int64_t groupsize, int64_t bits) {
  check_layout(codes, sm, groupsize, bits);
  at::Tensor w = at::empty({codes.size(0) * kRows, codes.size(1) * (32 / bits)}, codes.options().dtype(at::kFloat));
  dispatch_layout(codes, sm, bits, [&](auto, auto nsm_c, auto scale) {
    dequantize_tiles<decltype(nsm_c)::value, decltype(scale)>(codes, sm, groupsize, bits, w);
  });
  return w;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(LIT_LLAMA_OPS, m) {
  m.def("lowbit_matmul(Tensor x, Tensor codes, Tensor sm, int groupsize, int bits) -> Tensor");
  m.def("lowbit_dequantize(Tensor codes, Tensor sm, int groupsize, int bits) -> Tensor");  // (N, K)
}

TORCH_LIBRARY_IMPL(LIT_LLAMA_OPS, CPU, m) {
  m.impl("lowbit_matmul", &lowbit_matmul);
  m.impl("lowbit_dequantize", &lowbit_dequantize);
}
