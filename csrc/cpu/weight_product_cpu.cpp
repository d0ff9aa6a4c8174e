// CPU kernels of lis_weight_product and lis_weight_grad (vsops/ops/lis.py): a few vectors
// times a projection weight (the GEMVs of LIS scoring when a batch has several segments) and
// the weight gradients (sums of a few outer products). A library GEMM with 2-16 vectors
// moves the weight at about a third of the memory bandwidth here; these loops stream it once,
// a few rows at a time, and accumulate in float32 whatever the weight's dtype. Past 16
// vectors the products are compute-bound and vsops/lis.py hands them to the library GEMM.
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

template <typename T>
using Acc = acc_t<T>;

// Register tiles: kTileRows weight rows times up to kTileVectors vectors, so each weight load
// feeds several fused multiply-adds and the accumulators never leave registers.
constexpr int kTileRows = 4;
constexpr int kTileVectors = 4;
// Weight rows per task of the dot products and the weight gradients, and the columns per chunk
// they sweep (a multiple of every kStep): 8 vectors' slice of 512 float32 columns is 16 KiB.
constexpr int64_t kRowGrain = 16;
constexpr int64_t kChunkColumns = 512;
// Weight columns per task of the weighted row sums: D = 3584 splits into 14 even tasks, and a
// task's slice of the output (vectors x columns) stays in L1.
constexpr int64_t kColumnBlock = 256;

// Running dot products of the R rows from j with the V vectors from s, over columns
// [e0, e1): one vector of lane partial sums per (row, vector) in `partial` (the task's rows
// from j0, num_vectors per row).
template <typename T, int R, int V>
void dot_tile(const T* weight, const Acc<T>* vectors, int64_t j, int64_t s, int64_t j0, int64_t num_vectors,
              int64_t dim, int64_t e0, int64_t e1, Acc<T>* partial) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  const auto slot = [&](int r, int v) { return partial + ((j - j0 + r) * num_vectors + s + v) * AccVec::size(); };
  AccVec sum[R][V];
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) sum[r][v] = AccVec::loadu(slot(r, v));
  }
  for (int64_t e = e0; e < e1; e += IO::kStep) {
    const int64_t count = std::min(IO::kStep, e1 - e);
    AccVec wv[R][IO::kParts];
    for (int r = 0; r < R; ++r) IO::load(weight + (j + r) * dim + e, count, wv[r]);
    for (int v = 0; v < V; ++v) {
      AccVec xv[IO::kParts];
      IO::load_acc(vectors + (s + v) * dim + e, count, xv);
      for (int r = 0; r < R; ++r) {
        for (int q = 0; q < IO::kParts; ++q) sum[r][v] = at::vec::fmadd(wv[r][q], xv[q], sum[r][v]);
      }
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int v = 0; v < V; ++v) sum[r][v].store(slot(r, v));
  }
}

// out[s, c0:c1] += sum over the R rows from j of vectors[s, row] weight[row, c0:c1], for the
// V vectors from s; rows are added in order.
template <typename T, int R, int V>
void sum_tile(const T* weight, const Acc<T>* vectors, int64_t j, int64_t s, int64_t rows, int64_t dim,
              int64_t c0, int64_t c1, Acc<T>* out) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  AccVec coefficient[V][R];
  for (int v = 0; v < V; ++v) {
    for (int r = 0; r < R; ++r) coefficient[v][r] = AccVec(vectors[(s + v) * rows + j + r]);
  }
  for (int64_t e = c0; e < c1; e += IO::kStep) {
    const int64_t count = std::min(IO::kStep, c1 - e);
    AccVec wv[R][IO::kParts];
    for (int r = 0; r < R; ++r) IO::load(weight + (j + r) * dim + e, count, wv[r]);
    for (int v = 0; v < V; ++v) {
      AccVec av[IO::kParts];
      IO::load_acc(out + (s + v) * dim + e, count, av);
      for (int r = 0; r < R; ++r) {
        for (int q = 0; q < IO::kParts; ++q) av[q] = at::vec::fmadd(coefficient[v][r], wv[r][q], av[q]);
      }
      IO::store_acc(out + (s + v) * dim + e, count, av);
    }
  }
}

// Calls tile<R, V>(args...) for V = min(kTileVectors, vectors left), over all vectors.
template <int R, template <int, int> class Tile, typename... Args>
void over_vectors(int64_t num_vectors, Args... args) {
  int64_t s = 0;
  for (; s + kTileVectors <= num_vectors; s += kTileVectors) Tile<R, kTileVectors>::run(s, args...);
  switch (num_vectors - s) {
    case 3: Tile<R, 3>::run(s, args...); break;
    case 2: Tile<R, 2>::run(s, args...); break;
    case 1: Tile<R, 1>::run(s, args...); break;
    default: break;
  }
}

