"""Pieces shared by the Triton kernels: segment bounds, launch sizing and the block cap."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.backends import TRITON_DTYPES

# Longest row kept in registers (one program per segment), at 8 elements a thread: ptxas
# (sm_90) then needs 42 to 59 registers a thread for the three kernels, where 16 elements a
# thread spill in the forward; so 8192 over 32 warps is the most that fits. When a segment is
# longer, the kernels keep its first STREAM_BLOCK elements in registers and stream the rest in
# chunks of that size on every pass; the streaming loops need registers of their own, and
# 4096 over 16 warps (102 to 128 registers) is the largest block that then fits.
BLOCK_CAP = 8192
STREAM_BLOCK = 4096
ELEMENTS_PER_THREAD = 8

SUPPORTED_DTYPES = TRITON_DTYPES


def check_dtype(dtype: torch.dtype, op: str, what: str = "scores") -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"vsops.triton.{op}: {what} must be float16, bfloat16 or float32, got {dtype} "
            "(float64 is served by the compiled and reference backends)"
        )


def launch_geometry(scores: torch.Tensor, cu_seqlens: torch.Tensor | None,
                    max_seqlen: int | None):
    """(segments, row_len, block, stream, num_warps). ``row_len`` is the padded row length
    (unused for packed input); ``stream`` says whether some segment is longer than the block.
    ``max_seqlen`` saves the host sync that finding the longest packed segment otherwise costs."""
    if cu_seqlens is None:
        segments, row_len = scores.shape
        longest = row_len
    else:
        segments, row_len = cu_seqlens.numel() - 1, 0
        if max_seqlen is None:
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            max_seqlen = int(lengths.max().item()) if segments > 0 else 0
        longest = max_seqlen
    stream = longest > BLOCK_CAP
    block = STREAM_BLOCK if stream else triton.next_power_of_2(max(longest, 1))
    num_warps = max(1, min(32, block // (32 * ELEMENTS_PER_THREAD)))
    return segments, row_len, block, stream, num_warps


@triton.jit
def segment_bounds(cu_seqlens_ptr, row, row_len, PACKED: tl.constexpr):
    """(start, length) of segment ``row`` as int64 scalars, as segments.h: a decreasing
    cu_seqlens gives an empty segment rather than a negative length."""
    if PACKED:
        start = tl.load(cu_seqlens_ptr + row).to(tl.int64)
        length = tl.maximum(tl.load(cu_seqlens_ptr + row + 1).to(tl.int64) - start, 0)
    else:
        start = row.to(tl.int64) * row_len
        length = row_len.to(tl.int64)
    return start, length


@triton.jit
def load_chunk(ptr, start, chunk, length, offs, other):
    """Elements [chunk, chunk + BLOCK) of a segment as fp32, ``other`` past its end."""
    valid = chunk + offs < length
    x = tl.load(ptr + start + chunk + offs, mask=valid, other=other).to(tl.float32)
    return x, valid


@triton.jit
def stream_end(length, STREAM: tl.constexpr):
    """End of the chunks streamed after the first (the one in registers). Launches whose rows
    all fit in one block compile without the streaming loops: even when never entered, the
    loops' temporaries take registers (ptxas, forward at 8192 over 32 warps: 59 registers
    without them, 64 plus spills with them)."""
    if STREAM:
        return length
    else:
        return 0
