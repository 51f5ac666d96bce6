// Paged decode attention and tree attention on the CPU, as one flash-attention style kernel
// that is row-invariant: a query row's output bits depend only on its query and on the
// sequence of keys it sees (see csrc/cpu/README.md), never on the other rows of the call,
// the row's place among them, the number of threads, or whether the keys sit in the paged
// cache or in the step's scratch rows.
//
// A row's visible keys, in order, are the paged prefix [0, P) followed by the scratch rows
// its mask bits allow, in scratch order; key j of that list is "visible key j". For plain
// decoding (the cache holds [0, p]), a tree row at depth t (prefix p - t, then its ancestors
// and itself) and a prefill row (cache [0, s), then chunk rows [0, i]), the same token sees
// the same list. Everything is then cut by visible-key index alone:
//  - splits of SPLIT keys (fixed, in keys): each gives a partial (max, sum, unnormalised
//    output), merged by log-sum-exp in split order;
//  - blocks of KB keys inside a split: an online softmax step each (block max, rescale).
// Per row and block, one order of operations (see the score section below and
// csrc/cpu/README.md): scores as four FMA chains summed (c0 + c2) + (c1 + c3); probabilities
// exp2 against the running max, summed as KB/W vectors then simd::hsum; the output o * alpha,
// then one FMA per key in key order. Few rows keep their state along the memory (row-major),
// many rows along the vector lanes for the keys they all see; both layouts perform exactly
// these operations. Rows are grouped into register tiles only to share loads: no operation
// mixes two rows. The mask bits choose keys; masked keys are never read.
//
// Work items are (sequence, kv head, block of query rows, split). Query rows of an item are
// the g = H / Hkv heads sharing a kv head times whole tokens, so a key row loaded serves all
// of them (GQA). Keys that every row of an item sees at the same visible index, the prefix
// blocks below the last partial one, are attended by all rows together; the rest (tree
// attention: the prefix's last partial block and the scratch rows) per token, from the
// token's own list of visible keys.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpu_ops.h"

namespace firp {
namespace {

using namespace simd;
constexpr int KB = 32;                   // keys per block
constexpr int64_t SPLIT = 256;           // keys per split (a multiple of KB)
constexpr int RT = 4;                    // query rows per register tile
// Register tiles of lane_pv: ND head dims times NRV vectors of rows, 12 accumulators with
// AVX2 (of 16 registers), 24 with AVX-512 (of 32).
constexpr int ND = W == 16 ? 8 : 4;
constexpr int NRV = 3;
constexpr int ROWS_PER_ITEM = 64;        // query rows per work item (whole tokens)
constexpr int64_t MAX_D = 256;
constexpr int64_t PREFETCH_BLOCKS = 2;   // how far ahead the paged keys/values are fetched
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Running max of a row that has seen no key yet: finite, so that no inf - inf appears;
// the scores of absent keys are -inf and become exactly 0.
constexpr float M_EMPTY = -1e30f;
static_assert(SPLIT % KB == 0 && KB % W == 0, "splits are whole blocks, blocks whole vectors");

// The online-softmax state of R consecutive query rows (row-major, D floats per row).
struct Rows {
  float* q;  // [R, D] queries scaled by scale * log2(e)
  float* o;  // [R, D] unnormalised output
  float* m;  // [R] running max
  float* l;  // [R] running sum
  int R;

