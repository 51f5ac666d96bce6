// The internals of quant.cpp: the pack format constants, x quantized per row, and the
// register tiles (AVX2 + F16C, and portable code computing the same bits). Included by
// quant.cpp only; the format and the two definitions are described there.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_ops.h"

namespace firp {
namespace {


constexpr int PANEL = 8;
constexpr int QK = 32;                       // weights per block
constexpr int64_t HEADER = 64;               // bytes before the panels
constexpr int64_t MAGIC = 0x315150524946LL;  // the bytes "FIRPQ1" (little-endian)
constexpr int64_t GRAIN_BYTES = 1 << 16;     // packed bytes below which one thread does the work
constexpr int MAX_MR = 4;

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
enum Act : int64_t { ACT_Q8 = 0, ACT_FLOAT = 1 };
constexpr const char* ACT_NAMES[] = {"q8", "float"};

struct KindInfo {
  const char* name;
  int64_t gguf_bytes;   // bytes of one GGUF block
  int64_t scale_bytes;  // fp16 scales per panel block (d, and m for Q4_1)
  int64_t q_bytes;      // quant bytes per panel block
};
constexpr KindInfo KINDS[] = {{"Q4_0", 18, 16, 128}, {"Q4_1", 20, 32, 128}, {"Q8_0", 34, 16, 256}};

inline float half_to_float(uint16_t h) {  // exact, portable (subnormals, inf, NaN)
  const uint32_t sign = uint32_t(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
  uint32_t u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112) << 23) | (man << 13);
  } else {
    const float f = float(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    std::memcpy(&u, &f, 4);
    u |= sign;
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// x rows quantized to 8-bit blocks (quant.py's quantize_rows), and what the kernel needs per block.
struct QuantX {
  std::vector<int8_t> q;      // [M, K]
  std::vector<float> dx;      // [M, nb]  block scale
  std::vector<float> sx;      // [M, nb]  dx * sum(q) (Q4_1)
  std::vector<int32_t> s8;    // [M, nb]  8 * sum(q)  (Q4_0)
};

// One block of 32 x values -> 32 int8 at q; returns sum(q). The scalar definition (quant.py's
// quantize_rows): q = clamp(round_half_even(x * inv), -127, 127). The vector forms compute the
// same: one IEEE multiply, cvtps rounds half to even (the default MXCSR mode) as nearbyint does.
template <typename XT>
inline int32_t quantize_block(const XT* x, float inv, int8_t* q) {
#if defined(__AVX512F__)
  int32_t sum = 0;
  for (int h = 0; h < QK; h += 16) {
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(simd::load(x + h), _mm512_set1_ps(inv)));
    v = _mm512_max_epi32(_mm512_min_epi32(v, _mm512_set1_epi32(127)), _mm512_set1_epi32(-127));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + h), _mm512_cvtepi32_epi8(v));
    sum += _mm512_reduce_add_epi32(v);
  }
  return sum;
#elif defined(__AVX2__) && defined(__FMA__)
  int32_t sum = 0;
  for (int h = 0; h < QK; h += 8) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(simd::load(x + h), _mm256_set1_ps(inv)));
    v = _mm256_max_epi32(_mm256_min_epi32(v, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
    alignas(32) int32_t lanes[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(lanes), v);
    for (int j = 0; j < 8; ++j) {
      q[h + j] = int8_t(lanes[j]);
      sum += lanes[j];
    }
  }
  return sum;
#else
  int32_t sum = 0;
  for (int j = 0; j < QK; ++j) {
    const float v = std::min(127.f, std::max(-127.f, std::nearbyint(to_float(x[j]) * inv)));
    q[j] = int8_t(v);
    sum += q[j];
  }
  return sum;
#endif
}

template <typename XT>
inline float block_amax(const XT* x) {
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  simd::vf m = simd::zero();  // max of |x|: exact in any order
  for (int h = 0; h < QK; h += simd::W) m = simd::max(m, simd::abs(simd::load(x + h)));
  return simd::hmax(m);
#else
  float amax = 0.f;
  for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(to_float(x[j])));
  return amax;
