// C-ABI launchers of the CUDA kernels in csrc/cuda.
//
// The kernels are plain CUDA C++ (no torch headers: the .cu files compile with nvcc and the
// CUDA headers alone); bindings_cuda.cpp turns at::Tensor arguments into the raw pointers,
// sizes and strides below and passes torch's current stream.
//
// Conventions:
//   - every stride is in elements, the innermost dimension is always contiguous;
//   - `dtype` is the element type of the activations / caches (bf16 or fp32);
//   - pointers given to vector loads must be 16-byte aligned and strides multiples of
//     16 / sizeof(element) (the wrappers check this and copy when it does not hold);
//   - each launcher enqueues on `stream` and returns cudaGetLastError() (or
//     cudaErrorInvalidValue for a configuration the kernels are not built for).
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { FIRP_F32 = 0, FIRP_BF16 = 1 } FirpDtype;

// One layer of the paged KV cache: k and v [NB, BS, Hkv, D] with identical strides.
typedef struct {
  const void* k;         // [NB, BS, Hkv, D]
  const void* v;         // [NB, BS, Hkv, D]
  int64_t block_stride;  // elements between blocks
  int64_t token_stride;  // elements between slots of one block
  int64_t head_stride;   // elements between kv heads of one slot
  int block_size;        // BS
} FirpPagedKV;

// Head dims the attention kernels are built for.
int firp_attention_head_dim_supported(int head_dim);
// Largest query-heads-per-kv-head group the attention kernels are built for.
int firp_attention_max_group(void);

// ------------------------------------------------------------------ norms / elementwise

cudaError_t launch_rms_norm(FirpDtype dtype,
                            const void* x,       // [rows, dim], rows x_stride apart
                            int64_t x_stride,    // scalar: elements between rows of x
                            const void* weight,  // [dim]
                            void* out,           // [rows, dim], rows out_stride apart
                            int64_t out_stride,  // scalar: elements between rows of out
                            int rows, int dim, float eps, cudaStream_t stream);

// residual += x (rounded to dtype, in place), out = rms_norm(residual).
cudaError_t launch_add_rms_norm(FirpDtype dtype,
                                const void* x,         // [rows, dim], rows x_stride apart
                                int64_t x_stride,      // scalar: elements between rows of x
                                void* residual,        // [rows, dim], rows res_stride apart
                                int64_t res_stride,    // scalar: elements between rows of residual
                                const void* weight,    // [dim]
                                void* out,             // [rows, dim], rows out_stride apart
                                int64_t out_stride,    // scalar: elements between rows of out
                                int rows, int dim, float eps, cudaStream_t stream);

// Rotate-half RoPE into fresh contiguous outputs.
cudaError_t launch_rope(FirpDtype dtype,
                        const void* q,              // [T, H, D] with the strides below
                        int64_t q_token_stride, int64_t q_head_stride,
                        const void* k,              // [T, Hkv, D]
                        int64_t k_token_stride, int64_t k_head_stride,
                        const int64_t* positions,   // [T]
                        const float* cos,           // [max_pos, D / 2]
                        const float* sin,           // [max_pos, D / 2]
                        void* q_out,                // [T, H, D] contiguous
                        void* k_out,                // [T, Hkv, D] contiguous
                        int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream);

cudaError_t launch_silu_mul(FirpDtype dtype,
                            const void* gate_up,  // [T, 2F], rows in_stride apart
                            int64_t in_stride,    // scalar: elements between rows of gate_up
                            void* out,            // [T, F], rows out_stride apart
                            int64_t out_stride,   // scalar: elements between rows of out
                            int tokens, int ffn, cudaStream_t stream);

// ------------------------------------------------------------------ KV cache writes

// One layer: slot s of the cache gets token t's K/V (slots < 0 are skipped).
cudaError_t launch_write_kv(FirpDtype dtype,
                            void* k_cache,         // [NB * BS, Hkv, D] contiguous
                            void* v_cache,         // [NB * BS, Hkv, D] contiguous
                            const void* k,         // [T, Hkv, D] with the strides below
                            int64_t k_token_stride, int64_t k_head_stride,
                            const void* v,         // [T, Hkv, D]
                            int64_t v_token_stride, int64_t v_head_stride,
                            const int64_t* slots,  // [T]
                            int tokens, int kv_heads, int head_dim, cudaStream_t stream);

// All layers in one launch: scratch row src_rows[i] goes to cache slot dst_slots[i].
cudaError_t launch_kv_commit(FirpDtype dtype,
                             void* k_cache,                 // [L, NB * BS, Hkv * D], layers cache_layer_stride apart
                             void* v_cache,                 // [L, NB * BS, Hkv * D]
                             int64_t cache_layer_stride,    // scalar: elements between layers of the caches
                             const void* k_scratch,         // [L, S, Hkv * D], rows scratch_row_stride apart
                             const void* v_scratch,         // [L, S, Hkv * D]
                             int64_t scratch_layer_stride,  // scalar: elements between layers of the scratch
                             int64_t scratch_row_stride,    // scalar: elements between scratch rows (>= Hkv * D)
                             const int64_t* src_rows,       // [m]
                             const int64_t* dst_slots,      // [m]
                             int layers, int m, int row_elems, cudaStream_t stream);

