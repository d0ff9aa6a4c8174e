// DivPrune on rows the glue has L2-normalized into the accumulation type (float; double for
// float64 input), two launches for a batch of segments:
//
// - nearest: block (row block, segment) takes kRows rows of its segment and sweeps every
//   column of the segment, one per thread, staging kChunk features of its rows at a time in
//   shared memory; each thread keeps a running maximum per row that skips the diagonal, and a
//   block reduction gives nearest = 1 - max (NaN if any product was NaN). The n x n matrix is
//   never written.
// - greedy: one block per segment runs its k picks. A pick sweeps the segment (the dot product
//   with the picked row, the running minimum distance in `distance`, NaN-propagating) and a
//   block argmax over the unpicked tokens (NaN below every number, ties to the lower index)
//   gives the next pick.
//
// Not tuned, and not yet run on a GPU (CI compiles it with nvcc): the columns of the nearest
// pass are read uncoalesced (one row per thread).
#include <cmath>

#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"

namespace vsops {
namespace cuda {
namespace {

constexpr int kRows = 32;
constexpr int kChunk = 32;
constexpr int64_t kNoIndex = INT64_MAX;

template <typename T>
struct Candidate {
  T key;
  int64_t index;
};

// The larger key, ties to the lower index.
struct Larger {
  template <typename T>
  __device__ __forceinline__ Candidate<T> operator()(const Candidate<T>& a, const Candidate<T>& b) const {
    return (b.key > a.key || (b.key == a.key && b.index < a.index)) ? b : a;
  }
};

struct Max {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return b > a ? b : a;
  }
};

struct Or {
  __device__ __forceinline__ unsigned operator()(unsigned a, unsigned b) const { return a | b; }
};

template <typename T>
__device__ __forceinline__ T lowest() {
  return sizeof(T) == sizeof(double) ? T(-1.7976931348623157e308) : T(-3.4028234663852886e38);
}

// NaN ranks below every number.
template <typename T>
__device__ __forceinline__ T rank_key(T value) {
  return isnan(value) ? lowest<T>() : value;
}

__device__ __forceinline__ void segment_of(const int32_t* cu, int64_t segment, int64_t& start, int64_t& n) {
  segment_bounds(cu, 0, segment, start, n);
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    nearest_kernel(const T* unit, const int32_t* cu_seqlens, int64_t dim, T* nearest) {
  int64_t start, n;
  segment_of(cu_seqlens, blockIdx.y, start, n);
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  if (row0 >= n) return;  // the whole block
  __shared__ T rows[kRows][kChunk];
  T best[kRows];
  unsigned nan_rows = 0;
#pragma unroll
  for (int r = 0; r < kRows; ++r) best[r] = -INFINITY;
  for (int64_t col0 = 0; col0 < n; col0 += kBlockThreads) {
    const int64_t j = col0 + threadIdx.x;
    T acc[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[r] = T(0);
    for (int64_t d0 = 0; d0 < dim; d0 += kChunk) {
      __syncthreads();  // the previous chunk is consumed
      for (int e = threadIdx.x; e < kRows * kChunk; e += kBlockThreads) {
        const int r = e / kChunk, c = e % kChunk;
        rows[r][c] = (row0 + r < n && d0 + c < dim) ? unit[(start + row0 + r) * dim + d0 + c] : T(0);
      }
      __syncthreads();
      if (j < n) {
        const int width = static_cast<int>(dim - d0 < kChunk ? dim - d0 : kChunk);
        for (int c = 0; c < width; ++c) {
          const T v = unit[(start + j) * dim + d0 + c];
#pragma unroll
          for (int r = 0; r < kRows; ++r) acc[r] += rows[r][c] * v;
        }
      }
    }
    if (j < n) {
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        if (row0 + r >= n || j == row0 + r) continue;  // a token is not its own neighbour
        if (isnan(acc[r])) {
          nan_rows |= 1u << r;
        } else if (acc[r] > best[r]) {
          best[r] = acc[r];
        }
      }
    }
  }
  const unsigned any_nan = block_allreduce(nan_rows, Or{});
  for (int r = 0; r < kRows; ++r) {
    const T row_best = block_allreduce(best[r], Max{});
    if (threadIdx.x == 0 && row0 + r < n) {
      nearest[start + row0 + r] = ((any_nan >> r) & 1u) ? T(NAN) : T(1) - row_best;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kBlockThreads)
    greedy_kernel(const T* unit, const int32_t* cu_seqlens, const int64_t* k, int64_t dim, const T* nearest,
                  T* distance, bool* keep) {
  int64_t start, n;
  segment_of(cu_seqlens, blockIdx.x, start, n);
  const int64_t count = k[blockIdx.x] < 0 ? 0 : (k[blockIdx.x] > n ? n : k[blockIdx.x]);
  if (count == n) {
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) keep[start + i] = true;
    return;
  }
  if (count == 0) return;
  Candidate<T> best{T(-INFINITY), kNoIndex};
  for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
    best = Larger{}(best, Candidate<T>{rank_key(nearest[start + i]), i});
  }
  int64_t choice = block_allreduce(best, Larger{}).index;
  for (int64_t step = 0; step < count; ++step) {
    if (threadIdx.x == 0) keep[start + choice] = true;
    __syncthreads();  // every thread sees the new pick's flag
    if (step + 1 == count) break;
    const T* picked_row = unit + (start + choice) * dim;
    Candidate<T> next{T(-INFINITY), kNoIndex};
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) {
      const T* row = unit + (start + i) * dim;
      T dot = T(0);
      for (int64_t d = 0; d < dim; ++d) dot += row[d] * picked_row[d];
      const T old = distance[start + i], fresh = T(1) - dot;
      const T updated = (isnan(old) || isnan(fresh)) ? T(NAN) : (fresh < old ? fresh : old);
      distance[start + i] = updated;
      if (!keep[start + i]) next = Larger{}(next, Candidate<T>{rank_key(updated), i});
    }
    choice = block_allreduce(next, Larger{}).index;
  }
}

template <typename T>
cudaError_t launch(const DivPruneParams& p, cudaStream_t stream) {
  const T* unit = static_cast<const T*>(p.unit);
  const dim3 rows_grid(static_cast<unsigned>((p.num_tokens + kRows - 1) / kRows), static_cast<unsigned>(p.num_segments));
  nearest_kernel<T><<<rows_grid, kBlockThreads, 0, stream>>>(unit, p.cu_seqlens, p.dim, static_cast<T*>(p.nearest));
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  greedy_kernel<T><<<static_cast<unsigned>(p.num_segments), kBlockThreads, 0, stream>>>(
      unit, p.cu_seqlens, p.k, p.dim, static_cast<const T*>(p.nearest), static_cast<T*>(p.distance), p.keep);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_divprune(const DivPruneParams& params, cudaStream_t stream) {
  if (params.num_segments == 0 || params.num_tokens == 0) return cudaSuccess;
  if (params.num_segments > kMaxDivPruneSegments || (params.num_tokens + kRows - 1) / kRows > kMaxGridX) {
    return cudaErrorInvalidConfiguration;
  }
  return params.is_double ? launch<double>(params, stream) : launch<float>(params, stream);
}

}  // namespace cuda
}  // namespace vsops
