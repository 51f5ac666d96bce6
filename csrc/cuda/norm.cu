// RMSNorm and the fused residual-add + RMSNorm. One block per row; fp32 statistics.
// Reference: ops.rms_norm / ops.add_rms_norm (the normalised row is cast to the input type
// before the weight multiply, as Hugging Face does; the residual sum is rounded likewise).
#include "common.cuh"

namespace firp {
namespace {

constexpr int kNormThreads = 256;

// ADD: residual[row] += x[row] in place first, and the statistics use that sum.
template <typename T, bool ADD>
__global__ void __launch_bounds__(kNormThreads) rms_norm_kernel(
    const T* x,                    // [rows, dim], rows x_stride apart
    const int64_t x_stride,        // scalar: elements between rows of x
    T* residual,                   // [rows, dim], rows res_stride apart (ADD only)
    const int64_t res_stride,      // scalar: elements between rows of residual
    const T* __restrict__ weight,  // [dim]
    T* out,                        // [rows, dim], rows out_stride apart; may alias x
    const int64_t out_stride,      // scalar: elements between rows of out
    const int dim, const float eps) {  // d, scalar
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  T* rr = ADD ? residual + row * res_stride : nullptr;
  // The row that gets normalised: x itself, or the residual after the add.
  const T* src = ADD ? rr : xr;

  float sum_sq = 0.f;
  for (int i = threadIdx.x; i < dim; i += kNormThreads) {
    float v = to_float(xr[i]);
    if (ADD) {
      v = round_to<T>(to_float(rr[i]) + v);
      rr[i] = from_float<T>(v);  // read back below by this same thread only
    }
    sum_sq += v * v;
  }
  const float inv_rms = rsqrtf(block_sum(sum_sq) / static_cast<float>(dim) + eps);

  T* o = out + row * out_stride;
  for (int i = threadIdx.x; i < dim; i += kNormThreads) {
    const float normed = round_to<T>(to_float(src[i]) * inv_rms);
    o[i] = from_float<T>(normed * to_float(weight[i]));
  }
}

template <typename T, bool ADD>
cudaError_t run(const void* x, int64_t x_stride, void* residual, int64_t res_stride, const void* weight,
                void* out, int64_t out_stride, int rows, int dim, float eps, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  rms_norm_kernel<T, ADD><<<rows, kNormThreads, 0, stream>>>(
      static_cast<const T*>(x), x_stride, static_cast<T*>(residual), res_stride,
      static_cast<const T*>(weight), static_cast<T*>(out), out_stride, dim, eps);
  return cudaGetLastError();
}

}  // namespace
}  // namespace firp

extern "C" cudaError_t launch_rms_norm(FirpDtype dtype, const void* x, int64_t x_stride, const void* weight,
                                       void* out, int64_t out_stride, int rows, int dim, float eps,
                                       cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run<__nv_bfloat16, false>(x, x_stride, nullptr, 0, weight, out, out_stride, rows, dim, eps,
                                           stream);
  if (dtype == FIRP_F32)
    return firp::run<float, false>(x, x_stride, nullptr, 0, weight, out, out_stride, rows, dim, eps, stream);
  return cudaErrorInvalidValue;
}

extern "C" cudaError_t launch_add_rms_norm(FirpDtype dtype, const void* x, int64_t x_stride, void* residual,
                                           int64_t res_stride, const void* weight, void* out,
                                           int64_t out_stride, int rows, int dim, float eps,
                                           cudaStream_t stream) {
  if (dtype == FIRP_BF16)
    return firp::run<__nv_bfloat16, true>(x, x_stride, residual, res_stride, weight, out, out_stride, rows,
                                          dim, eps, stream);
  if (dtype == FIRP_F32)
    return firp::run<float, true>(x, x_stride, residual, res_stride, weight, out, out_stride, rows, dim, eps,
                                  stream);
  return cudaErrorInvalidValue;
}
