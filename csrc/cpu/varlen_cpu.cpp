// CPU kernels of the varlen pack and unpack ops (vsops/ops/varlen.py): rows of several
// tensors gathered into FlashAttention's packed layout in one pass, and scattered back.
#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "cpu/kernels.h"
#include "cpu/stream_copy.h"
#include "op_common.h"

namespace vsops {
namespace cpu {
namespace {

// Tokens per task when counting and copying: the per-block counts are scanned serially.
constexpr int64_t kPackBlock = 2048;

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> varlen_pack(const at::Tensor& keep, int64_t total,
                                                            at::TensorList rows) {
  check_varlen_keep(keep);
  const int64_t tokens = keep.numel();
  check_varlen_rows(rows, tokens, keep.device());
  const bool* kept = keep.const_data_ptr<bool>();

  const int64_t blocks = (tokens + kPackBlock - 1) / kPackBlock;
  std::vector<int64_t> offset(blocks + 1, 0);
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t end = std::min(tokens, (b + 1) * kPackBlock);
      offset[b + 1] = std::count(kept + b * kPackBlock, kept + end, true);
    }
  });
  for (int64_t b = 0; b < blocks; ++b) offset[b + 1] += offset[b];
  TORCH_CHECK_VALUE(offset[blocks] == total, "vsops: total = ", total, " but keep has ", offset[blocks],
                    " kept tokens");

  at::Tensor indices = at::empty({total}, keep.options().dtype(at::kLong));
  std::vector<at::Tensor> packed;
  std::vector<const char*> src;
  std::vector<char*> dst;
  std::vector<int64_t> row_bytes;
  for (const at::Tensor& r : rows) {
    packed.push_back(at::empty({total, r.size(1)}, r.options()));
    src.push_back(static_cast<const char*>(r.const_data_ptr()));
    dst.push_back(static_cast<char*>(packed.back().mutable_data_ptr()));
    row_bytes.push_back(r.size(1) * r.element_size());
  }
  int64_t* idx = indices.mutable_data_ptr<int64_t>();
  int64_t out_bytes = 0;
  for (const int64_t rb : row_bytes) out_bytes += total * rb;
  const bool streaming = out_bytes >= kStreamingOutputBytes;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      int64_t d = offset[b];
      const int64_t end = std::min(tokens, (b + 1) * kPackBlock);
      for (int64_t i = b * kPackBlock; i < end; ++i) {
        if (!kept[i]) continue;
        idx[d] = i;
        for (size_t j = 0; j < src.size(); ++j) {
          copy_row(dst[j] + d * row_bytes[j], src[j] + i * row_bytes[j], row_bytes[j], streaming);
        }
        ++d;
      }
    }
    stream_fence();
  });
  return {indices, packed};
}

at::Tensor varlen_unpack(const at::Tensor& packed, const at::Tensor& indices, int64_t rows,
                         const at::Scalar& fill) {
  check_varlen_unpack(packed, indices, rows);
  const int64_t total = packed.size(0);
  const int64_t* idx = indices.const_data_ptr<int64_t>();
  const std::string rows_arg = c10::str("rows = ", rows);
  at::Tensor out = empty_checked({rows, packed.size(1)}, packed.options(), rows_arg);
  const auto check_in_range = [&](int64_t j) {
    TORCH_CHECK_VALUE(idx[j] >= 0 && idx[j] < rows, "vsops: indices[", j, "] = ", idx[j],
                      " is out of range [0, ", rows, ")");
  };
  const int64_t row_bytes = packed.size(1) * packed.element_size();
  if (row_bytes == 0) {
    // Nothing to write, so no map of the rows (which may be far more than memory holds) either:
    // the indices are checked for range only, as repeats cannot change an empty output.
    for (int64_t j = 0; j < total; ++j) check_in_range(j);
    return out;
  }
  // source[i]: the packed row written to output row i, or -1 for a filled row. Every output
  // row is then written exactly once, with no zero fill before the scatter. (A tensor, not a
  // std::vector, so that a size no machine can hold is refused as the output is.)
  at::Tensor source_rows = empty_checked({rows}, indices.options(), rows_arg).fill_(-1);
  int64_t* source = source_rows.mutable_data_ptr<int64_t>();
  for (int64_t j = 0; j < total; ++j) {
    check_in_range(j);
    TORCH_CHECK_VALUE(source[idx[j]] < 0, "vsops: indices repeats ", idx[j]);
    source[idx[j]] = j;
  }
  const at::Tensor fill_row = at::full({packed.size(1)}, fill, packed.options());
  const char* src = static_cast<const char*>(packed.const_data_ptr());
  const char* fill_bytes = static_cast<const char*>(fill_row.const_data_ptr());
  char* dst = static_cast<char*>(out.mutable_data_ptr());
  const bool streaming = rows * row_bytes >= kStreamingOutputBytes;
  at::parallel_for(0, rows, kPackBlock, [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      copy_row(dst + i * row_bytes, source[i] >= 0 ? src + source[i] * row_bytes : fill_bytes, row_bytes, streaming);
    }
    stream_fence();
  });
  return out;
}

}  // namespace cpu
}  // namespace vsops
