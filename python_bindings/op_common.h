// Input checks and output allocation shared by the CPU and CUDA registrations of the ops.
// The public Python API validates arguments with friendlier messages first; these checks
// keep direct torch.ops.vsops.* calls from reading out of bounds.
#pragma once

#include <cmath>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <c10/util/safe_numerics.h>

#include "vsops/difftopk_math.h"

namespace vsops {

// Outputs and workspaces past this size are refused before allocating: 256 TiB, more memory than
// any one machine or GPU has. Such sizes come from a wrong argument (a huge `rows`, a zero-size
// input with huge dimensions), and allocating them would fail inside the kernel, as std::bad_alloc
// or as an overflowed storage size. vsops.ops.validation.MAX_ALLOCATION_BYTES is the same limit.
constexpr int64_t kMaxAllocationBytes = int64_t(1) << 48;

// at::empty(sizes, options), or a ValueError naming `what` (the argument the size comes from)
// when the tensor would exceed kMaxAllocationBytes.
inline at::Tensor empty_checked(at::IntArrayRef sizes, const at::TensorOptions& options, const std::string& what) {
  int64_t bytes = static_cast<int64_t>(options.dtype().itemsize());
  bool too_large = false, empty = false;
  for (const int64_t size : sizes) {
    TORCH_CHECK_VALUE(size >= 0, "vsops: ", what, " gives a negative size, ", sizes);
    too_large = too_large || c10::mul_overflows(bytes, size, &bytes) || bytes > kMaxAllocationBytes;
    empty = empty || size == 0;  // then empty whatever the product of the other sizes
  }
  TORCH_CHECK_VALUE(!too_large || empty, "vsops: ", what, " asks for a tensor of shape ", sizes,
                    " and dtype ", options.dtype(), ": more than 2^48 bytes, more memory than any machine has");
  return at::empty(sizes, options);
}

struct SegmentShape {
  int64_t num_segments;
  int64_t row_length;  // 0 in the packed layout (lengths come from cu_seqlens)
};

// The bounds in cu_seqlens, checked where they can be read without a device sync.
inline void check_cu_seqlens_on_host(const at::Tensor& cu, int64_t total) {
  const int32_t* c = cu.data_ptr<int32_t>();
  const int64_t s = cu.numel() - 1;
  TORCH_CHECK_VALUE(c[0] == 0, "vsops: cu_seqlens must start at 0, got ", c[0]);
  for (int64_t i = 0; i < s; ++i) {
    TORCH_CHECK_VALUE(c[i] <= c[i + 1], "vsops: cu_seqlens must be non-decreasing (at ", i, ")");
  }
  TORCH_CHECK_VALUE(c[s] == total, "vsops: cu_seqlens must end at the number of tokens, ", total,
                    ", got ", c[s]);
}

// cu_seqlens of a packed input with `total` tokens on `device`.
inline void check_cu_seqlens(const at::Tensor& cu, const at::Device& device, int64_t total) {
  TORCH_CHECK_TYPE(cu.scalar_type() == at::kInt, "vsops: cu_seqlens must be int32, got ",
                   cu.scalar_type());
  TORCH_CHECK_VALUE(cu.dim() == 1 && cu.numel() >= 1 && cu.is_contiguous(),
                    "vsops: cu_seqlens must be a contiguous 1-D tensor [S + 1]");
  TORCH_CHECK_VALUE(cu.device() == device, "vsops: cu_seqlens must be on the device of the input");
  if (cu.device().is_cpu()) check_cu_seqlens_on_host(cu, total);
}

inline SegmentShape check_scores_layout(const at::Tensor& scores,
                                        const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK_TYPE(at::isFloatingType(scores.scalar_type()),
                   "vsops: scores must be float16, bfloat16, float32 or float64, got ",
                   scores.scalar_type());
  TORCH_CHECK_VALUE(scores.is_contiguous(), "vsops: scores must be contiguous");
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(scores.dim() == 1, "vsops: packed scores must be 1-D [total], got shape ",
                      scores.sizes());
    check_cu_seqlens(*cu_seqlens, scores.device(), scores.numel());
    return SegmentShape{cu_seqlens->numel() - 1, 0};
  }
  TORCH_CHECK_VALUE(scores.dim() == 2, "vsops: scores must be 2-D [B, N] without cu_seqlens, got shape ",
                    scores.sizes());
  return SegmentShape{scores.size(0), scores.size(1)};
}

