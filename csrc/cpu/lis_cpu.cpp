// CPU kernels of the LIS scoring passes (vsops/ops/lis.py): segment sum, segment dot and the
// input gradient. All three stream x (or dx) once, in chunks of consecutive tokens of one
// segment so that threads split long segments and batches of short ones alike.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "cpu/stream_copy.h"
#include "cpu/vec_io.h"
#include "op_common.h"

namespace vsops {
namespace cpu {
namespace {

// Tokens per chunk. Fixed, not derived from the thread count, so results do not depend on it.
constexpr int64_t kChunkTokens = 128;
// Columns of the per-segment reduction of chunk partial sums handled per task.
constexpr int64_t kReduceColumns = 512;

struct Chunk {
  int64_t segment;
  int64_t begin;  // token range [begin, end)
  int64_t end;
};

struct ChunkPlan {
  std::vector<Chunk> chunks;
  std::vector<int64_t> first_chunk;  // [S + 1]: segment s owns chunks [first_chunk[s], first_chunk[s + 1])
};

ChunkPlan plan_chunks(const LisShape& shape, const std::optional<at::Tensor>& cu_seqlens) {
  const int32_t* cu = cu_seqlens_data(cu_seqlens);
  ChunkPlan plan;
  plan.first_chunk.reserve(shape.num_segments + 1);
  for (int64_t s = 0; s < shape.num_segments; ++s) {
    plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
    const int64_t lo = cu ? cu[s] : s * shape.row_length;
    const int64_t hi = cu ? cu[s + 1] : (s + 1) * shape.row_length;
    for (int64_t b = lo; b < hi; b += kChunkTokens) {
      plan.chunks.push_back(Chunk{s, b, std::min(hi, b + kChunkTokens)});
    }
  }
  plan.first_chunk.push_back(static_cast<int64_t>(plan.chunks.size()));
  return plan;
}

template <typename T>
using Acc = acc_t<T>;

// acc += w x for one token (w = 1 without weights). The partial row acc stays in L1; one
// token at a time, because streaming several rows of x per thread at once measured slower.
template <typename T>
void accumulate_row(const T* x, const Acc<T>* weight, int64_t dim, Acc<T>* acc) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  const AccVec w(weight ? *weight : Acc<T>(1));
  for (int64_t e = 0; e < dim; e += IO::kStep) {
    const int64_t count = std::min(IO::kStep, dim - e);
    AccVec av[IO::kParts], xv[IO::kParts];
    IO::load_acc(acc + e, count, av);
    IO::load(x + e, count, xv);
    for (int q = 0; q < IO::kParts; ++q) av[q] = weight ? at::vec::fmadd(w, xv[q], av[q]) : av[q] + xv[q];
    IO::store_acc(acc + e, count, av);
  }
}

// partial[c] = sum over the tokens i of chunk c of w_i x_i (w_i = 1 without weights).
template <typename T>
void sum_chunks(const T* x, const Acc<T>* weight, const ChunkPlan& plan, int64_t dim, Acc<T>* partial) {
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& chunk = plan.chunks[c];
      Acc<T>* acc = partial + c * dim;
      std::fill(acc, acc + dim, Acc<T>(0));
      for (int64_t i = chunk.begin; i < chunk.end; ++i) {
        accumulate_row(x + i * dim, weight ? weight + i : nullptr, dim, acc);
      }
    }
  });
}

