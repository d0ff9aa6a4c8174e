// Varlen pack and unpack (vsops/ops/varlen.py): rows of any dtype moved as bytes between the
// padded token axis and FlashAttention's packed one, with no host sync.
//
// pack, three launches whose grids come from num_tokens and total:
//   1. compact: one block per tile of kTileTokens tokens. Each warp takes kCompactRounds
//      runs of 32 consecutive tokens, one ballot per run; popcounts give every kept token its
//      rank in the tile, and the block writes the tile-local positions of its kept tokens, in
//      order, to the front of the tile's slots of the workspace, and its count to
//      offsets[tile + 1]. This is the only read of the keep mask.
//   2. scan: one block turns the tile counts into exclusive offsets (a tile per thread,
//      carried across rounds of kBlockThreads tiles).
//   3. gather: one warp per packed row d < total. The tile holding the d-th kept token is
//      the last one whose offset is <= d (binary search over the offsets); the warp writes
//      indices[d] and copies the token's row of every tensor of the batch. Each tensor moves
//      in the widest word (16, 8, 4, 2 or 1 bytes) that divides its row size and both base
//      addresses, so mixed batches (bf16 embeddings next to int64 labels) keep 16-byte
//      accesses for the wide rows. Up to kBatchTensors tensors share a launch; longer lists
//      take more gather launches, only the first of which writes indices.
//   A packed row past the kept tokens (total overstating them) reads nothing: its index is
//   -1. Kept tokens past total have no packed row, so nothing is written past total.
//
// unpack: memset source[] to -1, scatter source[indices[j]] = j, then one warp per output
// row copies packed row source[i] or the fill row: every output row is written once.
#include <cstdint>

#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"

