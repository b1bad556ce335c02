// AMX tiles for files compiled with -mamx-tile -mamx-bf16 (PYXF_AMX): blocks of 32 x 32 fp32
// results from bf16 operands on the tile multiply unit.
//
// tdpbf16ps takes an A tile of 16 rows x 32 bf16 depths (64 bytes a row), a B tile of 16 depth
// pairs x 16 columns x 2 bf16 (64 bytes a pair row) and adds their product to a 16 x 16 fp32 C
// tile: C[m][n] += A[m][2i] B[i][n][0] + A[m][2i + 1] B[i][n][1]. B is the layout of pyxf's pair
// panels ([depth / 2][columns][2]), so panels packed for vdpbf16ps are B tiles as they stand. A
// block of 32 x 32 uses all eight tiles: C 0-3 (rows 0-15 x columns 0-15, 0-15 x 16-31, 16-31 x
// 0-15, 16-31 x 16-31), A 4-5 (rows 0-15, 16-31), B 6-7 (columns 0-15, 16-31); each step of 32
// depths loads two A and two B tiles and makes four products. (The intrinsics take literal tile
// numbers.)
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace pyxf::kernels::amx {

constexpr int kBlock = 32;  // rows and columns of a block
constexpr int kStep = 32;   // depths of a step

// Palette 1, every tile 16 rows x 64 bytes.
struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, 64, 64, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, 16, 16};
};

// Tiles are per thread: configured for a scope of the calling thread's products and released
// after it (a thread holding tile state pays for saving it at each context switch). About 50 ns.
class TileScope {
 public:
  TileScope() {
    static const TileConfig config;
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

inline void zero_block() {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
}

// Every row of the block's C tiles = row[0, 32) (a tile load of stride 0 reads one row 16 times).
inline void load_row_block(const float* row) {
  _tile_loadd(0, row, 0);
  _tile_loadd(1, row + 16, 0);
  _tile_loadd(2, row, 0);
  _tile_loadd(3, row + 16, 0);
}

// The block's C tiles from / to c[32][32] (ldc floats between rows).
inline void load_block(const float* c, long ldc) {
  const long stride = ldc * (long)sizeof(float);
  _tile_loadd(0, c, stride);
  _tile_loadd(1, c + 16, stride);
  _tile_loadd(2, c + 16 * ldc, stride);
  _tile_loadd(3, c + 16 * ldc + 16, stride);
}
inline void store_block(float* c, long ldc) {
  const long stride = ldc * (long)sizeof(float);
  _tile_stored(0, c, stride);
  _tile_stored(1, c + 16, stride);
  _tile_stored(2, c + 16 * ldc, stride);
  _tile_stored(3, c + 16 * ldc + 16, stride);
}

// C += a[32 rows][steps x 32 depths] b: a's rows are a_ld elements apart; b's pair rows (16 columns
// x 2 a tile) b_ld elements apart, columns 16-31 b_half elements after columns 0-15.
inline void multiply_steps(const uint16_t* a, long a_ld, const uint16_t* b, long b_ld, long b_half, int steps) {
  const long a_stride = a_ld * (long)sizeof(uint16_t), b_stride = b_ld * (long)sizeof(uint16_t);
  for (int s = 0; s < steps; ++s) {
    const uint16_t* as = a + (long)s * kStep;
    const uint16_t* bs = b + (long)s * (kStep / 2) * b_ld;
    _tile_loadd(4, as, a_stride);
    _tile_loadd(5, as + 16 * a_ld, a_stride);
    _tile_loadd(6, bs, b_stride);
    _tile_loadd(7, bs + b_half, b_stride);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
  }
}

}  // namespace pyxf::kernels::amx
