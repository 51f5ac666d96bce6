// The AMX GEMM's tile core (csrc/cpu/amx_tiles.h) with the tile instructions emulated in
// software: tiles are 1 KiB arrays, tdpbf16ps is the documented sum over bf16 pairs in fp32.
// This checks the kernel's addressing (panels, k-chunks, row blocks, padding, edges) on
// machines without AMX; tests/test_amx_emulated.py compiles and runs it. Exit 0 = all good.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/simd.h"

namespace emu {
alignas(64) unsigned char tiles[8][16][64];

inline void zero(int t) { std::memset(tiles[t], 0, sizeof(tiles[t])); }
inline void load(int t, const void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(tiles[t][r], static_cast<const char*>(base) + r * stride, 64);
}
inline void store(int t, void* base, int64_t stride) {
  for (int r = 0; r < 16; ++r) std::memcpy(static_cast<char*>(base) + r * stride, tiles[t][r], 64);
}
inline float bf(const unsigned char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return firp::bf16_to_float(h);
}
// C[m][n] += sum_k A[m][2k] * B[k][2n] + A[m][2k+1] * B[k][2n+1], C fp32 16x16
inline void dpbf16(int c, int a, int b) {
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      float acc;
      std::memcpy(&acc, &tiles[c][m][4 * n], 4);
      for (int k = 0; k < 16; ++k)
        acc += bf(&tiles[a][m][4 * k]) * bf(&tiles[b][k][4 * n]) + bf(&tiles[a][m][4 * k + 2]) * bf(&tiles[b][k][4 * n + 2]);
      std::memcpy(&tiles[c][m][4 * n], &acc, 4);
    }
}
}  // namespace emu

#define _tile_loadconfig(cfg) ((void)(cfg))
#define _tile_release() ((void)0)
#define _tile_zero(t) emu::zero(t)
#define _tile_loadd(t, base, stride) emu::load(t, base, stride)
#define _tile_stored(t, base, stride) emu::store(t, base, stride)
#define _tile_dpbf16ps(c, a, b) emu::dpbf16(c, a, b)

#include "cpu/amx_tiles.h"

using firp::bf16_t;

// pack_linear's bf16 layout: [Np, K/2, 32], element (p, kk, 2c + j) = W[16p + c, 2kk + j]
std::vector<bf16_t> pack(const std::vector<bf16_t>& w, int64_t N, int64_t K) {
  const int64_t Np = (N + 15) / 16, K2 = K / 2;
  std::vector<bf16_t> out(size_t(Np * K2 * 32), 0);
  for (int64_t p = 0; p < Np; ++p)
    for (int64_t kk = 0; kk < K2; ++kk)
      for (int c = 0; c < 16; ++c)
        for (int j = 0; j < 2; ++j)
          if (16 * p + c < N) out[size_t((p * K2 + kk) * 32 + 2 * c + j)] = w[size_t((16 * p + c) * K + 2 * kk + j)];
  return out;
}

// linear_amx's driver, single-threaded: row groups of up to 64, x padded to 16-row blocks.
std::vector<bf16_t> gemm(const std::vector<bf16_t>& packed, const std::vector<bf16_t>& x, int64_t M, int64_t N,
                         int64_t K) {
  using namespace firp::amx;
  const int64_t Mpad = (M + 15) / 16 * 16, Np = (N + 15) / 16;
  std::vector<bf16_t> xp(size_t(Mpad * K), 0), y(size_t(M * N), 0xFFFF);  // poisoned: NaN bits
  std::copy(x.begin(), x.end(), xp.begin());
  for (int64_t m0 = 0; m0 < Mpad; m0 += MAX_RB * TILE_ROWS) {
    const int rb = int(std::min<int64_t>(MAX_RB, (Mpad - m0) / TILE_ROWS));
    const int64_t rows = std::min<int64_t>(M - m0, int64_t(rb) * TILE_ROWS);
    configure_tiles();
    panels(packed.data(), xp.data() + m0 * K, K, rb, rows, 0, Np, N, y.data() + m0 * N);
  }
  return y;
}

int main() {
  std::mt19937 rng(0);
  std::normal_distribution<float> nd;
  int failures = 0;
  for (auto [N, K] : {std::pair<int64_t, int64_t>{40, 96}, {16, 32}, {192, 576}, {7, 64}}) {
    std::vector<bf16_t> w(size_t(N * K));
    for (auto& v : w) v = firp::float_to_bf16(nd(rng));
    const auto packed = pack(w, N, K);
    const int64_t Mmax = 70;
    std::vector<bf16_t> x(size_t(Mmax * K));
    for (auto& v : x) v = firp::float_to_bf16(nd(rng));
    const auto full = gemm(packed, x, Mmax, N, K);
    for (int64_t m = 0; m < Mmax; ++m)
      for (int64_t n = 0; n < N; ++n) {  // against a plain fp32 dot product
        double ref = 0;
        for (int64_t k = 0; k < K; ++k)
          ref += double(firp::bf16_to_float(x[size_t(m * K + k)])) * firp::bf16_to_float(w[size_t(n * K + k)]);
        const float got = firp::bf16_to_float(full[size_t(m * N + n)]);
        if (!(std::fabs(got - ref) <= 1e-2 * (1 + std::fabs(ref)))) {
          if (failures++ < 5) std::printf("N=%ld K=%ld row %ld col %ld: %g vs %g\n", long(N), long(K), long(m), long(n), got, ref);
        }
      }
    for (int64_t M : {1, 2, 15, 16, 17, 33, 64, 65}) {  // a row alone or among others: same bits
      const auto part = gemm(packed, std::vector<bf16_t>(x.begin(), x.begin() + M * K), M, N, K);
      if (std::memcmp(part.data(), full.data(), size_t(M * N) * sizeof(bf16_t)) != 0 && failures++ < 5)
        std::printf("N=%ld K=%ld: the first %ld rows differ from the same rows inside M=70\n", long(N), long(K), long(M));
    }
  }
  std::printf(failures ? "FAILED (%d)\n" : "ok\n", failures);
  return failures ? 1 : 0;
}
