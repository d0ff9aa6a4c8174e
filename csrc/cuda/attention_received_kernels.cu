// Attention received by each key (vsops/ops/attention_received.py), three launches; no head's
// n x n attention is ever stored, only lse [Tq, H] and per-head column sums [H, Tk], both in
// the accumulation type (float; double for float64 input):
//
// - statistics: grid (query tile, head). A tile is kTileRows query rows of one segment; the
//   block sweeps the keys of that segment in chunks of kChunkRows, and each lane keeps an
//   online (max, sum of exp) per row over the keys it computed, so the lanes are combined only
//   once per row at the end: lse = max + log(sum).
// - column sums: grid (key tile, head), the same sweep with the roles swapped: a tile of keys
//   against the segment's queries in chunks, each lane summing exp(logit - lse) over its
//   queries; one warp reduction per key gives that head's column sum.
// - finalize: one thread per key adds its heads in order and divides by H * n_q (0 for a
//   segment without queries).
//
// Tiles are numbered so that the grid is sized on the host whatever the lengths in the device
// cu_seqlens (as in the LIS segment sum): segment s owns tiles [s + b_s / C, ...), one per C
// rows, and a block finds its segment by binary search. Logits come from shared-memory tiles
// of kFeatures columns at a time: the owned tile's rows are read as warp broadcasts, the
// chunk's rows (padded by one element, so that the lanes hit distinct banks) one per lane.
// Every sum runs in a fixed order without atomics, so results are deterministic.
//
// Not tuned, and not yet run on a GPU (CI compiles it with nvcc); the logits are plain FMAs,
// no tensor cores.
#include <cmath>
#include <cstdint>

#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"

