// Small-M matmul (decode and tree steps multiply 1-64 rows by a weight matrix): the work is
// streaming the weights once, so they are repacked at load time into 16-column panels that
// the kernel reads strictly sequentially, and every loaded weight vector is used for up to
// four rows of x before the next is loaded.
//
// Packed layouts (16 output columns per panel, zero-padded at the edges):
//   bf16: [Np, ceil(K/2), 32]  element (p, kk, 2c + j) = W[16p + c, 2kk + j]
//         one 64-byte row = 16 columns x 2 k-values, the operand order of vdpbf16ps;
//         without AVX512_BF16 the pairs are split into two float vectors by a shift/mask.
//   fp32: [Np, K, 16]          element (p, k, c) = W[16p + c, k]
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "cpu_ops.h"

namespace firp {
namespace {

using namespace simd;
constexpr int PANEL = 16;        // output columns per panel
constexpr int NV = PANEL / W;    // vectors per panel row (1 with AVX-512, 2 with AVX2)
constexpr int MAX_MR = 4;        // rows of x per register tile
constexpr int64_t GRAIN_BYTES = 1 << 16;  // weight bytes below which one thread does the work

#if defined(__AVX512BF16__)
// x rows as bf16 pairs (one uint32 per k-pair), broadcast straight into vdpbf16ps.
using XPair = uint32_t;
constexpr int X_PER_PAIR = 1;
#else
using XPair = float;  // x rows as floats: the pair trick needs one broadcast per k
constexpr int X_PER_PAIR = 2;
#endif

// c[MR][NP*16] = x[MR, 2*K2] . panels[p, :, :] for NP consecutive bf16 panels.
template <int MR, int NP>
inline void tile_bf16(const bf16_t* w,    // [NP panels of K2 * 32], panel stride pstride
                      int64_t pstride,
                      const XPair* x,     // [MR, ldx]
                      int64_t ldx, int64_t K2,
                      float* c) {         // [MR, NP * 16]
#if defined(__AVX512BF16__)
  __m512 acc[MR][NP];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) acc[r][p] = _mm512_setzero_ps();
  for (int64_t kk = 0; kk < K2; ++kk) {
    FIRP_UNROLL for (int p = 0; p < NP; ++p) __builtin_prefetch(w + (NP + p) * pstride + kk * 32);
    FIRP_UNROLL for (int p = 0; p < NP; ++p) {
      __m512bh wv = (__m512bh)_mm512_loadu_si512(w + p * pstride + kk * 32);
      FIRP_UNROLL for (int r = 0; r < MR; ++r)
        acc[r][p] = _mm512_dpbf16_ps(acc[r][p], wv, (__m512bh)_mm512_set1_epi32(int(x[r * ldx + kk])));
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int p = 0; p < NP; ++p) _mm512_storeu_ps(c + r * NP * PANEL + p * PANEL, acc[r][p]);
#else
  constexpr int NW = NP * NV;  // weight vectors per k-pair
  vf acc[MR][NW];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int v = 0; v < NW; ++v) acc[r][v] = zero();
  for (int64_t kk = 0; kk < K2; ++kk) {
    const bf16_t* wk = w + kk * 32;
    // The next panels (the next step of this thread) stream in while these are computed.
    FIRP_UNROLL for (int p = 0; p < NP; ++p) __builtin_prefetch(wk + (NP + p) * pstride);
    if constexpr (NW <= 2) {
      // Few weight vectors: convert them all, then one broadcast per row and k
      // (AVX2, 4 rows: 8 accumulators + 4 weights + 1 broadcast registers).
      vf even[NW], odd[NW];
      FIRP_UNROLL for (int v = 0; v < NW; ++v) load_pairs(wk + (v / NV) * pstride + (v % NV) * 2 * W, even[v], odd[v]);
      FIRP_UNROLL for (int r = 0; r < MR; ++r) {
        const vf x0 = set1(x[r * ldx + 2 * kk]);
        FIRP_UNROLL for (int v = 0; v < NW; ++v) acc[r][v] = fma(even[v], x0, acc[r][v]);
        const vf x1 = set1(x[r * ldx + 2 * kk + 1]);
        FIRP_UNROLL for (int v = 0; v < NW; ++v) acc[r][v] = fma(odd[v], x1, acc[r][v]);
      }
    } else {
      // Many weight vectors (one or two rows): keep the row broadcasts, stream the weights.
      vf x0[MR], x1[MR];
      FIRP_UNROLL for (int r = 0; r < MR; ++r) {
        x0[r] = set1(x[r * ldx + 2 * kk]);
        x1[r] = set1(x[r * ldx + 2 * kk + 1]);
      }
      FIRP_UNROLL for (int v = 0; v < NW; ++v) {
        vf even, odd;
        load_pairs(wk + (v / NV) * pstride + (v % NV) * 2 * W, even, odd);
        FIRP_UNROLL for (int r = 0; r < MR; ++r) {
          acc[r][v] = fma(even, x0[r], acc[r][v]);
          acc[r][v] = fma(odd, x1[r], acc[r][v]);
        }
      }
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int v = 0; v < NW; ++v) store(c + r * NP * PANEL + v * W, acc[r][v]);
#endif
}

// c[MR][NP*16] = x[MR, K] . panels for NP consecutive fp32 panels.
template <int MR, int NP>
inline void tile_f32(const float* w,      // [NP panels of K * 16], panel stride pstride
                     int64_t pstride,
                     const float* x,      // [MR, ldx]
                     int64_t ldx, int64_t K,
                     float* c) {          // [MR, NP * 16]
  vf acc[MR][NP * NV];
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int v = 0; v < NP * NV; ++v) acc[r][v] = zero();
  constexpr int NW = NP * NV;
  for (int64_t k = 0; k < K; ++k) {
    const float* wk = w + k * PANEL;
    FIRP_UNROLL for (int p = 0; p < NP; ++p) __builtin_prefetch(wk + (NP + p) * pstride);  // as in tile_bf16
    if constexpr (NW <= 2) {  // register use as in tile_bf16
      vf wv[NW];
      FIRP_UNROLL for (int v = 0; v < NW; ++v) wv[v] = load(wk + (v / NV) * pstride + (v % NV) * W);
      FIRP_UNROLL for (int r = 0; r < MR; ++r) {
        const vf xb = set1(x[r * ldx + k]);
        FIRP_UNROLL for (int v = 0; v < NW; ++v) acc[r][v] = fma(wv[v], xb, acc[r][v]);
      }
    } else {
      vf xb[MR];
      FIRP_UNROLL for (int r = 0; r < MR; ++r) xb[r] = set1(x[r * ldx + k]);
      FIRP_UNROLL for (int v = 0; v < NW; ++v) {
        const vf wv = load(wk + (v / NV) * pstride + (v % NV) * W);
        FIRP_UNROLL for (int r = 0; r < MR; ++r) acc[r][v] = fma(wv, xb[r], acc[r][v]);
      }
    }
  }
  FIRP_UNROLL for (int r = 0; r < MR; ++r)
    FIRP_UNROLL for (int v = 0; v < NP * NV; ++v) store(c + r * NP * PANEL + v * W, acc[r][v]);
}

// Everything one call needs, in the element type of the weights (WT) and of x (XT).
template <typename WT, typename XT>
struct Problem {
  const WT* packed;   // panels, see the layout above
  int64_t pstride;    // elements per panel
  int64_t kdim;       // K2 pairs (bf16) or K (fp32): the loop length of a tile
  const XT* x;        // [M, ldx]
  int64_t ldx;
  int64_t M, N;
  float* out_f;       // [M, N] output, one of the two is set
  bf16_t* out_h;
};

template <int MR, int NP, typename WT, typename XT>
inline void run_tile(const Problem<WT, XT>& pb, int64_t p, int64_t m0) {
  alignas(64) float c[MR * NP * PANEL];
  const WT* w = pb.packed + p * pb.pstride;
  const XT* x = pb.x + m0 * pb.ldx;
  if constexpr (std::is_same_v<WT, float>) {
    tile_f32<MR, NP>(w, pb.pstride, x, pb.ldx, pb.kdim, c);
  } else {
    tile_bf16<MR, NP>(w, pb.pstride, x, pb.ldx, pb.kdim, c);
  }
  const int64_t n0 = p * PANEL;
  const int64_t ncols = std::min<int64_t>(NP * PANEL, pb.N - n0);
  store_rows(c, NP * PANEL, MR, ncols, pb.out_f, pb.out_h, m0 * pb.N + n0, pb.N);
}

// Panels per step for a row tile of MR rows: enough independent accumulators to hide the
// FMA latency, few enough to stay in registers (16 vector registers with AVX2, 32 with AVX-512).
template <int MR>
constexpr int panels_per_step() {
  if constexpr (W == 16) return 4;
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

// All rows of x (tiles of up to MR rows) times the NP panels starting at p.
template <int MR, int NP, typename WT, typename XT>
inline void run_panels(const Problem<WT, XT>& pb, int64_t p) {
  int64_t m0 = 0;
  for (; m0 + MR <= pb.M; m0 += MR) run_tile<MR, NP>(pb, p, m0);
  switch (pb.M - m0) {  // the last rows: MR > 1 only
    case 1: run_tile<1, NP>(pb, p, m0); break;
    case 2: if constexpr (MR > 2) run_tile<2, NP>(pb, p, m0); break;
    case 3: if constexpr (MR > 3) run_tile<3, NP>(pb, p, m0); break;
    default: break;
  }
}

template <int MR, typename WT, typename XT>
void run_linear_mr(const Problem<WT, XT>& pb, int64_t n_panels) {
  constexpr int NP = panels_per_step<MR>();
  const int64_t panel_bytes = pb.pstride * int64_t(sizeof(WT));
  const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / panel_bytes);
  at::parallel_for(0, n_panels, grain, [&](int64_t p0, int64_t p1) {
    int64_t p = p0;
    for (; p + NP <= p1; p += NP) run_panels<MR, NP>(pb, p);
    for (; p < p1; ++p) run_panels<MR, 1>(pb, p);
  });
}

template <typename WT, typename XT>
void run_linear(const Problem<WT, XT>& pb, int64_t n_panels) {
  switch (std::min<int64_t>(pb.M, MAX_MR)) {
    case 1: run_linear_mr<1>(pb, n_panels); break;
    case 2: run_linear_mr<2>(pb, n_panels); break;
    case 3: run_linear_mr<3>(pb, n_panels); break;
    default: run_linear_mr<4>(pb, n_panels); break;
  }
}

// x [M, K] bf16 -> what the bf16 tile reads: zero-padded to an even K, as floats or pairs.
std::vector<XPair> prepare_x_bf16(const bf16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t K2) {
  std::vector<XPair> buf(M * K2 * X_PER_PAIR, XPair(0));
  for (int64_t m = 0; m < M; ++m) {
    const bf16_t* src = x + m * ldx;
#if defined(__AVX512BF16__)
    std::memcpy(buf.data() + m * K2, src, K * sizeof(bf16_t));  // K odd: the last pair's high half stays 0
#else
    float* dst = buf.data() + m * 2 * K2;
    for (int64_t k = 0; k < K; ++k) dst[k] = bf16_to_float(src[k]);
#endif
  }
  return buf;
}

void check_linear_args(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& packed) {
  check_cpu(x, "linear");
  TORCH_CHECK(weight.dim() == 2, "linear: weight must be [N, K], got ", weight.sizes());
  TORCH_CHECK(x.size(-1) == weight.size(1), "linear: x has K=", x.size(-1), " but weight is ", weight.sizes());
  TORCH_CHECK(x.scalar_type() == packed.scalar_type(), "linear: x is ", x.scalar_type(), " but the weight is ",
              packed.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1), Np = (N + PANEL - 1) / PANEL;
  const bool ok = packed.is_contiguous() &&
                  (packed.scalar_type() == at::kBFloat16 ? packed.sizes() == at::IntArrayRef{Np, (K + 1) / 2, 32}
                                                          : packed.sizes() == at::IntArrayRef{Np, K, PANEL});
  TORCH_CHECK(ok, "linear: `packed` was not made by the cpu backend's pack_linear for this weight");
}

}  // namespace

