// The layer loop in C++: one call runs a range of decoder layers for a whole batch.
//
// Why: the default model's layers are small (d = 576), so a bf16 decode step spends about a
// quarter of its time in Python between the kernels (op dispatch, views, splits, ~15 calls
// per layer). Here the same kernels run in the same order on the same tensors, so the result
// is bit-identical to `Transformer.run_layer` with the cpu backend (tests/test_layers.py),
// the GIL is released for the whole range, and the Python path stays as the reference and
// for training (autograd).
//
// The attention metadata of a batch (slots, page tables, context lengths, per-sequence spans
// and masks) is converted once per call and reused by every layer.
#include <ATen/ATen.h>

#include "cpu_ops.h"

namespace firp {

LayerStack::LayerStack(std::vector<std::vector<at::Tensor>> layers, at::Tensor cos, at::Tensor sin,
                       int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, double eps, double scale)
    : cos_(std::move(cos)),
      sin_(std::move(sin)),
      n_heads_(n_heads),
      n_kv_heads_(n_kv_heads),
      head_dim_(head_dim),
      eps_(eps),
      scale_(scale) {
  for (auto& t : layers) {
    TORCH_CHECK(t.size() == 10, "LayerStack: a layer is 10 tensors (attn_norm, ffn_norm, and weight, packed for "
                "qkv, o, gate_up, down), got ", t.size());
    layers_.push_back({t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7], t[8], t[9]});
  }
}

// One layer: the body of Transformer.run_layer, op for op. `attend` writes K/V and attends.
template <typename Attend>
at::Tensor LayerStack::layer(int64_t i, at::Tensor h, const at::Tensor& positions, Attend&& attend) const {
  const Layer& lw = layers_[i];
  const int64_t T = h.size(0), qs = n_heads_ * head_dim_, kvs = n_kv_heads_ * head_dim_;
  const at::Tensor x = rms_norm(h, lw.attn_norm, eps_, std::nullopt);
  const at::Tensor qkv = linear(x, lw.qkv_w, lw.qkv_p);
  auto [q, k] = rope(qkv.narrow(1, 0, qs).view({T, n_heads_, head_dim_}),
                     qkv.narrow(1, qs, kvs).view({T, n_kv_heads_, head_dim_}), positions, cos_, sin_);
  const at::Tensor v = qkv.narrow(1, qs + kvs, kvs).view({T, n_kv_heads_, head_dim_});
  const at::Tensor o = attend(i, q, k, v);
  const at::Tensor a = linear(o.view({T, qs}), lw.o_w, lw.o_p);
  auto [x2, h2] = add_rms_norm(a, h, lw.ffn_norm, eps_);
  const at::Tensor m = linear(silu_mul(linear(x2, lw.gu_w, lw.gu_p), std::nullopt), lw.down_w, lw.down_p);
  return h2.add_(m);
}

at::Tensor LayerStack::decode(at::Tensor h, const at::Tensor& positions, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slots, const at::Tensor& page_tables,
                              const at::Tensor& context_lens, int64_t start, int64_t end) const {
  check_range(start, end, k_cache);
  for (int64_t i = start; i < end; ++i) {
    h = layer(i, h, positions, [&](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);
      write_kv(kc, vc, k, v, slots);
      return paged_decode_attention(q, kc, vc, page_tables, context_lens, scale_, std::nullopt);
    });
  }
  return h;
}

at::Tensor LayerStack::spans(at::Tensor h, const at::Tensor& positions, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const OptTensor& slots, const OptTensor& k_scratch,
                             const OptTensor& v_scratch, const std::vector<int64_t>& starts,
                             const std::vector<int64_t>& ends, const std::vector<at::Tensor>& page_tables,
                             const std::vector<int64_t>& prefix_lens, const std::vector<at::Tensor>& mask_bits,
                             const std::vector<int64_t>& scratch_starts, int64_t start, int64_t end) const {
  check_range(start, end, k_cache);
  const size_t n = starts.size();
  TORCH_CHECK(ends.size() == n && page_tables.size() == n && prefix_lens.size() == n && mask_bits.size() == n &&
                  scratch_starts.size() == n,
              "LayerStack.spans: the per-sequence lists differ in length");
  TORCH_CHECK(k_scratch.has_value() == v_scratch.has_value(), "LayerStack.spans: give both scratch tensors or none");
  for (int64_t i = start; i < end; ++i) {
    h = layer(i, h, positions, [&](int64_t l, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
      at::Tensor kc = k_cache.select(0, l), vc = v_cache.select(0, l);
      if (k_scratch) {  // tree rows: K/V kept aside until verification says which to commit
        const at::Tensor ks = k_scratch->select(0, l), vs = v_scratch->select(0, l);
        for (size_t s = 0; s < n; ++s) {
          const int64_t rows = ends[s] - starts[s];
          ks.narrow(0, scratch_starts[s], rows).copy_(k.narrow(0, starts[s], rows));
          vs.narrow(0, scratch_starts[s], rows).copy_(v.narrow(0, starts[s], rows));
        }
      }
      if (slots) write_kv(kc, vc, k, v, *slots);
      at::Tensor out = at::empty_like(q);
      for (size_t s = 0; s < n; ++s) {
        const int64_t rows = ends[s] - starts[s];
        tree_attention(q.narrow(0, starts[s], rows), kc, vc, page_tables[s], prefix_lens[s],
                       k.narrow(0, starts[s], rows), v.narrow(0, starts[s], rows), mask_bits[s], scale_,
                       out.narrow(0, starts[s], rows));
      }
      return out;
    });
  }
  return h;
}

void LayerStack::check_range(int64_t start, int64_t end, const at::Tensor& k_cache) const {
  const auto L = static_cast<int64_t>(layers_.size());
  TORCH_CHECK(0 <= start && start <= end && end <= L, "LayerStack: layers [", start, ", ", end,
              ") outside [0, ", L, ")");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == L, "LayerStack: expected a KV pool [", L,
              ", blocks, block_size, Hkv, D], got ", k_cache.sizes());
}

}  // namespace firp
