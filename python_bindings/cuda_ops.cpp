// CUDA implementations of the vsops ops (schemas in ops.cpp): check the tensors, turn them
// into the plain-CUDA params structs of csrc/cuda/launch.h and launch on the current stream.
// Compiled by the host compiler in CUDA builds only.
//
// The stream comes from c10/cuda rather than ATen/cuda/CUDAContext.h, whose cuBLAS and
// cuSOLVER includes this file does not need.
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "op_common.h"
#include "vsops/difftopk_math.h"

namespace vsops {
namespace {

cuda::ScalarKind scalar_kind(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return cuda::ScalarKind::kFloat16;
    case at::kBFloat16:
      return cuda::ScalarKind::kBFloat16;
    case at::kFloat:
      return cuda::ScalarKind::kFloat32;
    case at::kDouble:
      return cuda::ScalarKind::kFloat64;
    default:
      TORCH_CHECK_TYPE(false, "vsops: CUDA kernels take float16, bfloat16, float32 or float64, ",
                       "got ", dtype);
  }
}

cuda::SegmentLayout segment_layout(const SegmentShape& shape,
                                   const std::optional<at::Tensor>& cu_seqlens) {
  return cuda::SegmentLayout{cu_seqlens_data(cu_seqlens), shape.num_segments, shape.row_length};
}

void check_launch(cudaError_t status) {
  TORCH_CHECK(status == cudaSuccess, "vsops: CUDA kernel launch failed: ",
              cudaGetErrorString(status));
}

// The packed layout's cu_seqlens runs from 0 to numel, so the segments cover the outputs and
// they need no zero fill. (A device cu_seqlens is not re-read here: that would sync.)
std::tuple<at::Tensor, at::Tensor> difftopk_forward(const at::Tensor& scores, const at::Tensor& k,
                                                    const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_k(k, scores, cu_seqlens, shape);
  const cuda::ScalarKind dtype = scalar_kind(scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor mask = at::empty_like(scores);
  at::Tensor row_state = at::empty({shape.num_segments, difftopk::kRowStateWidth},
                                   scores.options().dtype(state_dtype_for(scores.scalar_type())));
  const cuda::DiffTopKForwardParams params{scores.const_data_ptr(), k.const_data_ptr<int64_t>(),
                                           mask.mutable_data_ptr(), row_state.mutable_data_ptr(),
                                           segment_layout(shape, cu_seqlens), dtype};
  check_launch(cuda::launch_difftopk_forward(params, c10::cuda::getCurrentCUDAStream()));
  return {mask, row_state};
}

at::Tensor difftopk_backward(const at::Tensor& grad, const at::Tensor& scores,
                             const at::Tensor& row_state,
                             const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_backward_inputs(grad, scores, row_state, shape.num_segments);
  const cuda::ScalarKind dtype = scalar_kind(scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor grad_scores = at::empty_like(scores);
  const cuda::DiffTopKBackwardParams params{grad.const_data_ptr(), scores.const_data_ptr(),
                                            row_state.const_data_ptr(),
                                            grad_scores.mutable_data_ptr(),
                                            segment_layout(shape, cu_seqlens), dtype};
  check_launch(cuda::launch_difftopk_backward(params, c10::cuda::getCurrentCUDAStream()));
  return grad_scores;
}

at::Tensor topk_mask(const at::Tensor& scores, const at::Tensor& k,
                     const std::optional<at::Tensor>& cu_seqlens) {
  const SegmentShape shape = check_scores_layout(scores, cu_seqlens);
  check_k(k, scores, cu_seqlens, shape);
  const cuda::ScalarKind dtype = scalar_kind(scores.scalar_type());
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor keep = at::empty(scores.sizes(), scores.options().dtype(at::kBool));
  const cuda::TopKMaskParams params{scores.const_data_ptr(), k.const_data_ptr<int64_t>(),
                                    keep.mutable_data_ptr<bool>(),
                                    segment_layout(shape, cu_seqlens), dtype};
  check_launch(cuda::launch_topk_mask(params, c10::cuda::getCurrentCUDAStream()));
  return keep;
}

at::Tensor divprune_keep(const at::Tensor& x, const at::Tensor& k, const at::Tensor& cu_seqlens) {
  check_divprune_inputs(x, k, cu_seqlens);
  const int64_t segments = cu_seqlens.numel() - 1;
  TORCH_CHECK_VALUE(segments <= cuda::kMaxDivPruneSegments, "vsops: divprune_keep takes at most ",
                    cuda::kMaxDivPruneSegments, " segments on CUDA, got ", segments);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::ScalarType acc = state_dtype_for(x.scalar_type());
  const at::Tensor rows = x.to(acc);
  // As torch.nn.functional.normalize (and the CPU kernel): a zero row stays zero.
  const at::Tensor unit = (rows / rows.norm(2, {1}, true).clamp_min(1e-12)).contiguous();
  at::Tensor nearest = at::empty({x.size(0)}, unit.options());
  at::Tensor distance = at::full({x.size(0)}, std::numeric_limits<double>::infinity(), unit.options());
  at::Tensor keep = at::zeros({x.size(0)}, x.options().dtype(at::kBool));
  const cuda::DivPruneParams params{unit.const_data_ptr(), cu_seqlens.const_data_ptr<int32_t>(),
                                    k.const_data_ptr<int64_t>(), nearest.mutable_data_ptr(),
                                    distance.mutable_data_ptr(), keep.mutable_data_ptr<bool>(),
                                    segments, x.size(0), x.size(1), acc == at::kDouble};
  check_launch(cuda::launch_divprune(params, c10::cuda::getCurrentCUDAStream()));
  return keep;
}

// lse and the per-head column sums are workspaces from the caching allocator (stream-ordered,
// so freeing them here while the kernels still run is safe); every key's output is written, 0
// for a segment without queries.
at::Tensor attention_received(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, double scale) {
  check_attention_received_inputs(q, k, cu_seqlens_q, cu_seqlens_k, scale);
  const int64_t heads = q.size(1);
  TORCH_CHECK_VALUE(heads <= cuda::kMaxAttentionReceivedHeads, "vsops: attention_received takes at most ",
                    cuda::kMaxAttentionReceivedHeads, " heads on CUDA, got ", heads);
  const cuda::ScalarKind dtype = scalar_kind(q.scalar_type());
  const c10::cuda::CUDAGuard guard(q.device());
  const at::TensorOptions options = k.options().dtype(state_dtype_for(q.scalar_type()));
  at::Tensor out = at::empty({k.size(0)}, options);
  at::Tensor lse = at::empty({q.size(0), heads}, options);
  at::Tensor partial = at::empty({heads, k.size(0)}, options);
  const cuda::AttentionReceivedParams params{q.const_data_ptr(),
                                             k.const_data_ptr(),
                                             cu_seqlens_q.const_data_ptr<int32_t>(),
                                             cu_seqlens_k.const_data_ptr<int32_t>(),
                                             lse.mutable_data_ptr(),
                                             partial.mutable_data_ptr(),
                                             out.mutable_data_ptr(),
                                             cu_seqlens_q.numel() - 1,
                                             q.size(0),
                                             k.size(0),
                                             heads,
                                             q.size(2),
                                             scale,
                                             dtype};
  check_launch(cuda::launch_attention_received(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

cuda::LisLayout lis_layout(const LisShape& shape, const std::optional<at::Tensor>& cu_seqlens) {
  return cuda::LisLayout{
      cuda::SegmentLayout{cu_seqlens_data(cu_seqlens), shape.num_segments, shape.row_length},
      shape.num_tokens, shape.dim};
}

// The partial sums of the token chunks live in a workspace from the caching allocator: it is
// stream-ordered, so freeing it here while the kernels still run is safe.
at::Tensor lis_segment_sum(const at::Tensor& x, const std::optional<at::Tensor>& token_weight,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const LisShape shape = check_lis_input(x, cu_seqlens);
  const at::ScalarType acc = state_dtype_for(x.scalar_type());
  if (token_weight.has_value()) {
    check_lis_operand(*token_weight, "token_weight", lis_token_sizes(shape), acc, x.device());
  }
  const cuda::ScalarKind dtype = scalar_kind(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  const cuda::LisLayout layout = lis_layout(shape, cu_seqlens);
  at::Tensor out = empty_checked({shape.num_segments, shape.dim}, x.options().dtype(acc), "x's segments and width");
  at::Tensor workspace = empty_checked({cuda::lis_segment_sum_workspace_rows(layout), shape.dim}, out.options(),
                                       "x's segments and width");
  const cuda::LisSegmentSumParams params{
      x.const_data_ptr(), token_weight.has_value() ? token_weight->const_data_ptr() : nullptr,
      workspace.mutable_data_ptr(), out.mutable_data_ptr(), layout, dtype};
  check_launch(cuda::launch_lis_segment_sum(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor lis_segment_dot(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                           const std::optional<at::Tensor>& cu_seqlens) {
  const LisShape shape = check_lis_segment_dot(x, u, c, cu_seqlens);
  const cuda::ScalarKind dtype = scalar_kind(x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = empty_checked(lis_token_sizes(shape), x.options().dtype(u.scalar_type()), "x's tokens");
  const cuda::LisSegmentDotParams params{x.const_data_ptr(), u.const_data_ptr(), c.const_data_ptr(),
                                         out.mutable_data_ptr(), lis_layout(shape, cu_seqlens),
                                         dtype};
  check_launch(cuda::launch_lis_segment_dot(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor lis_input_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& w,
                          const std::optional<at::Tensor>& cu_seqlens, at::ScalarType dtype) {
  const LisShape shape = check_lis_input_grad(grad, u, w, cu_seqlens, dtype);
  const cuda::ScalarKind kind = scalar_kind(dtype);
  const c10::cuda::CUDAGuard guard(grad.device());
  std::vector<int64_t> sizes = lis_token_sizes(shape);
  sizes.push_back(shape.dim);
  at::Tensor out = empty_checked(sizes, grad.options().dtype(dtype), "grad's tokens and u's width");
  const cuda::LisInputGradParams params{grad.const_data_ptr(), u.const_data_ptr(), w.const_data_ptr(),
                                        out.mutable_data_ptr(), lis_layout(shape, cu_seqlens), kind};
  check_launch(cuda::launch_lis_input_grad(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

// total is the caller's count of kept tokens; checking it would sync, so the kernels write
// at most total rows whatever keep holds (see VarlenPackParams).
std::tuple<at::Tensor, std::vector<at::Tensor>> varlen_pack(const at::Tensor& keep, int64_t total,
                                                            at::TensorList rows) {
  check_varlen_keep(keep);
  TORCH_CHECK_VALUE(total >= 0, "vsops: total must be >= 0, got ", total);
  const int64_t tokens = keep.numel();
  check_varlen_rows(rows, tokens, keep.device());
  const c10::cuda::CUDAGuard guard(keep.device());
  const std::string total_arg = c10::str("total = ", total);
  at::Tensor indices = empty_checked({total}, keep.options().dtype(at::kLong), total_arg);
  at::Tensor workspace =
      at::empty({cuda::varlen_pack_workspace_bytes(tokens)}, keep.options().dtype(at::kByte));
  std::vector<at::Tensor> packed;
  std::vector<cuda::VarlenRows> copies;
  packed.reserve(rows.size());
  copies.reserve(rows.size());
  for (const at::Tensor& r : rows) {
    packed.push_back(empty_checked({total, r.size(1)}, r.options(), total_arg));
    copies.push_back(cuda::VarlenRows{r.const_data_ptr(), packed.back().mutable_data_ptr(),
                                      r.size(1) * static_cast<int64_t>(r.element_size())});
  }
  const cuda::VarlenPackParams params{keep.const_data_ptr<bool>(),
                                      tokens,
                                      total,
                                      indices.mutable_data_ptr<int64_t>(),
                                      workspace.mutable_data_ptr(),
                                      copies.data(),
                                      static_cast<int64_t>(copies.size())};
  check_launch(cuda::launch_varlen_pack(params, c10::cuda::getCurrentCUDAStream()));
  return {indices, packed};
}

// fill is converted to the output dtype here, once, so that the kernels copy bytes only.
at::Tensor varlen_unpack(const at::Tensor& packed, const at::Tensor& indices, int64_t rows,
                         const at::Scalar& fill) {
  check_varlen_unpack(packed, indices, rows);
  const c10::cuda::CUDAGuard guard(packed.device());
  const std::string rows_arg = c10::str("rows = ", rows);
  at::Tensor out = empty_checked({rows, packed.size(1)}, packed.options(), rows_arg);
  const at::Tensor fill_row = at::full({packed.size(1)}, fill, packed.options());
  const int64_t row_bytes = packed.size(1) * static_cast<int64_t>(packed.element_size());
  // The map from output rows to packed rows; zero-width rows have nothing to map.
  at::Tensor source = empty_checked({row_bytes == 0 ? 0 : rows}, indices.options(), rows_arg);
  const cuda::VarlenUnpackParams params{packed.const_data_ptr(),
                                        indices.const_data_ptr<int64_t>(),
                                        fill_row.const_data_ptr(),
                                        source.mutable_data_ptr<int64_t>(),
                                        out.mutable_data_ptr(),
                                        packed.size(0),
                                        rows,
                                        row_bytes};
  check_launch(cuda::launch_varlen_unpack(params, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace
}  // namespace vsops

TORCH_LIBRARY_IMPL(vsops, CUDA, m) {
  m.impl("difftopk_forward", &vsops::difftopk_forward);
  m.impl("difftopk_backward", &vsops::difftopk_backward);
  m.impl("topk_mask", &vsops::topk_mask);
  m.impl("lis_segment_sum", &vsops::lis_segment_sum);
  m.impl("lis_segment_dot", &vsops::lis_segment_dot);
  m.impl("lis_input_grad", &vsops::lis_input_grad);
  m.impl("varlen_pack", &vsops::varlen_pack);
  m.impl("varlen_unpack", &vsops::varlen_unpack);
  m.impl("divprune_keep", &vsops::divprune_keep);
  m.impl("attention_received", &vsops::attention_received);
}