#endif
}

// Fills r (its buffers reused from call to call: the layer loop quantizes four inputs a layer).
template <typename XT>
void quantize_x(const XT* x, int64_t ldx, int64_t M, int64_t K, QuantX& r) {
  const int64_t nb = K / QK;
  r.q.resize(M * K), r.dx.resize(M * nb), r.sx.resize(M * nb), r.s8.resize(M * nb);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      const XT* xb = x + m * ldx + b * QK;
      const float amax = block_amax(xb);
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      const int32_t sum = quantize_block(xb, inv, r.q.data() + m * K + b * QK);
      const float dx = amax / 127.f;
      r.dx[m * nb + b] = dx;
      r.sx[m * nb + b] = dx * float(sum);
      r.s8[m * nb + b] = 8 * sum;
    }
  }
}

struct Problem {
  Kind kind;
  Act act;
  const uint8_t* panels;  // after the header
  int64_t pb_bytes;       // bytes per panel block
  int64_t nb;             // blocks per row (K / 32)
  const QuantX* x;       // act q8: the quantized rows
  const float* xf;       // act float: x [M, ldx] as floats
  int64_t ldx;
  int64_t M, N, K;
  float* out_f;           // [M, N], one of the two is set
  bf16_t* out_h;
};

// Every 64-byte line of the panel block at p (the same block of the next panel group). One
// prefetch a block left most of a 144-272-byte block to the hardware prefetcher; covering it
// all lets the weight stream overlap the compute of extra rows (AMD Zen 5, interleaved A/B:
// one row 3.4 against 4.4 ms a step, sixteen rows 10.4 against 14).
inline void prefetch_block(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off);
  __builtin_prefetch(p + bytes - 1);
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
inline __m256 load_half8(const uint8_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// c[MR][NP * 8] = rows m0.. of x times NP consecutive panels starting at w.
template <Kind KD, int MR, int NP>
inline void tile(const Problem& pb, const uint8_t* w, int64_t m0, float* c) {
  const int64_t pstride = pb.nb * pb.pb_bytes, K = pb.K, nb = pb.nb;
  const int8_t* xq = pb.x->q.data() + m0 * K;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[MR][NP];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) acc[r][p] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    FIRP_UNROLL for (int p = 0; p < NP; ++p) {
      const uint8_t* blk = w + p * pstride + b * pb.pb_bytes;
      prefetch_block(blk + NP * pstride, pb.pb_bytes);
      const uint8_t* q = blk + KINDS[KD].scale_bytes;
      __m256i isum[MR];
      if constexpr (KD == Q8_0) {
        FIRP_UNROLL for (int r = 0; r < MR; ++r) isum[r] = _mm256_setzero_si256();
        FIRP_UNROLL for (int g = 0; g < 8; ++g) {
          const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * g));
          const __m256i aw = _mm256_abs_epi8(wv);  // |w| <= 128 as u8; the sign moves onto x
          FIRP_UNROLL for (int r = 0; r < MR; ++r) {
            const __m256i xs = _mm256_sign_epi8(bcast4(xq + r * K + b * QK + 4 * g), wv);
            isum[r] = _mm256_add_epi32(isum[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xs), ones));
          }
        }
      } else {
        // Nibbles: 15 * 127 * 2 per s16 lane per chunk half, 8 halves add up to < 2^15, so the
        // s16 sums are exact before the one madd.
        __m256i s16[MR];
        FIRP_UNROLL for (int r = 0; r < MR; ++r) s16[r] = _mm256_setzero_si256();
        FIRP_UNROLL for (int i = 0; i < 4; ++i) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * i));
          const __m256i lo = _mm256_and_si256(raw, low4);
          const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
          FIRP_UNROLL for (int r = 0; r < MR; ++r) {
            const int8_t* xb = xq + r * K + b * QK + 4 * i;
            s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(lo, bcast4(xb)));
            s16[r] = _mm256_add_epi16(s16[r], _mm256_maddubs_epi16(hi, bcast4(xb + 16)));
          }
        }
        FIRP_UNROLL for (int r = 0; r < MR; ++r) {
          isum[r] = _mm256_madd_epi16(s16[r], ones);
          if constexpr (KD == Q4_0) isum[r] = _mm256_sub_epi32(isum[r], _mm256_set1_epi32(pb.x->s8[(m0 + r) * nb + b]));
        }
      }
      const __m256 d = load_half8(blk);
      FIRP_UNROLL for (int r = 0; r < MR; ++r) {
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(pb.x->dx[(m0 + r) * nb + b]));
        acc[r][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[r]), scale, acc[r][p]);
      }
      if constexpr (KD == Q4_1) {
        const __m256 mv = load_half8(blk + 16);
        FIRP_UNROLL for (int r = 0; r < MR; ++r)
          acc[r][p] = _mm256_fmadd_ps(mv, _mm256_set1_ps(pb.x->sx[(m0 + r) * nb + b]), acc[r][p]);
      }
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) _mm256_storeu_ps(c + r * NP * PANEL + p * PANEL, acc[r][p]);
}

