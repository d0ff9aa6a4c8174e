// Hard top-k mask on the CPU: per segment, an O(n) selection (nth_element) over ordered keys,
// ties to the lower index, segments in parallel.
#include <algorithm>
#include <numeric>
#include <vector>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "op_common.h"
#include "vsops/segments.h"
#include "vsops/topk_math.h"

namespace vsops {
namespace cpu {
namespace {

template <typename scalar_t>
void topk_rows(const at::Tensor& scores, const at::Tensor& k, const int32_t* cu,
               const SegmentShape& shape, at::Tensor& keep) {
  // Half and bfloat16 convert exactly to float, so they share float's 32-bit keys.
  using T = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using Key = typename topk::KeyOf<T>::type;
  const scalar_t* in = scores.data_ptr<scalar_t>();
  const int64_t* k_ptr = k.data_ptr<int64_t>();
  bool* out = keep.data_ptr<bool>();
  at::parallel_for(0, shape.num_segments, 1, [&](int64_t begin, int64_t end) {
    std::vector<Key> keys;
    std::vector<int64_t> order;
    for (int64_t row = begin; row < end; ++row) {
      int64_t start, n;
      segment_bounds(cu, shape.row_length, row, start, n);
      const int64_t kk = std::clamp<int64_t>(k_ptr[row], 0, n);
      std::fill(out + start, out + start + n, kk == n);
      if (kk == 0 || kk == n) continue;
      keys.resize(n);
      for (int64_t i = 0; i < n; ++i) keys[i] = topk::ordered_key(static_cast<T>(in[start + i]));
      order.resize(n);
      std::iota(order.begin(), order.end(), int64_t(0));
      std::nth_element(order.begin(), order.begin() + (kk - 1), order.end(),
                       [&](int64_t a, int64_t b) { return topk::ranks_before(keys[a], a, keys[b], b); });
      for (int64_t j = 0; j < kk; ++j) out[start + order[j]] = true;
    }
  });
}

}  // namespace

at::Tensor topk_mask(const at::Tensor& scores, const at::Tensor& k,
                     const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_k(k, scores, cu_seqlens, shape);
  at::Tensor keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const int32_t* cu = cu_seqlens_data(cu_seqlens);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, scores.scalar_type(),
                                  "vsops::topk_mask",
                                  [&] { topk_rows<scalar_t>(scores, k, cu, shape, keep); });
  return keep;
}

}  // namespace cpu
}  // namespace vsops
