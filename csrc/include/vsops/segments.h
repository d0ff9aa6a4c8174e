// Where segment i of a flat buffer lies, for both layouts (host and device).
#pragma once

#include <cstdint>

#include "vsops/macros.h"

namespace vsops {

// Packed layout: cu_seqlens (int32 [S + 1], FlashAttention's convention) gives the bounds.
// Padded layout (cu_seqlens == nullptr): rows of row_length elements.
VSOPS_HD void segment_bounds(const int32_t* cu_seqlens, int64_t row_length, int64_t i,
                             int64_t& start, int64_t& length) {
  if (cu_seqlens != nullptr) {
    start = cu_seqlens[i];
    const int64_t end = cu_seqlens[i + 1];
    length = end > start ? end - start : 0;
  } else {
    start = i * row_length;
    length = row_length;
  }
}

}  // namespace vsops
