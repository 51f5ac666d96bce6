// Tree attention for one sequence: the step's rows (tree nodes and FIRP pseudo rows, or a
// prefill chunk) attend to the whole paged prefix without a mask and to the step's scratch
// rows under a bit mask (bit j % 64 of word j / 64 of a row: that row may see scratch row j).
// Reference: ops.tree_attention.
//
// Keys are cut into splits: prefix_splits over the prefix, the rest over the scratch rows.
// Block (row tile, split, kv head) takes kQPerBlock query vectors (row, head of the kv head's
// group) and walks its split in tiles of 32 keys staged in shared memory as fp32:
//   scores: lane j dots key j of the tile with the query (query broadcast from shared memory),
//   softmax: online in base 2, one warp max + one warp sum per tile and query,
//   P @ V:  lane owns dims lane, lane + 32, ...; p_j reaches it by a shuffle from lane j.
// The partial (o, lse) of each split are merged by log-sum-exp in merge_states.cu; a causal
// prefill skips scratch tiles that no row of the block may see.
#include "common.cuh"

namespace firp {
namespace {

constexpr int kWarps = 4;
constexpr int kQPerWarp = 4;
constexpr int kQPerBlock = kWarps * kQPerWarp;
constexpr int kKeyTile = 32;  // one key per lane
constexpr int kMinSplitTokens = 64;

template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32) tree_attention_kernel(
    const T* __restrict__ q,               // [R, H, D] contiguous
    const T* __restrict__ k_cache,         // [NB, BS, Hkv, D] (strides in kv)
    const T* __restrict__ v_cache,         // [NB, BS, Hkv, D] (strides in kv)
    const FirpPagedKV kv,                  // strides and block size (its pointers unused here)
    const int32_t* __restrict__ page_table,  // [P]
    const int prefix_len,                  // scalar: prefix tokens in the pages (<= P * BS)
    const T* __restrict__ k_new,           // [S, Hkv, D] (new_token_stride, new_head_stride)
    const T* __restrict__ v_new,           // [S, Hkv, D] (same strides)
    const int64_t new_token_stride, const int64_t new_head_stride,  // scalars: strides over S and Hkv
    const int scratch_len,                 // S
    const uint64_t* __restrict__ mask,     // [R, W]
    const int mask_words,                  // W = ceil(S / 64)
    const int rows, const int heads, const int kv_heads,  // R, H, Hkv
    const float scale_log2,                // softmax scale * log2 e
    const int split_tokens, const int prefix_splits,  // keys per split; splits over the prefix
    T* __restrict__ out,                   // [R, H, D], written when gridDim.y == 1
    float* __restrict__ part_o,            // [R * H, NS, D], written when gridDim.y > 1
    float* __restrict__ part_lse) {        // [R * H, NS]
  constexpr int kPerLane = D / 32;
  constexpr int kPack = 16 / sizeof(T);
  __shared__ float sq[kQPerBlock][D];
  __shared__ float sk[kKeyTile][D + 1];  // +1: lane j reads row j, column d -> distinct banks
  __shared__ float sv[kKeyTile][D];

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int split = blockIdx.y, kvh = blockIdx.z, num_splits = gridDim.y;
  const int group = heads / kv_heads;
  const int n_vec = rows * group;  // query vectors of this kv head: (row, g), g fastest
  const int v0 = blockIdx.x * kQPerBlock;

  const bool scratch = split >= prefix_splits;
  const int key0 = (scratch ? split - prefix_splits : split) * split_tokens;
  const int key1 = min(scratch ? scratch_len : prefix_len, key0 + split_tokens);
  const T* k_base = scratch ? k_new : k_cache;
  const T* v_base = scratch ? v_new : v_cache;

  for (int i = threadIdx.x; i < kQPerBlock * D; i += kWarps * 32) {
    const int vec = v0 + i / D, d = i % D;
    float x = 0.f;
    if (vec < n_vec) {
      const int r = vec / group, h = kvh * group + vec % group;
      x = to_float(q[(static_cast<int64_t>(r) * heads + h) * D + d]) * scale_log2;
    }
    sq[i / D][d] = x;
  }

  // This warp's query vectors.
  int row_of[kQPerWarp];
  bool live[kQPerWarp];
  float m[kQPerWarp], l[kQPerWarp], acc[kQPerWarp][kPerLane];
#pragma unroll
  for (int i = 0; i < kQPerWarp; ++i) {
    const int vec = v0 + warp * kQPerWarp + i;
    live[i] = vec < n_vec;
    row_of[i] = live[i] ? vec / group : 0;
    m[i] = -CUDART_INF_F;
    l[i] = 0.f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) acc[i][e] = 0.f;
  }
  // Rows this block serves, for the tile-skipping test.
  const int row_lo = v0 / group, row_hi = (min(v0 + kQPerBlock, n_vec) - 1) / group;