// out[s] = scale_s * sum of the segment's chunk partials, in chunk order.
template <typename Acc>
void reduce_chunks(const Acc* partial, const ChunkPlan& plan, const LisShape& shape, bool mean, Acc* out) {
  const int64_t dim = shape.dim;
  const int64_t blocks = (dim + kReduceColumns - 1) / kReduceColumns;
  at::parallel_for(0, shape.num_segments * blocks, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / blocks;
      const int64_t col0 = (t % blocks) * kReduceColumns;
      const int64_t col1 = std::min(dim, col0 + kReduceColumns);
      Acc* dst = out + s * dim;
      std::fill(dst + col0, dst + col1, Acc(0));
      const int64_t first = plan.first_chunk[s], last = plan.first_chunk[s + 1];
      for (int64_t c = first; c < last; ++c) {
        const Acc* src = partial + c * dim;
        for (int64_t j = col0; j < col1; ++j) dst[j] += src[j];
      }
      if (mean && last > first) {
        const Acc tokens = static_cast<Acc>(plan.chunks[last - 1].end - plan.chunks[first].begin);
        for (int64_t j = col0; j < col1; ++j) dst[j] /= tokens;
      }
    }
  });
}

// Independent partial sums per dot product: a single chain of fused multiply-adds would
// wait on its latency. (Interleaving tokens instead, to share the loads of u, measured
// slower: two streams of x per thread stream worse than one.)
constexpr int kDotChains = 4;

template <typename T>
Acc<T> dot_row(const T* x, const Acc<T>* u, int64_t dim) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  AccVec sum[kDotChains][IO::kParts];
  for (auto& chain : sum) {
    for (auto& part : chain) part = AccVec(Acc<T>(0));
  }
  int64_t e = 0;
  for (; e + kDotChains * IO::kStep <= dim; e += kDotChains * IO::kStep) {
    for (int k = 0; k < kDotChains; ++k) {
      AccVec xv[IO::kParts], uv[IO::kParts];
      IO::load(x + e + k * IO::kStep, xv);
      IO::load_acc(u + e + k * IO::kStep, IO::kStep, uv);
      for (int q = 0; q < IO::kParts; ++q) sum[k][q] = at::vec::fmadd(xv[q], uv[q], sum[k][q]);
    }
  }
  for (; e < dim; e += IO::kStep) {
    const int64_t count = std::min(IO::kStep, dim - e);
    AccVec xv[IO::kParts], uv[IO::kParts];
    IO::load(x + e, count, xv);
    IO::load_acc(u + e, count, uv);
    for (int q = 0; q < IO::kParts; ++q) sum[0][q] = at::vec::fmadd(xv[q], uv[q], sum[0][q]);
  }
  AccVec total(Acc<T>(0));
  for (const auto& chain : sum) {
    for (const auto& part : chain) total = total + part;
  }
  return at::vec::vec_reduce_all<Acc<T>>([](AccVec a, AccVec b) { return a + b; }, total);
}

template <typename T>
void dot_tokens(const T* x, const Acc<T>* u, const Acc<T>* c, const ChunkPlan& plan, int64_t dim, Acc<T>* out) {
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    for (int64_t ci = c0; ci < c1; ++ci) {
      const Chunk& chunk = plan.chunks[ci];
      const Acc<T>* us = u + chunk.segment * dim;
      const Acc<T> cs = c[chunk.segment];
      for (int64_t i = chunk.begin; i < chunk.end; ++i) out[i] = dot_row(x + i * dim, us, dim) + cs;
    }
  });
}

// dx rows, each staged in L1 and then written whole: with streaming stores when dx is past
// the cache, so its lines are not read before being overwritten.
template <typename T>
void input_grad_tokens(const Acc<T>* grad, const Acc<T>* u, const Acc<T>* w, const ChunkPlan& plan,
                       int64_t num_tokens, int64_t dim, T* out) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  const int64_t row_bytes = dim * static_cast<int64_t>(sizeof(T));
  const bool streaming = num_tokens * row_bytes >= kStreamingOutputBytes;
  at::parallel_for(0, static_cast<int64_t>(plan.chunks.size()), 1, [&](int64_t c0, int64_t c1) {
    std::vector<T> staged(dim);
    for (int64_t ci = c0; ci < c1; ++ci) {
      const Chunk& chunk = plan.chunks[ci];
      const Acc<T>* us = u + chunk.segment * dim;
      const Acc<T>* ws = w + chunk.segment * dim;
      for (int64_t i = chunk.begin; i < chunk.end; ++i) {
        const AccVec g(grad[i]);
        for (int64_t e = 0; e < dim; e += IO::kStep) {
          const int64_t count = std::min(IO::kStep, dim - e);
          AccVec uv[IO::kParts], wv[IO::kParts];
          IO::load_acc(us + e, count, uv);
          IO::load_acc(ws + e, count, wv);
          for (int q = 0; q < IO::kParts; ++q) uv[q] = at::vec::fmadd(g, uv[q], wv[q]);
          IO::store(staged.data() + e, count, uv);
        }
        copy_row(reinterpret_cast<char*>(out + i * dim), reinterpret_cast<const char*>(staged.data()), row_bytes,
                 streaming);
      }
    }
    stream_fence();
  });
}

