// A small SIMD layer for the CPU kernels: one float vector type `vf` of W lanes and the
// handful of operations the kernels need. The ISA is chosen at compile time from the
// flags setup.py passes (AVX-512 > AVX2+FMA > portable scalar code), so every kernel is
// written once against this header; setup.py compiles them once per path, and the cpu
// backend loads the best one the running CPU supports. bf16 values are handled as raw uint16 bits.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

// Before a loop over a register tile (compile-time trip count): fully unrolled early, so
// that GCC keeps the tile's accumulator array in registers (at -O3 it may otherwise store
// the array to memory on every step of the enclosing loop).
#define FIRP_UNROLL _Pragma("GCC unroll 16")

namespace firp {

using bf16_t = uint16_t;  // raw bfloat16 bits

inline float bf16_to_float(bf16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN -> 0x7FC0: the same bits as c10::BFloat16.
inline bf16_t float_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return bf16_t(u >> 16);
}

inline float to_float(float v) { return v; }
inline float to_float(bf16_t v) { return bf16_to_float(v); }
template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) { return v; }
template <>
inline bf16_t from_float<bf16_t>(float v) { return float_to_bf16(v); }

// Rounds through T and back: what torch gets when an intermediate is stored in dtype T.
template <typename T>
inline float round_to(float v) { return to_float(from_float<T>(v)); }

namespace simd {

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
// Horizontal sums fold halves, in every ISA path: lane i += lane i + W/2, then i + W/4, ...
// With 8 lanes: ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)). Kernels that must give a row the
// same bits whatever its layout (csrc/cpu/README.md) rely on this one order.
inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

#if defined(__AVX512F__)
// ------------------------------------------------------------------ AVX-512
constexpr int W = 16;
using vf = __m512;
inline vf zero() { return _mm512_setzero_ps(); }
inline vf set1(float x) { return _mm512_set1_ps(x); }
inline vf load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf fma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf max(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf abs(vf a) { return _mm512_abs_ps(a); }
inline vf div(vf a, vf b) { return _mm512_div_ps(a, b); }
// 1/x to ~1 ulp: the estimate plus one Newton step (cheaper than a division).
inline vf recip(vf x) {
  const vf r = _mm512_rcp14_ps(x);
  return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, _mm512_set1_ps(2.f)));
}
// Rounds to the nearest bf16 value (kept as float): an intermediate torch stores in bf16.
inline vf round_bf16(vf v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                  _mm512_set1_epi32(0x7FFF));
  return _mm512_castsi512_ps(_mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(int(0xFFFF0000u))));
}
// hsum folds halves (the 256-bit halves, then as with AVX2): see the AVX2 hsum256.
inline float hsum(vf v) { return hsum256(_mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1))); }
inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
inline vf load(const bf16_t* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store(bf16_t* p, vf v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                  _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
}
// W (column k0, column k1) bf16 pairs -> the k0 values and the k1 values as floats.
inline void load_pairs(const bf16_t* p, vf& even, vf& odd) {
  __m512i u = _mm512_loadu_si512(p);
  even = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
  odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// 2^x for x <= 128; x <= -127 (and -inf) gives exactly 0.
inline vf exp2(vf x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-127.f)), _mm512_set1_ps(127.f));
  vf n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = _mm512_sub_ps(x, n);
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  vf p = _mm512_set1_ps(1.5403530e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

#elif defined(__AVX2__) && defined(__FMA__)
// ------------------------------------------------------------------ AVX2 + FMA
constexpr int W = 8;
using vf = __m256;
inline vf zero() { return _mm256_setzero_ps(); }
inline vf set1(float x) { return _mm256_set1_ps(x); }
inline vf load(const float* p) { return _mm256_loadu_ps(p); }
inline void store(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf fma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf add(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf sub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf mul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf max(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf abs(vf a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
inline vf div(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf recip(vf x) {
  const vf r = _mm256_rcp_ps(x);
  return _mm256_mul_ps(r, _mm256_fnmadd_ps(x, r, _mm256_set1_ps(2.f)));
}
inline vf round_bf16(vf v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                  _mm256_set1_epi32(0x7FFF));
  return _mm256_castsi256_ps(_mm256_and_si256(_mm256_add_epi32(u, bias), _mm256_set1_epi32(int(0xFFFF0000u))));
}
inline float hsum(vf v) { return hsum256(v); }
inline float hmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline vf load(const bf16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline void store(bf16_t* p, vf v) {
  __m256i u = _mm256_castps_si256(v);
  __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                  _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // packus works per 128-bit lane; the permute puts the two halves side by side.
  __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void load_pairs(const bf16_t* p, vf& even, vf& odd) {
  __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  even = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xFFFF0000u))));
}
inline vf exp2(vf x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-127.f)), _mm256_set1_ps(127.f));
  vf n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf f = _mm256_sub_ps(x, n);
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  vf p = _mm256_set1_ps(1.5403530e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504109e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022651e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.f));
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#else
// ------------------------------------------------------------------ portable fallback
// Plain loops over a small array; the compiler vectorises them for whatever the target
// has (SSE2, NEON, ...). FIRP_SCALAR_W lets the tests exercise the kernels at W = 16.
#ifndef FIRP_SCALAR_W
#define FIRP_SCALAR_W 8
#endif
constexpr int W = FIRP_SCALAR_W;
struct vf {
  float v[W];
};
#define FIRP_LANES(expr)            \
  vf r;                             \
  for (int i = 0; i < W; ++i) expr; \
  return r