  Rows sub(int r0, int n, int64_t D) const { return {q + r0 * D, o + r0 * D, m + r0, l + r0, n}; }
};

// Per-thread buffers.
struct Work {
  float* s;      // scores, then probabilities: [R, KB], or [KB, RP] with rows along the lanes
  float* alpha;  // [RP] rescale factor of the current block
  float* ot;     // [D, RP] the output with rows along the lanes (many rows)
  float* qp;     // [RP / 2, D / 4, 8] the queries by pairs of rows (many rows, see lane_scores)
  float* kb;     // [KB, D] a key block as floats
  float* vb;     // [KB, D] a value block as floats
};

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

// dst[0:D] = src[0:D] as floats.
template <typename T>
inline void to_floats(float* dst, const T* src, int64_t D) {
  for (int64_t c = 0; c < D; c += W) store(dst + c, load(src + c));
}

// A block every row sees: row_block, or lane_block when the rows are laid along the lanes
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

// ---------------------------------------------------------------- items

// Everything about one call that items need (element types are resolved by templates).
struct Problem {
  const void* q;                  // [T or B, H, D]
  int64_t q_s0, q_s1;
  bool q_bf16;
  int64_t H, Hkv, D, g;
  float qscale;                   // scale * log2(e)
  const void* kc;                 // [NB, BS, Hkv, D] contiguous
  const void* vc;
  int64_t bs;
  const int32_t* pages;           // [B, P]
  int64_t pages_ld;
  const int64_t* prefix;          // [B] keys in the cache per sequence (decode: the whole context)
  // tree attention only (kn null for decode):
  const void* kn;                 // scratch rows [S, Hkv, D]
  const void* vn;
  int64_t kn_s0, kn_s1, vn_s0, vn_s1;
  const int64_t* vis_off;         // [T + 1] token t sees scratch rows vis_idx[vis_off[t] : vis_off[t + 1]]
  const int32_t* vis_idx;
};

struct Item {
  int64_t seq, h, r0, nr;  // rows [r0, r0 + nr) of the (seq, kv head) row space: row = t * g + j
  int64_t v0, v1;          // the split: visible keys [v0, v1)
};

// Token and head of row r of an item: decode has one token per sequence, tree one sequence.
inline int64_t row_token(const Problem& pb, const Item& it, int64_t r) { return it.seq + (it.r0 + r) / pb.g; }
inline int64_t row_head(const Problem& pb, const Item& it, int64_t r) { return it.h * pb.g + (it.r0 + r) % pb.g; }

// Visible keys of token t (tree attention; decode rows see the prefix only).
inline int64_t visible_keys(const Problem& pb, int64_t t, int64_t prefix) {
  return prefix + (pb.kn ? pb.vis_off[t + 1] - pb.vis_off[t] : 0);
}

// Element offset of cache token t of a sequence's kv head h.
inline int64_t cache_offset(const Problem& pb, const int32_t* pages, int64_t h, int64_t t) {
  return (int64_t(pages[t / pb.bs]) * pb.bs + t % pb.bs) * pb.Hkv * pb.D + h * pb.D;
}

// Scaled query rows of the item into rows.q [R, D].
template <typename TQ>
void load_queries(const Problem& pb, const Item& it, const Rows& rows) {
  const TQ* q = static_cast<const TQ*>(pb.q);
  const vf scale = set1(pb.qscale);
  for (int r = 0; r < rows.R; ++r) {
    const TQ* src = q + row_token(pb, it, r) * pb.q_s0 + row_head(pb, it, r) * pb.q_s1;
    for (int64_t c = 0; c < pb.D; c += W) store(rows.q + r * pb.D + c, mul(load(src + c), scale));
  }
}

// Cache keys [k0, k1) (k0 a multiple of KB) for all rows of an item (along the lanes if RP > 0).
template <typename TC>
void attend_shared(const Problem& pb, const Item& it, const Rows& rows, int RP, const Work& w, int64_t k0,
                   int64_t k1) {
  const TC* kc = static_cast<const TC*>(pb.kc);
  const TC* vc = static_cast<const TC*>(pb.vc);
  const int32_t* pages = pb.pages + it.seq * pb.pages_ld;
  const int64_t row_bytes = pb.D * int64_t(sizeof(TC));
  const TC* kp[KB];
  const TC* vp[KB];
  for (int64_t b0 = k0; b0 < k1; b0 += KB) {
    const int n = int(std::min<int64_t>(KB, k1 - b0));
    for (int i = 0; i < n; ++i) {
      const int64_t off = cache_offset(pb, pages, it.h, b0 + i);
      kp[i] = kc + off;
      vp[i] = vc + off;
    }
    // Rows come from scattered pages, beyond what the hardware prefetcher guesses:
    // fetch the keys and values PREFETCH_BLOCKS ahead while this block is computed.
    const int64_t ahead = b0 + PREFETCH_BLOCKS * KB;
    for (int64_t t = ahead; t < std::min(ahead + KB, k1); ++t) {
      const char* k = reinterpret_cast<const char*>(kc + cache_offset(pb, pages, it.h, t));
      const char* v = reinterpret_cast<const char*>(vc + cache_offset(pb, pages, it.h, t));
      for (int64_t c = 0; c < row_bytes; c += 64) {
        __builtin_prefetch(k + c);
        __builtin_prefetch(v + c);
      }
    }
    attend_block(rows, RP, w, pb.D, kp, vp, n);
  }
}

// Tree attention: each token's visible keys [from, min(v1, its count)), from its own list:
// the cache below the prefix length, then its visible scratch rows. Block by block,
// consecutive tokens whose lists agree on the block (e.g. the rows of a prefill chunk on
// the chunk rows they all see) attend it together; that only shares loads.
template <typename TC, typename TS>
void attend_tokens(const Problem& pb, const Item& it, const Rows& rows, const Work& w, int64_t from) {
  const int64_t P = pb.prefix[0], D = pb.D, g = pb.g;
  const int32_t* pages = pb.pages;
  const TC* kc = static_cast<const TC*>(pb.kc);
  const TC* vc = static_cast<const TC*>(pb.vc);
  const TS* kn = static_cast<const TS*>(pb.kn);
  const TS* vn = static_cast<const TS*>(pb.vn);
  const int64_t t0 = row_token(pb, it, 0), n_tokens = rows.R / g;
  // Keys of token t in the block at b0, and whether token u has the same ones.
  auto count = [&](int64_t t, int64_t b0) {
    return std::clamp<int64_t>(std::min(it.v1, visible_keys(pb, t, P)) - b0, 0, KB);
  };
  auto scratch_rows = [&](int64_t t) { return pb.vis_idx + pb.vis_off[t]; };
  auto same_keys = [&](int64_t t, int64_t u, int64_t b0, int64_t n) {
    if (count(u, b0) != n) return false;
    const int64_t j0 = std::max(b0, P) - P, j1 = b0 + n - P;
    return j0 >= j1 || std::equal(scratch_rows(t) + j0, scratch_rows(t) + j1, scratch_rows(u) + j0);
  };
  for (int64_t b0 = from; b0 < it.v1; b0 += KB) {
    for (int64_t a = 0; a < n_tokens;) {
      const int64_t t = t0 + a, n = count(t, b0);
      int64_t e = a + 1;
      while (e < n_tokens && n > 0 && same_keys(t, t0 + e, b0, n)) ++e;
      const Rows tr = rows.sub(int(a * g), int((e - a) * g), D);
      a = e;
      if (n == 0) continue;
      const int32_t* vis = scratch_rows(t);
      if constexpr (std::is_same_v<TC, TS>) {
        const TC* kp[KB];
        const TC* vp[KB];
        for (int i = 0; i < n; ++i) {
          const int64_t j = b0 + i;
          if (j < P) {
            kp[i] = kc + cache_offset(pb, pages, it.h, j);
            vp[i] = vc + cache_offset(pb, pages, it.h, j);
          } else {
            kp[i] = kn + vis[j - P] * pb.kn_s0 + it.h * pb.kn_s1;
            vp[i] = vn + vis[j - P] * pb.vn_s0 + it.h * pb.vn_s1;
          }
        }
        attend_block(tr, 0, w, D, kp, vp, int(n));
      } else {  // cache and scratch of different dtypes: one float block
        const float* kp[KB];
        const float* vp[KB];
        for (int i = 0; i < n; ++i) {
          const int64_t j = b0 + i;
          if (j < P) {
            to_floats(w.kb + i * D, kc + cache_offset(pb, pages, it.h, j), D);
            to_floats(w.vb + i * D, vc + cache_offset(pb, pages, it.h, j), D);
          } else {
            to_floats(w.kb + i * D, kn + vis[j - P] * pb.kn_s0 + it.h * pb.kn_s1, D);
            to_floats(w.vb + i * D, vn + vis[j - P] * pb.vn_s0 + it.h * pb.vn_s1, D);
          }
          kp[i] = w.kb + i * D;
          vp[i] = w.vb + i * D;
        }
        attend_block(tr, 0, w, D, kp, vp, int(n));
      }
    }
  }
}

// Where an item's result goes: unnormalised rows [R, D] and (max, sum) pairs [R, 2].
struct Partial {
  float* o;
  float* ml;
};

// qp [RP / 2, D / 4, 8] = rows 2P and 2P + 1 of q [R, D] four columns at a time (rows >= R: 0).
void interleave_pairs(const float* q, int R, int RP, int64_t D, float* qp) {
  for (int r = 0; r < RP; ++r)
    for (int64_t c = 0; c < D; c += 4)
      for (int j = 0; j < 4; ++j) qp[(r / 2) * 2 * D + 2 * c + (r % 2) * 4 + j] = r < R ? q[r * D + c + j] : 0.f;
}

template <typename TC, typename TS>
void run_item(const Problem& pb, const Item& it, const Rows& rows, const Work& w, Partial part) {
  const int64_t D = pb.D;
  if (pb.q_bf16) load_queries<bf16_t>(pb, it, rows);
  else load_queries<float>(pb, it, rows);
  // Many rows take the shared keys along the lanes (m, l padded to whole vectors), then
  // continue along the memory.
  const int RP = rows.R > RT ? (rows.R + W - 1) / W * W : 0;
  float* o = RP ? w.ot : rows.o;
  if (RP) interleave_pairs(rows.q, rows.R, RP, D, w.qp);
  std::fill(o, o + std::max(RP, rows.R) * D, 0.f);
  std::fill(rows.m, rows.m + std::max(RP, rows.R), M_EMPTY);
  std::fill(rows.l, rows.l + std::max(RP, rows.R), 0.f);
  const int64_t P = pb.prefix[it.seq];
  // Cache keys every row sees at the same index: all of them for decode; for a tree, the
  // whole blocks (the last partial block continues with each token's own scratch rows).
  const int64_t shared = pb.kn ? P / KB * KB : P;
  attend_shared<TC>(pb, it, rows, RP, w, it.v0, std::min(it.v1, shared));
  if (RP)
    for (int r = 0; r < rows.R; ++r)
      for (int64_t d = 0; d < D; ++d) rows.o[r * D + d] = w.ot[d * RP + r];
  if (pb.kn) attend_tokens<TC, TS>(pb, it, rows, w, std::max(it.v0, shared));
  std::copy(rows.o, rows.o + rows.R * D, part.o);
  for (int r = 0; r < rows.R; ++r) {
    part.ml[2 * r] = rows.m[r];
    part.ml[2 * r + 1] = rows.l[r];
  }
}

// The items of one (sequence, kv head, row block), one per split: consecutive in the list.
struct Group {
  int64_t first, count;
};

// Merges a group's partials by log-sum-exp, in split order, and writes the output rows. A
// split the row has no key in (l = 0) is skipped: it must not touch the row's result.
template <typename TO>
void merge_group(const Problem& pb, const Item* items, const Group& gr,
                 const float* part_o,   // [items, rows_ld, D]
                 const float* part_ml,  // [items, rows_ld, 2]
                 int64_t rows_ld, void* out, int64_t o_s0, int64_t o_s1) {
  const Item& it = items[gr.first];
  const int64_t D = pb.D;
  float acc[MAX_D];
  for (int64_t r = 0; r < it.nr; ++r) {
    float m = M_EMPTY;
    for (int64_t s = 0; s < gr.count; ++s) {
      const float* ml = part_ml + ((gr.first + s) * rows_ld + r) * 2;
      if (ml[1] > 0.f) m = std::max(m, ml[0]);
    }
    float l = 0.f;
    std::fill(acc, acc + D, 0.f);
    for (int64_t s = 0; s < gr.count; ++s) {
      const int64_t slot = (gr.first + s) * rows_ld + r;
      if (!(part_ml[slot * 2 + 1] > 0.f)) continue;
      const float w = std::exp2(part_ml[slot * 2] - m);
      l = std::fma(w, part_ml[slot * 2 + 1], l);
      const vf wv = set1(w);
      for (int64_t c = 0; c < D; c += W) store(acc + c, fma(load(part_o + slot * D + c), wv, load(acc + c)));
    }
    TO* dst = static_cast<TO*>(out) + row_token(pb, it, r) * o_s0 + row_head(pb, it, r) * o_s1;
    const vf inv = set1(1.f / l);
    for (int64_t c = 0; c < D; c += W) store(dst + c, mul(load(acc + c), inv));
  }
}

// Uninitialised float scratch (zero-filling it would cost more than some calls).
std::unique_ptr<float[]> scratch(int64_t n) { return std::unique_ptr<float[]>(new float[n]); }

// Runs all items in parallel, then the merges; out [.., H, D] has a contiguous last dim.
template <typename TC, typename TS>
void run_all(const Problem& pb, const std::vector<Item>& items, const std::vector<Group>& groups, at::Tensor& out) {
  const int64_t D = pb.D, n = int64_t(items.size());
  int64_t R = 0;  // rows of the largest item
  for (const Item& it : items) R = std::max(R, it.nr);
  const int64_t RP = (R + W - 1) / W * W;
  auto part_o = scratch(n * R * D), part_ml = scratch(n * R * 2);
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    auto buf = scratch(4 * RP * D + 3 * RP + RP * KB + 2 * KB * D);
    float* p = buf.get();
    auto take = [&p](int64_t count) { return std::exchange(p, p + count); };
    float *q = take(RP * D), *o = take(RP * D), *m = take(RP), *l = take(RP);
    const Work w{take(RP * KB), take(RP), take(RP * D), take(RP * D), take(KB * D), take(KB * D)};
    for (int64_t i = i0; i < i1; ++i) {
      const Rows rows{q, o, m, l, int(items[i].nr)};
      run_item<TC, TS>(pb, items[i], rows, w, {part_o.get() + i * R * D, part_ml.get() + i * R * 2});
    }
  });
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  at::parallel_for(0, int64_t(groups.size()), 4, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      if (bf16)
        merge_group<bf16_t>(pb, items.data(), groups[g], part_o.get(), part_ml.get(), R, out.data_ptr(),
                            out.stride(0), out.stride(1));
      else
        merge_group<float>(pb, items.data(), groups[g], part_o.get(), part_ml.get(), R, out.data_ptr(),
                           out.stride(0), out.stride(1));
    }
  });
}

