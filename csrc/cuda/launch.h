// Plain-CUDA interface of the vsops GPU kernels: parameter structs and launchers.
// No torch header is included, so nvcc compiles csrc/cuda alone (CI does, for sm_80/sm_90);
// python_bindings/cuda_ops.cpp turns tensors into these structs.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace vsops {
namespace cuda {

enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3 };

// Segments of a flat buffer: with cu_seqlens (device int32 [num_segments + 1]) segment i is
// [cu_seqlens[i], cu_seqlens[i + 1]); without it, segment i is [i * row_length, (i+1) * row_length).
struct SegmentLayout {
  const int32_t* cu_seqlens;
  int64_t num_segments;
  int64_t row_length;
};

// row_state is [num_segments, 4] of float (double when dtype is kFloat64): anchor, t, +inf value,
// -inf value (RowSolution and kRowStateWidth in vsops/difftopk_math.h).
struct DiffTopKForwardParams {
  const void* scores;
  const int64_t* k;  // device int64 [num_segments]
  void* mask;        // same dtype as scores
  void* row_state;
  SegmentLayout layout;
  ScalarKind dtype;
};

struct DiffTopKBackwardParams {
  const void* grad;       // same dtype as scores
  const void* scores;
  const void* row_state;  // as written by the forward
  void* grad_scores;      // same dtype as scores
  SegmentLayout layout;
  ScalarKind dtype;
};

struct TopKMaskParams {
  const void* scores;
  const int64_t* k;
  bool* keep;
  SegmentLayout layout;
  ScalarKind dtype;
};

// Tokens of the LIS scoring passes: rows of `dim` elements, grouped into segments by
// `segments` (row_length = N tokens in the padded layout [B, N, D], cu_seqlens in the packed
// one [total, D]). Per-token and per-segment operands are in the accumulation type: float64
// when the element type is kFloat64, float32 otherwise.
struct LisLayout {
  SegmentLayout segments;
  int64_t num_tokens;
  int64_t dim;
};

// out[s] = sum_i w_i x_i over the tokens of segment s, with w_i = 1 / n_s (0 for an empty
// segment) when token_weight is nullptr.
struct LisSegmentSumParams {
  const void* x;             // [num_tokens, dim], dtype
  const void* token_weight;  // [num_tokens] or nullptr
  void* workspace;           // [lis_segment_sum_workspace_rows(layout), dim]
  void* out;                 // [num_segments, dim]
  LisLayout layout;
  ScalarKind dtype;
};

// out[i] = x_i . u_s + c_s for each token i of segment s.
struct LisSegmentDotParams {
  const void* x;  // [num_tokens, dim], dtype
  const void* u;  // [num_segments, dim]
  const void* c;  // [num_segments]
  void* out;      // [num_tokens]
  LisLayout layout;
  ScalarKind dtype;
};

// out[i] = grad_i * u_s + w_s for each token i of segment s.
struct LisInputGradParams {
  const void* grad;  // [num_tokens]
  const void* u;     // [num_segments, dim]
  const void* w;     // [num_segments, dim]
  void* out;         // [num_tokens, dim], dtype
  LisLayout layout;
  ScalarKind dtype;
};

// Varlen pack (vsops/ops/varlen.py): rows of one tensor, treated as bytes; its packed copy
// has the same row size.
struct VarlenRows {
  const void* src;  // [num_tokens, row_bytes]
  void* dst;        // [total, row_bytes]
  int64_t row_bytes;
};

// indices[d] = the flat position of the d-th kept token and rows[j].dst row d = rows[j].src row
// indices[d], for d < total. total is the caller's count, never read back from the device:
// kept tokens past it are dropped, and rows past the kept tokens get indices -1 (their
// packed rows are left unwritten).
struct VarlenPackParams {
  const bool* keep;  // [num_tokens]
  int64_t num_tokens;
  int64_t total;
  int64_t* indices;        // [total]
  void* workspace;         // varlen_pack_workspace_bytes(num_tokens) bytes
  const VarlenRows* rows;  // host array of num_tensors entries, read during the call only
  int64_t num_tensors;
};

