// FIRP projection: every tree node's layer-l hidden state through all k maps at once,
// written straight into the pseudo rows of the step's hidden states.
// Reference: ops.firp_project (out row j * k + i = weight[i] @ h[j] + bias[i], fp32 math).
//
// n (tree nodes) is small and the k * d * d weights are large, so the kernel is a batched
// GEMV bound by weight bytes: one warp owns one output feature e of one map i, streams that
// weight row once per group of kRows nodes, and dots it with the nodes' hidden states
// (a few KB, served from L1/L2).
#include "common.cuh"

namespace firp {
namespace {

constexpr int kProjWarps = 4;  // output features per block
constexpr int kRows = 8;       // nodes sharing one pass over a weight row
constexpr int kPack = 8;       // elements per lane per step (d must be a multiple of 8)

template <typename T, typename W>
__global__ void __launch_bounds__(kProjWarps * 32) firp_project_kernel(
    const T* __restrict__ h,       // [n, d], rows h_stride apart
    const int64_t h_stride,        // scalar: elements between rows of h
    const W* __restrict__ weight,  // [k, d, d]: weight[i][e] holds output feature e's input weights
    const float* __restrict__ bias,  // [k, d] fp32, or nullptr
    T* __restrict__ out,           // [n * k, d], rows out_stride apart
    const int64_t out_stride,      // scalar: elements between rows of out
    const int n, const int k, const int d) {  // nodes, maps, hidden size
  const int lane = threadIdx.x % 32;
  const int e = blockIdx.x * kProjWarps + threadIdx.x / 32;
  const int i = blockIdx.y;
  if (e >= d) return;  // a whole warp leaves; nothing below synchronises the block
  const W* w_row = weight + (static_cast<int64_t>(i) * d + e) * d;
  const float b = bias != nullptr ? bias[static_cast<int64_t>(i) * d + e] : 0.f;

  for (int j0 = 0; j0 < n; j0 += kRows) {
    float acc[kRows] = {};
    for (int c = lane * kPack; c < d; c += 32 * kPack) {
      float w[kPack];
      load_floats<kPack>(w_row + c, w);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (j0 + r >= n) break;
        float x[kPack];
        load_floats<kPack>(h + (j0 + r) * h_stride + c, x);
#pragma unroll
        for (int u = 0; u < kPack; ++u) acc[r] += w[u] * x[u];
      }
    }
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (j0 + r >= n) break;  // uniform across the warp
      const float y = warp_sum(acc[r]) + b;
      if (lane == 0) out[(static_cast<int64_t>(j0 + r) * k + i) * out_stride + e] = from_float<T>(y);
    }
  }
}

template <typename T, typename W>
cudaError_t run(const void* h, int64_t h_stride, const void* weight, const float* bias, void* out,
                int64_t out_stride, int n, int k, int d, cudaStream_t stream) {
  if (d % kPack != 0 || k > 65535) return cudaErrorInvalidValue;
  if (n == 0 || k == 0) return cudaSuccess;
  const dim3 grid(ceil_div(d, kProjWarps), k);
  firp_project_kernel<T, W><<<grid, kProjWarps * 32, 0, stream>>>(
      static_cast<const T*>(h), h_stride, static_cast<const W*>(weight), bias,
      static_cast<T*>(out), out_stride, n, k, d);
  return cudaGetLastError();
}

template <typename T>
cudaError_t run_act(FirpDtype weight_dtype, const void* h, int64_t h_stride, const void* weight,
                    const float* bias, void* out, int64_t out_stride, int n, int k, int d, cudaStream_t stream) {
  if (weight_dtype == FIRP_BF16)
    return run<T, __nv_bfloat16>(h, h_stride, weight, bias, out, out_stride, n, k, d, stream);
  if (weight_dtype == FIRP_F32) return run<T, float>(h, h_stride, weight, bias, out, out_stride, n, k, d, stream);
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace firp

extern "C" cudaError_t launch_firp_project(FirpDtype act_dtype, FirpDtype weight_dtype, const void* h,
                                           int64_t h_stride, const void* weight, const float* bias, void* out,
                                           int64_t out_stride, int n, int k, int d, cudaStream_t stream) {
  if (act_dtype == FIRP_BF16)
    return firp::run_act<__nv_bfloat16>(weight_dtype, h, h_stride, weight, bias, out, out_stride, n, k, d,
                                        stream);
  if (act_dtype == FIRP_F32)
    return firp::run_act<float>(weight_dtype, h, h_stride, weight, bias, out, out_stride, n, k, d, stream);
  return cudaErrorInvalidValue;
}
