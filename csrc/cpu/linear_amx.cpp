// AMX-BF16 small-M GEMM (the `amx` build only): y[M, N] = x[M, K] . W^T for bf16 x and W.
//
// Why: with AVX-512-BF16 a row costs one vdpbf16ps per 16 columns x 2 k-values, so 16 rows cost
// ~16x one row once the weights are in cache; one AMX tdpbf16ps multiplies a 16-row x 32-k tile
// of x by a 32-k x 16-column tile of W, so rows up to 16 (and, with four accumulator tiles, up
// to 64) ride along with the weight stream nearly for free.
//
// The weights use pack_linear's bf16 layout unchanged ([Np, K/2, 32]: a panel's 16 k-pairs x 16
// columns x 2 values are one 1 KiB B tile, rows 64 bytes apart), so there is no second copy.
// x is copied into a zero-padded [ceil(M/16)*16, K] buffer (A tiles always load 16 rows).
//
// Row invariance (csrc/cpu/README.md): every output element is one accumulation over the
// K-chunks in order, in a tile row of its own; threads split the panels, never K; M = 1 and
// M = 64 issue the same tile instructions for a row. This path is used when K % 32 == 0 (every
// weight of the default model); other K run the AVX-512-BF16 kernel, for every M alike.
//
// NOT RUN on the development machines so far (no AMX there): compiled everywhere (the amx
// build needs only compiler support), and the cpu backend checks it against the avx512bf16
// variant at load before using it (firp_engine/backends/cpu.py).
#if defined(__AMX_BF16__) && defined(__AMX_TILE__)
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "cpu_ops.h"

namespace firp {

bool linear_amx(const at::Tensor& x, const at::Tensor& packed, int64_t N, at::Tensor& out) {
  using namespace amx;
  const int64_t M = x.size(0), K = x.size(1);
  if (x.scalar_type() != at::kBFloat16 || K % KCHUNK != 0) return false;
  const int64_t Mpad = (M + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS, Np = packed.size(0);
  std::vector<bf16_t> xp(size_t(Mpad * K), 0);  // A tiles load 16 rows: pad with zero rows
  for (int64_t m = 0; m < M; ++m)
    std::memcpy(xp.data() + m * K, ptr<bf16_t>(x) + m * x.stride(0), size_t(K) * sizeof(bf16_t));
  const bf16_t* w = ptr<bf16_t>(packed);
  bf16_t* y = ptr<bf16_t>(out);
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (K * 32));  // ~64 KiB of weights
  for (int64_t m0 = 0; m0 < Mpad; m0 += MAX_RB * TILE_ROWS) {
    const int rb = int(std::min<int64_t>(MAX_RB, (Mpad - m0) / TILE_ROWS));
    const int64_t rows = std::min<int64_t>(M - m0, int64_t(rb) * TILE_ROWS);
    at::parallel_for(0, Np, grain, [&](int64_t p0, int64_t p1) {
      configure_tiles();  // tile state is per thread
      panels(w, xp.data() + m0 * K, K, rb, rows, p0, p1, N, y + m0 * N);
      _tile_release();
    });
  }
  return true;
}

}  // namespace firp
#endif