namespace vsops {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockWarps = kThreads / kWarpSize;
// Rows of the owned tile per warp, and rows of a streamed chunk per lane.
constexpr int kRowsPerWarp = 8;
constexpr int kPerLane = 2;
constexpr int kTileRows = kBlockWarps * kRowsPerWarp;
constexpr int kChunkRows = kWarpSize * kPerLane;

// Head-size columns staged per step: both tiles fit 48 KiB of static shared memory.
template <typename T>
constexpr int kFeatures = sizeof(T) == sizeof(double) ? 32 : 64;

template <typename T>
struct Tiles {
  T owned[kTileRows][kFeatures<T>];
  T streamed[kChunkRows][kFeatures<T> + 1];
};

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

// Rows [begin, begin + count) of one segment of the tiled side.
struct TileRows {
  int64_t segment;
  int64_t begin;
  int64_t count;
};

__device__ __forceinline__ int64_t first_tile(int64_t segment, int64_t begin) {
  return segment + begin / kTileRows;
}

// The rows of tile `tile`; count <= 0 for the tiles no segment owns.
__device__ TileRows tile_rows(const int32_t* cu_seqlens, int64_t num_segments, int64_t tile) {
  const int64_t segment = last_at_or_below(num_segments, tile, [&](int64_t s) {
    return first_tile(s, static_cast<int64_t>(cu_seqlens[s]));
  });
  int64_t start, length;
  segment_bounds(cu_seqlens, 0, segment, start, length);
  const int64_t offset = (tile - first_tile(segment, start)) * kTileRows;
  const int64_t left = length - offset;
  return TileRows{segment, start + offset, left < kTileRows ? left : kTileRows};
}

// One block's share of logits: logits[r][p] = scale * owned row (warp * kRowsPerWarp + r) .
// streamed row (lane + kWarpSize * p), rows `stride` elements apart. Rows past owned_rows or
// streamed_rows read as zeros. The owned tile is staged only when load_owned, or when the head
// size takes more than one step (the tile is then overwritten by the steps). Call from every
// thread of the block.
template <typename In>
__device__ __forceinline__ void tile_logits(const In* __restrict__ owned, int64_t owned_rows,
                                            const In* __restrict__ streamed, int64_t streamed_rows,
                                            int64_t stride, int64_t dim, Acc<In> scale, bool load_owned,
                                            Tiles<Acc<In>>& tiles, Acc<In> (&logits)[kRowsPerWarp][kPerLane]) {
  using T = Acc<In>;
  constexpr int F = kFeatures<T>;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int p = 0; p < kPerLane; ++p) logits[r][p] = T(0);
  }
  load_owned = load_owned || dim > F;
  // At least one step even without columns, so that the tiles are consistently staged.
  for (int64_t d0 = 0; d0 < dim || d0 == 0; d0 += F) {
    __syncthreads();  // the previous step's tiles are consumed
    // Consecutive threads take consecutive columns of a row: the loads coalesce.
    if (load_owned) {
      for (int e = threadIdx.x; e < kTileRows * F; e += kThreads) {
        const int r = e / F, c = e % F;
        tiles.owned[r][c] = (r < owned_rows && d0 + c < dim) ? Scalar<In>::load(owned[r * stride + d0 + c]) : T(0);
      }
    }
    for (int e = threadIdx.x; e < kChunkRows * F; e += kThreads) {
      const int r = e / F, c = e % F;
      tiles.streamed[r][c] =
          (r < streamed_rows && d0 + c < dim) ? Scalar<In>::load(streamed[r * stride + d0 + c]) : T(0);
    }
    __syncthreads();
#pragma unroll 8
    for (int c = 0; c < F; ++c) {
      T column[kPerLane];
#pragma unroll
      for (int p = 0; p < kPerLane; ++p) column[p] = tiles.streamed[lane + kWarpSize * p][c];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) {
        const T o = tiles.owned[warp * kRowsPerWarp + r][c];
#pragma unroll
        for (int p = 0; p < kPerLane; ++p) logits[r][p] = fma(o, column[p], logits[r][p]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
    for (int p = 0; p < kPerLane; ++p) logits[r][p] *= scale;
  }
}

// Online softmax statistics of a set of logits: max and sum of exp(x - max).
template <typename T>
struct Stats {
  T max;
  T sum;
};

// Symmetric in its arguments, so every lane of the butterfly gets the same total.
struct Combine {
  template <typename T>
  __device__ __forceinline__ Stats<T> operator()(const Stats<T>& a, const Stats<T>& b) const {
    const T top = a.max > b.max ? a.max : b.max;
    if (top == T(-INFINITY)) return a;  // neither has a logit: -inf - -inf would be NaN
    return Stats<T>{top, a.sum * exp_of(a.max - top) + b.sum * exp_of(b.max - top)};
  }
};

struct Sum {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

template <typename In>
__global__ void __launch_bounds__(kThreads)
    statistics_kernel(const In* __restrict__ q, const In* __restrict__ k, const int32_t* __restrict__ cu_seqlens_q,
                      const int32_t* __restrict__ cu_seqlens_k, Acc<In>* __restrict__ lse, AttentionReceivedParams p) {
  using T = Acc<In>;
  const TileRows rows = tile_rows(cu_seqlens_q, p.num_segments, blockIdx.x);
  int64_t key_begin, n_k;
  segment_bounds(cu_seqlens_k, 0, rows.segment, key_begin, n_k);
  // Uniform over the block, before any barrier. Without keys nobody reads these rows' lse.
  if (rows.count <= 0 || n_k == 0) return;
  const int64_t head = blockIdx.y;
  const int64_t stride = p.heads * p.dim;
  const In* owned = q + rows.begin * stride + head * p.dim;
  __shared__ Tiles<T> tiles;
  Stats<T> stats[kRowsPerWarp];
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) stats[r] = Stats<T>{T(-INFINITY), T(0)};
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t j0 = 0; j0 < n_k; j0 += kChunkRows) {
    T logits[kRowsPerWarp][kPerLane];
    tile_logits<In>(owned, rows.count, k + (key_begin + j0) * stride + head * p.dim, n_k - j0, stride, p.dim,
                    static_cast<T>(p.scale), j0 == 0, tiles, logits);
#pragma unroll
    for (int r = 0; r < kRowsPerWarp; ++r) {
#pragma unroll
      for (int c = 0; c < kPerLane; ++c) {
        if (j0 + lane + kWarpSize * c >= n_k) continue;
        const T x = logits[r][c];
        Stats<T>& s = stats[r];
        // NaN logits fall to the else branch and make the sum NaN.
        if (x > s.max) {
          s.sum = s.sum * exp_of(s.max - x) + T(1);
          s.max = x;
        } else {
          s.sum += exp_of(x - s.max);
        }
      }
    }
  }
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const Stats<T> total = warp_allreduce(stats[r], Combine{});
    const int64_t row = warp * kRowsPerWarp + r;
    if (lane == 0 && row < rows.count) lse[(rows.begin + row) * p.heads + head] = total.max + log_of(total.sum);
  }
}