  for (int j0 = key0; j0 < key1; j0 += kKeyTile) {
    if (scratch) {
      // Tiles start at multiples of 32, so each lies in one half of one mask word.
      const int r = row_lo + static_cast<int>(threadIdx.x);
      uint32_t bits = 0;
      if (r <= row_hi)
        bits = static_cast<uint32_t>(mask[static_cast<int64_t>(r) * mask_words + j0 / 64] >> (j0 % 64));
      if (!__syncthreads_or(bits != 0)) continue;  // uniform: no row of the block sees this tile
    }

    // Stage the tile as fp32; keys past the split read as zeros (their scores are masked).
    for (int i = threadIdx.x; i < kKeyTile * (D / kPack); i += kWarps * 32) {
      const int j = i / (D / kPack), d = (i % (D / kPack)) * kPack;
      const int key = j0 + j;
      float kx[kPack] = {}, vx[kPack] = {};
      if (key < key1) {
        const int64_t off =
            scratch ? key * new_token_stride + kvh * new_head_stride + d
                    : page_table[key / kv.block_size] * kv.block_stride + (key % kv.block_size) * kv.token_stride +
                          kvh * kv.head_stride + d;
        load_floats<kPack>(k_base + off, kx);
        load_floats<kPack>(v_base + off, vx);
      }
#pragma unroll
      for (int e = 0; e < kPack; ++e) {
        sk[j][d + e] = kx[e];
        sv[j][d + e] = vx[e];
      }
    }
    __syncthreads();

    // Scores: lane = key of the tile.
    float s[kQPerWarp] = {};
#pragma unroll 8
    for (int d = 0; d < D; ++d) {
      const float kd = sk[lane][d];
#pragma unroll
      for (int i = 0; i < kQPerWarp; ++i) s[i] += sq[warp * kQPerWarp + i][d] * kd;
    }
    const int key = j0 + lane;
    float p[kQPerWarp];
#pragma unroll
    for (int i = 0; i < kQPerWarp; ++i) {
      bool visible = live[i] && key < key1;
      if (visible && scratch)
        visible = (mask[static_cast<int64_t>(row_of[i]) * mask_words + key / 64] >> (key % 64)) & 1u;
      if (!visible) s[i] = -CUDART_INF_F;
      const float m_new = fmaxf(m[i], warp_max(s[i]));
      // Nothing visible yet: subtract 0 instead of -inf so that exp2 gives 0, not NaN.
      const float base = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float corr = exp2f(m[i] - base);
      p[i] = exp2f(s[i] - base);
      l[i] = l[i] * corr + warp_sum(p[i]);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) acc[i][e] *= corr;
      m[i] = m_new;
    }

    // P @ V: p of key j comes from lane j.
#pragma unroll 4
    for (int j = 0; j < kKeyTile; ++j) {
      float pj[kQPerWarp];
#pragma unroll
      for (int i = 0; i < kQPerWarp; ++i) pj[i] = __shfl_sync(kFullMask, p[i], j);
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) {
        const float vd = sv[j][lane + 32 * e];
#pragma unroll
        for (int i = 0; i < kQPerWarp; ++i) acc[i][e] += pj[i] * vd;
      }
    }
    __syncthreads();  // the tile is overwritten next
  }

#pragma unroll
  for (int i = 0; i < kQPerWarp; ++i) {
    if (!live[i]) continue;  // uniform across the warp
    const int vec = v0 + warp * kQPerWarp + i;
    const int64_t row = static_cast<int64_t>(row_of[i]) * heads + kvh * group + vec % group;
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    if (num_splits == 1) {
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) out[row * D + lane + 32 * e] = from_float<T>(acc[i][e] * inv);
    } else {
      float* dst = part_o + (row * num_splits + split) * D;
#pragma unroll
      for (int e = 0; e < kPerLane; ++e) dst[lane + 32 * e] = acc[i][e] * inv;
      if (lane == 0) part_lse[row * num_splits + split] = l[i] > 0.f ? m[i] + log2f(l[i]) : -CUDART_INF_F;
    }
  }
}