// Appends the items of one (sequence, kv head, row block): one per split of its longest row.
void add_group(std::vector<Item>& items, std::vector<Group>& groups, int64_t seq, int64_t h, int64_t r0,
               int64_t nr, int64_t most_keys) {
  const int64_t splits = std::max<int64_t>(1, (most_keys + SPLIT - 1) / SPLIT);
  groups.push_back({int64_t(items.size()), splits});
  for (int64_t s = 0; s < splits; ++s) items.push_back({seq, h, r0, nr, s * SPLIT, (s + 1) * SPLIT});
}

void check_heads(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const char* name) {
  check_cpu(q, name);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), name,
              ": expected q [T, H, D] and caches [NB, BS, Hkv, D], got ", q.sizes(), " and ", k_cache.sizes());
  const int64_t H = q.size(1), Hkv = k_cache.size(2), D = q.size(2);
  TORCH_CHECK(k_cache.size(3) == D && Hkv > 0 && H % Hkv == 0, name, ": q ", q.sizes(), " does not match cache ",
              k_cache.sizes());
  TORCH_CHECK(D % W == 0 && D <= MAX_D, name, ": head_dim ", D, " must be a multiple of ", W, " and <= ", MAX_D);
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type(), name, ": k and v caches differ in dtype");
}

Problem make_problem(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const at::Tensor& pages,
                     double scale) {
  Problem pb{};
  pb.q = q.data_ptr();
  pb.q_s0 = q.stride(0);
  pb.q_s1 = q.stride(1);
  pb.q_bf16 = q.scalar_type() == at::kBFloat16;
  pb.H = q.size(1);
  pb.Hkv = kc.size(2);
  pb.D = q.size(2);
  pb.g = pb.H / pb.Hkv;
  pb.qscale = float(scale) * LOG2E;
  pb.kc = kc.data_ptr();
  pb.vc = vc.data_ptr();
  pb.bs = kc.size(1);
  pb.pages = ptr<int32_t>(pages);
  pb.pages_ld = pages.size(-1);
  return pb;
}