// k against the segment lengths, where it can be read without a device sync.
inline void check_k_on_host(const at::Tensor& k, const int32_t* cu_seqlens, int64_t row_length) {
  const int64_t* kp = k.data_ptr<int64_t>();
  for (int64_t i = 0; i < k.numel(); ++i) {
    TORCH_CHECK_VALUE(kp[i] >= 0, "vsops: k must be >= 0 in every segment, got ", kp[i],
                      " for segment ", i);
    const int64_t length = cu_seqlens ? cu_seqlens[i + 1] - cu_seqlens[i] : row_length;
    TORCH_CHECK_VALUE(kp[i] <= length, "vsops: k must not exceed the segment's length, got k = ",
                      kp[i], " for segment ", i, " of length ", length);
  }
}

// Call after check_scores_layout, which validates cu_seqlens.
inline void check_k(const at::Tensor& k, const at::Tensor& scores,
                    const std::optional<at::Tensor>& cu_seqlens, const SegmentShape& shape) {
  TORCH_CHECK_TYPE(k.scalar_type() == at::kLong, "vsops: k must be int64, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 1 && k.numel() == shape.num_segments && k.is_contiguous(),
                    "vsops: k must be a contiguous [", shape.num_segments, "] tensor, got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.device() == scores.device(), "vsops: k must be on the device of scores");
  if (k.device().is_cpu()) {
    check_k_on_host(k, cu_seqlens.has_value() ? cu_seqlens->data_ptr<int32_t>() : nullptr,
                    shape.row_length);
  }
}

// DivPrune's x [total, D], k int64 [S] and cu_seqlens int32 [S + 1], on one device; k against
// the segment lengths where that needs no sync.
inline void check_divprune_inputs(const at::Tensor& x, const at::Tensor& k, const at::Tensor& cu_seqlens) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "vsops: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "vsops: x must be a contiguous [total, D] tensor, got shape ",
                    x.sizes());
  check_cu_seqlens(cu_seqlens, x.device(), x.size(0));
  const int64_t segments = cu_seqlens.numel() - 1;
  TORCH_CHECK_TYPE(k.scalar_type() == at::kLong, "vsops: k must be int64, got ", k.scalar_type());
  TORCH_CHECK_VALUE(k.dim() == 1 && k.numel() == segments && k.is_contiguous(),
                    "vsops: k must be a contiguous [", segments, "] tensor, got shape ", k.sizes());
  TORCH_CHECK_VALUE(k.device() == x.device(), "vsops: k must be on the device of x");
  if (k.device().is_cpu()) check_k_on_host(k, cu_seqlens.data_ptr<int32_t>(), 0);
}

// The attention-received op's q [Tq, H, d] and k [Tk, H, d] (one float dtype, one device) and
// their int32 cu_seqlens [S + 1], one pair of segments per entry.
inline void check_attention_received_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cu_seqlens_q,
                                            const at::Tensor& cu_seqlens_k, double scale) {
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()),
                   "vsops: q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type(), "vsops: q and k must have one dtype, got ",
                   q.scalar_type(), " and ", k.scalar_type());
  TORCH_CHECK_VALUE(q.dim() == 3 && q.is_contiguous(), "vsops: q must be a contiguous [T, H, d] tensor, got shape ",
                    q.sizes());
  TORCH_CHECK_VALUE(k.dim() == 3 && k.is_contiguous() && k.size(1) == q.size(1) && k.size(2) == q.size(2),
                    "vsops: k must be a contiguous [T, H, d] tensor with the heads and head size of q, got shape ",
                    k.sizes());
  TORCH_CHECK_VALUE(k.device() == q.device(), "vsops: k must be on the device of q");
  TORCH_CHECK_VALUE(std::isfinite(scale), "vsops: scale must be finite");
  check_cu_seqlens(cu_seqlens_q, q.device(), q.size(0));
  check_cu_seqlens(cu_seqlens_k, q.device(), k.size(0));
  TORCH_CHECK_VALUE(cu_seqlens_q.numel() == cu_seqlens_k.numel(),
                    "vsops: cu_seqlens_q and cu_seqlens_k must have one entry per segment each");
}

inline const int32_t* cu_seqlens_data(const std::optional<at::Tensor>& cu_seqlens) {
  return cu_seqlens.has_value() ? cu_seqlens->data_ptr<int32_t>() : nullptr;
}

