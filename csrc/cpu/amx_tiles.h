// The tile core of the AMX-BF16 GEMM (linear_amx.cpp), free of torch so that
// tests/amx_emulated.cpp can run it with the tile instructions emulated in software: the
// machines this project has run on so far have no AMX.
#pragma once

#include <algorithm>
#include <cstdint>

#include "simd.h"

namespace firp::amx {

constexpr int TILE_ROWS = 16;  // rows of x per A tile, k-pairs per B tile
constexpr int TILE_COLS = 16;  // fp32 columns per C tile = one pack_linear panel
constexpr int KCHUNK = 32;     // bf16 k-values per tile row (64 bytes)
constexpr int MAX_RB = 4;      // row blocks of 16 per pass: tiles 0-3 accumulate, 4 = A, 5 = B

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

inline void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 6; ++t) {
    cfg.colsb[t] = 64;  // C: 16 fp32, A: 32 bf16, B: 16 columns x 2 bf16
    cfg.rows[t] = TILE_ROWS;
  }
  _tile_loadconfig(&cfg);
}

// c[RB*16, 16] (row stride 16 floats) = x rows [RB*16, K] . panel^T, in K-chunk order.
// Tile numbers are immediates: one instantiation per row-block count.
template <int RB>
void panel_tiles(const bf16_t* panel, const bf16_t* x, int64_t K, float* c) {
  const int64_t x_stride = K * int64_t(sizeof(bf16_t));
  _tile_zero(0);
  if constexpr (RB > 1) _tile_zero(1);
  if constexpr (RB > 2) _tile_zero(2);
  if constexpr (RB > 3) _tile_zero(3);
  for (int64_t k = 0; k < K; k += KCHUNK) {
    _tile_loadd(5, panel + (k / 2) * 2 * TILE_COLS, 64);  // k-pairs k/2 .. k/2+15 of the panel
    _tile_loadd(4, x + k, x_stride);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (RB > 1) {
      _tile_loadd(4, x + 16 * K + k, x_stride);
      _tile_dpbf16ps(1, 4, 5);
    }
    if constexpr (RB > 2) {
      _tile_loadd(4, x + 32 * K + k, x_stride);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (RB > 3) {
      _tile_loadd(4, x + 48 * K + k, x_stride);
      _tile_dpbf16ps(3, 4, 5);
    }
  }
  _tile_stored(0, c, 64);
  if constexpr (RB > 1) _tile_stored(1, c + 16 * TILE_COLS, 64);
  if constexpr (RB > 2) _tile_stored(2, c + 32 * TILE_COLS, 64);
  if constexpr (RB > 3) _tile_stored(3, c + 48 * TILE_COLS, 64);
}

// Rows [0, rows) of y [*, N] (bf16, row stride N) for panels [p0, p1), from the padded x rows
// xs [rb*16, K] and the packed weights w [Np, K/2, 32]. The caller configured the tiles.
inline void panels(const bf16_t* w, const bf16_t* xs, int64_t K, int rb, int64_t rows, int64_t p0, int64_t p1,
                   int64_t N, bf16_t* y) {
  alignas(64) float c[MAX_RB * TILE_ROWS * TILE_COLS];
  for (int64_t p = p0; p < p1; ++p) {
    const bf16_t* panel = w + p * (K / 2) * 2 * TILE_COLS;
    switch (rb) {
      case 1: panel_tiles<1>(panel, xs, K, c); break;
      case 2: panel_tiles<2>(panel, xs, K, c); break;
      case 3: panel_tiles<3>(panel, xs, K, c); break;
      default: panel_tiles<4>(panel, xs, K, c); break;
    }
    const int64_t n0 = p * TILE_COLS, cols = std::min<int64_t>(TILE_COLS, N - n0);
    store_rows(c, TILE_COLS, rows, cols, nullptr, y, n0, N);
  }
}

}  // namespace firp::amx
