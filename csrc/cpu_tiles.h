// Tiles for the CPU hard-routing kernels (csrc/hard_cpu.cpp): the (task, row block, column block)
// list, the one parallel region that hands them out, and the row gather/scatter helpers.
#pragma once
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

#include "cpu_blas.h"

namespace mftk {
namespace {

constexpr int64_t kRowBlock = 256;      // rows per tile: each W chunk is packed once per 256 rows
constexpr int64_t kColChunk = 256;      // columns per GEMM inside a tile: [bm, chunk] in L2
constexpr int64_t kTilesPerThread = 4;  // enough tiles to rebalance when a thread stalls
constexpr int64_t kSerialMacs = int64_t{1} << 22;  // below this, no parallel region at all

struct Tile {
  int64_t task;  // -1: base-only rows
  int64_t row0, rows, col0, cols;
};

// Tiles covering plan rows [0, n) (groups from offsets; base-only rows last) and columns
// [0, d_cols). Columns are split only when there are too few row blocks to keep threads busy.
std::vector<Tile> make_tiles(const int64_t* off, int64_t t_count, int64_t n, int64_t d_cols,
                             int64_t threads) {
  int64_t row_tiles = 0;
  for (int64_t g = 0; g <= t_count; ++g) {
    const int64_t rows = (g < t_count ? off[g + 1] : n) - off[g];
    row_tiles += (rows + kRowBlock - 1) / kRowBlock;
  }
  int64_t col_blocks = 1;
  const int64_t want = kTilesPerThread * threads;
  if (threads > 1 && row_tiles < want) {
    col_blocks = std::min((want + row_tiles - 1) / std::max<int64_t>(row_tiles, 1),
                          std::max<int64_t>(d_cols / kColChunk, 1));
  }
  // Column blocks are whole kColChunk chunks, so every GEMM inside a tile has the shape it has
  // with one thread: the thread count does not change a bit of the result.
  const int64_t chunks = (d_cols + kColChunk - 1) / kColChunk;
  const int64_t bn = std::max<int64_t>((chunks + col_blocks - 1) / col_blocks, 1) * kColChunk;
  std::vector<Tile> tiles;
  tiles.reserve(row_tiles * col_blocks);
  for (int64_t g = 0; g <= t_count; ++g) {
    const int64_t end = g < t_count ? off[g + 1] : n;
    for (int64_t r = off[g]; r < end; r += kRowBlock)
      for (int64_t c = 0; c < d_cols; c += bn)
        tiles.push_back({g < t_count ? g : -1, r, std::min(kRowBlock, end - r), c,
                         std::min(bn, d_cols - c)});
  }
  return tiles;
}

// Run f(tile index, thread slot) over all tiles: one parallel region with dynamic hand-out, or
// inline when threads == 1. Slots are < threads.
template <typename F>
void run_tiles(int64_t ntiles, int64_t threads, const F& f) {
  if (threads <= 1 || ntiles <= 1) {
    SerialBlas serial;
    for (int64_t i = 0; i < ntiles; ++i) f(i, 0);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    SerialBlas serial;
    const int64_t slot = at::get_thread_num();
    for (int64_t i = next.fetch_add(1); i < ntiles; i = next.fetch_add(1)) f(i, slot);
  });
}

int64_t choose_threads(int64_t n, int64_t d_in, int64_t d_out) {
  if (n * d_in * d_out < kSerialMacs || at::in_parallel_region()) return 1;
  return std::max<int64_t>(1, at::get_num_threads());
}

// A hand-made plan must not send the row loops out of bounds.
void check_plan(const at::Tensor& perm, const at::Tensor& offsets, int64_t t_count, int64_t n) {
  TORCH_CHECK(perm.numel() == n, "perm: expected (N,) = (", n, ",), got ", perm.sizes());
  TORCH_CHECK(offsets.numel() == t_count + 1, "offsets: expected (T + 1,) = (", t_count + 1,
              ",), got ", offsets.sizes());
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* p = perm.data_ptr<int64_t>();
  TORCH_CHECK(off[0] == 0 && off[t_count] <= n, "offsets: expected 0 <= ... <= N = ", n);
  for (int64_t t = 0; t < t_count; ++t)
    TORCH_CHECK(off[t] <= off[t + 1], "offsets: expected non-decreasing, task ", t);
  // Every row is read and written through perm: all N entries in range, none twice (a repeat
  // would leave a row of y unwritten and let two tiles write one row).
  std::vector<char> seen(n, 0);
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= 0 && p[i] < n, "perm: entry ", i, " = ", p[i], " out of [0, N)");
    TORCH_CHECK(!seen[p[i]], "perm: entry ", i, " = ", p[i], " repeats an earlier entry");
    seen[p[i]] = 1;
  }
}

// dst[r, :cols] = src[idx[r], col0 : col0 + cols]
template <typename scalar_t>
void gather(scalar_t* dst, const scalar_t* src, int64_t ld_src, const int64_t* idx, int64_t rows,
            int64_t col0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + r * cols, src + idx[r] * ld_src + col0, cols * sizeof(scalar_t));
}

// dst[idx[r], col0 : col0 + cols] = src[r, :cols]
template <typename scalar_t>
void scatter(scalar_t* dst, int64_t ld_dst, const scalar_t* src, const int64_t* idx, int64_t rows,
             int64_t col0, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r)
    std::memcpy(dst + idx[r] * ld_dst + col0, src + r * cols, cols * sizeof(scalar_t));
}

}  // namespace
}  // namespace mftk