void check_pages(const int32_t* pages, int64_t n_tokens, int64_t bs, int64_t max_pages, int64_t n_blocks,
                 const char* name) {
  const int64_t n = (n_tokens + bs - 1) / bs;
  TORCH_CHECK(n <= max_pages, name, ": ", n_tokens, " tokens need ", n, " pages, the page table has ", max_pages);
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(pages[i] >= 0 && pages[i] < n_blocks, name, ": page ", pages[i], " is outside [0, ", n_blocks, ")");
}

// t itself when it already has this dtype and is contiguous (the common case: no op calls).
at::Tensor as_contiguous(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype && t.is_contiguous() ? t : t.to(dtype).contiguous();
}

// Context lengths as int64, read without a conversion op for int32 and int64 tensors.
std::vector<int64_t> read_lengths(const at::Tensor& t_in) {
  const at::Tensor t = t_in.scalar_type() == at::kInt ? t_in.contiguous() : as_contiguous(t_in, at::kLong);
  std::vector<int64_t> out(t.numel());
  if (t.scalar_type() == at::kInt) std::copy(ptr<int32_t>(t), ptr<int32_t>(t) + t.numel(), out.begin());
  else std::copy(ptr<int64_t>(t), ptr<int64_t>(t) + t.numel(), out.begin());
  return out;
}