template <typename T>
struct DotTile {
  template <int R, int V>
  struct Fn {
    static void run(int64_t s, const T* weight, const Acc<T>* vectors, int64_t j, int64_t j0, int64_t num_vectors,
                    int64_t dim, int64_t e0, int64_t e1, Acc<T>* partial) {
      dot_tile<T, R, V>(weight, vectors, j, s, j0, num_vectors, dim, e0, e1, partial);
    }
  };
};

template <typename T>
struct SumTile {
  template <int R, int V>
  struct Fn {
    static void run(int64_t s, const T* weight, const Acc<T>* vectors, int64_t j, int64_t rows, int64_t dim,
                    int64_t c0, int64_t c1, Acc<T>* out) {
      sum_tile<T, R, V>(weight, vectors, j, s, rows, dim, c0, c1, out);
    }
  };
};

// Both kernels read a short slice of each row at a time (a column block or chunk), too short
// for the hardware prefetcher to follow, so the slices a few tiles ahead are requested.
constexpr int64_t kPrefetchRows = 3 * kTileRows;

template <typename T>
void prefetch_rows(const T* weight, int64_t j0, int64_t j1, int64_t dim, int64_t c0, int64_t c1) {
  constexpr int64_t kLine = 64;
  for (int64_t j = j0; j < j1; ++j) {
    const char* begin = reinterpret_cast<const char*>(weight + j * dim + c0);
    const char* end = reinterpret_cast<const char*>(weight + j * dim + c1);
    for (const char* p = begin; p < end; p += kLine) __builtin_prefetch(p, 0, 3);
  }
}

// out[s, j] = weight[j] . vectors[s]   (vectors [S, D], out [S, d]). Columns go in chunks
// whose slice of the vectors stays in L1 while the task's rows stream past it; each row is
// read once.
template <typename T>
void weight_rows_dot(const T* weight, const Acc<T>* vectors, int64_t num_vectors, int64_t rows, int64_t dim,
                     Acc<T>* out) {
  using AccVec = at::vec::Vectorized<Acc<T>>;
  at::parallel_for(0, rows, kRowGrain, [&](int64_t j0, int64_t j1) {
    std::vector<Acc<T>> partial((j1 - j0) * num_vectors * AccVec::size(), Acc<T>(0));
    for (int64_t e0 = 0; e0 < dim; e0 += kChunkColumns) {
      const int64_t e1 = std::min(dim, e0 + kChunkColumns);
      int64_t j = j0;
      for (; j + kTileRows <= j1; j += kTileRows) {
        prefetch_rows(weight, std::min(j + kPrefetchRows, j1), std::min(j + kPrefetchRows + kTileRows, j1), dim, e0, e1);
        over_vectors<kTileRows, DotTile<T>::template Fn>(num_vectors, weight, vectors, j, j0, num_vectors, dim, e0,
                                                         e1, partial.data());
      }
      for (; j < j1; ++j) {
        over_vectors<1, DotTile<T>::template Fn>(num_vectors, weight, vectors, j, j0, num_vectors, dim, e0, e1,
                                                 partial.data());
      }
    }
    for (int64_t j = j0; j < j1; ++j) {
      for (int64_t s = 0; s < num_vectors; ++s) {
        const AccVec lanes = AccVec::loadu(partial.data() + ((j - j0) * num_vectors + s) * AccVec::size());
        out[s * rows + j] = at::vec::vec_reduce_all<Acc<T>>([](AccVec a, AccVec b) { return a + b; }, lanes);
      }
    }
  });
}

// out[s, :] = sum_j vectors[s, j] weight[j]   (vectors [S, d], out [S, D]). Each column is
// summed by one task in row order, so the result does not depend on the thread count.
template <typename T>
void weight_rows_sum(const T* weight, const Acc<T>* vectors, int64_t num_vectors, int64_t rows, int64_t dim,
                     Acc<T>* out) {
  const int64_t blocks = (dim + kColumnBlock - 1) / kColumnBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t c0 = b * kColumnBlock, c1 = std::min(dim, c0 + kColumnBlock);
      for (int64_t s = 0; s < num_vectors; ++s) std::fill(out + s * dim + c0, out + s * dim + c1, Acc<T>(0));
      int64_t j = 0;
      for (; j + kTileRows <= rows; j += kTileRows) {
        prefetch_rows(weight, std::min(j + kPrefetchRows, rows), std::min(j + kPrefetchRows + kTileRows, rows), dim, c0, c1);
        over_vectors<kTileRows, SumTile<T>::template Fn>(num_vectors, weight, vectors, j, rows, dim, c0, c1, out);
      }
      for (; j < rows; ++j) {
        over_vectors<1, SumTile<T>::template Fn>(num_vectors, weight, vectors, j, rows, dim, c0, c1, out);
      }
    }
  });
}