namespace vsops {
namespace cuda {
namespace {

// 4096-token tiles: the scan's input is 1/4096 of the tokens, and a position within a tile
// takes 2 bytes of workspace.
constexpr int kCompactRounds = 8;
constexpr int64_t kTileTokens = static_cast<int64_t>(kBlockThreads) * kCompactRounds;
static_assert(kTileTokens <= 65536, "tile positions must fit uint16_t");

constexpr int kCopyWarps = 8;
constexpr int kCopyThreads = kCopyWarps * kWarpSize;
// With a thread bound alone, ptxas (CUDA 13) holds the copy kernels to 40 registers and
// spills the unrolled loads; 4 resident blocks leave 64 registers and still keep up to 64 KiB
// of loads in flight per SM.
constexpr int kCopyBlocksPerSm = 4;
constexpr int kScatterThreads = 256;
constexpr int kBatchTensors = 8;
constexpr int kMaxWordBytes = 16;

// The workspace of pack: offsets (int64 [tiles + 1]) first, so that both parts stay aligned.
struct PackWorkspace {
  int64_t* offsets;
  uint16_t* positions;  // [num_tokens]; tile t's kept tokens from slot t * kTileTokens on
};

int64_t tiles_of(int64_t num_tokens) { return (num_tokens + kTileTokens - 1) / kTileTokens; }

PackWorkspace pack_workspace(void* workspace, int64_t num_tokens) {
  auto* offsets = static_cast<int64_t*>(workspace);
  return PackWorkspace{offsets, reinterpret_cast<uint16_t*>(offsets + tiles_of(num_tokens) + 1)};
}

__global__ void __launch_bounds__(kBlockThreads)
    compact_tiles_kernel(const bool* __restrict__ keep, int64_t num_tokens, PackWorkspace ws) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t tile_begin = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  const int warp_begin = warp * kWarpSize * kCompactRounds;
  unsigned ballots[kCompactRounds];
  int warp_count = 0;
#pragma unroll
  for (int r = 0; r < kCompactRounds; ++r) {
    const int64_t token = tile_begin + warp_begin + r * kWarpSize + lane;
    ballots[r] = __ballot_sync(0xffffffffu, token < num_tokens && keep[token]);
    warp_count += __popc(ballots[r]);
  }
  __shared__ int warp_counts[kWarps];
  if (lane == 0) warp_counts[warp] = warp_count;
  __syncthreads();
  int rank = 0;
  for (int w = 0; w < warp; ++w) rank += warp_counts[w];
  if (threadIdx.x == 0) {
    int tile_count = 0;
    for (int w = 0; w < kWarps; ++w) tile_count += warp_counts[w];
    ws.offsets[blockIdx.x + 1] = tile_count;
  }
  const unsigned lanes_below = (1u << lane) - 1u;
  uint16_t* positions = ws.positions + tile_begin;
#pragma unroll
  for (int r = 0; r < kCompactRounds; ++r) {
    if ((ballots[r] >> lane) & 1u) {
      positions[rank + __popc(ballots[r] & lanes_below)] =
          static_cast<uint16_t>(warp_begin + r * kWarpSize + lane);
    }
    rank += __popc(ballots[r]);
  }
}

// offsets[1..tiles] hold the tile counts; afterwards offsets[t] = sum of the counts of the
// tiles before t, for t in [0, tiles].
__global__ void __launch_bounds__(kBlockThreads)
    scan_tile_counts_kernel(int64_t* offsets, int64_t tiles) {
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  __shared__ int64_t warp_totals[kWarps];
  int64_t carry = 0;
  for (int64_t first = 0; first < tiles; first += kBlockThreads) {
    const int64_t tile = first + threadIdx.x;
    int64_t sum = tile < tiles ? offsets[tile + 1] : 0;
#pragma unroll
    for (int step = 1; step < kWarpSize; step *= 2) {
      const int64_t below = __shfl_up_sync(0xffffffffu, sum, step);
      if (lane >= step) sum += below;
    }
    if (lane == kWarpSize - 1) warp_totals[warp] = sum;
    __syncthreads();
    // sum turns from the warp's inclusive scan into the scan over all tiles so far.
    int64_t round_total = 0;
    for (int w = 0; w < kWarps; ++w) {
      if (w == warp) sum += carry + round_total;
      round_total += warp_totals[w];
    }
    if (tile < tiles) offsets[tile + 1] = sum;
    carry += round_total;
    // The next round overwrites warp_totals; nobody may still be reading them.
    __syncthreads();
  }
  if (threadIdx.x == 0) offsets[0] = 0;
}

// Copies one row of `bytes` bytes in Words, the warp's lanes striding over it. Four loads
// are issued before their stores so that each lane keeps several requests in flight.
template <typename Word>
__device__ __forceinline__ void copy_words(unsigned char* dst, const unsigned char* src, int64_t bytes,
                                           int lane) {
  Word* __restrict__ to = reinterpret_cast<Word*>(dst);
  const Word* __restrict__ from = reinterpret_cast<const Word*>(src);
  const int64_t words = bytes / static_cast<int64_t>(sizeof(Word));
  constexpr int kUnroll = 4;
  int64_t w = lane;
  for (; w + (kUnroll - 1) * kWarpSize < words; w += kUnroll * kWarpSize) {
    Word values[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) values[k] = __ldg(from + w + k * kWarpSize);
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) to[w + k * kWarpSize] = values[k];
  }
  for (; w < words; w += kWarpSize) to[w] = __ldg(from + w);
}

// word_bytes is uniform over the warp, so the switch does not diverge.
__device__ __forceinline__ void copy_row(unsigned char* dst, const unsigned char* src, int64_t bytes,
                                         int word_bytes, int lane) {
  switch (word_bytes) {
    case 16:
      copy_words<uint4>(dst, src, bytes, lane);
      break;
    case 8:
      copy_words<uint2>(dst, src, bytes, lane);
      break;
    case 4:
      copy_words<unsigned int>(dst, src, bytes, lane);
      break;
    case 2:
      copy_words<unsigned short>(dst, src, bytes, lane);
      break;
    default:
      copy_words<unsigned char>(dst, src, bytes, lane);
  }
}

// The widest word (at most kMaxWordBytes) dividing every value: a row size and the base
// addresses, which then keeps every row of the tensors aligned to it.
template <typename... Values>
int word_bytes_of(Values... values) {
  const uintptr_t bits = (static_cast<uintptr_t>(values) | ...);
  int word = kMaxWordBytes;
  while (word > 1 && bits % word != 0) word /= 2;
  return word;
}

struct CopyRows {
  const unsigned char* src;
  unsigned char* dst;
  int64_t row_bytes;
  int word_bytes;
};

// Passed by value: the kernel reads the tensors' pointers from the parameter bank.
struct GatherBatch {
  CopyRows tensors[kBatchTensors];
  int count;
};

struct GatherLayout {
  const uint16_t* positions;
  const int64_t* offsets;
  int64_t tiles;
  int64_t total;
  int64_t* indices;  // nullptr in all but the first gather launch of a pack
};

__global__ void __launch_bounds__(kCopyThreads, kCopyBlocksPerSm)
    gather_rows_kernel(GatherLayout layout, GatherBatch batch) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCopyWarps + threadIdx.x / kWarpSize;
  // Uniform over the warp, and the kernel has no block barrier.
  if (row >= layout.total) return;
  const int64_t* offsets = layout.offsets;
  int64_t token = -1;
  if (row < offsets[layout.tiles]) {
    const int64_t tile =
        last_at_or_below(layout.tiles, row, [&](int64_t t) { return offsets[t]; });
    const int64_t tile_begin = tile * kTileTokens;
    token = tile_begin + layout.positions[tile_begin + row - offsets[tile]];
  }
  if (layout.indices != nullptr && lane == 0) layout.indices[row] = token;
  if (token < 0) return;
  for (int j = 0; j < batch.count; ++j) {
    const CopyRows& t = batch.tensors[j];
    copy_row(t.dst + row * t.row_bytes, t.src + token * t.row_bytes, t.row_bytes, t.word_bytes, lane);
  }
}

