// CUDA implementations of the vsops ops (schemas in ops.cpp): check the tensors, turn them
// into the plain-CUDA params structs of csrc/cuda/launch.h and launch on the current stream.
// Compiled by the host compiler in CUDA builds only.
//
// The stream comes from c10/cuda rather than ATen/cuda/CUDAContext.h, whose cuBLAS and
// cuSOLVER includes this file does not need.
#include <optional>
#include <tuple>

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

}  // namespace
}  // namespace vsops

TORCH_LIBRARY_IMPL(vsops, CUDA, m) {
  m.impl("difftopk_forward", &vsops::difftopk_forward);
  m.impl("difftopk_backward", &vsops::difftopk_backward);
  m.impl("topk_mask", &vsops::topk_mask);
}