// act float: the 8 rows' weights at k = 4i + t (hi: 16 + 4i + t) of the panel block, as gguf
// dequantizes them.
template <Kind KD>
inline __m256 weights_at(__m256i chunk, int t, bool hi, __m256 d, __m256 m) {
  if constexpr (KD == Q8_0) {  // byte t of each lane, sign-extended
    const __m256i q = _mm256_srai_epi32(_mm256_slli_epi32(chunk, 24 - 8 * t), 24);
    return _mm256_mul_ps(_mm256_cvtepi32_ps(q), d);
  } else {
    __m256i q = _mm256_and_si256(_mm256_srli_epi32(chunk, 8 * t + (hi ? 4 : 0)), _mm256_set1_epi32(0x0F));
    if constexpr (KD == Q4_0) q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
    const __m256 w = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
    return KD == Q4_1 ? _mm256_add_ps(w, m) : w;
  }
}

template <Kind KD, int MR, int NP>
inline void tile_float(const Problem& pb, const uint8_t* w, int64_t m0, float* c) {
  const int64_t pstride = pb.nb * pb.pb_bytes, ldx = pb.ldx;
  const float* x = pb.xf + m0 * ldx;
  __m256 acc[MR][NP];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) acc[r][p] = _mm256_setzero_ps();
  for (int64_t b = 0; b < pb.nb; ++b) {
    const float* xb = x + b * QK;
    FIRP_UNROLL for (int p = 0; p < NP; ++p) {
      const uint8_t* blk = w + p * pstride + b * pb.pb_bytes;
      prefetch_block(blk + NP * pstride, pb.pb_bytes);
      const uint8_t* q = blk + KINDS[KD].scale_bytes;
      const __m256 d = load_half8(blk), m = KD == Q4_1 ? load_half8(blk + 16) : d;
      // k in order 0..31: Q4 takes the low nibbles of chunks 0-3, then the high ones; Q8 chunks 0-7.
      constexpr int CHUNKS = KD == Q8_0 ? 8 : 4;
      FIRP_UNROLL for (int half = 0; half < (KD == Q8_0 ? 1 : 2); ++half) {
        FIRP_UNROLL for (int i = 0; i < CHUNKS; ++i) {
          const __m256i chunk = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32 * i));
          FIRP_UNROLL for (int t = 0; t < 4; ++t) {
            const __m256 wv = weights_at<KD>(chunk, t, half == 1, d, m);
            const int k = 16 * half + 4 * i + t;
            FIRP_UNROLL for (int r = 0; r < MR; ++r)
              acc[r][p] = _mm256_fmadd_ps(wv, _mm256_set1_ps(xb[r * ldx + k]), acc[r][p]);
          }
        }
      }
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) _mm256_storeu_ps(c + r * NP * PANEL + p * PANEL, acc[r][p]);
}
#else
// Portable: the same operations lane by lane (the integer sums are exact, the float steps the
// same fma chain), so the same bits as the AVX2 path.
template <Kind KD, int MR, int NP>
inline void tile(const Problem& pb, const uint8_t* w, int64_t m0, float* c) {
  const int64_t pstride = pb.nb * pb.pb_bytes, K = pb.K, nb = pb.nb;
  for (int r = 0; r < MR; ++r) {
    const int64_t m = m0 + r;
    const int8_t* xq = pb.x->q.data() + m * K;
    for (int p = 0; p < NP; ++p) {
      for (int col = 0; col < PANEL; ++col) {
        float acc = 0.f;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* blk = w + p * pstride + b * pb.pb_bytes;
          const uint8_t* q = blk + KINDS[KD].scale_bytes;
          const int8_t* xb = xq + b * QK;
          int32_t isum = 0;
          for (int i = 0; i < (KD == Q8_0 ? 8 : 4); ++i) {
            for (int t = 0; t < 4; ++t) {
              const uint8_t byte = q[32 * i + 4 * col + t];
              if constexpr (KD == Q8_0) {
                isum += int32_t(int8_t(byte)) * xb[4 * i + t];
              } else {
                isum += int32_t(byte & 0x0F) * xb[4 * i + t] + int32_t(byte >> 4) * xb[16 + 4 * i + t];
              }
            }
          }
          if constexpr (KD == Q4_0) isum -= pb.x->s8[m * nb + b];
          uint16_t dh, mh;
          std::memcpy(&dh, blk + 2 * col, 2);
          acc = std::fma(float(isum), half_to_float(dh) * pb.x->dx[m * nb + b], acc);
          if constexpr (KD == Q4_1) {
            std::memcpy(&mh, blk + 16 + 2 * col, 2);
            acc = std::fma(half_to_float(mh), pb.x->sx[m * nb + b], acc);
          }
        }
        c[r * NP * PANEL + p * PANEL + col] = acc;
      }
    }
  }
}

