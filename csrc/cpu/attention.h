// Internals shared by the CPU attention files (not part of the extension's interface).
//
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
//
// The files:
//  - attention_block.cpp: one block of keys for a set of rows (scores, online softmax, the
//    output update), with one order of operations per row whatever the layout;
//  - attention_run.cpp: running the work items (which keys each item's rows attend, block
//    by block) and merging their partials;
//  - attention.cpp: the ops: argument checks and the plan of work items.
#pragma once

#include <ATen/core/Tensor.h>

#include <limits>
#include <vector>

#include "cpu_ops.h"

namespace firp::attn {

using namespace simd;
constexpr int KB = 32;                   // keys per block
constexpr int64_t SPLIT = 256;           // keys per split (a multiple of KB)
constexpr int RT = 4;                    // query rows per register tile
// Register tiles of lane_pv: ND head dims times NRV vectors of rows, 12 accumulators with
// AVX2 (of 16 registers), 24 with AVX-512 (of 32).
constexpr int ND = W == 16 ? 8 : 4;
constexpr int NRV = 3;
// Query rows per work item (whole tokens): at most ROWS_PER_ITEM; when tree rows are cut
// finer to give every thread work, at least MIN_ROWS_PER_ITEM (smaller blocks would convert
// and load the same keys more often than the threads gain).
constexpr int ROWS_PER_ITEM = 64;
constexpr int MIN_ROWS_PER_ITEM = 16;
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

// dst[0:D] = src[0:D] as floats.
template <typename T>
inline void to_floats(float* dst, const T* src, int64_t D) {
  for (int64_t c = 0; c < D; c += W) store(dst + c, load(src + c));
}

// ---------------------------------------------------------------- work items

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
  int64_t work;            // rows x keys of the split's longest row: items run most work first
  int64_t group;           // index of its Group
};

// The items of one (sequence, kv head, row block), one per split: consecutive in the list.
struct Group {
  int64_t first, count;
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

// ---------------------------------------------------------------- across the files

// attention_block.cpp: all rows against one block of n <= KB keys (row pointers kp/vp) that
// every row sees; along the lanes when RP > 0 (then w.ot, and m and l of RP entries).
template <typename T>
void attend_block(const Rows& rows, int RP, const Work& w, int64_t D, const T* const* kp, const T* const* vp,
                  int n);

// attention_run.cpp: runs all items in parallel and merges each group's partials into out
// [.., H, D] (a contiguous last dim). TC, TS: element types of the cache and scratch rows.
template <typename TC, typename TS>
void run_all(const Problem& pb, const std::vector<Item>& items, const std::vector<Group>& groups, at::Tensor& out);

}  // namespace firp::attn
