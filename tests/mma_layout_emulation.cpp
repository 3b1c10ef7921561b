// Host emulation of the ldmatrix.x4 operand loads of the tensor-core kernels: the lane offsets
// of csrc/cuda/mma.cuh (the very functions the kernels call) drive an emulated ldmatrix (PTX
// ISA semantics), and every lane's registers are checked against the m16n8k16 fragment layouts
// of the PTX ISA for the logical matrix each kernel step means. Also checked: every lane address
// is 16-byte aligned and the 8 rows of each matrix hit 32 distinct shared-memory banks.
// Built and run by tests/test_mma_layout.py; prints "ok <checks>" or the first mismatch.
#include <array>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <vector>

#include "cuda/mma.cuh"

namespace {

using vsd_ext::cuda::ldsm_a_offset;
using vsd_ext::cuda::ldsm_b_kn_offset;
using vsd_ext::cuda::ldsm_b_nk_offset;

// A row-major shared-memory tile whose element at offset o holds o itself (so a value names the
// element it was read from).
struct Tile {
  int rows, lds;
  uint32_t at(int row, int col) const { return static_cast<uint32_t>(row * lds + col); }
};

// regs[lane][i][h]: half h (0 = low) of register i of `lane` after ldmatrix.x4 (.trans).
using Regs = std::vector<std::array<std::array<uint32_t, 2>, 4>>;

long checks = 0;

bool fail(const char* what, int lane, int reg, int half, uint32_t got, uint32_t want) {
  std::printf("%s: lane %d register %d half %d holds element %u, want %u\n", what, lane, reg, half,
              got, want);
  return false;
}

// ldmatrix.x4 as the PTX ISA defines it: lane l gives the address (element offset) of row l % 8
// of matrix l / 8; plain, lane (g, t) gets (row g, columns 2t, 2t+1) of matrix i in register i,
// with .trans (rows 2t, 2t+1, column g).
bool ldmatrix_x4(const std::function<int(int)>& offset, bool trans, const char* what, Regs& regs) {
  regs.assign(32, {});
  for (int m = 0; m < 4; ++m) {
    int rows[8];
    unsigned banks = 0;
    for (int r = 0; r < 8; ++r) {
      rows[r] = offset(8 * m + r);
      if (rows[r] % 8 != 0) {  // 8 16-bit elements: the row must start 16-byte aligned
        std::printf("%s: lane %d addresses element %d, not 16-byte aligned\n", what, 8 * m + r,
                    rows[r]);
        return false;
      }
      const int bank = (rows[r] * 2 / 4) % 32;
      for (int w = 0; w < 4; ++w) banks |= 1u << ((bank + w) % 32);
    }
    if (banks != 0xffffffffu) {
      std::printf("%s: the rows of matrix %d share banks (bank mask %08x)\n", what, m, banks);
      return false;
    }
    for (int lane = 0; lane < 32; ++lane) {
      const int g = lane / 4, t = lane % 4;
      for (int h = 0; h < 2; ++h)
        regs[lane][m][h] = static_cast<uint32_t>(trans ? rows[2 * t + h] + g : rows[g] + 2 * t + h);
    }
  }
  return true;
}

// A fragment of m16n8k16: register i of lane (g, t) holds A(g + 8 (i & 1), 2t + 8 (i >> 1) + h).
bool check_a(const Regs& regs, const std::function<uint32_t(int, int)>& A, const char* what) {
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h, ++checks) {
        const uint32_t want = A(lane / 4 + 8 * (i & 1), 2 * (lane % 4) + 8 * (i >> 1) + h);
        if (regs[lane][i][h] != want) return fail(what, lane, i, h, regs[lane][i][h], want);
      }
  return true;
}

// B fragments of two n tiles j = 0, 1 in registers (2j, 2j + 1): b_r of lane (g, t) holds
// B_j(k = 2t + 8r + h, n = g).
bool check_b_pair(const Regs& regs, const std::function<uint32_t(int, int, int)>& B,
                  const char* what) {
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 2; ++j)
      for (int r = 0; r < 2; ++r)
        for (int h = 0; h < 2; ++h, ++checks) {
          const uint32_t want = B(j, 2 * (lane % 4) + 8 * r + h, lane / 4);
          const uint32_t got = regs[lane][2 * j + r][h];
          if (got != want) return fail(what, lane, 2 * j + r, h, got, want);
        }
  return true;
}

bool check_tile(int lds) {
  const Tile tile{64, lds};
  const int D = lds - 8;
  Regs regs;
  // Q (and K, dO in the backward) A operands: rows r0.. of the tile, k slice kk (load_a).
  for (int r0 = 0; r0 < 64; r0 += 16)
    for (int kk = 0; kk < D / 16; ++kk) {
      auto off = [&](int lane) { return ldsm_a_offset(lane, r0, kk * 16, lds); };
      if (!ldmatrix_x4(off, false, "A", regs)) return false;
      if (!check_a(regs, [&](int m, int k) { return tile.at(r0 + m, kk * 16 + k); }, "A"))
        return false;
    }
  // S = Q K^T: B(k, n) = K[n][k], n tiles np 16 + 8 j, k slice kk (mma_a_bt).
  for (int np = 0; np < 4; ++np)
    for (int kk = 0; kk < D / 16; ++kk) {
      auto off = [&](int lane) { return ldsm_b_nk_offset(lane, np * 16, kk * 16, lds); };
      if (!ldmatrix_x4(off, false, "B from [n][k]", regs)) return false;
      auto B = [&](int j, int k, int n) { return tile.at(np * 16 + 8 * j + n, kk * 16 + k); };
      if (!check_b_pair(regs, B, "B from [n][k]")) return false;
    }
  // O += P V: B(k, n) = V[k][n], k slice kk of the 64 keys, n tiles dp 16 + 8 j (tile_xm).
  for (int kk = 0; kk < 4; ++kk)
    for (int dp = 0; dp < D / 16; ++dp) {
      auto off = [&](int lane) { return ldsm_b_kn_offset(lane, kk * 16, dp * 16, lds); };
      if (!ldmatrix_x4(off, true, "B from [k][n] (.trans)", regs)) return false;
      auto B = [&](int j, int k, int n) { return tile.at(kk * 16 + k, dp * 16 + 8 * j + n); };
      if (!check_b_pair(regs, B, "B from [k][n] (.trans)")) return false;
    }
  return true;
}

}  // namespace

int main() {
  for (int lds : {64 + 8, 128 + 8})  // the kernels' padded rows, D = 64 and 128
    if (!check_tile(lds)) return 1;
  std::printf("ok %ld\n", checks);
  return 0;
}
