// The act-q8 register tile of quant.cpp on AVX-512 VNNI (the avx512bf16 and amx builds):
// vpdpbusd multiplies 64 u8 x s8 pairs into 16 int32 lanes in one instruction, where AVX2
// needs maddubs + madd + add for 16 pairs in 8 lanes. One zmm holds two panels: chunk i of
// panel p in lanes 0-7, of panel p + 1 in lanes 8-15 (the packed layout is unchanged, the
// two 32-byte halves come from two loads), so a 4-byte broadcast of xq serves 16 outputs.
//
// Bits: every integer block sum is exact, so it equals the AVX2 and portable tiles' sum; the
// float part is the same per-lane sequence (scale = d * dx, acc = fma(float(isum), scale,
// acc), Q4_1 then acc = fma(m, sx, acc)). A row's output is therefore bit-identical on every
// path (tests/test_quant.py compares them), and a single trailing panel may use the AVX2 tile.
#pragma once

#include "quant_tiles.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FIRP_QUANT_VNNI 1

namespace firp {
namespace {

inline __m512i load_two_panels(const uint8_t* a, const uint8_t* b) {  // 32 bytes of each
  const __m256i lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a));
  return _mm512_inserti64x4(_mm512_castsi256_si512(lo), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)), 1);
}

inline __m512 load_half16(const uint8_t* a, const uint8_t* b) {  // 8 fp16 of each -> 16 floats
  const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a));
  return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(lo),
                                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(b)), 1));
}

inline __m512i bcast4_512(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// c[MR][NZ * 16] = rows m0.. of x times the 2 * NZ consecutive panels starting at w.
// Loop order per block: chunk, row, zmm: one broadcast of 4 bytes of a row's xq feeds all NZ
// weight vectors (the broadcast is a load uop per vpdpbusd otherwise). With few chains
// (MR * NZ < 8) each output keeps two integer accumulators (low / high nibbles, even / odd Q8
// chunks) so that vpdpbusd's latency is hidden; their sum is exact, so no bit changes.
template <Kind KD, int MR, int NZ>
inline void tile_vnni(const Problem& pb, const uint8_t* w, int64_t m0, float* c) {
  constexpr int S = MR * NZ < 8 ? 2 : 1;  // integer accumulators per output vector
  const int64_t pstride = pb.nb * pb.pb_bytes, K = pb.K, nb = pb.nb;
  const int8_t* xq = pb.x->q.data() + m0 * K;
  const __m512i low4 = _mm512_set1_epi8(0x0F), flip = _mm512_set1_epi8(char(0x80));
  __m512 acc[MR][NZ];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int z = 0; z < NZ; ++z) acc[r][z] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk[NZ];  // panel 2z's block b; panel 2z + 1's is pstride further
    FIRP_UNROLL for (int z = 0; z < NZ; ++z) {
      blk[z] = w + 2 * z * pstride + b * pb.pb_bytes;
      prefetch_block(blk[z] + 2 * NZ * pstride, pb.pb_bytes);
      prefetch_block(blk[z] + (2 * NZ + 1) * pstride, pb.pb_bytes);
    }
    constexpr int off = KINDS[KD].scale_bytes;
    __m512i s[S][MR][NZ];
    FIRP_UNROLL for (int h = 0; h < S; ++h)
      FIRP_UNROLL for (int r = 0; r < MR; ++r)
        FIRP_UNROLL for (int z = 0; z < NZ; ++z) s[h][r][z] = _mm512_setzero_si512();
    if constexpr (KD == Q8_0) {
      // vpdpbusd wants unsigned weights: (w xor 0x80) = w + 128 as u8, and the extra
      // 128 * sum(xq) comes off below (s8 holds 8 * sum(xq)).
      FIRP_UNROLL for (int g = 0; g < 8; ++g) {
        __m512i wv[NZ];
        FIRP_UNROLL for (int z = 0; z < NZ; ++z)
          wv[z] = _mm512_xor_si512(load_two_panels(blk[z] + off + 32 * g, blk[z] + pstride + off + 32 * g), flip);
        FIRP_UNROLL for (int r = 0; r < MR; ++r) {
          const __m512i bx = bcast4_512(xq + r * K + b * QK + 4 * g);
          FIRP_UNROLL for (int z = 0; z < NZ; ++z) s[g % S][r][z] = _mm512_dpbusd_epi32(s[g % S][r][z], wv[z], bx);
        }
      }
    } else {
      FIRP_UNROLL for (int i = 0; i < 4; ++i) {
        __m512i lo[NZ], hi[NZ];
        FIRP_UNROLL for (int z = 0; z < NZ; ++z) {
          const __m512i raw = load_two_panels(blk[z] + off + 32 * i, blk[z] + pstride + off + 32 * i);
          lo[z] = _mm512_and_si512(raw, low4);
          hi[z] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low4);
        }
        FIRP_UNROLL for (int r = 0; r < MR; ++r) {
          const int8_t* xb = xq + r * K + b * QK + 4 * i;
          const __m512i b0 = bcast4_512(xb), b1 = bcast4_512(xb + 16);
          FIRP_UNROLL for (int z = 0; z < NZ; ++z) {
            s[0][r][z] = _mm512_dpbusd_epi32(s[0][r][z], lo[z], b0);
            s[S - 1][r][z] = _mm512_dpbusd_epi32(s[S - 1][r][z], hi[z], b1);
          }
        }
      }
    }
    FIRP_UNROLL for (int z = 0; z < NZ; ++z) {
      const __m512 d = load_half16(blk[z], blk[z] + pstride);
      FIRP_UNROLL for (int r = 0; r < MR; ++r) {
        __m512i isum = S == 2 ? _mm512_add_epi32(s[0][r][z], s[S - 1][r][z]) : s[0][r][z];
        const int32_t s8 = pb.x->s8[(m0 + r) * nb + b];
        if constexpr (KD == Q4_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(s8));
        if constexpr (KD == Q8_0) isum = _mm512_sub_epi32(isum, _mm512_set1_epi32(16 * s8));
        const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(pb.x->dx[(m0 + r) * nb + b]));
        acc[r][z] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), scale, acc[r][z]);
      }
      if constexpr (KD == Q4_1) {
        const __m512 mv = load_half16(blk[z] + 16, blk[z] + pstride + 16);
        FIRP_UNROLL for (int r = 0; r < MR; ++r)
          acc[r][z] = _mm512_fmadd_ps(mv, _mm512_set1_ps(pb.x->sx[(m0 + r) * nb + b]), acc[r][z]);
      }
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int z = 0; z < NZ; ++z) _mm512_storeu_ps(c + r * NZ * 2 * PANEL + z * 2 * PANEL, acc[r][z]);
}

}  // namespace
}  // namespace firp
#else
#define FIRP_QUANT_VNNI 0
#endif
