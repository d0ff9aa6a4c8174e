// Device and launch helpers shared by the kernels of csrc/cuda.
#pragma once

#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "cuda/launch.h"
#include "vsops/segments.h"

namespace vsops {
namespace cuda {

// Rows of visual tokens are a few hundred to a few tens of thousands long and there are
// few of them per batch, so a block must cover a row with many threads.
constexpr int kBlockThreads = 512;
constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockThreads / kWarpSize;

// A row whose per-element cache fits here is read from global memory once; longer rows are
// re-read every pass. 48 KiB of static + dynamic shared memory needs no opt-in on any
// architecture; 4 KiB stay free for the kernels' static reduction scratch.
constexpr size_t kCacheBytes = 44 * 1024;

constexpr int64_t kMaxGridX = 2147483647;

// Input element type -> accumulation type and conversions (fp32 for the 16-bit types).
template <typename In>
struct Scalar;

template <>
struct Scalar<float> {
  using Acc = float;
  static __device__ __forceinline__ float load(float x) { return x; }
  static __device__ __forceinline__ float store(float x) { return x; }
};

template <>
struct Scalar<double> {
  using Acc = double;
  static __device__ __forceinline__ double load(double x) { return x; }
  static __device__ __forceinline__ double store(double x) { return x; }
};

template <>
struct Scalar<__half> {
  using Acc = float;
  static __device__ __forceinline__ float load(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half store(float x) { return __float2half_rn(x); }
};

template <>
struct Scalar<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 store(float x) { return __float2bfloat16_rn(x); }
};

template <typename In>
using Acc = typename Scalar<In>::Acc;

// One segment's elements as `Convert`ed values: from the shared-memory cache when the row
// fits (the kernel's first pass fills it through load()), otherwise converted again from
// global memory on every pass.
template <typename In, typename Convert>
struct CachedRow {
  using Value = decltype(Convert{}(In{}));

  const In* global;
  Value* cache;  // nullptr when the row does not fit
  int64_t length;

  __device__ __forceinline__ Value load(int64_t i) const { return Convert{}(global[i]); }

  __device__ __forceinline__ Value operator[](int64_t i) const {
    return cache != nullptr ? cache[i] : load(i);
  }
};

struct Segment {
  int64_t begin;
  int64_t length;
};

__device__ __forceinline__ Segment segment_of(const SegmentLayout& layout, int64_t index) {
  Segment segment;
  segment_bounds(layout.cu_seqlens, layout.row_length, index, segment.begin, segment.length);
  return segment;
}

// The last s in [0, count) with key(s) <= target, for key non-decreasing in s and
// key(0) <= target. Every lane of a warp searches the same target, so the loads broadcast.
template <typename Key>
__device__ __forceinline__ int64_t last_at_or_below(int64_t count, int64_t target, Key key) {
  int64_t lo = 0;
  int64_t hi = count - 1;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo + 1) / 2;
    if (key(mid) <= target) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Kernels of different element types share the one dynamic shared memory buffer.
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char vsops_dynamic_smem[];
  return reinterpret_cast<T*>(vsops_dynamic_smem);
}

// Shuffles any trivially copyable value word by word, so structs such as RowStats (floats
// and int64 counters) reduce with the same code as scalars.
template <typename V>
__device__ __forceinline__ V shuffle_xor(const V& value, int lane_mask) {
  static_assert(sizeof(V) % sizeof(unsigned) == 0, "shuffle_xor needs a whole number of words");
  constexpr int kWords = sizeof(V) / sizeof(unsigned);
  unsigned words[kWords];
  memcpy(words, &value, sizeof(V));
#pragma unroll
  for (int w = 0; w < kWords; ++w) words[w] = __shfl_xor_sync(0xffffffffu, words[w], lane_mask);
  V out;
  memcpy(&out, words, sizeof(V));
  return out;
}

// Reduces one value per lane with `op` in a fixed butterfly order; every lane gets the same
// total. Must be reached by all 32 lanes of the warp.
template <typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V value, Op op) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    value = op(value, shuffle_xor(value, offset));
  }
  return value;
}

// Reduces one value per thread with `op`; every thread gets the same total. The partials are
// folded in a fixed order by every thread, so callers that branch on the total (the Newton
// search, the radix select) take the same path in every thread and the result is
// run-to-run deterministic. Must be reached by all kBlockThreads threads.
template <typename V, typename Op>
__device__ V block_allreduce(V value, Op op) {
  __shared__ V partials[kWarps];
  value = warp_allreduce(value, op);
  if (threadIdx.x % kWarpSize == 0) partials[threadIdx.x / kWarpSize] = value;
  __syncthreads();
  V total = partials[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) total = op(total, partials[w]);
  // The next call overwrites partials; nobody may still be reading them.
  __syncthreads();
  return total;
}

// Dynamic shared memory of a launch and how many row entries it caches. Packed segment
// lengths are only known on the device, so packed launches reserve the whole cap and each
// block checks its own length.
struct RowCache {
  size_t bytes;
  int64_t capacity;
};

inline RowCache row_cache(const SegmentLayout& layout, size_t entry_bytes) {
  const int64_t max_entries = static_cast<int64_t>(kCacheBytes / entry_bytes);
  if (layout.cu_seqlens != nullptr) {
    return RowCache{static_cast<size_t>(max_entries) * entry_bytes, max_entries};
  }
  if (layout.row_length > max_entries) return RowCache{0, 0};
  return RowCache{static_cast<size_t>(layout.row_length) * entry_bytes, layout.row_length};
}

template <typename In>
struct ScalarTag {
  using type = In;
};

// Runs launch(ScalarTag<In>{}) for the element type of dtype.
template <typename Launch>
cudaError_t dispatch_scalar(ScalarKind dtype, Launch&& launch) {
  switch (dtype) {
    case ScalarKind::kFloat16:
      return launch(ScalarTag<__half>{});
    case ScalarKind::kBFloat16:
      return launch(ScalarTag<__nv_bfloat16>{});
    case ScalarKind::kFloat32:
      return launch(ScalarTag<float>{});
    case ScalarKind::kFloat64:
      return launch(ScalarTag<double>{});
  }
  return cudaErrorInvalidValue;
}

// dispatch_scalar() after the checks every one-block-per-segment launch needs: an empty grid
// is a launch error, and grid.x is 31 bits.
template <typename Launch>
cudaError_t launch_per_segment(const SegmentLayout& layout, ScalarKind dtype, Launch&& launch) {
  if (layout.num_segments == 0) return cudaSuccess;
  if (layout.num_segments > kMaxGridX) return cudaErrorInvalidConfiguration;
  return dispatch_scalar(dtype, launch);
}

}  // namespace cuda
}  // namespace vsops
