// Native GGUF weights (Q4_0, Q4_1, Q8_0): small-M GEMM y[M, N] = x[M, K] @ W^T straight on the
// blocks. Two definitions, chosen when the weight is packed (the pack's `act`):
// act "float" (firp_engine/quant.py's dequant_linear): each weight is dequantized in registers
//   exactly as gguf does it (d * q, then + m), and each output is one fp32 FMA chain over k in
//   order, the chain of the dense fp32 kernel (linear.cpp): with fp32 x, the same bits as the
//   dense fp32 model. Reads 4.5-8.5 bits per weight instead of 32; costs more instructions.
// act "q8" (quant.py's linear_q8):
//   - each row of x is quantized on its own to 8-bit blocks of 32 (scale dx = amax / 127),
//     so a block's dot product with a weight block is an exact integer, made with AVX2's
//     maddubs (u8 x s8 pairs -> s16) and madd (s16 pairs -> s32): 32 multiply-adds per
//     instruction against 8 for an fp32 FMA, which keeps extra rows cheap;
//   - per output, the blocks are accumulated in K order in fp32:
//       acc = fma(float(isum), d * dx, acc)         (Q4_1 also: acc = fma(m, dx * sum(xq), acc))
//     The integer part is exact whatever the order; the float part is one chain per output in
//     one order, so a row's bits do not depend on M, on its place, or on the thread count
//     (threads split the panels, never K), and the portable code gives the same bits.
//
// Packed layout (pack_quant, made once at load): a uint8 tensor, a 64-byte header of int64
// {MAGIC, kind, N, K, panels, bytes per panel block, act, 0}, then panels of PANEL = 8 output
// rows (zero-padded past N), each K/32 panel blocks in K order:
//   Q4_0: d[8] fp16 | q[128]            Q4_1: d[8] fp16 | m[8] fp16 | q[128]
//   Q8_0: d[8] fp16 | q[256]
// q is cut in 32-byte chunks, byte 4c + t of a chunk belonging to row c of the panel:
//   Q4: chunk i holds GGUF nibble bytes 4i..4i+3 of each row: low nibbles k = 4i + t,
//       high nibbles k = 16 + 4i + t;   Q8: chunk g holds k = 4g + t.
// So one chunk (after a mask or a shift for Q4) times a broadcast of 4 bytes of xq gives the
// 8 rows' partial dots in the 8 int32 lanes, with no horizontal sums; and byte t of each lane
// (a shift) is the 8 rows' weights at one k, what the float path's FMA needs. The bytes per
// weight stay GGUF's (the fp16 scales are converted in the kernel).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
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

template <typename XT>
QuantX quantize_x(const XT* x, int64_t ldx, int64_t M, int64_t K) {
  const int64_t nb = K / QK;
  QuantX r{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * nb),
           std::vector<int32_t>(M * nb)};
  float buf[QK];
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < nb; ++b) {
      float amax = 0.f;
      for (int j = 0; j < QK; ++j) {
        buf[j] = to_float(x[m * ldx + b * QK + j]);
        amax = std::max(amax, std::fabs(buf[j]));
      }
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0;
      int8_t* q = r.q.data() + m * K + b * QK;
      for (int j = 0; j < QK; ++j) {
        const float v = std::min(127.f, std::max(-127.f, std::nearbyint(buf[j] * inv)));
        q[j] = int8_t(v);
        sum += q[j];
      }
      const float dx = amax / 127.f;
      r.dx[m * nb + b] = dx;
      r.sx[m * nb + b] = dx * float(sum);
      r.s8[m * nb + b] = 8 * sum;
    }
  }
  return r;
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
      __builtin_prefetch(blk + NP * pstride);
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
      __builtin_prefetch(blk + NP * pstride);
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

