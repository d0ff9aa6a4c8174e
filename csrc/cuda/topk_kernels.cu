// Hard top-k mask: one thread block per segment.
//
// The k-th largest ordered key K* is found by an MSB-first radix search, one block-reduced
// count per key bit; then an element is kept when its key is above K*, or equal to it and
// among the first (k - #above) such elements in index order, found by a block-wide scan.
// Keys come from vsops/topk_math.h (16-bit inputs are ranked through float, which orders
// them identically).
//
// Rows whose keys fit kCacheBytes are converted once into shared memory. Each thread reads
// back only the entries it wrote itself (every pass visits i = threadIdx.x + j * blockDim),
// so the cache needs no barrier of its own.
#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"
#include "vsops/topk_math.h"

namespace vsops {
namespace cuda {
namespace {

template <typename In>
using Key = typename topk::KeyOf<Acc<In>>::type;

template <typename In>
struct ToKey {
  __device__ __forceinline__ Key<In> operator()(In x) const {
    return topk::ordered_key(Scalar<In>::load(x));
  }
};

// A row of scores as their ordered keys.
template <typename In>
using KeyRow = CachedRow<In, ToKey<In>>;

template <typename K>
struct Threshold {
  K key;          // the k-th largest key K*
  int64_t above;  // #(key > K*)
};

// Greedy MSB-first construction of K* = max{x : #(key >= x) >= k}, for 0 < k <= n.
// When the last rejected candidate was c, K* = c - 1 (every lower bit was accepted), so
// #(key > K*) = #(key >= c), the count that rejected it: no extra pass is needed.
template <typename In>
__device__ Threshold<Key<In>> kth_largest_key(const KeyRow<In>& row, int64_t k) {
  using K = Key<In>;
  K prefix = 0;
  int64_t above = 0;
  for (int bit = topk::KeyOf<Acc<In>>::bits - 1; bit >= 0; --bit) {
    const K candidate = prefix | (K(1) << bit);
    int64_t count = 0;
    for (int64_t i = threadIdx.x; i < row.length; i += kBlockThreads) count += row[i] >= candidate;
    count = block_allreduce(count, [](int64_t a, int64_t b) { return a + b; });
    if (count >= k) {
      prefix = candidate;
    } else {
      above = count;
    }
  }
  return Threshold<K>{prefix, above};
}

struct FlagCount {
  int before;  // flags set at lower thread indices
  int total;   // flags set in the block
};

// Exclusive count of `flag` over the threads of the block, in thread order.
__device__ FlagCount block_exclusive_count(bool flag) {
  __shared__ int warp_counts[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const unsigned ballot = __ballot_sync(0xffffffffu, flag);
  if (lane == 0) warp_counts[warp] = __popc(ballot);
  __syncthreads();
  FlagCount count{__popc(ballot & ((1u << lane) - 1u)), 0};
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    if (w < warp) count.before += warp_counts[w];
    count.total += warp_counts[w];
  }
  // The next call overwrites warp_counts; nobody may still be reading them.
  __syncthreads();
  return count;
}

// Ties with K* are ranked in index order chunk by chunk, carrying the count of earlier
// chunks, so the lowest indices win. The trip count is the same for every thread, which
// keeps the barriers in block_exclusive_count uniform.
template <typename In>
__device__ void write_keep(const KeyRow<In>& row, const Threshold<Key<In>>& threshold,
                           int64_t k, bool* keep) {
  const int64_t ties_kept = k - threshold.above;
  int64_t ties_before_chunk = 0;
  for (int64_t chunk = 0; chunk < row.length; chunk += kBlockThreads) {
    const int64_t i = chunk + threadIdx.x;
    const bool in_row = i < row.length;
    const Key<In> key = in_row ? row[i] : Key<In>(0);
    const bool tie = in_row && key == threshold.key;
    const FlagCount ties = block_exclusive_count(tie);
    if (in_row) {
      keep[i] = key > threshold.key || (tie && ties_before_chunk + ties.before < ties_kept);
    }
    ties_before_chunk += ties.total;
  }
}

template <typename In>
__global__ void __launch_bounds__(kBlockThreads)
    topk_mask_kernel(const In* __restrict__ scores, const int64_t* __restrict__ k,
                     bool* __restrict__ keep, SegmentLayout layout, int64_t cache_capacity) {
  const Segment segment = segment_of(layout, blockIdx.x);
  const int64_t n = segment.length;
  const int64_t k_requested = k[blockIdx.x];
  const int64_t k_row = k_requested < 0 ? 0 : (k_requested > n ? n : k_requested);
  bool* out = keep + segment.begin;
  // k = 0 and k = n need no ranking (and the radix search assumes 0 < k <= n). The branch
  // is uniform over the block, so returning before the barriers below is safe.
  if (k_row == 0 || k_row == n) {
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) out[i] = k_row == n;
    return;
  }
  const KeyRow<In> row{scores + segment.begin,
                       n <= cache_capacity ? dynamic_smem<Key<In>>() : nullptr, n};
  if (row.cache != nullptr) {
    for (int64_t i = threadIdx.x; i < n; i += kBlockThreads) row.cache[i] = row.load(i);
  }
  write_keep(row, kth_largest_key(row, k_row), k_row, out);
}

template <typename In>
cudaError_t launch_topk(const TopKMaskParams& p, cudaStream_t stream) {
  const RowCache cache = row_cache(p.layout, sizeof(Key<In>));
  topk_mask_kernel<In><<<static_cast<unsigned>(p.layout.num_segments), kBlockThreads,
                         cache.bytes, stream>>>(static_cast<const In*>(p.scores), p.k, p.keep,
                                                p.layout, cache.capacity);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_topk_mask(const TopKMaskParams& params, cudaStream_t stream) {
  return launch_per_segment(params.layout, params.dtype, [&](auto tag) {
    return launch_topk<typename decltype(tag)::type>(params, stream);
  });
}

}  // namespace cuda
}  // namespace vsops