inline at::ScalarType state_dtype_for(at::ScalarType dtype) {
  return dtype == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_backward_inputs(const at::Tensor& grad, const at::Tensor& scores,
                                  const at::Tensor& row_state, int64_t num_segments) {
  TORCH_CHECK_VALUE(grad.sizes() == scores.sizes() && grad.is_contiguous(),
                    "vsops: grad must be contiguous with the shape of scores");
  TORCH_CHECK_TYPE(grad.scalar_type() == scores.scalar_type(), "vsops: grad must have the dtype of scores");
  TORCH_CHECK_VALUE(grad.device() == scores.device(), "vsops: grad must be on the device of scores");
  TORCH_CHECK_TYPE(row_state.scalar_type() == state_dtype_for(scores.scalar_type()),
                   "vsops: row_state has the wrong dtype");
  TORCH_CHECK_VALUE(row_state.dim() == 2 && row_state.size(0) == num_segments &&
                        row_state.size(1) == difftopk::kRowStateWidth && row_state.is_contiguous(),
                    "vsops: row_state must be a contiguous [S, ", difftopk::kRowStateWidth,
                    "] tensor (the forward's)");
  TORCH_CHECK_VALUE(row_state.device() == scores.device(),
                    "vsops: row_state must be on the device of scores");
}

// --- LIS scoring passes (see vsops/ops/lis.py for the layouts) ---------------------------

struct LisShape {
  int64_t num_segments;
  int64_t num_tokens;
  int64_t row_length;  // N in the padded layout, 0 in the packed one
  int64_t dim;         // D
};

// x is [B, N, D] (padded) or [total, D] with cu_seqlens (packed).
inline LisShape check_lis_input(const at::Tensor& x, const std::optional<at::Tensor>& cu_seqlens) {
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "vsops: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.is_contiguous(), "vsops: x must be contiguous");
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(x.dim() == 2, "vsops: packed x must be 2-D [total, D], got shape ", x.sizes());
    check_cu_seqlens(*cu_seqlens, x.device(), x.size(0));
    return LisShape{cu_seqlens->numel() - 1, x.size(0), 0, x.size(1)};
  }
  TORCH_CHECK_VALUE(x.dim() == 3, "vsops: x must be 3-D [B, N, D] without cu_seqlens, got shape ",
                    x.sizes());
  return LisShape{x.size(0), x.size(0) * x.size(1), x.size(1), x.size(2)};
}

// The per-token shape: [B, N] padded, [total] packed.
inline std::vector<int64_t> lis_token_sizes(const LisShape& shape) {
  if (shape.row_length == 0) return {shape.num_tokens};
  return {shape.num_segments, shape.row_length};
}

// A per-token ([B, N] / [total]) or per-segment ([S, D] / [S]) tensor in the accumulation dtype.
inline void check_lis_operand(const at::Tensor& t, const char* name, at::IntArrayRef sizes,
                              at::ScalarType acc, const at::Device& device) {
  TORCH_CHECK_TYPE(t.scalar_type() == acc, "vsops: ", name, " must be ", acc, ", got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == sizes, "vsops: ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), "vsops: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.device() == device, "vsops: ", name, " must be on the device of the input");
}

// lis_segment_dot's operands: x, and u [S, D] and c [S] in the accumulation dtype.
inline LisShape check_lis_segment_dot(const at::Tensor& x, const at::Tensor& u, const at::Tensor& c,
                                      const std::optional<at::Tensor>& cu_seqlens) {
  const LisShape shape = check_lis_input(x, cu_seqlens);
  const at::ScalarType acc = state_dtype_for(x.scalar_type());
  check_lis_operand(u, "u", {shape.num_segments, shape.dim}, acc, x.device());
  check_lis_operand(c, "c", {shape.num_segments}, acc, x.device());
  return shape;
}

// lis_weight_product's operands: weight [d, D]; vectors [S, D] (transpose) or [S, d], in the
// weight's accumulation dtype.
inline void check_lis_weight_product(const at::Tensor& vectors, const at::Tensor& weight, bool transpose) {
  TORCH_CHECK_TYPE(at::isFloatingType(weight.scalar_type()),
                   "vsops: weight must be float16, bfloat16, float32 or float64, got ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.is_contiguous(),
                    "vsops: weight must be a contiguous [d, D] tensor, got shape ", weight.sizes());
  TORCH_CHECK_VALUE(vectors.dim() == 2, "vsops: vectors must be 2-D [S, ", transpose ? "D" : "d",
                    "], got shape ", vectors.sizes());
  const int64_t width = transpose ? weight.size(1) : weight.size(0);
  check_lis_operand(vectors, "vectors", {vectors.size(0), width}, state_dtype_for(weight.scalar_type()),
                    weight.device());
}

