// The CPU ops bound into firp_engine._C. Signatures and semantics mirror the PyTorch
// references in firp_engine/ops.py; fp32 and bf16 tensors are supported.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <vector>

#include "simd.h"

namespace firp {

using OptTensor = std::optional<at::Tensor>;

// ---- elementwise.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, const OptTensor& out);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& positions,
                                        const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gate_up, const OptTensor& out);
void write_kv(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& slots);
void kv_commit(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& k_scratch,
               const at::Tensor& v_scratch, const at::Tensor& src_rows, const at::Tensor& dst_slots);

// ---- top_lse.cpp: per row of fp32 x [R, V], the k largest (values, int64 indices) and logsumexp
std::tuple<at::Tensor, at::Tensor, at::Tensor> top_lse(const at::Tensor& x, int64_t k);

// ---- linear.cpp
at::Tensor pack_linear(const at::Tensor& weight);
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed);
at::Tensor firp_project(const at::Tensor& h, const at::Tensor& weight, const OptTensor& bias,
                        const OptTensor& out);

// ---- linear_amx.cpp (amx builds): y = x W^T on AMX tiles for bf16 x with K % 32 == 0, into
// `out` [M, N]; false (nothing done) for other inputs, which the vector kernel then runs.
bool linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t N, at::Tensor& out);

// ---- quant.cpp (GGUF Q4_0 / Q4_1 / Q8_0 weights; `linear` dispatches to quant_linear on such a pack)
at::Tensor pack_quant(const at::Tensor& blocks, const std::string& kind, const std::string& act);
bool is_quant_pack(const at::Tensor& packed);
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed);

// ---- attention.cpp
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& page_tables, const at::Tensor& context_lens, double scale,
                                  const OptTensor& out);
at::Tensor tree_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& page_table, int64_t prefix_len, const at::Tensor& k_new,
                          const at::Tensor& v_new, const at::Tensor& mask_bits, double scale,
                          const OptTensor& out);

// ---- cpuid.cpp: the SIMD paths this CPU and OS run, best first ("amx", "avx512bf16",
// "avx512", "avx2", then always "scalar"); asks Linux for AMX tile state when the CPU has it.
std::vector<std::string> cpu_paths();

// ---- layers.cpp: the layer loop (Transformer.run_layer over a range of layers, in one call)
class __attribute__((visibility("hidden"))) LayerStack {  // hidden: as pybind11's types
 public:
  // layers[i] = {attn_norm, ffn_norm, qkv weight, qkv packed, o weight, o packed, gate_up weight,
  // gate_up packed, down weight, down packed}: what `linear` takes (a weight may be a meta tensor).
  LayerStack(std::vector<std::vector<at::Tensor>> layers, at::Tensor cos, at::Tensor sin, int64_t n_heads,
             int64_t n_kv_heads, int64_t head_dim, double eps, double scale);
  // One row per sequence: K/V written to `slots`, then paged decode attention.
  at::Tensor decode(at::Tensor h, const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                    const at::Tensor& slots, const at::Tensor& page_tables, const at::Tensor& context_lens,
                    int64_t start, int64_t end) const;
  // Rows in per-sequence spans (prefill chunks, draft trees): K/V written to `slots` and/or
  // copied to the scratch regions, then tree attention per span under its mask.
  at::Tensor spans(at::Tensor h, const at::Tensor& positions, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const OptTensor& slots, const OptTensor& k_scratch, const OptTensor& v_scratch,
                   const std::vector<int64_t>& starts, const std::vector<int64_t>& ends,
                   const std::vector<at::Tensor>& page_tables, const std::vector<int64_t>& prefix_lens,
                   const std::vector<at::Tensor>& mask_bits, const std::vector<int64_t>& scratch_starts,
                   int64_t start, int64_t end) const;
  int64_t n_layers() const { return static_cast<int64_t>(layers_.size()); }

 private:
  struct Layer {
    at::Tensor attn_norm, ffn_norm, qkv_w, qkv_p, o_w, o_p, gu_w, gu_p, down_w, down_p;
  };
  template <typename Attend>
  at::Tensor layer(int64_t i, at::Tensor h, const at::Tensor& positions, Attend&& attend) const;
  void check_range(int64_t start, int64_t end, const at::Tensor& k_cache) const;

  std::vector<Layer> layers_;
  at::Tensor cos_, sin_;
  int64_t n_heads_, n_kv_heads_, head_dim_;
  double eps_, scale_;
};

// ---- shared helpers (defined inline: tiny)

// Calls f(float{}) or f(bf16_t{}) for the tensor's dtype; other dtypes are an error.
template <typename F>
inline void dispatch_float(const at::Tensor& t, const char* name, F&& f) {
  if (t.scalar_type() == at::kFloat) {
    f(float{});
  } else if (t.scalar_type() == at::kBFloat16) {
    f(bf16_t{});
  } else {
    TORCH_CHECK(false, name, ": expected float32 or bfloat16, got ", t.scalar_type());
  }
}

template <typename T>
inline T* ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}

// The tensor itself when its last dimension is contiguous (rows may be strided), else a copy.
inline at::Tensor rows_contig(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, ": expected a CPU tensor, got ", t.device());
}

}  // namespace firp
