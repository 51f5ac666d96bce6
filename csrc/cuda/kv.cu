// KV cache writes: write_kv (one layer, the step's new tokens into their slots) and
// kv_commit (every layer in one launch: the accepted tree path from scratch into the pages).
// References: ops.write_kv, ops.kv_commit. Both are pure copies in 16-byte packs.
#include "common.cuh"

namespace firp {
namespace {

constexpr int kCopyThreads = 128;

// One block per token; threads copy (head, pack) pieces of the token's K and V.
template <typename T>
__global__ void __launch_bounds__(kCopyThreads) write_kv_kernel(
    T* __restrict__ k_cache,              // [NB * BS, Hkv, D] contiguous
    T* __restrict__ v_cache,              // [NB * BS, Hkv, D] contiguous
    const T* __restrict__ k,              // [T, Hkv, D] (k_token_stride, k_head_stride)
    const int64_t k_token_stride, const int64_t k_head_stride,  // scalars: k's strides over T and Hkv
    const T* __restrict__ v,              // [T, Hkv, D] (v_token_stride, v_head_stride)
    const int64_t v_token_stride, const int64_t v_head_stride,  // scalars: v's strides over T and Hkv
    const int64_t* __restrict__ slots,    // [T]
    const int kv_heads, const int head_dim) {  // Hkv, D
  constexpr int kPack = 16 / sizeof(T);
  const int64_t t = blockIdx.x;
  const int64_t slot = slots[t];
  if (slot < 0) return;  // padding token: nothing to store
  const int packs_per_head = head_dim / kPack;
  for (int i = threadIdx.x; i < kv_heads * packs_per_head; i += kCopyThreads) {
    const int head = i / packs_per_head, d = (i % packs_per_head) * kPack;
    const int64_t dst = (slot * kv_heads + head) * head_dim + d;
    copy_pack<kPack>(k_cache + dst, k + t * k_token_stride + head * k_head_stride + d);
    copy_pack<kPack>(v_cache + dst, v + t * v_token_stride + head * v_head_stride + d);
  }
}

// grid (m, L): block (i, layer) moves scratch row src_rows[i] of that layer to dst_slots[i].
template <typename T>
__global__ void __launch_bounds__(kCopyThreads) kv_commit_kernel(
    T* __restrict__ k_cache,                // [L, NB * BS, row_elems], layers cache_layer_stride apart
    T* __restrict__ v_cache,                // [L, NB * BS, row_elems]
    const int64_t cache_layer_stride,       // scalar: elements between layers of the caches
    const T* __restrict__ k_scratch,        // [L, S, row_elems], rows scratch_row_stride apart
    const T* __restrict__ v_scratch,        // [L, S, row_elems]
    const int64_t scratch_layer_stride,     // scalar: elements between layers of the scratch
    const int64_t scratch_row_stride,       // scalar: elements between scratch rows (>= Hkv * D)
    const int64_t* __restrict__ src_rows,   // [m]
    const int64_t* __restrict__ dst_slots,  // [m]
    const int row_elems) {                  // Hkv * D
  constexpr int kPack = 16 / sizeof(T);
  const int64_t layer = blockIdx.y;
  const int64_t src = layer * scratch_layer_stride + src_rows[blockIdx.x] * scratch_row_stride;
  const int64_t dst = layer * cache_layer_stride + dst_slots[blockIdx.x] * row_elems;
  for (int e = threadIdx.x * kPack; e < row_elems; e += kCopyThreads * kPack) {
    copy_pack<kPack>(k_cache + dst + e, k_scratch + src + e);
    copy_pack<kPack>(v_cache + dst + e, v_scratch + src + e);
  }
}

template <typename T>
cudaError_t run_write_kv(void* k_cache, void* v_cache, const void* k, int64_t kts, int64_t khs, const void* v,
                         int64_t vts, int64_t vhs, const int64_t* slots, int tokens, int kv_heads, int head_dim,
                         cudaStream_t stream) {
  if (head_dim % (16 / sizeof(T)) != 0) return cudaErrorInvalidValue;
  if (tokens == 0) return cudaSuccess;
  write_kv_kernel<T><<<tokens, kCopyThreads, 0, stream>>>(
      static_cast<T*>(k_cache), static_cast<T*>(v_cache), static_cast<const T*>(k), kts, khs,
      static_cast<const T*>(v), vts, vhs, slots, kv_heads, head_dim);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_kv_commit(void* k_cache, void* v_cache, int64_t cache_layer_stride, const void* k_scratch,
                          const void* v_scratch, int64_t scratch_layer_stride, int64_t scratch_row_stride,
                          const int64_t* src_rows, const int64_t* dst_slots, int layers, int m, int row_elems,
                          cudaStream_t stream) {
  if (row_elems % (16 / sizeof(T)) != 0 || layers > 65535) return cudaErrorInvalidValue;
  if (m == 0 || layers == 0) return cudaSuccess;
  kv_commit_kernel<T><<<dim3(m, layers), kCopyThreads, 0, stream>>>(
      static_cast<T*>(k_cache), static_cast<T*>(v_cache), cache_layer_stride, static_cast<const T*>(k_scratch),
      static_cast<const T*>(v_scratch), scratch_layer_stride, scratch_row_stride, src_rows, dst_slots, row_elems);
  return cudaGetLastError();
}

}  // namespace
}  // namespace firp

extern "C" cudaError_t launch_write_kv(FirpDtype dtype, void* k_cache, void* v_cache, const void* k,
                                       int64_t k_token_stride, int64_t k_head_stride, const void* v,
                                       int64_t v_token_stride, int64_t v_head_stride, const int64_t* slots,
                                       int tokens, int kv_heads, int head_dim, cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run_write_kv<__nv_bfloat16>(k_cache, v_cache, k, k_token_stride, k_head_stride, v,
                                             v_token_stride, v_head_stride, slots, tokens, kv_heads, head_dim,
                                             stream);
  if (dtype == FIRP_F32)
    return firp::run_write_kv<float>(k_cache, v_cache, k, k_token_stride, k_head_stride, v, v_token_stride,
                                     v_head_stride, slots, tokens, kv_heads, head_dim, stream);
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t launch_kv_commit(FirpDtype dtype, void* k_cache, void* v_cache, int64_t cache_layer_stride,
                                        const void* k_scratch, const void* v_scratch,
                                        int64_t scratch_layer_stride, int64_t scratch_row_stride,
                                        const int64_t* src_rows, const int64_t* dst_slots, int layers, int m,
                                        int row_elems, cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run_kv_commit<__nv_bfloat16>(k_cache, v_cache, cache_layer_stride, k_scratch, v_scratch,
                                              scratch_layer_stride, scratch_row_stride, src_rows, dst_slots,
                                              layers, m, row_elems, stream);
  if (dtype == FIRP_F32)
    return firp::run_kv_commit<float>(k_cache, v_cache, cache_layer_stride, k_scratch, v_scratch,
                                      scratch_layer_stride, scratch_row_stride, src_rows, dst_slots, layers, m,
                                      row_elems, stream);
  return cudaErrorInvalidValue;
}
