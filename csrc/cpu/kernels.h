// CPU implementations of the vsops ops, registered in python_bindings/ops.cpp.
#pragma once

#include <optional>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>

namespace vsops {
namespace cpu {

// Elements of one tile of an n x n product (similarities, attention logits): the reference's
// TILE_ELEMENTS, so that both tile alike and no n x n matrix is ever held.
constexpr int64_t kTileElements = int64_t(1) << 24;

std::tuple<at::Tensor, at::Tensor> difftopk_forward(const at::Tensor& scores, const at::Tensor& k,
                                                    const std::optional<at::Tensor>& cu_seqlens);

at::Tensor difftopk_backward(const at::Tensor& grad, const at::Tensor& scores,
                             const at::Tensor& row_state,
                             const std::optional<at::Tensor>& cu_seqlens);

at::Tensor topk_mask(const at::Tensor& scores, const at::Tensor& k,
                     const std::optional<at::Tensor>& cu_seqlens);

at::Tensor lis_segment_sum(const at::Tensor& x, const std::optional<at::Tensor>& token_weight,
                           const std::optional<at::Tensor>& cu_seqlens);

at::Tensor lis_segment_dot(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                           const std::optional<at::Tensor>& cu_seqlens);

at::Tensor lis_weight_product(const at::Tensor& vectors, const at::Tensor& weight, bool transpose);

at::Tensor lis_weight_grad(const at::Tensor& left, const at::Tensor& right, at::ScalarType dtype);

at::Tensor lis_input_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& w,
                          const std::optional<at::Tensor>& cu_seqlens, at::ScalarType dtype);

std::tuple<at::Tensor, std::vector<at::Tensor>> varlen_pack(const at::Tensor& keep, int64_t total,
                                                            at::TensorList rows);

at::Tensor varlen_unpack(const at::Tensor& packed, const at::Tensor& indices, int64_t rows,
                         const at::Scalar& fill);

at::Tensor divprune_keep(const at::Tensor& x, const at::Tensor& k, const at::Tensor& cu_seqlens);

at::Tensor attention_received(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                              const at::Tensor& cu_seqlens_k, double scale);

}  // namespace cpu
}  // namespace vsops