__global__ void __launch_bounds__(kScatterThreads)
    invert_indices_kernel(const int64_t* __restrict__ indices, int64_t total, int64_t rows,
                          int64_t* __restrict__ source) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kScatterThreads + threadIdx.x;
  if (j >= total) return;
  const int64_t i = indices[j];
  if (i >= 0 && i < rows) source[i] = j;
}

struct UnpackRows {
  const unsigned char* packed;
  const unsigned char* fill;
  const int64_t* source;
  unsigned char* out;
  int64_t rows;
  int64_t row_bytes;
  int word_bytes;
};

__global__ void __launch_bounds__(kCopyThreads, kCopyBlocksPerSm)
    unpack_rows_kernel(UnpackRows p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kCopyWarps + threadIdx.x / kWarpSize;
  if (row >= p.rows) return;
  const int64_t j = p.source[row];
  copy_row(p.out + row * p.row_bytes, j >= 0 ? p.packed + j * p.row_bytes : p.fill, p.row_bytes,
           p.word_bytes, lane);
}

int64_t warp_row_blocks(int64_t rows) { return (rows + kCopyWarps - 1) / kCopyWarps; }

}  // namespace

int64_t varlen_pack_workspace_bytes(int64_t num_tokens) {
  return (tiles_of(num_tokens) + 1) * static_cast<int64_t>(sizeof(int64_t)) +
         num_tokens * static_cast<int64_t>(sizeof(uint16_t));
}

cudaError_t launch_varlen_pack(const VarlenPackParams& p, cudaStream_t stream) {
  if (p.total == 0) return cudaSuccess;
  const int64_t tiles = tiles_of(p.num_tokens);
  const int64_t row_blocks = warp_row_blocks(p.total);
  if (tiles > kMaxGridX || row_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  const PackWorkspace ws = pack_workspace(p.workspace, p.num_tokens);
  if (tiles > 0) {
    compact_tiles_kernel<<<static_cast<unsigned>(tiles), kBlockThreads, 0, stream>>>(
        p.keep, p.num_tokens, ws);
  }
  // Also run without tiles: it writes offsets[0], which the gather reads.
  scan_tile_counts_kernel<<<1, kBlockThreads, 0, stream>>>(ws.offsets, tiles);
  GatherLayout layout{ws.positions, ws.offsets, tiles, p.total, p.indices};
  // One launch even without tensors: it writes indices.
  int64_t next = 0;
  do {
    GatherBatch batch{};
    for (; next < p.num_tensors && batch.count < kBatchTensors; ++next) {
      const VarlenRows& r = p.rows[next];
      batch.tensors[batch.count++] =
          CopyRows{static_cast<const unsigned char*>(r.src), static_cast<unsigned char*>(r.dst),
                   r.row_bytes,
                   word_bytes_of(reinterpret_cast<uintptr_t>(r.src), reinterpret_cast<uintptr_t>(r.dst),
                                 r.row_bytes)};
    }
    gather_rows_kernel<<<static_cast<unsigned>(row_blocks), kCopyThreads, 0, stream>>>(layout, batch);
    layout.indices = nullptr;
  } while (next < p.num_tensors);
  return cudaGetLastError();
}

cudaError_t launch_varlen_unpack(const VarlenUnpackParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.row_bytes == 0) return cudaSuccess;
  const int64_t scatter_blocks = (p.total + kScatterThreads - 1) / kScatterThreads;
  const int64_t row_blocks = warp_row_blocks(p.rows);
  if (scatter_blocks > kMaxGridX || row_blocks > kMaxGridX) return cudaErrorInvalidConfiguration;
  // All-ones bytes are int64 -1: "no packed row".
  cudaError_t status =
      cudaMemsetAsync(p.source, 0xff, static_cast<size_t>(p.rows) * sizeof(int64_t), stream);
  if (status != cudaSuccess) return status;
  if (p.total > 0) {
    invert_indices_kernel<<<static_cast<unsigned>(scatter_blocks), kScatterThreads, 0, stream>>>(
        p.indices, p.total, p.rows, p.source);
  }
  const UnpackRows rows{static_cast<const unsigned char*>(p.packed),
                        static_cast<const unsigned char*>(p.fill),
                        p.source,
                        static_cast<unsigned char*>(p.out),
                        p.rows,
                        p.row_bytes,
                        word_bytes_of(reinterpret_cast<uintptr_t>(p.packed),
                                      reinterpret_cast<uintptr_t>(p.fill),
                                      reinterpret_cast<uintptr_t>(p.out), p.row_bytes)};
  unpack_rows_kernel<<<static_cast<unsigned>(row_blocks), kCopyThreads, 0, stream>>>(rows);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace vsops
