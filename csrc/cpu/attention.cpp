// The attention ops: paged_decode_attention and tree_attention check their arguments, plan
// the work items (attention.h) and run them (attention_run.cpp).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "attention.h"

namespace firp {
namespace {

using namespace attn;

// Splits of a row block whose longest row sees most_keys keys.
int64_t n_splits(int64_t most_keys) { return std::max<int64_t>(1, (most_keys + SPLIT - 1) / SPLIT); }

// Appends the items of one (sequence, kv head, row block): one per split of its longest row.
void add_group(std::vector<Item>& items, std::vector<Group>& groups, int64_t seq, int64_t h, int64_t r0,
               int64_t nr, int64_t most_keys) {
  const int64_t splits = n_splits(most_keys);
  const int64_t group = int64_t(groups.size());
  groups.push_back({int64_t(items.size()), splits});
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t v0 = s * SPLIT, v1 = v0 + SPLIT;
    items.push_back({seq, h, r0, nr, v0, v1, nr * (std::min(v1, most_keys) - v0), group});
  }
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
  // Row blocks of whole tokens (a token's rows attend its own keys together), evenly sized,
  // of at most ROWS_PER_ITEM rows. With several threads and few items (a short prefix:
  // one split per kv head), blocks down to MIN_ROWS_PER_ITEM rows, for two items a thread.
  // Rows are independent: how they are grouped changes no row's bits.
  int64_t most = 0;
  for (int64_t t = 0; t < T; ++t) most = std::max(most, visible_keys(pb, t, prefix_len));
  const int64_t rows = T * pb.g, threads = at::get_num_threads(), per_block = pb.Hkv * n_splits(most);
  int64_t n_blocks = (rows + ROWS_PER_ITEM - 1) / ROWS_PER_ITEM;
  if (threads > 1)
    n_blocks = std::max(n_blocks, std::min((2 * threads + per_block - 1) / per_block, rows / MIN_ROWS_PER_ITEM));
  int64_t tokens = (T + n_blocks - 1) / n_blocks;
  if (tokens * pb.g > RT) {  // rows along the lanes: whole vectors of rows where possible
    const int64_t step = W / std::gcd<int64_t>(pb.g, W);
    tokens = (tokens + step - 1) / step * step;
  }
  std::vector<Item> items;
  std::vector<Group> groups;
  for (int64_t t0 = 0; t0 < T; t0 += tokens) {
    const int64_t t1 = std::min(T, t0 + tokens);
    int64_t block_most = 0;
    for (int64_t t = t0; t < t1; ++t) block_most = std::max(block_most, visible_keys(pb, t, prefix_len));
    for (int64_t h = 0; h < pb.Hkv; ++h) add_group(items, groups, 0, h, t0 * pb.g, (t1 - t0) * pb.g, block_most);
  }
  dispatch_kv(kc, kn, [&](auto ct, auto st) { run_all<decltype(ct), decltype(st)>(pb, items, groups, res); });
  if (out && !res.is_same(*out)) out->copy_(res);
  return out ? *out : res;
}

}  // namespace firp