// ------------------------------------------------------------------ FIRP projection

// out row j * k + i = weight[i] @ h[j] + bias[i] (fp32 accumulation).
cudaError_t launch_firp_project(FirpDtype act_dtype,      // h / out
                                FirpDtype weight_dtype,   // weight
                                const void* h,            // [n, d], rows h_stride apart
                                int64_t h_stride,         // scalar: elements between rows of h
                                const void* weight,       // [k, d, d] contiguous (out x in)
                                const float* bias,        // [k, d] fp32, or NULL
                                void* out,                // [n * k, d], rows out_stride apart
                                int64_t out_stride,       // scalar: elements between rows of out
                                int n, int k, int d, cudaStream_t stream);

// ------------------------------------------------------------------ attention

// Split-K plan for paged decode: keys per split and number of splits for contexts up to
// max_context, so that batch * kv_heads * splits blocks fill num_sms SMs.
void firp_decode_plan(int batch, int kv_heads, int max_context, int num_sms, int* num_splits,
                      int* split_tokens);

// One query per sequence over its paged context. With num_splits == 1 the result goes
// straight to out; otherwise each split writes (o, lse) to the fp32 workspace and a merge
// kernel combines them into out.
cudaError_t launch_paged_decode_attention(FirpDtype dtype,
                                          const void* q,                // [B, H, D] contiguous
                                          FirpPagedKV cache,            // one layer
                                          const int32_t* page_tables,   // [B, P], rows page_table_stride apart
                                          int64_t page_table_stride,    // scalar: >= P
                                          const int32_t* context_lens,  // [B]
                                          int batch, int heads, int kv_heads, int head_dim, float scale,
                                          int num_splits, int split_tokens,
                                          void* out,                    // [B, H, D] contiguous
                                          float* part_o,                // [B * H, num_splits, D] (num_splits > 1)
                                          float* part_lse,              // [B * H, num_splits]
                                          cudaStream_t stream);

// Split-K plan for tree attention: the prefix and the scratch rows are cut into splits of
// split_tokens keys; prefix_splits of them cover the prefix, the rest the scratch rows.
void firp_tree_plan(int rows, int heads, int kv_heads, int prefix_len, int scratch_len, int num_sms,
                    int* num_splits, int* prefix_splits, int* split_tokens);

// One sequence's new rows: the whole paged prefix (no mask) plus scratch rows under the
// bit mask, partial results merged by log-sum-exp.
cudaError_t launch_tree_attention(FirpDtype dtype,
                                  const void* q,                // [R, H, D] contiguous
                                  FirpPagedKV cache,            // one layer
                                  const int32_t* page_table,    // [P]
                                  int prefix_len,               // scalar: prefix tokens in the pages (<= P * BS)
                                  const void* k_new,            // [S, Hkv, D] with the strides below
                                  const void* v_new,            // [S, Hkv, D]
                                  int64_t new_token_stride, int64_t new_head_stride,
                                  int scratch_len,              // S
                                  const uint64_t* mask,         // [R, W], W = ceil(S / 64) words
                                  int mask_words,               // W
                                  int rows, int heads, int kv_heads, int head_dim, float scale,
                                  int num_splits, int prefix_splits, int split_tokens,
                                  void* out,                    // [R, H, D] contiguous
                                  float* part_o,                // [R * H, num_splits, D] (num_splits > 1)
                                  float* part_lse,              // [R * H, num_splits]
                                  cudaStream_t stream);

// Log-sum-exp merge of split partials: out[r] = sum_s 2^lse[r,s] o[r,s] / sum_s 2^lse[r,s].
// With context_lens, row r belongs to sequence r / rows_per_seq and only its first
// ceil(context / split_tokens) splits are read; without, all splits are.
cudaError_t launch_merge_states(FirpDtype dtype,
                                const float* part_o,          // [R, num_splits, D]
                                const float* part_lse,        // [R, num_splits], log2 units, -inf = empty
                                int rows, int num_splits, int head_dim,
                                const int32_t* context_lens,  // [R / rows_per_seq] or NULL
                                int rows_per_seq, int split_tokens,
                                void* out,                    // [R, D] contiguous
                                cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif

// The torch-side registration (bindings_cuda.cpp). Only visible to host C++ that has already
// included pybind11 (e.g. through <torch/extension.h>), never to nvcc-compiled kernels.
#if defined(__cplusplus) && !defined(__CUDACC__) && defined(PYBIND11_VERSION_MAJOR)
void register_cuda(pybind11::module& m);
#endif
