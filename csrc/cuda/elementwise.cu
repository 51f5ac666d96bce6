// Rotate-half RoPE and SwiGLU's silu(gate) * up.
// References: ops.rope, ops.silu_mul. Products and sums use the _rn intrinsics so that nvcc
// does not fuse them into FMAs: each step then rounds exactly as the reference's separate
// tensor ops do.
#include "common.cuh"

namespace firp {
namespace {

constexpr int kRopeThreads = 128;
constexpr int kSiluThreads = 256;

// One block per token; threads walk the (head, pair) grid of q then k.
template <typename T>
__global__ void __launch_bounds__(kRopeThreads) rope_kernel(
    const T* __restrict__ q,                 // [T, H, D] (q_token_stride, q_head_stride)
    const int64_t q_token_stride, const int64_t q_head_stride,  // scalars: q's strides over T and H
    const T* __restrict__ k,                 // [T, Hkv, D] (k_token_stride, k_head_stride)
    const int64_t k_token_stride, const int64_t k_head_stride,  // scalars: k's strides over T and Hkv
    const int64_t* __restrict__ positions,   // [T]
    const float* __restrict__ cos_table,     // [max_pos, D / 2]
    const float* __restrict__ sin_table,     // [max_pos, D / 2]
    T* __restrict__ q_out,                   // [T, H, D] contiguous
    T* __restrict__ k_out,                   // [T, Hkv, D] contiguous
    const int heads, const int kv_heads, const int head_dim) {  // H, Hkv, D
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const int64_t pos = positions[t];
  const float* c_row = cos_table + pos * half;
  const float* s_row = sin_table + pos * half;
  for (int i = threadIdx.x; i < (heads + kv_heads) * half; i += kRopeThreads) {
    const int head = i / half, j = i % half;
    const bool is_q = head < heads;
    const T* src = is_q ? q + t * q_token_stride + head * q_head_stride
                        : k + t * k_token_stride + (head - heads) * k_head_stride;
    T* dst = is_q ? q_out + (t * heads + head) * head_dim : k_out + (t * kv_heads + head - heads) * head_dim;
    const float x1 = to_float(src[j]), x2 = to_float(src[j + half]);
    const float c = c_row[j], s = s_row[j];
    dst[j] = from_float<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    dst[j + half] = from_float<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
  }
}

// Flat grid-stride loop over [T, F]; silu is rounded to T before the multiply, like F.silu(g) * u.
template <typename T>
__global__ void __launch_bounds__(kSiluThreads) silu_mul_kernel(
    const T* __restrict__ gate_up,  // [T, 2F], rows in_stride apart
    const int64_t in_stride,        // scalar: elements between rows of gate_up
    T* __restrict__ out,            // [T, F], rows out_stride apart
    const int64_t out_stride,       // scalar: elements between rows of out
    const int64_t tokens, const int ffn) {  // T, F
  const int64_t n = tokens * ffn;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kSiluThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kSiluThreads) {
    const int64_t t = i / ffn;
    const int f = static_cast<int>(i % ffn);
    const float g = to_float(gate_up[t * in_stride + f]);
    const float u = to_float(gate_up[t * in_stride + ffn + f]);
    const float silu = round_to<T>(__fdiv_rn(g, __fadd_rn(1.f, expf(-g))));
    out[t * out_stride + f] = from_float<T>(__fmul_rn(silu, u));
  }
}

template <typename T>
cudaError_t run_rope(const void* q, int64_t qts, int64_t qhs, const void* k, int64_t kts, int64_t khs,
                     const int64_t* positions, const float* cos, const float* sin, void* q_out, void* k_out,
                     int tokens, int heads, int kv_heads, int head_dim, cudaStream_t stream) {
  if (tokens == 0) return cudaSuccess;
  rope_kernel<T><<<tokens, kRopeThreads, 0, stream>>>(
      static_cast<const T*>(q), qts, qhs, static_cast<const T*>(k), kts, khs, positions, cos, sin,
      static_cast<T*>(q_out), static_cast<T*>(k_out), heads, kv_heads, head_dim);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_silu_mul(const void* gate_up, int64_t in_stride, void* out, int64_t out_stride, int tokens,
                         int ffn, cudaStream_t stream) {
  const int64_t n = static_cast<int64_t>(tokens) * ffn;
  if (n == 0) return cudaSuccess;
  // Enough blocks for every SM several times over; the loop covers the rest.
  const int64_t needed = (n + kSiluThreads - 1) / kSiluThreads;
  const int blocks = static_cast<int>(needed < 4096 ? needed : 4096);
  silu_mul_kernel<T><<<blocks, kSiluThreads, 0, stream>>>(static_cast<const T*>(gate_up), in_stride,
                                                          static_cast<T*>(out), out_stride, tokens, ffn);
  return cudaGetLastError();
}

}  // namespace
}  // namespace firp

extern "C" cudaError_t launch_rope(FirpDtype dtype, const void* q, int64_t q_token_stride, int64_t q_head_stride,
                                   const void* k, int64_t k_token_stride, int64_t k_head_stride,
                                   const int64_t* positions, const float* cos, const float* sin, void* q_out,
                                   void* k_out, int tokens, int heads, int kv_heads, int head_dim,
                                   cudaStream_t stream) {
  if (head_dim % 2 != 0) return cudaErrorInvalidValue;
  if (dtype == FIRP_BF16)
    return firp::run_rope<__nv_bfloat16>(q, q_token_stride, q_head_stride, k, k_token_stride, k_head_stride,
                                         positions, cos, sin, q_out, k_out, tokens, heads, kv_heads, head_dim,
                                         stream);
  if (dtype == FIRP_F32)
    return firp::run_rope<float>(q, q_token_stride, q_head_stride, k, k_token_stride, k_head_stride, positions,
                                 cos, sin, q_out, k_out, tokens, heads, kv_heads, head_dim, stream);
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t launch_silu_mul(FirpDtype dtype, const void* gate_up, int64_t in_stride, void* out,
                                       int64_t out_stride, int tokens, int ffn, cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run_silu_mul<__nv_bfloat16>(gate_up, in_stride, out, out_stride, tokens, ffn, stream);
  if (dtype == FIRP_F32) return firp::run_silu_mul<float>(gate_up, in_stride, out, out_stride, tokens, ffn, stream);
  return cudaErrorInvalidValue;
}