struct TreeArgs {
  const void* q;
  FirpPagedKV cache;
  const int32_t* page_table;
  int prefix_len;
  const void* k_new;
  const void* v_new;
  int64_t new_token_stride, new_head_stride;
  int scratch_len;
  const uint64_t* mask;
  int mask_words;
  int rows, heads, kv_heads;
  float scale_log2;
  int num_splits, prefix_splits, split_tokens;
  void* out;
  float* part_o;
  float* part_lse;
};

template <typename T, int D>
cudaError_t run(const TreeArgs& a, cudaStream_t stream) {
  const int group = a.heads / a.kv_heads;
  const dim3 grid(ceil_div(a.rows * group, kQPerBlock), a.num_splits, a.kv_heads);
  tree_attention_kernel<T, D><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const T*>(a.q), static_cast<const T*>(a.cache.k), static_cast<const T*>(a.cache.v), a.cache,
      a.page_table, a.prefix_len, static_cast<const T*>(a.k_new), static_cast<const T*>(a.v_new),
      a.new_token_stride, a.new_head_stride, a.scratch_len, a.mask, a.mask_words, a.rows, a.heads, a.kv_heads,
      a.scale_log2, a.split_tokens, a.prefix_splits, static_cast<T*>(a.out), a.part_o, a.part_lse);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_dim(int head_dim, const TreeArgs& a, cudaStream_t stream) {
  if (head_dim == 64) return run<T, 64>(a, stream);
  if (head_dim == 128) return run<T, 128>(a, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace firp

extern "C" void firp_tree_plan(int rows, int heads, int kv_heads, int prefix_len, int scratch_len, int num_sms,
                               int* num_splits, int* prefix_splits, int* split_tokens) {
  using firp::ceil_div;
  const int group = kv_heads > 0 ? heads / kv_heads : 1;
  const int vectors = rows * group > 0 ? rows * group : 1;  // (row, query head) pairs per kv head
  const int base_blocks = ceil_div(vectors, firp::kQPerBlock) * (kv_heads > 0 ? kv_heads : 1);
  const int wanted = ceil_div(4 * (num_sms > 0 ? num_sms : 1), base_blocks);
  const int keys = prefix_len + scratch_len > 0 ? prefix_len + scratch_len : 1;
  int tokens = ceil_div(ceil_div(keys, wanted), 64) * 64;  // multiple of 64: tiles never straddle mask words
  if (tokens < firp::kMinSplitTokens) tokens = firp::kMinSplitTokens;
  *split_tokens = tokens;
  *prefix_splits = ceil_div(prefix_len, tokens);
  *num_splits = *prefix_splits + ceil_div(scratch_len, tokens);
}

extern "C" cudaError_t launch_tree_attention(FirpDtype dtype, const void* q, FirpPagedKV cache,
                                             const int32_t* page_table, int prefix_len, const void* k_new,
                                             const void* v_new, int64_t new_token_stride, int64_t new_head_stride,
                                             int scratch_len, const uint64_t* mask, int mask_words, int rows,
                                             int heads, int kv_heads, int head_dim, float scale, int num_splits,
                                             int prefix_splits, int split_tokens, void* out, float* part_o,
                                             float* part_lse, cudaStream_t stream) {
  if (kv_heads <= 0 || heads % kv_heads != 0 || kv_heads > 65535 || num_splits < 1 || num_splits > 65535 ||
      split_tokens % 64 != 0 || split_tokens < 64 || cache.block_size < 1 ||
      (scratch_len > 0 && mask_words < firp::ceil_div(scratch_len, 64)))
    return cudaErrorInvalidValue;
  if (num_splits > 1 && (part_o == nullptr || part_lse == nullptr)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const firp::TreeArgs a{q, cache, page_table, prefix_len, k_new, v_new, new_token_stride, new_head_stride,
                         scratch_len, mask, mask_words, rows, heads, kv_heads, scale * firp::kLog2e,
                         num_splits, prefix_splits, split_tokens, out, part_o, part_lse};
  cudaError_t err = cudaErrorInvalidValue;
  if (dtype == FIRP_BF16) err = firp::run_dim<__nv_bfloat16>(head_dim, a, stream);
  if (dtype == FIRP_F32) err = firp::run_dim<float>(head_dim, a, stream);
  if (err != cudaSuccess || num_splits == 1) return err;
  return launch_merge_states(dtype, part_o, part_lse, rows * heads, num_splits, head_dim, nullptr, 1,
                             split_tokens, out, stream);
}