// Rows j..j+R of out, columns [e0, e1), into staged[r * kChunkColumns + (e - e0)]: R rows share
// each load of `right`, and their R independent sums hide the latency of the fused
// multiply-adds over the vectors.
template <typename T, int R>
void outer_sum_tile(const Acc<T>* left, const Acc<T>* right, int64_t num_vectors, int64_t rows, int64_t dim,
                    int64_t j, int64_t e0, int64_t e1, T* staged) {
  using IO = VecIO<T>;
  using AccVec = typename IO::AccVec;
  for (int64_t e = e0; e < e1; e += IO::kStep) {
    const int64_t count = std::min(IO::kStep, e1 - e);
    AccVec sum[R][IO::kParts];
    for (auto& row : sum) {
      for (auto& part : row) part = AccVec(Acc<T>(0));
    }
    for (int64_t s = 0; s < num_vectors; ++s) {
      AccVec rv[IO::kParts];
      IO::load_acc(right + s * dim + e, count, rv);
      for (int r = 0; r < R; ++r) {
        const AccVec coefficient(left[s * rows + j + r]);
        for (int q = 0; q < IO::kParts; ++q) sum[r][q] = at::vec::fmadd(coefficient, rv[q], sum[r][q]);
      }
    }
    for (int r = 0; r < R; ++r) IO::store(staged + r * kChunkColumns + (e - e0), count, sum[r]);
  }
}

// out[j, :] = sum_s left[s, j] right[s, :] in the output dtype (left [S, d], right [S, D],
// out [d, D]): the weight gradients, written once. Column chunks keep the vectors' slice in
// L1; each tile of rows is staged in the output dtype and, for outputs past the cache, written
// with streaming stores.
template <typename T>
void outer_sum(const Acc<T>* left, const Acc<T>* right, int64_t num_vectors, int64_t rows, int64_t dim,
               T* out) {
  const bool streaming = rows * dim * static_cast<int64_t>(sizeof(T)) >= kStreamingOutputBytes;
  const int64_t element_bytes = static_cast<int64_t>(sizeof(T));
  at::parallel_for(0, rows, kRowGrain, [&](int64_t j0, int64_t j1) {
    T staged[kTileRows * kChunkColumns];
    const auto write = [&](int64_t j, int r, int64_t e0, int64_t e1) {
      copy_row(reinterpret_cast<char*>(out + (j + r) * dim + e0),
               reinterpret_cast<const char*>(staged + r * kChunkColumns), (e1 - e0) * element_bytes, streaming);
    };
    for (int64_t e0 = 0; e0 < dim; e0 += kChunkColumns) {
      const int64_t e1 = std::min(dim, e0 + kChunkColumns);
      int64_t j = j0;
      for (; j + kTileRows <= j1; j += kTileRows) {
        outer_sum_tile<T, kTileRows>(left, right, num_vectors, rows, dim, j, e0, e1, staged);
        for (int r = 0; r < kTileRows; ++r) write(j, r, e0, e1);
      }
      for (; j < j1; ++j) {
        outer_sum_tile<T, 1>(left, right, num_vectors, rows, dim, j, e0, e1, staged);
        write(j, 0, e0, e1);
      }
    }
    stream_fence();
  });
}

}  // namespace

at::Tensor lis_weight_product(const at::Tensor& vectors, const at::Tensor& weight, bool transpose) {
  check_lis_weight_product(vectors, weight, transpose);
  const int64_t rows = weight.size(0), dim = weight.size(1);
  at::Tensor out = empty_checked({vectors.size(0), transpose ? rows : dim}, vectors.options(), "vectors and weight");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, weight.scalar_type(), "vsops_lis_weight_product", [&] {
    using A = Acc<scalar_t>;
    const auto kernel = transpose ? weight_rows_dot<scalar_t> : weight_rows_sum<scalar_t>;
    kernel(weight.const_data_ptr<scalar_t>(), vectors.const_data_ptr<A>(), vectors.size(0), rows, dim,
           out.mutable_data_ptr<A>());
  });
  return out;
}

at::Tensor lis_weight_grad(const at::Tensor& left, const at::Tensor& right, at::ScalarType dtype) {
  check_lis_weight_grad(left, right, dtype);
  at::Tensor out = empty_checked({left.size(1), right.size(1)}, right.options().dtype(dtype), "left and right");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "vsops_lis_weight_grad", [&] {
    using A = Acc<scalar_t>;
    outer_sum(left.const_data_ptr<A>(), right.const_data_ptr<A>(), left.size(0), left.size(1), right.size(1),
              out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace cpu
}  // namespace vsops
