// One block of keys against a set of query rows: scores, an online-softmax step and the
// output update, for rows along the memory (few rows) or along the vector lanes (many rows).
// Per row and block, one order of operations (see the score section below and
// csrc/cpu/README.md): scores as four FMA chains summed (c0 + c2) + (c1 + c3); probabilities
// exp2 against the running max, summed as KB/W vectors then simd::hsum; the output o * alpha,
// then one FMA per key in key order. Both layouts perform exactly these operations. Rows are
// grouped into register tiles only to share loads: no operation mixes two rows.
#include <algorithm>
#include <type_traits>

#include "attention.h"

namespace firp::attn {
namespace {


// 2^x of one float, by the same polynomial as the vector probabilities.
inline float exp2_one(float x) {
  alignas(64) float t[W];
  store(t, exp2(set1(x)));
  return t[0];
}

// ---------------------------------------------------------------- scores
// A score q . k is four FMA chains, chain j over d = j, j + 4, j + 8, .., summed as
// (chain 0 + chain 2) + (chain 1 + chain 3): one order for every tile shape, row layout and
// ISA. With AVX2 (and AVX-512, which runs the same 256-bit code here) a vector holds the
// four chains of two keys, so eight scores reduce in nine operations and the q operand is
// a 128-bit broadcast.
#if defined(__AVX2__) && defined(__FMA__)

// [a[0:4] | b[0:4]] as floats.
inline __m256 load_pair(const float* a, const float* b) { return _mm256_loadu2_m128(b, a); }
inline __m256 load_pair(const bf16_t* a, const bf16_t* b) {
  const __m128i h = _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(a)),
                                       _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Scores of four vectors of pair chains v = [score x | score y]: lanes [a.x, b.x, c.x,
// d.x | a.y, b.y, c.y, d.y]. (Vectors by value: an accumulator array whose address is
// taken would be stored to memory on every FMA step.)
inline __m256 pair_sums(__m256 a, __m256 b, __m256 c, __m256 d) {
  // chains (0 + 2, 1 + 3) of a and c, then of b and d, interleaved; then their sums
  const __m256 ac = _mm256_add_ps(_mm256_unpacklo_ps(a, c), _mm256_unpackhi_ps(a, c));
  const __m256 bd = _mm256_add_ps(_mm256_unpacklo_ps(b, d), _mm256_unpackhi_ps(b, d));
  return _mm256_add_ps(_mm256_unpacklo_ps(ac, bd), _mm256_unpackhi_ps(ac, bd));
}

// s[r * ldr + j * ldk] = q[r] . k[j] for NR rows and the keys of NP pairs from key i (with
// `odd`, one key: i, paired with itself).
template <int NR, int NP, typename T>
inline void scores_pairs(const float* q, int64_t D, const T* const* kp, int i, bool odd, float* s, int64_t ldr,
                         int64_t ldk) {
  __m256 acc[NP][NR];
  FIRP_UNROLL for (int p = 0; p < NP; ++p)
    FIRP_UNROLL for (int r = 0; r < NR; ++r) acc[p][r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < D; c += 4) {
    __m256 kv[NP];
    FIRP_UNROLL for (int p = 0; p < NP; ++p) kv[p] = load_pair(kp[i + 2 * p] + c, kp[odd ? i : i + 2 * p + 1] + c);
    FIRP_UNROLL for (int r = 0; r < NR; ++r) {
      const __m256 qv = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(q + r * D + c));
      FIRP_UNROLL for (int p = 0; p < NP; ++p) acc[p][r] = _mm256_fmadd_ps(qv, kv[p], acc[p][r]);
    }
  }
  FIRP_UNROLL for (int p = 0; p < NP; ++p) {
    float sums[8];  // vectors past NR repeat row 0
    _mm256_storeu_ps(sums, pair_sums(acc[p][0], acc[p][NR > 1 ? 1 : 0], acc[p][NR > 2 ? 2 : 0],
                                     acc[p][NR > 3 ? 3 : 0]));
    FIRP_UNROLL for (int r = 0; r < NR; ++r) {
      s[r * ldr + (i + 2 * p) * ldk] = sums[r];
      if (!odd) s[r * ldr + (i + 2 * p + 1) * ldk] = sums[4 + r];
    }
  }
}

// s[r * ldr + j * ldk] = q[r] . k[j] for NR rows and n keys, in tiles of at most 12
// accumulators (AVX2 has 16 registers).
template <int NR, typename T>
inline void scores_tile(const float* q, int64_t D, const T* const* kp, int n, float* s, int64_t ldr, int64_t ldk) {
  constexpr int NP = NR == 4 ? 2 : NR == 3 ? 3 : 4;
  int i = 0;
  for (; i + 2 * NP <= n; i += 2 * NP) scores_pairs<NR, NP>(q, D, kp, i, false, s, ldr, ldk);
  for (; i + 2 <= n; i += 2) scores_pairs<NR, 1>(q, D, kp, i, false, s, ldr, ldk);
  if (i < n) scores_pairs<NR, 1>(q, D, kp, i, true, s, ldr, ldk);
}

// Many rows: q interleaved by pairs of rows, qp [RP / 2, D / 4, 8] = [q[2P][c : c + 4] |
// q[2P + 1][c : c + 4]], so that a vector holds the chains of two rows and k is a broadcast.

// Rows [r0, r0 + 8) x keys [i, i + NK): s[j * RP + r] = q[r] . k[j].
template <int NK>
inline void lane_scores_tile(const float* qp, int64_t D, const float* const* kr, int i, float* s, int64_t RP,
                             int r0) {
  __m256 acc[NK][4];
  FIRP_UNROLL for (int j = 0; j < NK; ++j)
    FIRP_UNROLL for (int p = 0; p < 4; ++p) acc[j][p] = _mm256_setzero_ps();
  const float* q0 = qp + int64_t(r0 / 2) * 2 * D;
  for (int64_t c = 0; c < D; c += 4) {
    __m256 kv[NK];
    FIRP_UNROLL for (int j = 0; j < NK; ++j) kv[j] = _mm256_broadcast_ps(reinterpret_cast<const __m128*>(kr[i + j] + c));
    FIRP_UNROLL for (int p = 0; p < 4; ++p) {
      const __m256 qv = _mm256_loadu_ps(q0 + p * 2 * D + 2 * c);
      FIRP_UNROLL for (int j = 0; j < NK; ++j) acc[j][p] = _mm256_fmadd_ps(qv, kv[j], acc[j][p]);
    }
  }
  const __m256i rows = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // lanes hold rows 0 2 4 6 1 3 5 7
  FIRP_UNROLL for (int j = 0; j < NK; ++j)
    _mm256_storeu_ps(s + (i + j) * RP + r0,
                     _mm256_permutevar8x32_ps(pair_sums(acc[j][0], acc[j][1], acc[j][2], acc[j][3]), rows));
}

// s[i * RP + r] = q[r] . k[i] for all RP rows (a multiple of 8) and n keys.
inline void lane_scores(const float* qp, int64_t D, const float* const* kr, int n, float* s, int64_t RP) {
  constexpr int NK = 3;  // 12 accumulators
  for (int r0 = 0; r0 < RP; r0 += 8) {
    int i = 0;
    for (; i + NK <= n; i += NK) lane_scores_tile<NK>(qp, D, kr, i, s, RP, r0);
    for (; i < n; ++i) lane_scores_tile<1>(qp, D, kr, i, s, RP, r0);
  }
}

#else  // portable build: the same chains, one score at a time

template <int NR, typename T>
inline void scores_tile(const float* q, int64_t D, const T* const* kp, int n, float* s, int64_t ldr, int64_t ldk) {
  for (int r = 0; r < NR; ++r)
    for (int i = 0; i < n; ++i) {
      float ch[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t c = 0; c < D; c += 4)
        for (int j = 0; j < 4; ++j) ch[j] = std::fma(q[r * D + c + j], to_float(kp[i][c + j]), ch[j]);
      s[r * ldr + i * ldk] = (ch[0] + ch[2]) + (ch[1] + ch[3]);
    }
}

inline void lane_scores(const float* qp, int64_t D, const float* const* kr, int n, float* s, int64_t RP) {
  for (int64_t r = 0; r < RP; ++r)
    for (int i = 0; i < n; ++i) {
      const float* q = qp + (r / 2) * 2 * D + (r % 2) * 4;  // row r's columns c .. c + 3 at q[2 c]
      float ch[4] = {0.f, 0.f, 0.f, 0.f};
      for (int64_t c = 0; c < D; c += 4)
        for (int j = 0; j < 4; ++j) ch[j] = std::fma(q[2 * c + j], kr[i][c + j], ch[j]);
      s[i * RP + r] = (ch[0] + ch[2]) + (ch[1] + ch[3]);
    }
}

#endif

// Calls f(std::integral_constant<int, nr>{}, r0) for the row tiles [r0, r0 + nr) of R rows.
template <typename F>
inline void for_row_tiles(int R, F&& f) {
  int r0 = 0;
  for (; r0 + RT <= R; r0 += RT) f(std::integral_constant<int, RT>{}, r0);
  switch (R - r0) {
    case 1: f(std::integral_constant<int, 1>{}, r0); break;
    case 2: f(std::integral_constant<int, 2>{}, r0); break;
    case 3: f(std::integral_constant<int, 3>{}, r0); break;
    default: break;
  }
}

// ---------------------------------------------------------------- rows along the memory

// One row's scores s[KB] (n real keys) -> probabilities against the new running max;
// updates m and l and returns alpha, the factor for the row's old output.
inline float softmax_row(float* s, int n, float* m, float* l) {
  for (int i = n; i < KB; ++i) s[i] = NEG_INF;
  vf mx = load(s);
  for (int j = W; j < KB; j += W) mx = max(mx, load(s + j));
  const float m_new = std::max(*m, hmax(mx));
  const float alpha = exp2_one(*m - m_new);
  vf sum = zero();
  for (int j = 0; j < KB; j += W) {
    const vf p = exp2(sub(load(s + j), set1(m_new)));
    store(s + j, p);
    sum = add(sum, p);
  }
  *l = std::fma(*l, alpha, hsum(sum));
  *m = m_new;
  return alpha;
}

// o[r][c : c + NV*W] = alpha[r] * o[r][...] + sum_i p[r][i] * v[i][...] for NR rows.
template <int NR, int NV, typename T>
inline void pv_tile(float* o, int64_t D, const float* p, const float* alpha, const T* const* vp, int n, int64_t c) {
  vf acc[NR][NV];
  FIRP_UNROLL for (int r = 0; r < NR; ++r) {
    const vf a = set1(alpha[r]);
    FIRP_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = mul(load(o + r * D + c + j * W), a);
  }
  for (int i = 0; i < n; ++i) {
    vf vv[NV];
    FIRP_UNROLL for (int j = 0; j < NV; ++j) vv[j] = load(vp[i] + c + j * W);
    FIRP_UNROLL for (int r = 0; r < NR; ++r) {
      const vf pb = set1(p[r * KB + i]);
      FIRP_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = fma(pb, vv[j], acc[r][j]);
    }
  }
  FIRP_UNROLL for (int r = 0; r < NR; ++r)
    FIRP_UNROLL for (int j = 0; j < NV; ++j) store(o + r * D + c + j * W, acc[r][j]);
}

// All rows against one block of n <= KB keys (row pointers kp/vp), visible to every row.
template <typename T>
void row_block(const Rows& rows, const Work& w, int64_t D, const T* const* kp, const T* const* vp, int n) {
  for_row_tiles(rows.R, [&](auto nr, int r0) {
    scores_tile<decltype(nr)::value>(rows.q + r0 * D, D, kp, n, w.s + r0 * KB, KB, 1);
  });
  for (int r = 0; r < rows.R; ++r) w.alpha[r] = softmax_row(w.s + r * KB, n, rows.m + r, rows.l + r);
  for_row_tiles(rows.R, [&](auto nr, int r0) {
    constexpr int NR = decltype(nr)::value;
    float* o = rows.o + r0 * D;
    const float* p = w.s + r0 * KB;
    int64_t c = 0;
    for (; c + 2 * W <= D; c += 2 * W) pv_tile<NR, 2>(o, D, p, w.alpha + r0, vp, n, c);
    for (; c < D; c += W) pv_tile<NR, 1>(o, D, p, w.alpha + r0, vp, n, c);
  });
}

// ---------------------------------------------------------------- rows along the lanes
// Many rows: the same scores (stored [KB, RP]), then softmax_row's and pv_tile's operations
// for W rows at once, on vectors of rows: no transposes or horizontal sums per block.

// The softmax of softmax_row for the rows of each vector (m, l, alpha [RP]).
inline void lane_softmax(float* s, int RP, float* m, float* l, float* alpha) {  // s [KB, RP]
  for (int j = 0; j < RP; j += W) {
    vf mx = load(s + j);
    for (int i = 1; i < KB; ++i) mx = max(mx, load(s + i * RP + j));
    const vf m_old = load(m + j);
    const vf m_new = max(m_old, mx);
    const vf a = exp2(sub(m_old, m_new));
    vf part[W];  // part[c]: lane c of softmax_row's `sum`, for each row
    for (int c = 0; c < W; ++c) part[c] = zero();
    for (int i = 0; i < KB; ++i) {
      const vf p = exp2(sub(load(s + i * RP + j), m_new));
      store(s + i * RP + j, p);
      part[i % W] = add(part[i % W], p);
    }
    for (int half = W / 2; half >= 1; half /= 2)  // hsum's fold
      for (int c = 0; c < half; ++c) part[c] = add(part[c], part[c + half]);
    store(l + j, fma(load(l + j), a, part[0]));
    store(m + j, m_new);
    store(alpha + j, a);
  }
}

// ot[d][rows] = alpha * ot[d][rows] + sum_i v[i][d] * p[i][rows] for ND dims and NRV row vectors.
template <int NRV>
inline void lane_pv(float* ot, int64_t ldo,          // [D, ldo] at the first row vector
                    const float* p, int64_t ldp,     // [KB, ldp] at the first row vector
                    const float* alpha,              // [NRV * W]
                    const float* const* vr,          // [n] value rows [D] as floats
                    int n, int64_t d0) {
  vf acc[ND][NRV];
  FIRP_UNROLL for (int j = 0; j < NRV; ++j) {
    const vf a = load(alpha + j * W);
    FIRP_UNROLL for (int dd = 0; dd < ND; ++dd) acc[dd][j] = mul(load(ot + (d0 + dd) * ldo + j * W), a);
  }
  for (int i = 0; i < n; ++i) {
    vf pv[NRV];
    FIRP_UNROLL for (int j = 0; j < NRV; ++j) pv[j] = load(p + i * ldp + j * W);
    FIRP_UNROLL for (int dd = 0; dd < ND; ++dd) {
      const vf vv = set1(vr[i][d0 + dd]);
      FIRP_UNROLL for (int j = 0; j < NRV; ++j) acc[dd][j] = fma(vv, pv[j], acc[dd][j]);
    }
  }
  FIRP_UNROLL for (int dd = 0; dd < ND; ++dd)
    FIRP_UNROLL for (int j = 0; j < NRV; ++j) store(ot + (d0 + dd) * ldo + j * W, acc[dd][j]);
}

// row_block's operations for rows.R > RT rows along the lanes: output w.ot, m and l of RP entries.
void lane_block(const Rows& rows, int RP, const Work& w, int64_t D, const float* const* kr, const float* const* vr,
                int n) {
  lane_scores(w.qp, D, kr, n, w.s, RP);
  for (int i = 0; i < KB; ++i)  // absent keys and padding rows: -inf, probability 0
    std::fill(w.s + i * RP + (i < n ? rows.R : 0), w.s + (i + 1) * RP, NEG_INF);
  lane_softmax(w.s, RP, rows.m, rows.l, w.alpha);
  for (int64_t d0 = 0; d0 < D; d0 += ND) {
    int j = 0;
    for (; j + NRV * W <= RP; j += NRV * W) lane_pv<NRV>(w.ot + j, RP, w.s + j, RP, w.alpha + j, vr, n, d0);
    if (j + 2 * W <= RP) lane_pv<2>(w.ot + j, RP, w.s + j, RP, w.alpha + j, vr, n, d0);
    else if (j < RP) lane_pv<1>(w.ot + j, RP, w.s + j, RP, w.alpha + j, vr, n, d0);
  }
}

}  // namespace

// (RP > 0). bf16 keys are converted to floats once when several row tiles would each
// convert them (exact: the same values reach the same operations).
template <typename T>
void attend_block(const Rows& rows, int RP, const Work& w, int64_t D, const T* const* kp, const T* const* vp,
                  int n) {
  if constexpr (std::is_same_v<T, bf16_t>) {
    if (rows.R > RT) {
      const float* kr[KB];
      const float* vr[KB];
      for (int i = 0; i < n; ++i) {
        to_floats(w.kb + i * D, kp[i], D);
        to_floats(w.vb + i * D, vp[i], D);
        kr[i] = w.kb + i * D;
        vr[i] = w.vb + i * D;
      }
      attend_block(rows, RP, w, D, kr, vr, n);
      return;
    }
  } else {
    if (RP > 0) {
      lane_block(rows, RP, w, D, kp, vp, n);
      return;
    }
  }
  row_block(rows, w, D, kp, vp, n);
}

template void attend_block(const Rows&, int, const Work&, int64_t, const float* const*, const float* const*, int);
template void attend_block(const Rows&, int, const Work&, int64_t, const bf16_t* const*, const bf16_t* const*, int);

}  // namespace firp::attn
