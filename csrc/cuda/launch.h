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

// row_state is [num_segments, 3] of float (double when dtype is kFloat64): t, +inf value, -inf value.
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

cudaError_t launch_difftopk_forward(const DiffTopKForwardParams& params, cudaStream_t stream);
cudaError_t launch_difftopk_backward(const DiffTopKBackwardParams& params, cudaStream_t stream);
cudaError_t launch_topk_mask(const TopKMaskParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace vsops