#define VSOPS_DISPATCH_LIS(dtype, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vsops_lis", __VA_ARGS__)

}  // namespace

at::Tensor lis_segment_sum(const at::Tensor& x, const std::optional<at::Tensor>& token_weight,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const LisShape shape = check_lis_input(x, cu_seqlens);
  const at::ScalarType acc = state_dtype_for(x.scalar_type());
  if (token_weight.has_value()) {
    check_lis_operand(*token_weight, "token_weight", lis_token_sizes(shape), acc, x.device());
  }
  at::Tensor out = empty_checked({shape.num_segments, shape.dim}, x.options().dtype(acc), "x's segments and width");
  // Nothing to compute, and no plan over tokens that may be more than memory holds (a zero-width x).
  if (out.numel() == 0) return out;
  const ChunkPlan plan = plan_chunks(shape, cu_seqlens);
  at::Tensor partial = at::empty({static_cast<int64_t>(plan.chunks.size()), shape.dim}, out.options());
  VSOPS_DISPATCH_LIS(x.scalar_type(), [&] {
    using A = Acc<scalar_t>;
    const A* weight = token_weight.has_value() ? token_weight->const_data_ptr<A>() : nullptr;
    sum_chunks(x.const_data_ptr<scalar_t>(), weight, plan, shape.dim, partial.mutable_data_ptr<A>());
    reduce_chunks(partial.const_data_ptr<A>(), plan, shape, weight == nullptr, out.mutable_data_ptr<A>());
  });
  return out;
}

at::Tensor lis_segment_dot(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const LisShape shape = check_lis_segment_dot(x, u, c, cu_seqlens);
  at::Tensor out = empty_checked(lis_token_sizes(shape), x.options().dtype(u.scalar_type()), "x's tokens");
  const ChunkPlan plan = plan_chunks(shape, cu_seqlens);
  VSOPS_DISPATCH_LIS(x.scalar_type(), [&] {
    using A = Acc<scalar_t>;
    dot_tokens(x.const_data_ptr<scalar_t>(), u.const_data_ptr<A>(), c.const_data_ptr<A>(), plan, shape.dim,
               out.mutable_data_ptr<A>());
  });
  return out;
}

at::Tensor lis_input_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& w,
                          const std::optional<at::Tensor>& cu_seqlens, at::ScalarType dtype) {
  const LisShape shape = check_lis_input_grad(grad, u, w, cu_seqlens, dtype);
  std::vector<int64_t> sizes = lis_token_sizes(shape);
  sizes.push_back(shape.dim);
  at::Tensor out = empty_checked(sizes, grad.options().dtype(dtype), "grad's tokens and u's width");
  if (out.numel() == 0) return out;
  const ChunkPlan plan = plan_chunks(shape, cu_seqlens);
  VSOPS_DISPATCH_LIS(dtype, [&] {
    using A = Acc<scalar_t>;
    input_grad_tokens(grad.const_data_ptr<A>(), u.const_data_ptr<A>(), w.const_data_ptr<A>(), plan,
                      shape.num_tokens, shape.dim, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace cpu
}  // namespace vsops
