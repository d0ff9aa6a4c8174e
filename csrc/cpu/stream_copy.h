// Row copies for outputs larger than the cache. A plain memcpy of a row reads every
// destination line before overwriting it (write-allocate), so a gather moves three bytes for
// every two it needs; non-temporal stores write whole lines without reading them. Outputs
// that fit in cache keep memcpy, because the next op reads them from there.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

namespace vsops {
namespace cpu {

// Outputs at least this large are written with streaming stores: well past the L2 of a core
// and a large share of a typical L3, so the consumer would not find them in cache anyway.
constexpr int64_t kStreamingOutputBytes = int64_t(16) << 20;

#if defined(__AVX512F__)
constexpr int64_t kStreamLane = 64;
inline void stream_lane(char* dst, const char* src) {
  _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), _mm512_loadu_si512(src));
}
#elif defined(__AVX2__)
constexpr int64_t kStreamLane = 32;
inline void stream_lane(char* dst, const char* src) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
}
#endif

// memcpy(dst, src, bytes), with the lane-aligned middle of dst written by streaming stores
// when `streaming`. Callers must call stream_fence() before other threads read dst.
// Rows of zero bytes (zero-width tensors) are not copied: their data pointers may be null,
// which memcpy must not be given even for no bytes.
inline void copy_row(char* dst, const char* src, int64_t bytes, bool streaming) {
  if (bytes == 0) return;
#if defined(__AVX512F__) || defined(__AVX2__)
  if (streaming && bytes >= kStreamLane) {  // then head < bytes
    const int64_t head = static_cast<int64_t>((-reinterpret_cast<std::uintptr_t>(dst)) & (kStreamLane - 1));
    const int64_t body = (bytes - head) & ~(kStreamLane - 1);
    std::memcpy(dst, src, head);
    for (int64_t b = head; b < head + body; b += kStreamLane) stream_lane(dst + b, src + b);
    std::memcpy(dst + head + body, src + head + body, bytes - head - body);
    return;
  }
#endif
  std::memcpy(dst, src, bytes);
}

// Orders this thread's streaming stores before its later stores (and before the parallel
// region's join publishes them to other threads).
inline void stream_fence() {
#if defined(__AVX512F__) || defined(__AVX2__)
  _mm_sfence();
#endif
}

}  // namespace cpu
}  // namespace vsops