template <Kind KD, int MR, int NP>
inline void run_tile(const Problem& pb, int64_t p, int64_t m0) {
  alignas(32) float c[MR * NP * PANEL];
  const uint8_t* w = pb.panels + p * pb.nb * pb.pb_bytes;
  if (pb.act == ACT_FLOAT) {
    tile_float<KD, MR, NP>(pb, w, m0, c);
  } else {
    tile<KD, MR, NP>(pb, w, m0, c);
  }
  const int64_t n0 = p * PANEL, ncols = std::min<int64_t>(NP * PANEL, pb.N - n0);
  for (int r = 0; r < MR; ++r) {
    const float* src = c + r * NP * PANEL;
    const int64_t row = (m0 + r) * pb.N + n0;
    if (pb.out_f) {
      std::memcpy(pb.out_f + row, src, ncols * sizeof(float));
    } else {
      for (int64_t j = 0; j < ncols; ++j) pb.out_h[row + j] = float_to_bf16(src[j]);
    }
  }
}

// Panels per step: independent accumulators for one or two rows, registers for more (16 ymm).
template <int MR>
constexpr int panels_per_step() {
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

template <Kind KD, int MR, int NP>
inline void run_panels(const Problem& pb, int64_t p) {
  int64_t m0 = 0;
  for (; m0 + MR <= pb.M; m0 += MR) run_tile<KD, MR, NP>(pb, p, m0);
  switch (pb.M - m0) {  // the last rows
    case 1: run_tile<KD, 1, NP>(pb, p, m0); break;
    case 2: if constexpr (MR > 2) run_tile<KD, 2, NP>(pb, p, m0); break;
    case 3: if constexpr (MR > 3) run_tile<KD, 3, NP>(pb, p, m0); break;
    default: break;
  }
}

template <Kind KD, int MR>
void run_mr(const Problem& pb, int64_t n_panels) {
  constexpr int NP = panels_per_step<MR>();
  const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (pb.nb * pb.pb_bytes));
  at::parallel_for(0, n_panels, grain, [&](int64_t p0, int64_t p1) {
    int64_t p = p0;
    for (; p + NP <= p1; p += NP) run_panels<KD, MR, NP>(pb, p);
    for (; p < p1; ++p) run_panels<KD, MR, 1>(pb, p);
  });
}

template <Kind KD>
void run_kind(const Problem& pb, int64_t n_panels) {
  switch (std::min<int64_t>(pb.M, MAX_MR)) {
    case 1: run_mr<KD, 1>(pb, n_panels); break;
    case 2: run_mr<KD, 2>(pb, n_panels); break;
    case 3: run_mr<KD, 3>(pb, n_panels); break;
    default: run_mr<KD, 4>(pb, n_panels); break;
  }
}

const int64_t* header(const at::Tensor& packed) { return ptr<int64_t>(packed); }

}  // namespace

bool is_quant_pack(const at::Tensor& packed) {
  return packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() >= HEADER &&
         packed.is_contiguous() && header(packed)[0] == MAGIC;
}

