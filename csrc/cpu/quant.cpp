// Native GGUF weights (Q4_0, Q4_1, Q8_0): small-M GEMM y[M, N] = x[M, K] @ W^T straight on the
// blocks. Two definitions, chosen when the weight is packed (the pack's `act`):
// act "float" (firp_engine/quant.py's dequant_linear): each weight is dequantized in registers
//   exactly as gguf does it (d * q, then + m), and each output is one fp32 FMA chain over k in
//   order, the chain of the dense fp32 kernel (linear.cpp): with fp32 x, the same bits as the
//   dense fp32 model. Reads 4.5-8.5 bits per weight instead of 32; costs more instructions.
// act "q8" (quant.py's linear_q8):
//   - each row of x is quantized on its own to 8-bit blocks of 32 (scale dx = amax / 127),
//     so a block's dot product with a weight block is an exact integer, made with AVX2's
//     maddubs (u8 x s8 pairs -> s16) and madd (s16 pairs -> s32): 32 multiply-adds per
//     instruction against 8 for an fp32 FMA, which keeps extra rows cheap; with AVX-512 VNNI
//     one vpdpbusd does 64 (quant_vnni.h);
//   - per output, the blocks are accumulated in K order in fp32:
//       acc = fma(float(isum), d * dx, acc)         (Q4_1 also: acc = fma(m, dx * sum(xq), acc))
//     The integer part is exact whatever the order; the float part is one chain per output in
//     one order, so a row's bits do not depend on M, on its place, or on the thread count
//     (threads split the panels, never K), and the portable code gives the same bits.
//
// Packed layout (pack_quant, made once at load): a uint8 tensor, a 64-byte header of int64
// {MAGIC, kind, N, K, panels, bytes per panel block, act, 0}, then panels of PANEL = 8 output
// rows (zero-padded past N), each K/32 panel blocks in K order:
//   Q4_0: d[8] fp16 | q[128]            Q4_1: d[8] fp16 | m[8] fp16 | q[128]
//   Q8_0: d[8] fp16 | q[256]
// q is cut in 32-byte chunks, byte 4c + t of a chunk belonging to row c of the panel:
//   Q4: chunk i holds GGUF nibble bytes 4i..4i+3 of each row: low nibbles k = 4i + t,
//       high nibbles k = 16 + 4i + t;   Q8: chunk g holds k = 4g + t.
// So one chunk (after a mask or a shift for Q4) times a broadcast of 4 bytes of xq gives the
// 8 rows' partial dots in the 8 int32 lanes, with no horizontal sums; and byte t of each lane
// (a shift) is the 8 rows' weights at one k, what the float path's FMA needs. The bytes per
// weight stay GGUF's (the fp16 scales are converted in the kernel).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

#include "cpu_ops.h"
#include "quant_tiles.h"
#include "quant_vnni.h"

