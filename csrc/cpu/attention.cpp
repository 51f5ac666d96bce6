// Paged decode attention and tree attention on the CPU, as one flash-attention style kernel.
//
// Work is cut into items: (sequence, kv head, block of query rows, range of keys). The query
// rows of an item are the g = H / Hkv heads that share one kv head, times the item's tokens,
// so every key/value row loaded is used by all of them (GQA). An item walks its keys in
// blocks of KB with an online softmax (exp2 domain, the scale folded into q) and leaves a
// partial (max, sum, unnormalised output); a last pass merges the partials of the key
// ranges by log-sum-exp. Tree attention's keys are the paged prefix (no mask) followed by
// the step's scratch rows under the bit mask; the scratch goes with the last key range.
//
// Two inner paths:
//  - few rows (decode, <= 4 rows): each score is a dot product straight from the cache;
//  - many rows (tree, prefill): the query rows lie along the vector lanes (q transposed once
//    per item), so scores, softmax and the output update are plain vertical FMAs over a
//    block of keys, with no transposes or horizontal sums per block.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_ops.h"

namespace firp {
namespace {

using namespace simd;
constexpr int KB = 32;               // keys per block (never straddles a 64-bit mask word)
constexpr int FEW = 4;               // at most this many rows: the dot-product path
constexpr int ROWS_PER_ITEM = 64;    // query rows per work item
// Register tiles of the many-rows path: NK keys (scores) or ND head dims (output) times NRV
// vectors of rows, 12 accumulators with AVX2 (of 16 registers), 24 with AVX-512 (of 32):
// more independent FMA chains than the FMA latency x throughput needs.
constexpr int NK = W == 16 ? 8 : 4;
constexpr int ND = W == 16 ? 8 : 4;
constexpr int NRV = 3;
constexpr int64_t MAX_D = 256;
constexpr int64_t KEYS_PER_SPLIT = 256;  // do not split key ranges finer than this
constexpr int64_t PREFETCH_BLOCKS = 2;   // how far ahead the paged keys/values are fetched
constexpr float LOG2E = 1.4426950408889634f;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();
// Running max of a row that has seen no key yet: finite, so that no inf - inf appears;
// masked scores are -inf and become exactly 0.
constexpr float M_EMPTY = -1e30f;

// The online-softmax state of one item's query rows, in per-thread buffers.
struct State {
  int R = 0;       // rows
  int RP = 0;      // rows rounded up to whole vectors (many rows)
  int64_t D = 0;
  float* q;        // few: [R, D]; many: transposed [D, RP]; scaled by scale * log2(e)
  float* o;        // unnormalised output, laid out like q
  float* m;        // [RP] running max
  float* l;        // [RP] running sum
  float* s;        // few: [R, KB]; many: [KB, RP] scores, then probabilities
  float* alpha;    // [RP] rescale factor of the current block
  float* kb;       // [KB, D] key block as floats (bf16 caches)
  float* vb;       // [KB, D] value block as floats
  float* zeros;    // [D] stands in for absent keys
};

// ---------------------------------------------------------------- few rows

// s[r][i] = q[r] . k[i] for R rows, dot-product form; keys in pairs so that each q load
// serves two keys and 2R accumulator chains run side by side.
template <int R, typename T>
inline void few_scores(const float* q,       // [R, D]
                       const T* const* kp,   // [n] key rows [D]
                       int n, int64_t D,
                       float* s) {           // [R, KB]
  int i = 0;
  for (; i + 2 <= n; i += 2) {
    vf a0[R], a1[R];
    for (int r = 0; r < R; ++r) a0[r] = a1[r] = zero();
    for (int64_t c = 0; c < D; c += W) {
      const vf k0 = load(kp[i] + c), k1 = load(kp[i + 1] + c);
      for (int r = 0; r < R; ++r) {
        const vf qv = load(q + r * D + c);
        a0[r] = fma(qv, k0, a0[r]);
        a1[r] = fma(qv, k1, a1[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      s[r * KB + i] = hsum(a0[r]);
      s[r * KB + i + 1] = hsum(a1[r]);
    }
  }
  for (; i < n; ++i) {
    vf acc[R];
    for (int r = 0; r < R; ++r) acc[r] = zero();
    for (int64_t c = 0; c < D; c += W) {
      const vf kv = load(kp[i] + c);
      for (int r = 0; r < R; ++r) acc[r] = fma(load(q + r * D + c), kv, acc[r]);
    }
    for (int r = 0; r < R; ++r) s[r * KB + i] = hsum(acc[r]);
  }
}

// Masks keys >= n and those whose bit is clear, turns scores into probabilities against
// the running max (updating m and l) and sets alpha, the factor for the old output.
inline void few_softmax(float* s,               // [R, KB]
                        int R, int n,
                        const uint64_t* bits,   // [R] visibility of the block's keys, or null
                        float* m, float* l, float* alpha) {  // [R] each
  for (int r = 0; r < R; ++r) {
    float* sr = s + r * KB;
    for (int i = n; i < KB; ++i) sr[i] = NEG_INF;
    if (bits)
      for (int i = 0; i < n; ++i)
        if (!((bits[r] >> i) & 1)) sr[i] = NEG_INF;
    vf mx = load(sr);
    for (int j = W; j < KB; j += W) mx = max(mx, load(sr + j));
    const float m_new = std::max(m[r], hmax(mx));
    alpha[r] = std::exp2(m[r] - m_new);
    vf sum = zero();
    for (int j = 0; j < KB; j += W) {
      const vf p = exp2(sub(load(sr + j), set1(m_new)));
      store(sr + j, p);
      sum = add(sum, p);
    }
    l[r] = l[r] * alpha[r] + hsum(sum);
    m[r] = m_new;
  }
}

// o[r][c : c + NV*W] = alpha[r] * o[r][...] + sum_i p[r][i] * v[i][...] for R rows.
template <int R, int NV, typename T>
inline void few_pv(float* o,              // [R, D]
                   const float* p,        // [R, KB]
                   const float* alpha,    // [R]
                   const T* const* vp,    // [n] value rows [D]
                   int n, int64_t c, int64_t D) {
  vf acc[R][NV];
  for (int r = 0; r < R; ++r) {
    const vf a = set1(alpha[r]);
    for (int j = 0; j < NV; ++j) acc[r][j] = mul(load(o + r * D + c + j * W), a);
  }
  for (int i = 0; i < n; ++i) {
    vf vv[NV];
    for (int j = 0; j < NV; ++j) vv[j] = load(vp[i] + c + j * W);
    for (int r = 0; r < R; ++r) {
      const vf pb = set1(p[r * KB + i]);
      for (int j = 0; j < NV; ++j) acc[r][j] = fma(pb, vv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < NV; ++j) store(o + r * D + c + j * W, acc[r][j]);
}

template <int R, typename T>
inline void few_block(State& st, const T* const* kp, const T* const* vp, int n, const uint64_t* bits) {
  const int64_t D = st.D;
  few_scores<R>(st.q, kp, n, D, st.s);
  few_softmax(st.s, R, n, bits, st.m, st.l, st.alpha);
  int64_t c = 0;
  for (; c + 2 * W <= D; c += 2 * W) few_pv<R, 2>(st.o, st.s, st.alpha, vp, n, c, D);
  for (; c < D; c += W) few_pv<R, 1>(st.o, st.s, st.alpha, vp, n, c, D);
}

// ---------------------------------------------------------------- many rows (rows in lanes)

// s[i][rows] = k[i] . q[:, rows] for NK keys and NRV row vectors.
template <int NRV>
inline void lane_scores(const float* qt,          // [D, ldq] at the first row vector
                        int64_t ldq,
                        const float* const* kr,   // [NK] key rows [D] as floats
                        int64_t D,
                        float* s, int64_t lds) {  // [NK, lds] at the first row vector
  vf acc[NK][NRV];
  for (int i = 0; i < NK; ++i)
    for (int j = 0; j < NRV; ++j) acc[i][j] = zero();
  for (int64_t d = 0; d < D; ++d) {
    vf qv[NRV];
    for (int j = 0; j < NRV; ++j) qv[j] = load(qt + d * ldq + j * W);
    for (int i = 0; i < NK; ++i) {
      const vf kv = set1(kr[i][d]);
      for (int j = 0; j < NRV; ++j) acc[i][j] = fma(kv, qv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < NK; ++i)
    for (int j = 0; j < NRV; ++j) store(s + i * lds + j * W, acc[i][j]);
}

// Per row (lane): block max, rescale factor alpha, probabilities in place, running sum.
inline void lane_softmax(float* s, int RP, float* m, float* l, float* alpha) {  // s [KB, RP]
  for (int j = 0; j < RP; j += W) {
    vf mx = load(s + j);
    for (int i = 1; i < KB; ++i) mx = max(mx, load(s + i * RP + j));
    const vf m_old = load(m + j);
    const vf m_new = max(m_old, mx);
    const vf a = exp2(sub(m_old, m_new));
    vf sum = zero();
    for (int i = 0; i < KB; ++i) {
      const vf p = exp2(sub(load(s + i * RP + j), m_new));
      store(s + i * RP + j, p);
      sum = add(sum, p);
    }
    store(l + j, fma(load(l + j), a, sum));
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
  for (int j = 0; j < NRV; ++j) {
    const vf a = load(alpha + j * W);
    for (int dd = 0; dd < ND; ++dd) acc[dd][j] = mul(load(ot + (d0 + dd) * ldo + j * W), a);
  }
  for (int i = 0; i < n; ++i) {
    vf pv[NRV];
    for (int j = 0; j < NRV; ++j) pv[j] = load(p + i * ldp + j * W);
    for (int dd = 0; dd < ND; ++dd) {
      const vf vv = set1(vr[i][d0 + dd]);
      for (int j = 0; j < NRV; ++j) acc[dd][j] = fma(vv, pv[j], acc[dd][j]);
    }
  }
  for (int dd = 0; dd < ND; ++dd)
    for (int j = 0; j < NRV; ++j) store(ot + (d0 + dd) * ldo + j * W, acc[dd][j]);
}

template <typename T>
void lane_block(State& st, const T* const* kp, const T* const* vp, int n, const uint64_t* bits) {
  const int64_t D = st.D;
  const int RP = st.RP;
  const float* kr[KB];
  const float* vr[KB];
  for (int i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      kr[i] = kp[i];
      vr[i] = vp[i];
    } else {  // convert the block once for all rows
      for (int64_t c = 0; c < D; c += W) {
        store(st.kb + i * D + c, load(kp[i] + c));
        store(st.vb + i * D + c, load(vp[i] + c));
      }
      kr[i] = st.kb + i * D;
      vr[i] = st.vb + i * D;
    }
  }
  for (int i = n; i < KB; ++i) kr[i] = st.zeros;
  for (int i0 = 0; i0 < KB; i0 += NK) {
    int j = 0;
    for (; j + NRV * W <= RP; j += NRV * W) lane_scores<NRV>(st.q + j, RP, kr + i0, D, st.s + i0 * RP + j, RP);
    if (j + 2 * W <= RP) lane_scores<2>(st.q + j, RP, kr + i0, D, st.s + i0 * RP + j, RP);
    else if (j < RP) lane_scores<1>(st.q + j, RP, kr + i0, D, st.s + i0 * RP + j, RP);
  }
  for (int i = n; i < KB; ++i) std::fill(st.s + i * RP, st.s + (i + 1) * RP, NEG_INF);
  if (bits)
    for (int i = 0; i < n; ++i)
      for (int r = 0; r < st.R; ++r)
        if (!((bits[r] >> i) & 1)) st.s[i * RP + r] = NEG_INF;
  lane_softmax(st.s, RP, st.m, st.l, st.alpha);
  for (int64_t d0 = 0; d0 < D; d0 += ND) {
    int j = 0;
    for (; j + NRV * W <= RP; j += NRV * W) lane_pv<NRV>(st.o + j, RP, st.s + j, RP, st.alpha + j, vr, n, d0);
    if (j + 2 * W <= RP) lane_pv<2>(st.o + j, RP, st.s + j, RP, st.alpha + j, vr, n, d0);
    else if (j < RP) lane_pv<1>(st.o + j, RP, st.s + j, RP, st.alpha + j, vr, n, d0);
  }
}

// All rows of an item against n <= KB keys (row pointers kp/vp); bits: per-row visibility.
template <typename T>
void attend_block(State& st, const T* const* kp, const T* const* vp, int n, const uint64_t* bits) {
  switch (st.R) {
    case 1: few_block<1>(st, kp, vp, n, bits); break;
    case 2: few_block<2>(st, kp, vp, n, bits); break;
    case 3: few_block<3>(st, kp, vp, n, bits); break;
    case 4: few_block<4>(st, kp, vp, n, bits); break;
    default: lane_block(st, kp, vp, n, bits); break;
  }
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
  const void* kn;                 // scratch rows [S, Hkv, D] (tree only)
  const void* vn;
  int64_t kn_s0, kn_s1, vn_s0, vn_s1, S;
  const int64_t* mask;            // [T, mask_ld]
  int64_t mask_ld;
};

struct Item {
  int64_t seq, h, r0, nr;  // rows [r0, r0 + nr) of the (seq, kv head) row space: row = t * g + j
  int64_t k0, k1;          // prefix keys [k0, k1)
  bool scratch;            // also the scratch rows (tree attention, last key range)
};

// Token and head of row r of an item: decode has one token per sequence, tree one sequence.
inline int64_t row_token(const Problem& pb, const Item& it, int64_t r) { return it.seq + (it.r0 + r) / pb.g; }
inline int64_t row_head(const Problem& pb, const Item& it, int64_t r) { return it.h * pb.g + (it.r0 + r) % pb.g; }

// Scaled query rows into the state: [R, D] for few rows, transposed [D, RP] for many.
template <typename TQ>
void load_queries(const Problem& pb, const Item& it, State& st) {
  const TQ* q = static_cast<const TQ*>(pb.q);
  for (int r = 0; r < st.R; ++r) {
    const TQ* src = q + row_token(pb, it, r) * pb.q_s0 + row_head(pb, it, r) * pb.q_s1;
    if (st.R <= FEW) {
      for (int64_t c = 0; c < pb.D; c += W) store(st.q + r * pb.D + c, mul(load(src + c), set1(pb.qscale)));
    } else {
      for (int64_t d = 0; d < pb.D; ++d) st.q[d * st.RP + r] = to_float(src[d]) * pb.qscale;
    }
  }
  if (st.R > FEW)  // padding lanes: zero queries, never written out
    for (int64_t d = 0; d < pb.D; ++d) std::fill(st.q + d * st.RP + st.R, st.q + (d + 1) * st.RP, 0.f);
}

// Where an item's result goes: unnormalised rows [R, D] and (max, sum) pairs [R, 2].
struct Partial {
  float* o;
  float* ml;
};

// The item's paged prefix keys [k0, k1), no mask.
template <typename TC>
void attend_prefix(const Problem& pb, const Item& it, State& st) {
  const TC* kc = static_cast<const TC*>(pb.kc);
  const TC* vc = static_cast<const TC*>(pb.vc);
  const int32_t* pages = pb.pages + it.seq * pb.pages_ld;
  const int64_t row_ld = pb.Hkv * pb.D, row_bytes = pb.D * int64_t(sizeof(TC));
  auto offset = [&](int64_t t) { return (int64_t(pages[t / pb.bs]) * pb.bs + t % pb.bs) * row_ld + it.h * pb.D; };
  const TC* kp[KB];
  const TC* vp[KB];
  for (int64_t b0 = it.k0; b0 < it.k1; b0 += KB) {
    const int n = int(std::min<int64_t>(KB, it.k1 - b0));
    for (int i = 0; i < n; ++i) {
      const int64_t off = offset(b0 + i);
      kp[i] = kc + off;
      vp[i] = vc + off;
    }
    // Rows come from scattered pages, beyond what the hardware prefetcher guesses:
    // fetch the keys and values PREFETCH_BLOCKS ahead while this block is computed.
    const int64_t ahead = b0 + PREFETCH_BLOCKS * KB;
    for (int64_t t = ahead; t < std::min(ahead + KB, it.k1); ++t) {
      const char* k = reinterpret_cast<const char*>(kc + offset(t));
      const char* v = reinterpret_cast<const char*>(vc + offset(t));
      for (int64_t c = 0; c < row_bytes; c += 64) {
        __builtin_prefetch(k + c);
        __builtin_prefetch(v + c);
      }
    }
    attend_block(st, kp, vp, n, nullptr);
  }
}

// The scratch rows under the bit mask; blocks start at multiples of KB, so a block's bits
// lie in one 64-bit word, and blocks no row of the item sees are skipped.
template <typename TS>
void attend_scratch(const Problem& pb, const Item& it, State& st) {
  const TS* kn = static_cast<const TS*>(pb.kn);
  const TS* vn = static_cast<const TS*>(pb.vn);
  const TS* kp[KB];
  const TS* vp[KB];
  uint64_t bits[ROWS_PER_ITEM];
  for (int64_t j0 = 0; j0 < pb.S; j0 += KB) {
    const int n = int(std::min<int64_t>(KB, pb.S - j0));
    const uint64_t keep = (1ull << n) - 1;  // n <= 32
    uint64_t any = 0;
    for (int r = 0; r < st.R; ++r) {
      const uint64_t word = uint64_t(pb.mask[row_token(pb, it, r) * pb.mask_ld + j0 / 64]);
      bits[r] = (word >> (j0 % 64)) & keep;
      any |= bits[r];
    }
    if (!any) continue;
    for (int i = 0; i < n; ++i) {
      kp[i] = kn + (j0 + i) * pb.kn_s0 + it.h * pb.kn_s1;
      vp[i] = vn + (j0 + i) * pb.vn_s0 + it.h * pb.vn_s1;
    }
    attend_block(st, kp, vp, n, bits);
  }
}

template <typename TC, typename TS>
void run_item(const Problem& pb, const Item& it, State& st, Partial part) {
  const int64_t D = pb.D;
  st.R = int(it.nr);
  st.RP = int((it.nr + W - 1) / W * W);
  st.D = D;
  if (pb.q_bf16) load_queries<bf16_t>(pb, it, st);
  else load_queries<float>(pb, it, st);
  std::fill(st.o, st.o + st.RP * D, 0.f);
  std::fill(st.m, st.m + st.RP, M_EMPTY);
  std::fill(st.l, st.l + st.RP, 0.f);
  attend_prefix<TC>(pb, it, st);
  if (it.scratch) attend_scratch<TS>(pb, it, st);
  for (int r = 0; r < st.R; ++r) {
    if (st.R <= FEW) std::copy(st.o + r * D, st.o + (r + 1) * D, part.o + r * D);
    else  // many rows: o is transposed
      for (int64_t d = 0; d < D; ++d) part.o[r * D + d] = st.o[d * st.RP + r];
    part.ml[2 * r] = st.m[r];
    part.ml[2 * r + 1] = st.l[r];
  }
}

// Items of one (sequence, kv head, row block): consecutive in the item list.
struct Group {
  int64_t first, count;
};

// Merges a group's partials by log-sum-exp and writes the output rows.
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
    for (int64_t s = 0; s < gr.count; ++s) m = std::max(m, part_ml[((gr.first + s) * rows_ld + r) * 2]);
    float l = 0.f;
    std::fill(acc, acc + D, 0.f);
    for (int64_t s = 0; s < gr.count; ++s) {
      const int64_t slot = (gr.first + s) * rows_ld + r;
      const float w = std::exp2(part_ml[slot * 2] - m);  // a range that showed the row nothing has l = 0
      l += w * part_ml[slot * 2 + 1];
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
  int64_t R = 0;  // rows of the largest item, rounded to whole vectors
  for (const Item& it : items) R = std::max(R, (it.nr + W - 1) / W * W);
  auto part_o = scratch(n * R * D), part_ml = scratch(n * R * 2);
  at::parallel_for(0, n, 1, [&](int64_t i0, int64_t i1) {
    auto buf = scratch(2 * D * R + 3 * R + KB * R + 2 * KB * D + D);
    State st;
    st.q = buf.get();
    st.o = st.q + D * R;
    st.m = st.o + D * R;
    st.l = st.m + R;
    st.alpha = st.l + R;
    st.s = st.alpha + R;
    st.kb = st.s + KB * R;
    st.vb = st.kb + KB * D;
    st.zeros = st.vb + KB * D;
    std::fill(st.zeros, st.zeros + D, 0.f);
    for (int64_t i = i0; i < i1; ++i)
      run_item<TC, TS>(pb, items[i], st, {part_o.get() + i * R * D, part_ml.get() + i * R * 2});
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

// Appends the items of one (sequence, kv head): row blocks (evenly sized) x key ranges.
void add_items(std::vector<Item>& items, std::vector<Group>& groups, int64_t seq, int64_t h, int64_t rows,
               int64_t n_prefix, int64_t splits, bool scratch) {
  const int64_t n_blocks = (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  const int64_t per_block = ((rows + n_blocks - 1) / n_blocks + W - 1) / W * W;
  const int64_t key_blocks = (n_prefix + KB - 1) / KB;  // split on whole blocks
  for (int64_t r0 = 0; r0 < rows; r0 += per_block) {
    groups.push_back({int64_t(items.size()), splits});
    const int64_t nr = std::min(per_block, rows - r0);
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t k0 = std::min(n_prefix, key_blocks * s / splits * KB);
      const int64_t k1 = std::min(n_prefix, key_blocks * (s + 1) / splits * KB);
      items.push_back({seq, h, r0, nr, k0, k1, scratch && s == splits - 1});
    }
  }
}

int64_t row_blocks(int64_t rows) { return (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM; }

// Key ranges per row block: the fewest that spread the items evenly over the threads (at
// most 5% idle), none shorter than KEYS_PER_SPLIT keys.
int64_t choose_splits(int64_t n_groups, int64_t n_prefix) {
  const int64_t threads = at::get_num_threads();
  const int64_t most = std::max<int64_t>(1, n_prefix / KEYS_PER_SPLIT);
  int64_t s = 1;
  for (; s < most; ++s) {
    const int64_t items = n_groups * s;
    if (20 * ((items + threads - 1) / threads) * threads <= 21 * items) break;
  }
  return s;
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
  for (int64_t b = 0; b < B; ++b)
    check_pages(pb.pages + b * pb.pages_ld, len[b], pb.bs, pb.pages_ld, kc.size(0), "paged_decode_attention");
  std::vector<Item> items;
  std::vector<Group> groups;
  const int64_t n_groups = B * pb.Hkv * row_blocks(pb.g);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < pb.Hkv; ++h)
      add_items(items, groups, b, h, pb.g, len[b], choose_splits(n_groups, len[b]), false);
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
  pb.kn = kn.data_ptr();
  pb.vn = vn.data_ptr();
  pb.kn_s0 = kn.stride(0);
  pb.kn_s1 = kn.stride(1);
  pb.vn_s0 = vn.stride(0);
  pb.vn_s1 = vn.stride(1);
  pb.S = S;
  pb.mask = ptr<int64_t>(mask);
  pb.mask_ld = mask.size(1);
  std::vector<Item> items;
  std::vector<Group> groups;
  const int64_t rows = T * pb.g;
  const int64_t splits = choose_splits(pb.Hkv * row_blocks(rows), prefix_len);
  for (int64_t h = 0; h < pb.Hkv; ++h) add_items(items, groups, 0, h, rows, prefix_len, splits, true);
  dispatch_kv(kc, kn, [&](auto ct, auto st) { run_all<decltype(ct), decltype(st)>(pb, items, groups, res); });
  if (out && !res.is_same(*out)) out->copy_(res);
  return out ? *out : res;
}

}  // namespace firp