at::Tensor pack_linear(const at::Tensor& weight) {
  check_cpu(weight, "pack_linear");
  TORCH_CHECK(weight.dim() == 2, "pack_linear: weight must be [N, K], got ", weight.sizes());
  dispatch_float(weight, "pack_linear", [](auto) {});  // dtype check
  const int64_t N = weight.size(0), K = weight.size(1), Np = (N + PANEL - 1) / PANEL;
  if (weight.scalar_type() == at::kBFloat16) {  // k-pairs as int32: [Np, 16, K2] -> [Np, K2, 16]
    const int64_t K2 = (K + 1) / 2;
    at::Tensor padded = at::zeros({Np * PANEL, 2 * K2}, weight.options());
    padded.narrow(0, 0, N).narrow(1, 0, K).copy_(weight);
    const at::Tensor pairs = padded.view(at::kInt).view({Np, PANEL, K2});
    return pairs.permute({0, 2, 1}).contiguous().view(at::kBFloat16).view({Np, K2, 2 * PANEL});
  }
  at::Tensor padded = at::zeros({Np * PANEL, K}, weight.options());  // [Np, 16, K] -> [Np, K, 16]
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({Np, PANEL, K}).permute({0, 2, 1}).contiguous();
}

at::Tensor linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& packed) {
  if (is_quant_pack(packed)) return quant_linear(x_in, weight, packed);  // GGUF blocks: quant.cpp
  check_linear_args(x_in, weight, packed);
  const int64_t N = weight.size(0), K = weight.size(1), Np = (N + PANEL - 1) / PANEL;
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  const at::Tensor x = rows_contig(x_in.reshape({-1, K}));
  const int64_t M = x.size(0);
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
  if (linear_amx(x, packed, N, out)) return out;  // bf16 with K % 32 == 0 (linear_amx.cpp)
#endif
  if (x.scalar_type() == at::kFloat) {
    Problem<float, float> pb{ptr<float>(packed), K * PANEL, K, ptr<float>(x), x.stride(0), M, N,
                             ptr<float>(out), nullptr};
    run_linear(pb, Np);
  } else {
    const int64_t K2 = (K + 1) / 2;
    std::vector<XPair> xb = prepare_x_bf16(ptr<bf16_t>(x), x.stride(0), M, K, K2);
    Problem<bf16_t, XPair> pb{ptr<bf16_t>(packed), K2 * 32, K2, xb.data(), K2 * X_PER_PAIR, M, N,
                              nullptr, ptr<bf16_t>(out)};
    run_linear(pb, Np);
  }
  return out;
}

