// Attention received by each key on the CPU, per segment and head: tiles of query rows times
// all keys of the segment as one GEMM (ATen's, MKL), then per row the softmax statistics and
// exponentials in place, and the column sums of the normalized rows added to the keys
// (vectorized; threads split the rows, then the columns).
// A tile holds whole rows, so the two passes of the GPU kernels (statistics, then column sums)
// are two sweeps over the tile here; the tile size is the reference's, never a head's n x n.
#include <algorithm>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include "cpu/kernels.h"
#include "op_common.h"

namespace vsops {
namespace cpu {
namespace {


// Columns per thread in the column sums: a chunk of the accumulator stays in L1 while the
// tile's rows stream past it.
constexpr int64_t kColumnGrain = 1024;

// Adds weight * softmax(row) of every row of `tile` [m, n] (logits already scaled) to
// `received` [n]. The exponentials are written into the tile; each row's 1 / sum is folded into
// the column sums, so the tile is swept twice (statistics, then columns), not three times.
template <typename Acc>
void add_softmax_columns(at::Tensor& tile, Acc weight, Acc* received) {
  using Vec = at::vec::Vectorized<Acc>;
  const int64_t m = tile.size(0), n = tile.size(1);
  Acc* data = tile.data_ptr<Acc>();
  std::vector<Acc> scale(m);
  at::parallel_for(0, m, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      Acc* row = data + i * n;
      const Acc top = at::vec::reduce_all<Acc>([](Vec a, Vec b) { return at::vec::maximum(a, b); }, row, n);
      at::vec::map<Acc>([top](Vec x) { return (x - Vec(top)).exp(); }, row, row, n);
      scale[i] = weight / at::vec::reduce_all<Acc>([](Vec a, Vec b) { return a + b; }, row, n);
    }
  });
  at::parallel_for(0, n, kColumnGrain, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < m; ++i) {
      const Acc* row = data + i * n;
      const Vec w(scale[i]);
      int64_t j = begin;
      for (; j + Vec::size() <= end; j += Vec::size()) {
        (Vec::loadu(received + j) + Vec::loadu(row + j) * w).store(received + j);
      }
      for (; j < end; ++j) received[j] += row[j] * scale[i];
    }
  });
}

template <typename Acc>
void received_segment(const at::Tensor& q, const at::Tensor& k, double scale, at::Tensor out) {
  const int64_t n_q = q.size(0), n_k = k.size(0), heads = q.size(1);
  if (n_k == 0 || n_q == 0) return;  // out is zero already
  const int64_t rows = std::max<int64_t>(1, kTileElements / n_k);
  const Acc weight = Acc(1) / static_cast<Acc>(heads * n_q);
  Acc* received = out.data_ptr<Acc>();
  for (int64_t h = 0; h < heads; ++h) {
    const at::Tensor keys_t = k.select(1, h).t();
    for (int64_t r = 0; r < n_q; r += rows) {
      const int64_t m = std::min(rows, n_q - r);
      at::Tensor tile = at::mm(q.select(1, h).narrow(0, r, m) * scale, keys_t).contiguous();
      add_softmax_columns<Acc>(tile, weight, received);
    }
  }
}

}  // namespace

at::Tensor attention_received(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, double scale) {
  check_attention_received_inputs(q, k, cu_seqlens_q, cu_seqlens_k, scale);
  const at::ScalarType acc = state_dtype_for(q.scalar_type());
  const at::Tensor queries = q.to(acc), keys = k.to(acc);
  at::Tensor out = at::zeros({k.size(0)}, k.options().dtype(acc));
  const int32_t* cq = cu_seqlens_q.data_ptr<int32_t>();
  const int32_t* ck = cu_seqlens_k.data_ptr<int32_t>();
  for (int64_t s = 0; s + 1 < cu_seqlens_q.numel(); ++s) {
    const at::Tensor segment_q = queries.narrow(0, cq[s], cq[s + 1] - cq[s]);
    const at::Tensor segment_k = keys.narrow(0, ck[s], ck[s + 1] - ck[s]);
    at::Tensor segment_out = out.narrow(0, ck[s], ck[s + 1] - ck[s]);
    if (acc == at::kDouble) {
      received_segment<double>(segment_q, segment_k, scale, segment_out);
    } else {
      received_segment<float>(segment_q, segment_k, scale, segment_out);
    }
  }
  return out;
}

}  // namespace cpu
}  // namespace vsops