// act float, portable: per output the same dequantization and the same FMA chain over k.
template <Kind KD, int MR, int NP>
inline void tile_float(const Problem& pb, const uint8_t* w, int64_t m0, float* c) {
  const int64_t pstride = pb.nb * pb.pb_bytes;
  for (int r = 0; r < MR; ++r) {
    const float* x = pb.xf + (m0 + r) * pb.ldx;
    for (int p = 0; p < NP; ++p) {
      for (int col = 0; col < PANEL; ++col) {
        float acc = 0.f;
        for (int64_t b = 0; b < pb.nb; ++b) {
          const uint8_t* blk = w + p * pstride + b * pb.pb_bytes;
          const uint8_t* q = blk + KINDS[KD].scale_bytes;
          uint16_t dh, mh = 0;
          std::memcpy(&dh, blk + 2 * col, 2);
          if constexpr (KD == Q4_1) std::memcpy(&mh, blk + 16 + 2 * col, 2);
          const float d = half_to_float(dh), m = half_to_float(mh);
          for (int k = 0; k < QK; ++k) {
            float wv;
            if constexpr (KD == Q8_0) {
              wv = float(int8_t(q[32 * (k / 4) + 4 * col + k % 4])) * d;
            } else {
              const int kk = k % 16;
              const uint8_t byte = q[32 * (kk / 4) + 4 * col + kk % 4];
              const int nib = k < 16 ? byte & 0x0F : byte >> 4;
              wv = KD == Q4_0 ? d * float(nib - 8) : d * float(nib);
              if constexpr (KD == Q4_1) wv = wv + m;
            }
            acc = std::fma(wv, x[b * QK + k], acc);
          }
        }
        c[r * NP * PANEL + p * PANEL + col] = acc;
      }
    }
  }
}
#endif

}  // namespace
}  // namespace firp