// lis_weight_grad's operands: left [S, d] and right [S, D] in the accumulation dtype of the
// output dtype.
inline void check_lis_weight_grad(const at::Tensor& left, const at::Tensor& right, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "vsops: dtype must be a floating-point type, got ", dtype);
  TORCH_CHECK_VALUE(left.dim() == 2 && right.dim() == 2, "vsops: left and right must be 2-D [S, d] and [S, D], got ",
                    left.sizes(), " and ", right.sizes());
  const at::ScalarType acc = state_dtype_for(dtype);
  check_lis_operand(left, "left", left.sizes(), acc, right.device());
  check_lis_operand(right, "right", {left.size(0), right.size(1)}, acc, right.device());
}

// lis_input_grad's operands: grad per token, u and w per segment, output dtype.
inline LisShape check_lis_input_grad(const at::Tensor& grad, const at::Tensor& u, const at::Tensor& w,
                                     const std::optional<at::Tensor>& cu_seqlens, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(at::isFloatingType(dtype), "vsops: dtype must be a floating-point type, got ", dtype);
  TORCH_CHECK_VALUE(u.dim() == 2, "vsops: u must be [S, D], got shape ", u.sizes());
  LisShape shape{};
  if (cu_seqlens.has_value()) {
    TORCH_CHECK_VALUE(grad.dim() == 1, "vsops: packed grad must be 1-D [total], got shape ", grad.sizes());
    check_cu_seqlens(*cu_seqlens, grad.device(), grad.size(0));
    shape = LisShape{cu_seqlens->numel() - 1, grad.size(0), 0, u.size(1)};
  } else {
    TORCH_CHECK_VALUE(grad.dim() == 2, "vsops: grad must be 2-D [B, N] without cu_seqlens, got shape ",
                      grad.sizes());
    shape = LisShape{grad.size(0), grad.numel(), grad.size(1), u.size(1)};
  }
  const at::ScalarType acc = state_dtype_for(dtype);
  check_lis_operand(grad, "grad", lis_token_sizes(shape), acc, grad.device());
  check_lis_operand(u, "u", {shape.num_segments, shape.dim}, acc, grad.device());
  check_lis_operand(w, "w", {shape.num_segments, shape.dim}, acc, grad.device());
  return shape;
}

// --- varlen pack / unpack (see vsops/ops/varlen.py) ----------------------------------------

inline void check_varlen_keep(const at::Tensor& keep) {
  TORCH_CHECK_TYPE(keep.scalar_type() == at::kBool, "vsops: keep must be bool, got ", keep.scalar_type());
  TORCH_CHECK_VALUE(keep.is_contiguous(), "vsops: keep must be contiguous");
}

// The tensors to pack: contiguous rows [tokens, R] of any dtype, on the device of keep.
inline void check_varlen_rows(at::TensorList rows, int64_t tokens, const at::Device& device) {
  for (size_t j = 0; j < rows.size(); ++j) {
    const at::Tensor& r = rows[j];
    TORCH_CHECK_VALUE(r.dim() == 2 && r.size(0) == tokens && r.is_contiguous(), "vsops: rows[", j,
                      "] must be a contiguous [", tokens, ", R] tensor, got shape ", r.sizes());
    TORCH_CHECK_VALUE(r.device() == device, "vsops: rows[", j, "] must be on the device of keep");
  }
}

// The shapes of an unpack; the values of indices are the kernels' to check (the CUDA one
// cannot without a host sync).
inline void check_varlen_unpack(const at::Tensor& packed, const at::Tensor& indices, int64_t rows) {
  TORCH_CHECK_VALUE(packed.dim() == 2 && packed.is_contiguous(),
                    "vsops: packed must be a contiguous [total, R] tensor, got shape ", packed.sizes());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong, "vsops: indices must be int64, got ",
                   indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1 && indices.size(0) == packed.size(0) && indices.is_contiguous(),
                    "vsops: indices must be a contiguous [total] tensor, total = ", packed.size(0));
  TORCH_CHECK_VALUE(indices.device() == packed.device(), "vsops: indices must be on the device of packed");
  TORCH_CHECK_VALUE(rows >= packed.size(0), "vsops: rows = ", rows, " is fewer than the ", packed.size(0),
                    " packed rows");
}

}  // namespace vsops