template <typename In>
__global__ void __launch_bounds__(kThreads)
    column_sum_kernel(const In* __restrict__ q, const In* __restrict__ k, const int32_t* __restrict__ cu_seqlens_q,
                      const int32_t* __restrict__ cu_seqlens_k, const Acc<In>* __restrict__ lse,
                      Acc<In>* __restrict__ partial, AttentionReceivedParams p) {
  using T = Acc<In>;
  const TileRows keys = tile_rows(cu_seqlens_k, p.num_segments, blockIdx.x);
  int64_t query_begin, n_q;
  segment_bounds(cu_seqlens_q, 0, keys.segment, query_begin, n_q);
  // Uniform over the block, before any barrier. Without queries finalize writes 0 and reads
  // no partial.
  if (keys.count <= 0 || n_q == 0) return;
  const int64_t head = blockIdx.y;
  const int64_t stride = p.heads * p.dim;
  const In* owned = k + keys.begin * stride + head * p.dim;
  __shared__ Tiles<T> tiles;
  T received[kRowsPerWarp] = {};
  const int lane = threadIdx.x % kWarpSize;
  for (int64_t i0 = 0; i0 < n_q; i0 += kChunkRows) {
    T logits[kRowsPerWarp][kPerLane];
    tile_logits<In>(owned, keys.count, q + (query_begin + i0) * stride + head * p.dim, n_q - i0, stride, p.dim,
                    static_cast<T>(p.scale), i0 == 0, tiles, logits);
#pragma unroll
    for (int c = 0; c < kPerLane; ++c) {
      const int64_t i = i0 + lane + kWarpSize * c;
      if (i >= n_q) continue;
      const T row_lse = lse[(query_begin + i) * p.heads + head];
#pragma unroll
      for (int r = 0; r < kRowsPerWarp; ++r) received[r] += exp_of(logits[r][c] - row_lse);
    }
  }
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int r = 0; r < kRowsPerWarp; ++r) {
    const T total = warp_allreduce(received[r], Sum{});
    const int64_t key = warp * kRowsPerWarp + r;
    if (lane == 0 && key < keys.count) partial[head * p.num_keys + keys.begin + key] = total;
  }
}

// Threads of consecutive keys read consecutive partials of each head.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const int32_t* __restrict__ cu_seqlens_q, const int32_t* __restrict__ cu_seqlens_k,
                    const T* __restrict__ partial, T* __restrict__ out, AttentionReceivedParams p) {
  const int64_t key = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (key >= p.num_keys) return;
  int64_t n_q = 0;
  if (p.num_segments > 0) {
    const int64_t segment = last_at_or_below(p.num_segments, key, [&](int64_t s) {
      return static_cast<int64_t>(cu_seqlens_k[s]);
    });
    int64_t query_begin;
    segment_bounds(cu_seqlens_q, 0, segment, query_begin, n_q);
  }
  if (n_q == 0) {
    out[key] = T(0);
    return;
  }
  T sum = T(0);
  for (int64_t h = 0; h < p.heads; ++h) sum += partial[h * p.num_keys + key];
  // As the reference: the sum divided by H * n_q (NaN without heads).
  out[key] = sum / static_cast<T>(p.heads * n_q);
}

template <typename In>
cudaError_t launch(const AttentionReceivedParams& p, cudaStream_t stream) {
  using T = Acc<In>;
  auto* lse = static_cast<T*>(p.lse);
  auto* partial = static_cast<T*>(p.partial);
  if (p.num_queries > 0 && p.heads > 0) {
    const dim3 query_grid(static_cast<unsigned>(p.num_segments + p.num_queries / kTileRows),
                          static_cast<unsigned>(p.heads));
    statistics_kernel<In><<<query_grid, kThreads, 0, stream>>>(static_cast<const In*>(p.q), static_cast<const In*>(p.k),
                                                               p.cu_seqlens_q, p.cu_seqlens_k, lse, p);
    cudaError_t status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    const dim3 key_grid(static_cast<unsigned>(p.num_segments + p.num_keys / kTileRows), static_cast<unsigned>(p.heads));
    column_sum_kernel<In><<<key_grid, kThreads, 0, stream>>>(static_cast<const In*>(p.q), static_cast<const In*>(p.k),
                                                             p.cu_seqlens_q, p.cu_seqlens_k, lse, partial, p);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  finalize_kernel<T><<<static_cast<unsigned>((p.num_keys + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      p.cu_seqlens_q, p.cu_seqlens_k, partial, static_cast<T*>(p.out), p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_attention_received(const AttentionReceivedParams& params, cudaStream_t stream) {
  // No key: the output is empty.
  if (params.num_keys == 0) return cudaSuccess;
  // The larger of the two tile grids; it also bounds finalize's smaller one.
  const int64_t rows = params.num_queries > params.num_keys ? params.num_queries : params.num_keys;
  const int64_t tiles = params.num_segments + rows / kTileRows;
  if (tiles > kMaxGridX || params.heads > kMaxAttentionReceivedHeads) return cudaErrorInvalidConfiguration;
  return dispatch_scalar(params.dtype, [&](auto tag) {
    return launch<typename decltype(tag)::type>(params, stream);
  });
}

}  // namespace cuda
}  // namespace vsops