inline vf zero() { FIRP_LANES(r.v[i] = 0.f); }
inline vf set1(float x) { FIRP_LANES(r.v[i] = x); }
inline vf load(const float* p) { FIRP_LANES(r.v[i] = p[i]); }
inline void store(float* p, vf v) { std::memcpy(p, v.v, sizeof(v.v)); }
inline vf fma(vf a, vf b, vf c) { FIRP_LANES(r.v[i] = std::fma(a.v[i], b.v[i], c.v[i])); }
inline vf add(vf a, vf b) { FIRP_LANES(r.v[i] = a.v[i] + b.v[i]); }
inline vf sub(vf a, vf b) { FIRP_LANES(r.v[i] = a.v[i] - b.v[i]); }
inline vf mul(vf a, vf b) { FIRP_LANES(r.v[i] = a.v[i] * b.v[i]); }
inline vf max(vf a, vf b) { FIRP_LANES(r.v[i] = a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
inline vf abs(vf a) { FIRP_LANES(r.v[i] = std::fabs(a.v[i])); }
inline vf div(vf a, vf b) { FIRP_LANES(r.v[i] = a.v[i] / b.v[i]); }
inline vf recip(vf x) { FIRP_LANES(r.v[i] = 1.f / x.v[i]); }
inline vf round_bf16(vf v) { FIRP_LANES(r.v[i] = round_to<bf16_t>(v.v[i])); }
inline vf load(const bf16_t* p) { FIRP_LANES(r.v[i] = bf16_to_float(p[i])); }
inline vf exp2(vf x) { FIRP_LANES(r.v[i] = x.v[i] <= -127.f ? 0.f : std::exp2(x.v[i])); }
#undef FIRP_LANES
inline float hsum(vf v) {  // folding halves, as the SIMD paths do
  for (int half = W / 2; half >= 1; half /= 2)
    for (int i = 0; i < half; ++i) v.v[i] += v.v[i + half];
  return v.v[0];
}
inline float hmax(vf v) {
  float s = v.v[0];
  for (int i = 1; i < W; ++i) s = v.v[i] > s ? v.v[i] : s;
  return s;
}
inline void store(bf16_t* p, vf v) {
  for (int i = 0; i < W; ++i) p[i] = float_to_bf16(v.v[i]);
}
inline void load_pairs(const bf16_t* p, vf& even, vf& odd) {
  for (int i = 0; i < W; ++i) {
    even.v[i] = bf16_to_float(p[2 * i]);
    odd.v[i] = bf16_to_float(p[2 * i + 1]);
  }
}
#endif

}  // namespace simd

// The rows of a register tile, c [rows, ldc], into the output: row r goes to
// out[at + r * ldo .. + cols] as fp32 (out_f) or bf16 (out_h), exactly one of them set.
// Every GEMM tile (linear, quant, AMX) ends with this store.
inline void store_rows(const float* c, int64_t ldc, int64_t rows, int64_t cols, float* out_f, bf16_t* out_h,
                       int64_t at, int64_t ldo) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = c + r * ldc;
    if (out_f) {
      std::memcpy(out_f + at + r * ldo, src, cols * sizeof(float));
      continue;
    }
    bf16_t* dst = out_h + at + r * ldo;
    int64_t j = 0;
    for (; j + simd::W <= cols; j += simd::W) simd::store(dst + j, simd::load(src + j));
    for (; j < cols; ++j) dst[j] = float_to_bf16(src[j]);
  }
}

}  // namespace firp