// Each token's visible scratch rows (set bits below S, ascending) as offsets [T + 1] and rows.
void visible_rows(const int64_t* mask, int64_t T, int64_t mask_ld, int64_t S, std::vector<int64_t>& off,
                  std::vector<int32_t>& idx) {
  off.assign(T + 1, 0);
  idx.clear();
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t wd = 0; wd * 64 < S; ++wd) {
      uint64_t word = uint64_t(mask[t * mask_ld + wd]);
      if (S - wd * 64 < 64) word &= (1ull << (S - wd * 64)) - 1;
      for (; word; word &= word - 1) idx.push_back(int32_t(wd * 64 + __builtin_ctzll(word)));
    }
    off[t + 1] = int64_t(idx.size());
  }
}

// Output buffer with a contiguous last dim: `out` when usable, else a new tensor.
at::Tensor out_buffer(const OptTensor& out, const at::Tensor& q) {
  if (out && out->sizes() == q.sizes() && out->scalar_type() == q.scalar_type() && out->stride(-1) == 1) return *out;
  return at::empty(q.sizes(), q.options());
}

template <typename F>
void dispatch_kv(const at::Tensor& cache, const at::Tensor& scratch, F&& f) {
  dispatch_float(cache, "kv cache", [&](auto ct) {
    dispatch_float(scratch, "scratch kv", [&](auto st) { f(ct, st); });
  });
}

}  // namespace