at::Tensor pack_quant(const at::Tensor& blocks, const std::string& kind_name, const std::string& act_name) {
  check_cpu(blocks, "pack_quant");
  int64_t kind = -1, act = -1;
  for (int64_t k = 0; k < 3; ++k)
    if (kind_name == KINDS[k].name) kind = k;
  for (int64_t a = 0; a < 2; ++a)
    if (act_name == ACT_NAMES[a]) act = a;
  TORCH_CHECK(kind >= 0, "pack_quant: unsupported kind ", kind_name, " (Q4_0, Q4_1, Q8_0)");
  TORCH_CHECK(act >= 0, "pack_quant: unknown act ", act_name, " (q8, float)");
  const KindInfo& info = KINDS[kind];
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) % info.gguf_bytes == 0,
              "pack_quant: expected uint8 blocks [N, K/32 * ", info.gguf_bytes, "], got ", blocks.scalar_type(),
              " ", blocks.sizes());
  const at::Tensor src = blocks.contiguous();
  const int64_t N = src.size(0), nb = src.size(1) / info.gguf_bytes, K = nb * QK;
  const int64_t np = (N + PANEL - 1) / PANEL, pbb = info.scale_bytes + info.q_bytes;
  at::Tensor out = at::zeros({HEADER + np * nb * pbb}, src.options());
  int64_t* h = ptr<int64_t>(out);
  h[0] = MAGIC, h[1] = kind, h[2] = N, h[3] = K, h[4] = np, h[5] = pbb, h[6] = act;
  const uint8_t* in = ptr<uint8_t>(src);
  uint8_t* panels = ptr<uint8_t>(out) + HEADER;
  const int64_t qoff = info.gguf_bytes - info.q_bytes / PANEL;  // where a GGUF block's quants start
  at::parallel_for(0, np, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int c = 0; c < PANEL && p * PANEL + c < N; ++c) {  // padding rows stay zero
        const uint8_t* row = in + (p * PANEL + c) * nb * info.gguf_bytes;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* g = row + b * info.gguf_bytes;
          uint8_t* dst = panels + (p * nb + b) * pbb;
          std::memcpy(dst + 2 * c, g, 2);                          // d
          if (kind == Q4_1) std::memcpy(dst + 16 + 2 * c, g + 2, 2);  // m
          for (int64_t i = 0; i < info.q_bytes / 32; ++i)          // chunk i: bytes 4i..4i+3 of each row
            std::memcpy(dst + info.scale_bytes + 32 * i + 4 * c, g + qoff + 4 * i, 4);
        }
      }
    }
  });
  return out;
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& packed) {
  check_cpu(x_in, "linear");
  const int64_t* h = header(packed);
  TORCH_CHECK(h[1] >= 0 && h[1] < 3 && (h[6] == ACT_Q8 || h[6] == ACT_FLOAT) && h[3] % QK == 0 && packed.numel() == HEADER + h[4] * (h[3] / QK) * h[5],
              "linear: a corrupt quantized pack (not made by pack_quant?)");
  const Kind kind = Kind(h[1]);
  const int64_t N = h[2], K = h[3], np = h[4];
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K, "linear: the ", KINDS[kind].name,
              " pack is [", N, ", ", K, "] but weight is ", weight.sizes());
  TORCH_CHECK(x_in.size(-1) == K, "linear: x has K=", x_in.size(-1), " but the weight is [", N, ", ", K, "]");
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  const at::Tensor x = rows_contig(x_in.reshape({-1, K}));
  const int64_t M = x.size(0);
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  const Act act = Act(h[6]);
  const bool f32 = x.scalar_type() == at::kFloat;
  QuantX qx;
  std::vector<float> xf;  // act float with bf16 x: the rows as floats
  if (act == ACT_Q8) {
    dispatch_float(x, "linear", [&](auto t) {
      using XT = decltype(t);
      qx = quantize_x(ptr<XT>(x), x.stride(0), M, K);
    });
  } else if (!f32) {
    dispatch_float(x, "linear", [](auto) {});  // dtype check
    xf.resize(M * K);
    const bf16_t* src = ptr<bf16_t>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf16_to_float(src[m * x.stride(0) + k]);
  }
  const float* xrows = act == ACT_Q8 ? nullptr : f32 ? ptr<float>(x) : xf.data();
  const Problem pb{kind, act, ptr<uint8_t>(packed) + HEADER, h[5], K / QK, &qx, xrows,
                   f32 || act == ACT_Q8 ? x.stride(0) : K, M, N, K,
                   f32 ? ptr<float>(out) : nullptr, f32 ? nullptr : ptr<bf16_t>(out)};
  switch (kind) {
    case Q4_0: run_kind<Q4_0>(pb, np); break;
    case Q4_1: run_kind<Q4_1>(pb, np); break;
    case Q8_0: run_kind<Q8_0>(pb, np); break;
  }
  return out;
}

}  // namespace firp