namespace firp {
namespace {

template <Kind KD, int MR, int NP>
inline void run_tile(const Problem& pb, int64_t p, int64_t m0) {
  alignas(32) float c[MR * NP * PANEL];
  const uint8_t* w = pb.panels + p * pb.nb * pb.pb_bytes;
  if (pb.act == ACT_FLOAT) {
    tile_float<KD, MR, NP>(pb, w, m0, c);
  } else {
#if FIRP_QUANT_VNNI
    if constexpr (NP % 2 == 0)
      tile_vnni<KD, MR, NP / 2>(pb, w, m0, c);
    else
#endif
      tile<KD, MR, NP>(pb, w, m0, c);
  }
  const int64_t n0 = p * PANEL, ncols = std::min<int64_t>(NP * PANEL, pb.N - n0);
  store_rows(c, NP * PANEL, MR, ncols, pb.out_f, pb.out_h, m0 * pb.N + n0, pb.N);
}

// Panels per step: independent accumulators for one or two rows, registers for more (16 ymm;
// with VNNI 32 zmm of two panels each, and always an even count so that pairs fill a zmm:
// four panels at MR = 4 are 8 accumulators + 8 integer sums + 4 weight vectors).
template <int MR>
constexpr int panels_per_step() {
  if constexpr (FIRP_QUANT_VNNI) return MR == 1 ? 8 : 4;
  return MR == 1 ? 4 : MR == 2 ? 2 : 1;
}

template <Kind KD, int MR, int NP>
inline void run_panels(const Problem& pb, int64_t p) {
  int64_t m0 = 0;
  for (; m0 + MR <= pb.M; m0 += MR) run_tile<KD, MR, NP>(pb, p, m0);
  switch (pb.M - m0) {  // the last rows
    case 1: run_tile<KD, 1, NP>(pb, p, m0); break;
    case 2: if constexpr (MR > 2) run_tile<KD, 2, NP>(pb, p, m0); break;
    case 3: if constexpr (MR > 3) run_tile<KD, 3, NP>(pb, p, m0); break;
    default: break;
  }
}

template <Kind KD, int MR>
void run_mr(const Problem& pb, int64_t n_panels) {
  constexpr int NP = panels_per_step<MR>();
  const int64_t grain = std::max<int64_t>(1, GRAIN_BYTES / (pb.nb * pb.pb_bytes));
  at::parallel_for(0, n_panels, grain, [&](int64_t p0, int64_t p1) {
    int64_t p = p0;
    for (; p + NP <= p1; p += NP) run_panels<KD, MR, NP>(pb, p);
    for (; p < p1; ++p) run_panels<KD, MR, 1>(pb, p);
  });
}

template <Kind KD>
void run_kind(const Problem& pb, int64_t n_panels) {
  switch (std::min<int64_t>(pb.M, MAX_MR)) {
    case 1: run_mr<KD, 1>(pb, n_panels); break;
    case 2: run_mr<KD, 2>(pb, n_panels); break;
    case 3: run_mr<KD, 3>(pb, n_panels); break;
    default: run_mr<KD, 4>(pb, n_panels); break;
  }
}

const int64_t* header(const at::Tensor& packed) { return ptr<int64_t>(packed); }

}  // namespace

bool is_quant_pack(const at::Tensor& packed) {
  return packed.scalar_type() == at::kByte && packed.dim() == 1 && packed.numel() >= HEADER &&
         packed.is_contiguous() && header(packed)[0] == MAGIC;
}

at::Tensor pack_quant(const at::Tensor& blocks, const std::string& kind_name, const std::string& act_name) {
  check_cpu(blocks, "pack_quant");
  int64_t kind = -1, act = -1;
  for (int64_t k = 0; k < 3; ++k)
    if (kind_name == KINDS[k].name) kind = k;
  for (int64_t a = 0; a < 2; ++a)
    if (act_name == ACT_NAMES[a]) act = a;
  TORCH_CHECK(kind >= 0, "pack_quant: unsupported kind ", kind_name, " (Q4_0, Q4_1, Q8_0)");
  TORCH_CHECK(act >= 0, "pack_quant: unknown act ", act_name, " (q8, float)");
  const KindInfo& info = KINDS[kind];
  TORCH_CHECK(blocks.scalar_type() == at::kByte && blocks.dim() == 2 && blocks.size(1) % info.gguf_bytes == 0,
              "pack_quant: expected uint8 blocks [N, K/32 * ", info.gguf_bytes, "], got ", blocks.scalar_type(),
              " ", blocks.sizes());
  const at::Tensor src = blocks.contiguous();
  const int64_t N = src.size(0), nb = src.size(1) / info.gguf_bytes, K = nb * QK;
  const int64_t np = (N + PANEL - 1) / PANEL, pbb = info.scale_bytes + info.q_bytes;
  at::Tensor out = at::zeros({HEADER + np * nb * pbb}, src.options());
  int64_t* h = ptr<int64_t>(out);
  h[0] = MAGIC, h[1] = kind, h[2] = N, h[3] = K, h[4] = np, h[5] = pbb, h[6] = act;
  const uint8_t* in = ptr<uint8_t>(src);
  uint8_t* panels = ptr<uint8_t>(out) + HEADER;
  const int64_t qoff = info.gguf_bytes - info.q_bytes / PANEL;  // where a GGUF block's quants start
  at::parallel_for(0, np, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      for (int c = 0; c < PANEL && p * PANEL + c < N; ++c) {  // padding rows stay zero
        const uint8_t* row = in + (p * PANEL + c) * nb * info.gguf_bytes;
        for (int64_t b = 0; b < nb; ++b) {
          const uint8_t* g = row + b * info.gguf_bytes;
          uint8_t* dst = panels + (p * nb + b) * pbb;
          std::memcpy(dst + 2 * c, g, 2);                          // d
          if (kind == Q4_1) std::memcpy(dst + 16 + 2 * c, g + 2, 2);  // m
          for (int64_t i = 0; i < info.q_bytes / 32; ++i)          // chunk i: bytes 4i..4i+3 of each row
            std::memcpy(dst + info.scale_bytes + 32 * i + 4 * c, g + qoff + 4 * i, 4);
        }
      }
    }
  });
  return out;
}