// out row i = packed row j where indices[j] == i, else the fill row; indices outside
// [0, rows) are ignored (they cannot be checked without a host sync), and of repeated ones an
// arbitrary j wins.
struct VarlenUnpackParams {
  const void* packed;      // [total, row_bytes]
  const int64_t* indices;  // [total]
  const void* fill;        // one row of row_bytes bytes
  int64_t* source;         // workspace [rows]: the inverse map of indices
  void* out;               // [rows, row_bytes]
  int64_t total;
  int64_t rows;
  int64_t row_bytes;
};

cudaError_t launch_difftopk_forward(const DiffTopKForwardParams& params, cudaStream_t stream);
cudaError_t launch_difftopk_backward(const DiffTopKBackwardParams& params, cudaStream_t stream);
cudaError_t launch_topk_mask(const TopKMaskParams& params, cudaStream_t stream);

// DivPrune (vsops/ops/divprune.py) on rows the glue has L2-normalized into `unit`, float (double
// when is_double), [num_tokens, dim]. `nearest` and `distance` are scratch [num_tokens] of that
// type, `distance` filled with +inf; `keep` [num_tokens] is zeroed. Segments come from the
// device cu_seqlens; k is clamped to [0, n] per segment (it cannot be checked without a sync).
struct DivPruneParams {
  const void* unit;
  const int32_t* cu_seqlens;
  const int64_t* k;
  void* nearest;
  void* distance;
  bool* keep;
  int64_t num_segments;
  int64_t num_tokens;
  int64_t dim;
  bool is_double;
};

// Segments ride on grid.y in the nearest-neighbour pass.
constexpr int64_t kMaxDivPruneSegments = 65535;

cudaError_t launch_divprune(const DivPruneParams& params, cudaStream_t stream);

// Attention received by each key (vsops/ops/attention_received.py): q [num_queries, heads, dim]
// and k [num_keys, heads, dim] of dtype, packed by segment with the device cu_seqlens_q and
// cu_seqlens_k (int32 [num_segments + 1] each; the queries of segment s attend to its keys).
// lse [num_queries, heads] and partial [heads, num_keys] are scratch and out [num_keys] the
// result, all in the accumulation type (float64 when dtype is kFloat64, float32 otherwise).
struct AttentionReceivedParams {
  const void* q;
  const void* k;
  const int32_t* cu_seqlens_q;
  const int32_t* cu_seqlens_k;
  void* lse;
  void* partial;
  void* out;
  int64_t num_segments;
  int64_t num_queries;
  int64_t num_keys;
  int64_t heads;
  int64_t dim;
  double scale;
  ScalarKind dtype;
};

// Heads ride on grid.y.
constexpr int64_t kMaxAttentionReceivedHeads = 65535;

cudaError_t launch_attention_received(const AttentionReceivedParams& params, cudaStream_t stream);

// Rows of the partial-sum workspace launch_lis_segment_sum needs; known on the host whatever
// the lengths in a device cu_seqlens.
int64_t lis_segment_sum_workspace_rows(const LisLayout& layout);
cudaError_t launch_lis_segment_sum(const LisSegmentSumParams& params, cudaStream_t stream);
cudaError_t launch_lis_segment_dot(const LisSegmentDotParams& params, cudaStream_t stream);
cudaError_t launch_lis_input_grad(const LisInputGradParams& params, cudaStream_t stream);

int64_t varlen_pack_workspace_bytes(int64_t num_tokens);
cudaError_t launch_varlen_pack(const VarlenPackParams& params, cudaStream_t stream);
cudaError_t launch_varlen_unpack(const VarlenUnpackParams& params, cudaStream_t stream);

// cudaSuccess when GPU `device` can run this build's kernels, else why not: typically
// cudaErrorNoKernelImageForDevice, for a GPU older than every compiled arch (or of another major
// version with no PTX to compile). Every .cu file is compiled for the same archs, so one kernel
// stands for all. Restores the current device, and clears the runtime's last error, so that a
// failed probe is not reported by the next launch.
cudaError_t kernel_image_status(int device);

}  // namespace cuda
}  // namespace vsops
