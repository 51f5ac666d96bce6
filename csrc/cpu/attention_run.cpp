// Running the work items of an attention call: each item's rows attend the keys of its split
// block by block (attention_block.cpp), and the items of a row block are merged.
//
// Work items are (sequence, kv head, block of query rows, split). Query rows of an item are
// the g = H / Hkv heads sharing a kv head times whole tokens, so a key row loaded serves all
// of them (GQA). Keys that every row of an item sees at the same visible index, the prefix
// blocks below the last partial one, are attended by all rows together; the rest (tree
// attention: the prefix's last partial block and the scratch rows) per token, from the
// token's own list of visible keys.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <numeric>
#include <type_traits>
#include <utility>

#include "attention.h"

namespace firp::attn {
namespace {

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

}  // namespace

template <typename TC, typename TS>
void run_all(const Problem& pb, const std::vector<Item>& items, const std::vector<Group>& groups, at::Tensor& out) {
  const int64_t D = pb.D, n = int64_t(items.size());
  int64_t R = 0;  // rows of the largest item
  for (const Item& it : items) R = std::max(R, it.nr);
  const int64_t RP = (R + W - 1) / W * W;
  auto part_o = scratch(n * R * D), part_ml = scratch(n * R * 2);
  // The threads take items as they finish, most work first, so that uneven items (the short
  // last split, the scratch rows of a tree) even out. Which thread runs an item changes nothing.
  std::vector<int64_t> order(n);
  std::iota(order.begin(), order.end(), int64_t{0});
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return items[a].work > items[b].work; });
  // A group is merged by the thread that finishes its last item (the others' partials are
  // then visible: acquire-release): one parallel region per call, no second fork and join.
  std::unique_ptr<std::atomic<int64_t>[]> left(new std::atomic<int64_t>[groups.size()]);
  for (size_t g = 0; g < groups.size(); ++g) left[g].store(groups[g].count, std::memory_order_relaxed);
  auto merge = [&](int64_t g) {
    if (out.scalar_type() == at::kBFloat16)
      merge_group<bf16_t>(pb, items.data(), groups[g], part_o.get(), part_ml.get(), R, out.data_ptr(),
                          out.stride(0), out.stride(1));
    else
      merge_group<float>(pb, items.data(), groups[g], part_o.get(), part_ml.get(), R, out.data_ptr(),
                         out.stride(0), out.stride(1));
  };
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(n, at::get_num_threads()), 1, [&](int64_t, int64_t) {
    auto buf = scratch(4 * RP * D + 3 * RP + RP * KB + 2 * KB * D);
    float* p = buf.get();
    auto take = [&p](int64_t count) { return std::exchange(p, p + count); };
    float *q = take(RP * D), *o = take(RP * D), *m = take(RP), *l = take(RP);
    const Work w{take(RP * KB), take(RP), take(RP * D), take(RP * D), take(KB * D), take(KB * D)};
    for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      const Item& it = items[order[k]];
      const Rows rows{q, o, m, l, int(it.nr)};
      run_item<TC, TS>(pb, it, rows, w, {part_o.get() + order[k] * R * D, part_ml.get() + order[k] * R * 2});
      if (left[it.group].fetch_sub(1, std::memory_order_acq_rel) == 1) merge(it.group);
    }
  });
}

template void run_all<float, float>(const Problem&, const std::vector<Item>&, const std::vector<Group>&, at::Tensor&);
template void run_all<bf16_t, bf16_t>(const Problem&, const std::vector<Item>&, const std::vector<Group>&,
                                      at::Tensor&);
template void run_all<float, bf16_t>(const Problem&, const std::vector<Item>&, const std::vector<Group>&,
                                     at::Tensor&);
template void run_all<bf16_t, float>(const Problem&, const std::vector<Item>&, const std::vector<Group>&,
                                     at::Tensor&);

}  // namespace firp::attn
