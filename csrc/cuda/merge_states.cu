// Log-sum-exp merge of split-K attention partials (the second pass of paged decode and tree
// attention). A split that saw keys wrote o = its softmax-weighted mean of V and
// lse = log2(sum of its 2^scores); one that saw none wrote lse = -inf. Then
//   out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M),   M = max_s lse_s.
#include "common.cuh"

namespace firp {
namespace {

constexpr int kMergeWarps = 4;  // one warp per row

template <typename T, int D>
__global__ void __launch_bounds__(kMergeWarps * 32) merge_states_kernel(
    const float* __restrict__ part_o,          // [R, NS, D]
    const float* __restrict__ part_lse,        // [R, NS], log2 units
    const int rows, const int num_splits,      // R, NS
    const int32_t* __restrict__ context_lens,  // [R / rows_per_seq] or nullptr (all splits valid)
    const int rows_per_seq, const int split_tokens,  // scalars: H for decode; keys per split
    T* __restrict__ out) {                     // [R, D]
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x % 32;
  const int row = blockIdx.x * kMergeWarps + threadIdx.x / 32;
  if (row >= rows) return;
  int valid = num_splits;
  if (context_lens != nullptr) valid = min(valid, ceil_div(context_lens[row / rows_per_seq], split_tokens));

  const float* lse = part_lse + static_cast<int64_t>(row) * num_splits;
  float m = -CUDART_INF_F;
  for (int s = 0; s < valid; ++s) m = fmaxf(m, lse[s]);

  float o[kPerLane] = {};
  float total = 0.f;
  if (m != -CUDART_INF_F) {  // else: no split saw a key, the row stays zero
    for (int s = 0; s < valid; ++s) {
      const float w = exp2f(lse[s] - m);
      const float* src = part_o + (static_cast<int64_t>(row) * num_splits + s) * D;
      total += w;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) o[e] += w * src[lane + 32 * e];
    }
  }
  const float inv = total > 0.f ? 1.f / total : 0.f;
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) out[static_cast<int64_t>(row) * D + lane + 32 * e] = from_float<T>(o[e] * inv);
}

template <typename T, int D>
cudaError_t run(const float* part_o, const float* part_lse, int rows, int num_splits, const int32_t* context_lens,
                int rows_per_seq, int split_tokens, void* out, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  merge_states_kernel<T, D><<<ceil_div(rows, kMergeWarps), kMergeWarps * 32, 0, stream>>>(
      part_o, part_lse, rows, num_splits, context_lens, rows_per_seq, split_tokens, static_cast<T*>(out));
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_dim(int head_dim, const float* part_o, const float* part_lse, int rows, int num_splits,
                    const int32_t* context_lens, int rows_per_seq, int split_tokens, void* out,
                    cudaStream_t stream) {
  if (head_dim == 64)
    return run<T, 64>(part_o, part_lse, rows, num_splits, context_lens, rows_per_seq, split_tokens, out, stream);
  if (head_dim == 128)
    return run<T, 128>(part_o, part_lse, rows, num_splits, context_lens, rows_per_seq, split_tokens, out, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace firp

extern "C" int firp_attention_head_dim_supported(int head_dim) { return head_dim == 64 || head_dim == 128; }

extern "C" int firp_attention_max_group(void) { return 8; }

extern "C" cudaError_t launch_merge_states(FirpDtype dtype, const float* part_o, const float* part_lse, int rows,
                                           int num_splits, int head_dim, const int32_t* context_lens,
                                           int rows_per_seq, int split_tokens, void* out, cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run_dim<__nv_bfloat16>(head_dim, part_o, part_lse, rows, num_splits, context_lens,
                                        rows_per_seq, split_tokens, out, stream);
  if (dtype == FIRP_F32)
    return firp::run_dim<float>(head_dim, part_o, part_lse, rows, num_splits, context_lens, rows_per_seq,
                                split_tokens, out, stream);
  return cudaErrorInvalidValue;
}