at::Tensor paged_decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                                  const at::Tensor& page_tables_in, const at::Tensor& context_lens_in, double scale,
                                  const OptTensor& out) {
  check_heads(q_in, k_cache_in, v_cache_in, "paged_decode_attention");
  const at::Tensor q = rows_contig(q_in), kc = k_cache_in.contiguous(), vc = v_cache_in.contiguous();
  const at::Tensor pages = as_contiguous(page_tables_in, at::kInt);
  const std::vector<int64_t> len = read_lengths(context_lens_in);
  const int64_t B = q.size(0);
  TORCH_CHECK(pages.dim() == 2 && pages.size(0) == B && int64_t(len.size()) == B,
              "paged_decode_attention: expected page_tables [", B, ", P] and context_lens [", B, "], got ",
              pages.sizes(), " and ", context_lens_in.sizes());
  at::Tensor res = out_buffer(out, q);
  if (B == 0) return out ? *out : res;
  Problem pb = make_problem(q, kc, vc, pages, scale);
  pb.prefix = len.data();
  for (int64_t b = 0; b < B; ++b)
    check_pages(pb.pages + b * pb.pages_ld, len[b], pb.bs, pb.pages_ld, kc.size(0), "paged_decode_attention");
  std::vector<Item> items;
  std::vector<Group> groups;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < pb.Hkv; ++h) add_group(items, groups, b, h, 0, pb.g, len[b]);
  dispatch_float(kc, "kv cache", [&](auto ct) {
    using TC = decltype(ct);
    run_all<TC, TC>(pb, items, groups, res);
  });
  if (out && !res.is_same(*out)) out->copy_(res);
  return out ? *out : res;
}