// ------------------------------------------------------------------ firp_project
// y[j, col] = h[j, :] . Wflat[col, :] + b[col] with Wflat = weight viewed [k*d, d]: the output
// viewed [n, k*d] is exactly the pseudo rows [n*k, d]. The weight is not packed (it is used
// once per step), so this is a dot-product kernel over contiguous weight rows.
namespace {

template <int MR, int NC, typename WT>
inline void dot_tile(const float* h,   // [MR, K] fp32 rows, ld = K
                     const WT* w,      // [NC, K] weight rows, ld = K
                     int64_t K, float* c) {  // [MR, NC]
  vf acc[MR][NC];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NC; ++j) acc[r][j] = zero();
  int64_t k = 0;
  for (; k + W <= K; k += W) {
    vf hv[MR];
    for (int r = 0; r < MR; ++r) hv[r] = load(h + r * K + k);
    for (int j = 0; j < NC; ++j) {
      vf wv = load(w + j * K + k);
      for (int r = 0; r < MR; ++r) acc[r][j] = fma(hv[r], wv, acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r) {
    for (int j = 0; j < NC; ++j) {
      float s = hsum(acc[r][j]);
      for (int64_t t = k; t < K; ++t) s += h[r * K + t] * to_float(w[j * K + t]);
      c[r * NC + j] = s;
    }
  }
}

template <int NC, typename WT>
inline void dot_cols(const float* h, int64_t n, const WT* w, int64_t K, float* y, int64_t ldy) {
  constexpr int MR = 3;  // 3 x 4 accumulators + 3 rows of h + 1 weight vector fit 16 registers
  float c[MR * NC];
  for (int64_t j0 = 0; j0 < n; j0 += MR) {
    const int mr = int(std::min<int64_t>(MR, n - j0));
    if (mr == 3) dot_tile<3, NC>(h + j0 * K, w, K, c);
    else if (mr == 2) dot_tile<2, NC>(h + j0 * K, w, K, c);
    else dot_tile<1, NC>(h + j0 * K, w, K, c);
    for (int r = 0; r < mr; ++r)
      for (int j = 0; j < NC; ++j) y[(j0 + r) * ldy + j] = c[r * NC + j];
  }
}

}  // namespace

at::Tensor firp_project(const at::Tensor& h_in, const at::Tensor& weight_in, const OptTensor& bias_in,
                        const OptTensor& out) {
  check_cpu(h_in, "firp_project");
  TORCH_CHECK(h_in.dim() == 2 && weight_in.dim() == 3 && weight_in.size(1) == h_in.size(1) &&
                  weight_in.size(2) == h_in.size(1),
              "firp_project: expected h [n, d] and weight [k, d, d], got ", h_in.sizes(), " and ",
              weight_in.sizes());
  const int64_t n = h_in.size(0), d = h_in.size(1), k = weight_in.size(0), N = k * d;
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor h = h_in.to(at::kFloat).contiguous();
  at::Tensor bias;
  if (bias_in) {
    TORCH_CHECK(bias_in->numel() == N, "firp_project: bias must be [k, d], got ", bias_in->sizes());
    bias = bias_in->to(at::kFloat).contiguous();
  }
  // fp32 result [n, k*d], rounded into the output dtype at the end (as the reference does).
  at::Tensor y = at::empty({n, N}, h.options());
  dispatch_float(weight, "firp_project", [&](auto tag) {
    using WT = decltype(tag);
    const WT* w = ptr<WT>(weight);
    const float* hp = ptr<float>(h);
    float* yp = ptr<float>(y);
    constexpr int NC = 4;
    const int64_t groups = (N + NC - 1) / NC;
    at::parallel_for(0, groups, 16, [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t c0 = g * NC;
        if (c0 + NC <= N) dot_cols<NC>(hp, n, w + c0 * d, d, yp + c0, N);
        else
          for (int64_t c = c0; c < N; ++c) dot_cols<1>(hp, n, w + c * d, d, yp + c, N);
      }
    });
  });
  if (bias.defined()) y.add_(bias.view({1, N}));
  at::Tensor res = y.view({n * k, d}).to(h_in.scalar_type());
  if (out) {
    out->copy_(res);
    return *out;
  }
  return res;
}

}  // namespace firp
