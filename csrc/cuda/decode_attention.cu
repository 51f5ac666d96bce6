// Paged decode attention: one query per sequence, many sequences, GQA, split-K.
// Reference: ops.paged_decode_attention.
//
// Work split: block (split, kv head, sequence) reads its share of the sequence's keys once
// and serves all G = H / Hkv query heads that share that kv head. Inside the block, warp w
// takes chunks of kChunk consecutive tokens (w, w + kWarps, ...); a lane holds D / 32
// contiguous elements of every K/V row it touches and of each query head, so a score is one
// warp reduction. Softmax is online, in fp32 and base 2 (q is pre-scaled by scale * log2 e).
// The warps' states are merged in shared memory; with several splits, each writes
// (o, lse) to the workspace and merge_states.cu combines them.
#include "common.cuh"

namespace firp {
namespace {

constexpr int kWarps = 4;
constexpr int kChunk = 4;  // tokens loaded together by a warp: several loads in flight at once
constexpr int kMinSplitTokens = 128;

template <typename T, int D, int MAXG>
__global__ void __launch_bounds__(kWarps * 32) paged_decode_kernel(
    const T* __restrict__ q,                   // [B, H, D] contiguous
    const T* __restrict__ k_cache,             // [NB, BS, Hkv, D] (strides in kv)
    const T* __restrict__ v_cache,             // [NB, BS, Hkv, D] (strides in kv)
    const FirpPagedKV kv,                      // strides and block size (its pointers unused here)
    const int32_t* __restrict__ page_tables,   // [B, P], rows page_table_stride apart
    const int64_t page_table_stride,           // scalar: elements between page-table rows (>= P)
    const int32_t* __restrict__ context_lens,  // [B]
    const int heads, const int kv_heads,       // H, Hkv
    const float scale_log2,                    // softmax scale * log2 e
    const int split_tokens,                    // keys per split
    T* __restrict__ out,                       // [B, H, D], written when gridDim.x == 1
    float* __restrict__ part_o,                // [B * H, NS, D], written when gridDim.x > 1
    float* __restrict__ part_lse) {            // [B * H, NS]
  constexpr int kPerLane = D / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int num_splits = gridDim.x;
  const int group = heads / kv_heads;

  const int context = context_lens[b];
  const int start = split * split_tokens;
  if (start >= context) {
    // The merge reads only the splits that hold keys; an empty context gives zeros, as the
    // reference's softmax over no keys does.
    if (num_splits == 1) {
      for (int i = threadIdx.x; i < group * D; i += kWarps * 32)
        out[(static_cast<int64_t>(b) * heads + kvh * group) * D + i] = from_float<T>(0.f);
    }
    return;
  }
  const int end = min(context, start + split_tokens);

  // This lane's slice of each query head of the group, pre-scaled.
  float qr[MAXG][kPerLane];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g < group) {
      load_floats<kPerLane>(q + (static_cast<int64_t>(b) * heads + kvh * group + g) * D + lane * kPerLane, qr[g]);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) qr[g][e] *= scale_log2;
    }
  }

  float m[MAXG], l[MAXG], acc[MAXG][kPerLane];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    m[g] = -CUDART_INF_F;
    l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[g][e] = 0.f;
  }

  const int32_t* pages = page_tables + b * page_table_stride;
  const int64_t lane_offset = static_cast<int64_t>(kvh) * kv.head_stride + lane * kPerLane;
  for (int t0 = start + warp * kChunk; t0 < end; t0 += kWarps * kChunk) {
    float kr[kChunk][kPerLane], vr[kChunk][kPerLane];
#pragma unroll
    for (int c = 0; c < kChunk; ++c) {
      const int t = t0 + c;
      if (t < end) {
        const int64_t off = pages[t / kv.block_size] * kv.block_stride + (t % kv.block_size) * kv.token_stride +
                            lane_offset;
        load_floats<kPerLane>(k_cache + off, kr[c]);
        load_floats<kPerLane>(v_cache + off, vr[c]);
      } else {
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) kr[c][e] = vr[c][e] = 0.f;
      }
    }
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= group) continue;  // (not break: keeps the loop fully unrolled, arrays in registers)
      float s[kChunk];
      float m_new = m[g];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        float dot = 0.f;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) dot += qr[g][e] * kr[c][e];
        // t0 + c < end is the same for the whole warp, so the shuffles stay converged.
        s[c] = t0 + c < end ? warp_sum(dot) : -CUDART_INF_F;
        m_new = fmaxf(m_new, s[c]);
      }
      // m_new is finite: token t0 < end is in this chunk. First chunk: exp2(-inf) = 0.
      const float corr = exp2f(m[g] - m_new);
      l[g] *= corr;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[g][e] *= corr;
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        const float p = exp2f(s[c] - m_new);
        l[g] += p;
