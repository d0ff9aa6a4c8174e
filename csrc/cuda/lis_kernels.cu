// LIS scoring passes (vsops/ops/lis.py): segment sum, segment dot and input gradient. All
// three stream [tokens, D] once and are bound by memory bandwidth, so every element moves in
// 16-byte packs (8 halves, 4 floats, 2 doubles) when the rows allow it, and the grids are sized
// from host-known numbers (segments, tokens, D) so that no launch waits on cu_seqlens.
//
// segment_sum: grid (slot, column tile). A slot is one chunk of kChunkTokens tokens of one
//   segment; its 8 warps sum the chunk's rows for the tile's 32 packs of columns into one
//   workspace row. A second launch, grid (segment, column tile), sums the segment's workspace
//   rows in slot order. Both sums run in a fixed order without atomics: results are
//   deterministic, and even one long segment spreads over many blocks.
// segment_dot, input_grad: one warp per token; its lanes step over D in packs.
#include <cstdint>
#include <type_traits>

#include "cuda/kernel_common.cuh"
#include "cuda/launch.h"

namespace vsops {
namespace cuda {
namespace {

constexpr int kLisWarps = 8;
constexpr int kLisThreads = kLisWarps * kWarpSize;
constexpr int64_t kMaxGridY = 65535;

// Tokens summed by one segment_sum block. Smaller chunks give one long segment more blocks;
// each chunk costs a workspace row written and read again (1/64 of the chunk's traffic in
// fp32, 1/32 in 16-bit types).
constexpr int64_t kChunkTokens = 64;

constexpr int64_t kPackBytes = 16;

// Elements of T in one 16-byte pack.
template <typename T>
constexpr int kPackWidth = static_cast<int>(kPackBytes / sizeof(T));

// N consecutive elements at p, moved in 16-byte words when they fill whole words (the caller
// guarantees the alignment), element by element otherwise.
template <int N, typename T>
__device__ __forceinline__ void load_pack(const T* p, T (&out)[N]) {
  if constexpr (N * sizeof(T) % kPackBytes == 0) {
    constexpr int kPerWord = kPackWidth<T>;
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      const uint4 word = reinterpret_cast<const uint4*>(p)[w];
      memcpy(&out[w * kPerWord], &word, sizeof(word));
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = p[k];
  }
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, const T (&in)[N]) {
  if constexpr (N * sizeof(T) % kPackBytes == 0) {
    constexpr int kPerWord = kPackWidth<T>;
#pragma unroll
    for (int w = 0; w < N / kPerWord; ++w) {
      uint4 word;
      memcpy(&word, &in[w * kPerWord], sizeof(word));
      reinterpret_cast<uint4*>(p)[w] = word;
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) p[k] = in[k];
  }
}

// segment_sum's slot plan: segment s (tokens [b_s, b_s + n_s)) owns the workspace rows
// [first_slot(s, b_s), first_slot(s, b_s) + ceil(n_s / C)), one per chunk of C tokens, with
// first_slot = s + floor(b_s / C). Since ceil(n/C) <= floor(n/C) + 1
// <= floor((b + n)/C) - floor(b/C) + 1, consecutive segments' rows do not overlap and all of
// them lie below S + floor(total / C), whatever the lengths in cu_seqlens: the grid and the
// workspace are sized on the host, and first_slot is strictly increasing in s.
__device__ __forceinline__ int64_t first_slot(int64_t segment, int64_t begin) {
  return segment + begin / kChunkTokens;
}

__device__ __forceinline__ int64_t chunks_of(int64_t length) {
  return (length + kChunkTokens - 1) / kChunkTokens;
}

// Rows [begin, end) of a matrix: tokens of x, or slots of the workspace.
struct RowRange {
  int64_t begin;
  int64_t end;
};

// The tokens of this block's slot; empty for the slots no segment owns.
__device__ RowRange slot_tokens(const SegmentLayout& layout, int64_t slot) {
  const int64_t segment = last_at_or_below(layout.num_segments, slot, [&](int64_t s) {
    return first_slot(s, segment_of(layout, s).begin);
  });
  const Segment bounds = segment_of(layout, segment);
  const int64_t chunk = slot - first_slot(segment, bounds.begin);
  const int64_t segment_end = bounds.begin + bounds.length;
  const int64_t begin = bounds.begin + chunk * kChunkTokens;
  const int64_t end = begin + kChunkTokens < segment_end ? begin + kChunkTokens : segment_end;
  return RowRange{begin, end > begin ? end : begin};
}

// sum over rows r in [begin, end) of weight(r) * rows[r][c], for the block's tile (blockIdx.y)
// of kWarpSize packs of V columns. Warps take rows round-robin and their partials are added
// in warp order, so the result depends on nothing but the inputs. Thread t < kWarpSize * V
// gets column tile * kWarpSize * V + t (0 past dim). V must divide dim when V > 1, so that a
// lane's pack lies wholly inside or wholly past dim. Call once per block, from every thread.
template <int V, typename In, typename Weight>
__device__ Acc<In> tile_column_sum(const In* __restrict__ rows, int64_t dim, RowRange range,
                                   Weight weight) {
  using T = Acc<In>;
  static_assert(kWarpSize * V <= kLisThreads, "one thread per column of the tile");
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kWarpSize * V + lane * V;
  T acc[V] = {};
  if (col < dim) {
#pragma unroll 4
    for (int64_t r = range.begin + warp; r < range.end; r += kLisWarps) {
      In values[V];
      load_pack(rows + r * dim + col, values);
      const T w = weight(r);
#pragma unroll
      for (int k = 0; k < V; ++k) acc[k] = fma(w, Scalar<In>::load(values[k]), acc[k]);
    }
  }
  __shared__ __align__(16) T partials[kLisWarps][kWarpSize * V];
  store_pack(&partials[warp][lane * V], acc);
  __syncthreads();
  T total = T(0);
  if (threadIdx.x < kWarpSize * V) {
#pragma unroll
    for (int w = 0; w < kLisWarps; ++w) total += partials[w][threadIdx.x];
  }
  return total;
}

// Writes a tile column sum to row[c] for the columns of the tile inside dim.
template <int V, typename T>
__device__ __forceinline__ void store_tile_column(T* row, int64_t dim, T value) {
  const int64_t col = static_cast<int64_t>(blockIdx.y) * kWarpSize * V + threadIdx.x;
  if (threadIdx.x < kWarpSize * V && col < dim) row[col] = value;
}

template <typename In, int V>
__global__ void __launch_bounds__(kLisThreads)
    segment_sum_chunks_kernel(const In* __restrict__ x, const Acc<In>* __restrict__ token_weight,
                              Acc<In>* __restrict__ workspace, LisLayout layout) {
  using T = Acc<In>;
  const RowRange tokens = slot_tokens(layout.segments, blockIdx.x);
  // Uniform over the block, so leaving before tile_column_sum's barrier is safe. Nobody reads
  // the workspace row of an empty slot.
  if (tokens.begin == tokens.end) return;
  const T sum = tile_column_sum<V>(x, layout.dim, tokens, [&](int64_t i) {
    return token_weight != nullptr ? token_weight[i] : T(1);
  });
  store_tile_column<V>(workspace + static_cast<int64_t>(blockIdx.x) * layout.dim, layout.dim, sum);
}

template <typename T, int V>
__global__ void __launch_bounds__(kLisThreads)
    segment_sum_reduce_kernel(const T* __restrict__ workspace, T* __restrict__ out,
                              LisLayout layout, bool mean) {
  const int64_t segment = blockIdx.x;
  const Segment bounds = segment_of(layout.segments, segment);
  const int64_t first = first_slot(segment, bounds.begin);
  T sum = tile_column_sum<V>(workspace, layout.dim,
                             RowRange{first, first + chunks_of(bounds.length)},
                             [](int64_t) { return T(1); });
  if (mean && bounds.length > 0) sum /= static_cast<T>(bounds.length);
  store_tile_column<V>(out + segment * layout.dim, layout.dim, sum);
}

struct WarpToken {
  int64_t token;  // num_tokens or more for the warps past the end
  int64_t segment;
};

// This warp's token and its segment (by division when padded, by binary search over
// cu_seqlens when packed).
__device__ __forceinline__ WarpToken warp_token(const LisLayout& layout) {
  const int64_t token =
      static_cast<int64_t>(blockIdx.x) * kLisWarps + threadIdx.x / kWarpSize;
  if (token >= layout.num_tokens) return WarpToken{token, -1};
  const SegmentLayout& segments = layout.segments;
  if (segments.cu_seqlens == nullptr) return WarpToken{token, token / segments.row_length};
  return WarpToken{token, last_at_or_below(segments.num_segments, token, [&](int64_t s) {
                     return static_cast<int64_t>(segments.cu_seqlens[s]);
                   })};
}

template <typename In, int V>
__global__ void __launch_bounds__(kLisThreads)
    segment_dot_kernel(const In* __restrict__ x, const Acc<In>* __restrict__ u,
                       const Acc<In>* __restrict__ c, Acc<In>* __restrict__ out,
                       LisLayout layout) {
  using T = Acc<In>;
  const WarpToken at = warp_token(layout);
  // Uniform over the warp, and the kernel has no block barrier.
  if (at.token >= layout.num_tokens) return;
  const int lane = threadIdx.x % kWarpSize;
  const In* row = x + at.token * layout.dim;
  const T* u_row = u + at.segment * layout.dim;
  T acc[V] = {};
#pragma unroll 4
  for (int64_t col = lane * V; col < layout.dim; col += kWarpSize * V) {
    In xs[V];
    T us[V];
    load_pack(row + col, xs);
    load_pack(u_row + col, us);
#pragma unroll
    for (int k = 0; k < V; ++k) acc[k] = fma(Scalar<In>::load(xs[k]), us[k], acc[k]);
  }
  T sum = acc[0];
#pragma unroll
  for (int k = 1; k < V; ++k) sum += acc[k];
  sum = warp_allreduce(sum, [](T a, T b) { return a + b; });
  if (lane == 0) out[at.token] = sum + c[at.segment];
}

template <typename Out, int V>
__global__ void __launch_bounds__(kLisThreads)
    input_grad_kernel(const Acc<Out>* __restrict__ grad, const Acc<Out>* __restrict__ u,
                      const Acc<Out>* __restrict__ w, Out* __restrict__ out, LisLayout layout) {
  using T = Acc<Out>;
  const WarpToken at = warp_token(layout);
  if (at.token >= layout.num_tokens) return;
  const int lane = threadIdx.x % kWarpSize;
  const T g = grad[at.token];
  const T* u_row = u + at.segment * layout.dim;
  const T* w_row = w + at.segment * layout.dim;
  Out* out_row = out + at.token * layout.dim;
#pragma unroll 4
  for (int64_t col = lane * V; col < layout.dim; col += kWarpSize * V) {
    T us[V];
    T ws[V];
    load_pack(u_row + col, us);
    load_pack(w_row + col, ws);
    Out values[V];
#pragma unroll
    for (int k = 0; k < V; ++k) values[k] = Scalar<Out>::store(fma(g, us[k], ws[k]));
    store_pack(out_row + col, values);
  }
}

inline bool aligned_to_pack(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % kPackBytes == 0;
}

// Runs launch(std::integral_constant<int, V>{}) with V = kPackWidth<In> when every row of
// every matrix starts on a 16-byte boundary (aligned bases, dim a multiple of the pack; the
// accumulation-type matrices then follow, their elements being at least as wide), else V = 1.
template <typename In, typename Launch, typename... Pointers>
cudaError_t launch_packed(int64_t dim, Launch&& launch, const Pointers*... bases) {
  constexpr int kWidth = kPackWidth<In>;
  if (dim % kWidth == 0 && (aligned_to_pack(bases) && ...)) {
    return launch(std::integral_constant<int, kWidth>{});
  }
  return launch(std::integral_constant<int, 1>{});
}

// Column tiles of a segment_sum launch: kWarpSize packs of V columns each.
template <int V>
int64_t column_tiles(int64_t dim) {
  return (dim + kWarpSize * V - 1) / (kWarpSize * V);
}

template <typename In>
cudaError_t launch_segment_sum(const LisSegmentSumParams& p, cudaStream_t stream) {
  using T = Acc<In>;
  const LisLayout& layout = p.layout;
  const int64_t slots = lis_segment_sum_workspace_rows(layout);
  return launch_packed<In>(
      layout.dim,
      [&](auto width) {
        constexpr int V = decltype(width)::value;
        const int64_t tiles = column_tiles<V>(layout.dim);
        if (slots > kMaxGridX || tiles > kMaxGridY) return cudaErrorInvalidConfiguration;
        const auto* x = static_cast<const In*>(p.x);
        auto* workspace = static_cast<T*>(p.workspace);
        // With no tokens every slot is empty: the reduction alone writes the zeros.
        if (layout.num_tokens > 0) {
          segment_sum_chunks_kernel<In, V>
              <<<dim3(static_cast<unsigned>(slots), static_cast<unsigned>(tiles)), kLisThreads, 0,
                 stream>>>(x, static_cast<const T*>(p.token_weight), workspace, layout);
        }
        segment_sum_reduce_kernel<T, V><<<dim3(static_cast<unsigned>(layout.segments.num_segments),
                                               static_cast<unsigned>(tiles)),
                                          kLisThreads, 0, stream>>>(
            workspace, static_cast<T*>(p.out), layout, p.token_weight == nullptr);
        return cudaGetLastError();
      },
      p.x, p.workspace, p.out);
}

// Blocks of a one-warp-per-token launch.
inline int64_t token_blocks(const LisLayout& layout) {
  return (layout.num_tokens + kLisWarps - 1) / kLisWarps;
}

template <typename In>
cudaError_t launch_segment_dot(const LisSegmentDotParams& p, cudaStream_t stream) {
  using T = Acc<In>;
  const LisLayout& layout = p.layout;
  return launch_packed<In>(
      layout.dim,
      [&](auto width) {
        segment_dot_kernel<In, decltype(width)::value>
            <<<static_cast<unsigned>(token_blocks(layout)), kLisThreads, 0, stream>>>(
                static_cast<const In*>(p.x), static_cast<const T*>(p.u),
                static_cast<const T*>(p.c), static_cast<T*>(p.out), layout);
        return cudaGetLastError();
      },
      p.x, p.u);
}

template <typename Out>
cudaError_t launch_input_grad(const LisInputGradParams& p, cudaStream_t stream) {
  using T = Acc<Out>;
  const LisLayout& layout = p.layout;
  return launch_packed<Out>(
      layout.dim,
      [&](auto width) {
        input_grad_kernel<Out, decltype(width)::value>
            <<<static_cast<unsigned>(token_blocks(layout)), kLisThreads, 0, stream>>>(
                static_cast<const T*>(p.grad), static_cast<const T*>(p.u),
                static_cast<const T*>(p.w), static_cast<Out*>(p.out), layout);
        return cudaGetLastError();
      },
      p.u, p.w, p.out);
}

// The checks of a one-warp-per-token launch, then dispatch_scalar(): nothing to do without
// tokens, and grid.x is 31 bits.
template <typename Launch>
cudaError_t launch_per_token(const LisLayout& layout, ScalarKind dtype, Launch&& launch) {
  if (layout.num_tokens == 0) return cudaSuccess;
  if (token_blocks(layout) > kMaxGridX) return cudaErrorInvalidConfiguration;
  return dispatch_scalar(dtype, launch);
}

}  // namespace

int64_t lis_segment_sum_workspace_rows(const LisLayout& layout) {
  return layout.segments.num_segments + layout.num_tokens / kChunkTokens;
}

cudaError_t launch_lis_segment_sum(const LisSegmentSumParams& params, cudaStream_t stream) {
  // No segment or no column: the output is empty.
  if (params.layout.segments.num_segments == 0 || params.layout.dim == 0) return cudaSuccess;
  return dispatch_scalar(params.dtype, [&](auto tag) {
    return launch_segment_sum<typename decltype(tag)::type>(params, stream);
  });
}

cudaError_t launch_lis_segment_dot(const LisSegmentDotParams& params, cudaStream_t stream) {
  return launch_per_token(params.layout, params.dtype, [&](auto tag) {
    return launch_segment_dot<typename decltype(tag)::type>(params, stream);
  });
}

cudaError_t launch_lis_input_grad(const LisInputGradParams& params, cudaStream_t stream) {
  // No column: the output is empty.
  if (params.layout.dim == 0) return cudaSuccess;
  return launch_per_token(params.layout, params.dtype, [&](auto tag) {
    return launch_input_grad<typename decltype(tag)::type>(params, stream);
  });
}

}  // namespace cuda
}  // namespace vsops