at::Tensor quant_linear(const at::Tensor& x_in, const at::Tensor& weight, const at::Tensor& packed) {
  check_cpu(x_in, "linear");
  const int64_t* h = header(packed);
  TORCH_CHECK(h[1] >= 0 && h[1] < 3 && (h[6] == ACT_Q8 || h[6] == ACT_FLOAT) && h[3] % QK == 0 && packed.numel() == HEADER + h[4] * (h[3] / QK) * h[5],
              "linear: a corrupt quantized pack (not made by pack_quant?)");
  const Kind kind = Kind(h[1]);
  const int64_t N = h[2], K = h[3], np = h[4];
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == N && weight.size(1) == K, "linear: the ", KINDS[kind].name,
              " pack is [", N, ", ", K, "] but weight is ", weight.sizes());
  TORCH_CHECK(x_in.size(-1) == K, "linear: x has K=", x_in.size(-1), " but the weight is [", N, ", ", K, "]");
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end());
  out_shape.back() = N;
  const at::Tensor x = rows_contig(x_in.reshape({-1, K}));
  const int64_t M = x.size(0);
  at::Tensor out = at::empty(out_shape, x.options());
  if (M == 0 || N == 0) return out;
  const Act act = Act(h[6]);
  const bool f32 = x.scalar_type() == at::kFloat;
  thread_local QuantX qx;  // reused: no allocation per call once the largest M was seen
  std::vector<float> xf;  // act float with bf16 x: the rows as floats
  if (act == ACT_Q8) {
    dispatch_float(x, "linear", [&](auto t) {
      using XT = decltype(t);
      quantize_x(ptr<XT>(x), x.stride(0), M, K, qx);
    });
  } else if (!f32) {
    dispatch_float(x, "linear", [](auto) {});  // dtype check
    xf.resize(M * K);
    const bf16_t* src = ptr<bf16_t>(x);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xf[m * K + k] = bf16_to_float(src[m * x.stride(0) + k]);
  }
  const float* xrows = act == ACT_Q8 ? nullptr : f32 ? ptr<float>(x) : xf.data();
  const Problem pb{kind, act, ptr<uint8_t>(packed) + HEADER, h[5], K / QK, &qx, xrows,
                   f32 || act == ACT_Q8 ? x.stride(0) : K, M, N, K,
                   f32 ? ptr<float>(out) : nullptr, f32 ? nullptr : ptr<bf16_t>(out)};
  switch (kind) {
    case Q4_0: run_kind<Q4_0>(pb, np); break;
    case Q4_1: run_kind<Q4_1>(pb, np); break;
    case Q8_0: run_kind<Q8_0>(pb, np); break;
  }
  return out;
}

}  // namespace firp