at::Tensor tree_attention(const at::Tensor& q_in, const at::Tensor& k_cache_in, const at::Tensor& v_cache_in,
                          const at::Tensor& page_table_in, int64_t prefix_len, const at::Tensor& k_new_in,
                          const at::Tensor& v_new_in, const at::Tensor& mask_in, double scale, const OptTensor& out) {
  check_heads(q_in, k_cache_in, v_cache_in, "tree_attention");
  const at::Tensor q = rows_contig(q_in), kc = k_cache_in.contiguous(), vc = v_cache_in.contiguous();
  const at::Tensor pages = as_contiguous(page_table_in, at::kInt);  // [P]: one sequence
  const at::Tensor kn = rows_contig(k_new_in), vn = rows_contig(v_new_in);
  const at::Tensor mask = as_contiguous(mask_in, at::kLong);
  const int64_t T = q.size(0), S = kn.size(0);
  TORCH_CHECK(kn.dim() == 3 && kn.sizes() == vn.sizes() && kn.size(1) == kc.size(2) && kn.size(2) == q.size(2),
              "tree_attention: k_new/v_new must be [S, ", kc.size(2), ", ", q.size(2), "], got ", kn.sizes());
  TORCH_CHECK(kn.scalar_type() == vn.scalar_type(), "tree_attention: k_new and v_new differ in dtype");
  TORCH_CHECK(mask.dim() == 2 && mask.size(0) == T && mask.size(1) * 64 >= S,
              "tree_attention: mask_bits must be [", T, ", ", (S + 63) / 64, "], got ", mask.sizes());
  TORCH_CHECK(prefix_len >= 0, "tree_attention: negative prefix_len");
  at::Tensor res = out_buffer(out, q);
  if (T == 0) return out ? *out : res;
  Problem pb = make_problem(q, kc, vc, pages, scale);
  check_pages(pb.pages, prefix_len, pb.bs, pb.pages_ld, kc.size(0), "tree_attention");
  pb.prefix = &prefix_len;
  pb.kn = kn.data_ptr();
  pb.vn = vn.data_ptr();
  pb.kn_s0 = kn.stride(0);
  pb.kn_s1 = kn.stride(1);
  pb.vn_s0 = vn.stride(0);
  pb.vn_s1 = vn.stride(1);
  std::vector<int64_t> vis_off;
  std::vector<int32_t> vis_idx;
  visible_rows(ptr<int64_t>(mask), T, mask.size(1), S, vis_off, vis_idx);
  pb.vis_off = vis_off.data();
  pb.vis_idx = vis_idx.data();
  // Row blocks of whole tokens (a token's rows attend its own keys together), evenly sized.
  const int64_t n_blocks = (T * pb.g + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t tokens = (T + n_blocks - 1) / n_blocks;
  std::vector<Item> items;
  std::vector<Group> groups;
  for (int64_t t0 = 0; t0 < T; t0 += tokens) {
    const int64_t t1 = std::min(T, t0 + tokens);
    int64_t most = 0;
    for (int64_t t = t0; t < t1; ++t) most = std::max(most, visible_keys(pb, t, prefix_len));
    for (int64_t h = 0; h < pb.Hkv; ++h) add_group(items, groups, 0, h, t0 * pb.g, (t1 - t0) * pb.g, most);
  }
  dispatch_kv(kc, kn, [&](auto ct, auto st) { run_all<decltype(ct), decltype(st)>(pb, items, groups, res); });
  if (out && !res.is_same(*out)) out->copy_(res);
  return out ? *out : res;
}

}  // namespace firp