#pragma unroll
        for (int e = 0; e < kPerLane; ++e) acc[g][e] += p * vr[c][e];
      }
      m[g] = m_new;
    }
  }

  // Merge the warps' states. A warp that got no token has m = -inf, l = 0: weight 0.
  __shared__ float sm_m[kWarps][MAXG], sm_l[kWarps][MAXG];
  __shared__ float sm_acc[kWarps][MAXG][D];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (lane == 0) {
      sm_m[warp][g] = m[g];
      sm_l[warp][g] = l[g];
    }
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) sm_acc[warp][g][lane * kPerLane + e] = acc[g][e];
  }
  __syncthreads();

  for (int g = warp; g < group; g += kWarps) {
    float m_all = -CUDART_INF_F;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m_all = fmaxf(m_all, sm_m[w][g]);  // finite: warp 0 saw `start`
    float l_all = 0.f, o[kPerLane] = {};
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wt = exp2f(sm_m[w][g] - m_all);
      l_all += wt * sm_l[w][g];
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) o[e] += wt * sm_acc[w][g][lane * kPerLane + e];
    }
    const float inv = 1.f / l_all;
    const int64_t row = static_cast<int64_t>(b) * heads + kvh * group + g;
    if (num_splits == 1) {
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) out[row * D + lane * kPerLane + e] = from_float<T>(o[e] * inv);
    } else {
      float* dst = part_o + (row * num_splits + split) * D + lane * kPerLane;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) dst[e] = o[e] * inv;
      if (lane == 0) part_lse[row * num_splits + split] = m_all + log2f(l_all);
    }
  }
}

struct DecodeArgs {
  const void* q;
  FirpPagedKV cache;
  const int32_t* page_tables;
  int64_t page_table_stride;
  const int32_t* context_lens;
  int batch, heads, kv_heads;
  float scale_log2;
  int num_splits, split_tokens;
  void* out;
  float* part_o;
  float* part_lse;
};

template <typename T, int D, int MAXG>
cudaError_t run(const DecodeArgs& a, cudaStream_t stream) {
  const dim3 grid(a.num_splits, a.kv_heads, a.batch);
  paged_decode_kernel<T, D, MAXG><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.cache.k), static_cast<const T*>(a.cache.v), a.cache,
      a.page_tables, a.page_table_stride, a.context_lens, a.heads, a.kv_heads, a.scale_log2, a.split_tokens,
      static_cast<T*>(a.out), a.part_o, a.part_lse);
  return cudaGetLastError();
}

// Smallest register budget that holds the group: G = 3 runs as MAXG = 4 with one head idle.
template <typename T, int D>
cudaError_t run_group(const DecodeArgs& a, cudaStream_t stream) {
  const int group = a.heads / a.kv_heads;
  if (group == 1) return run<T, D, 1>(a, stream);
  if (group == 2) return run<T, D, 2>(a, stream);
  if (group <= 4) return run<T, D, 4>(a, stream);
  if (group <= 8) return run<T, D, 8>(a, stream);
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t run_dim(int head_dim, const DecodeArgs& a, cudaStream_t stream) {
  if (head_dim == 64) return run_group<T, 64>(a, stream);
  if (head_dim == 128) return run_group<T, 128>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace firp

extern "C" void firp_decode_plan(int batch, int kv_heads, int max_context, int num_sms, int* num_splits,
                                 int* split_tokens) {
  using firp::ceil_div;
  // About four blocks (16 warps) per SM keep enough K/V loads in flight to cover memory latency.
  const int base_blocks = batch * kv_heads > 0 ? batch * kv_heads : 1;
  const int wanted = ceil_div(4 * (num_sms > 0 ? num_sms : 1), base_blocks);
  int tokens = ceil_div(max_context > 0 ? max_context : 1, wanted);
  tokens = ceil_div(tokens, 64) * 64;
  if (tokens < firp::kMinSplitTokens) tokens = firp::kMinSplitTokens;
  *split_tokens = tokens;
  *num_splits = ceil_div(max_context > 0 ? max_context : 1, tokens);
}

extern "C" cudaError_t launch_paged_decode_attention(
    FirpDtype dtype, const void* q, FirpPagedKV cache, const int32_t* page_tables, int64_t page_table_stride,
    const int32_t* context_lens, int batch, int heads, int kv_heads, int head_dim, float scale, int num_splits,
    int split_tokens, void* out, float* part_o, float* part_lse, cudaStream_t stream) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || num_splits < 1 || split_tokens < 1 || cache.block_size < 1 ||
      kv_heads > 65535 || batch > 65535)
    return cudaErrorInvalidValue;
  if (num_splits > 1 && (part_o == nullptr || part_lse == nullptr)) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  const firp::DecodeArgs a{q, cache, page_tables, page_table_stride, context_lens, batch, heads, kv_heads,
                           scale * firp::kLog2e, num_splits, split_tokens, out, part_o, part_lse};
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == FIRP_BF16) err = firp::run_dim<__nv_bfloat16>(head_dim, a, stream);
  if (dtype == FIRP_F32) err = firp::run_dim<float>(head_dim, a, stream);
  if (err != cudaSuccess || num_splits == 1) return err;
  return launch_merge_states(dtype, part_o, part_lse, batch * heads, num_splits, head_dim, context_lens, heads,
                             split_tokens, out, stream);
}
