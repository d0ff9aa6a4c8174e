"""The LIS scoring passes (vsops/ops/lis.py) in Triton: segment sum, segment dot, input grad.

All three are memory-bound streams over ``x`` (or ``dx``) ``[tokens, D]`` and are launched over
the flat token axis, so that the grid depends only on host-known sizes (tokens, segments, D)
and never on the segment lengths, which live on the device: no host sync, no program left
without work, and a long segment is spread over as many programs as its length calls for,
however ragged the batch. A program finds the segment of its tokens by a binary search of
``cu_seqlens`` (a division in the padded layout).

* segment sum: program (chunk, column tile) sums the pieces of CHUNK tokens of the flat axis
  that each segment owns and writes one fp32 partial row per piece; a second launch, one
  program per (segment, column tile), adds a segment's pieces in order (no atomics, so the
  result is deterministic) and divides by the length for the mean.
* segment dot: program = TILE_TOKENS tokens, looping over D; tokens of one program may belong
  to different segments, so ``u`` is gathered per token (repeated rows hit L1).
* input grad: program = a [TILE_TOKENS, TILE_COLUMNS] tile of the output, ``u`` and ``w``
  gathered per token as in the dot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.triton import _common
from vsops.triton._common import segment_bounds

__all__ = ["lis_segment_sum", "lis_segment_dot", "lis_input_grad"]

# Tile of every pass: 16 tokens x 256 columns is 32 elements a thread over 4 warps, and a
# row of 256 fp16 columns reads four whole 128-byte lines. Not tuned on a GPU.
TILE_TOKENS = 16
TILE_COLUMNS = 256
NUM_WARPS = 4
# Tokens of the flat axis per segment-sum program. Each piece of a chunk costs one fp32 row of
# D written and read back: 8 bytes a column against 256 for reading 128 fp16 rows (3%).
SUM_CHUNK_TOKENS = 128


@triton.jit
def _segment_range(cu_seqlens_ptr, seg, row_len, total, PACKED: tl.constexpr):
    """[start, end) of segment ``seg`` as int64, clamped to the tokens that exist: inside
    torch.compile cu_seqlens is not checked, and a bad one must not send the kernels out of
    bounds."""
    start, length = segment_bounds(cu_seqlens_ptr, seg, row_len, PACKED)
    start = tl.minimum(tl.maximum(start, 0), total)
    return start, tl.minimum(start + length, total)


@triton.jit
def _segment_of(cu_seqlens_ptr, token, row_len, num_segments, search_top, PACKED: tl.constexpr):
    """Segment of each int64 ``token``: the last s < num_segments with cu_seqlens[s] <= token,
    so empty segments are skipped as in ``reference.segment_ids``. Binary lifting from
    ``search_top``, the highest power of two below num_segments: every probe is in bounds,
    whatever cu_seqlens holds."""
    if PACKED:
        seg = tl.zeros_like(token)
        step = search_top
        while step > 0:
            probe = seg + step
            inside = probe < num_segments
            probe_start = tl.load(cu_seqlens_ptr + probe, mask=inside, other=0)
            seg = tl.where(inside & (probe_start <= token), probe, seg)
            step = step // 2
    else:
        seg = token // row_len
    return seg


@triton.jit(do_not_specialize=["row_len", "total", "num_segments", "search_top"])
def _sum_chunks_kernel(x_ptr, weight_ptr, cu_seqlens_ptr, partial_ptr, dim, row_len, total,
                       num_segments, search_top, WEIGHTED: tl.constexpr, PACKED: tl.constexpr,
                       CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partial sums of the pieces of one chunk. The piece of chunk c in segment s goes to
    partial row c + s: segments are ordered along the token axis, so no two nonempty pieces
    share a row, and the pieces of one segment are consecutive rows."""
    chunk = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    rows = tl.arange(0, BLOCK_T)
    chunk_start = chunk.to(tl.int64) * CHUNK
    chunk_end = tl.minimum(chunk_start + CHUNK, total)
    seg = _segment_of(cu_seqlens_ptr, chunk_start, row_len, num_segments, search_top, PACKED)
    more = chunk_start < chunk_end
    while more:
        start, end = _segment_range(cu_seqlens_ptr, seg, row_len, total, PACKED)
        lo = tl.maximum(start, chunk_start)
        hi = tl.minimum(end, chunk_end)
        if lo < hi:
            # 2-D accumulator, reduced once at the end, rather than a cross-thread sum per tile.
            acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
            for first in range(lo, hi, BLOCK_T):
                tokens = first + rows
                token_ok = tokens < hi
                xs = tl.load(x_ptr + tokens[:, None] * dim + cols[None, :],
                             mask=token_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
                if WEIGHTED:
                    weight = tl.load(weight_ptr + tokens, mask=token_ok, other=0.0)
                    xs = xs * weight[:, None]
                acc += xs
            tl.store(partial_ptr + (chunk + seg) * dim + cols, tl.sum(acc, 0), mask=col_ok)
        seg += 1
        more = (seg < num_segments) & (end < chunk_end)


@triton.jit(do_not_specialize=["row_len", "total"])
def _sum_pieces_kernel(partial_ptr, cu_seqlens_ptr, out_ptr, dim, row_len, total,
                       MEAN: tl.constexpr, PACKED: tl.constexpr, CHUNK: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[s] = sum of segment s's pieces (rows first + s .. last + s), BLOCK_R rows a load so
    that a long segment's pieces do not make a chain of dependent loads."""
    seg = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    start, end = _segment_range(cu_seqlens_ptr, seg, row_len, total, PACKED)
    length = end - start
    first = start // CHUNK + seg
    pieces = tl.where(length > 0, (end - 1) // CHUNK - start // CHUNK + 1, 0)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for piece in range(0, pieces, BLOCK_R):
        piece_rows = piece + tl.arange(0, BLOCK_R)
        acc += tl.load(partial_ptr + (first + piece_rows)[:, None] * dim + cols[None, :],
                       mask=(piece_rows < pieces)[:, None] & col_ok[None, :], other=0.0)
    total_sum = tl.sum(acc, 0)
    if MEAN:
        total_sum = total_sum / tl.maximum(length, 1).to(tl.float32)
    tl.store(out_ptr + seg.to(tl.int64) * dim + cols, total_sum, mask=col_ok)


@triton.jit(do_not_specialize=["row_len", "total", "num_segments", "search_top"])
def _dot_kernel(x_ptr, u_ptr, c_ptr, cu_seqlens_ptr, out_ptr, dim, row_len, total,
                num_segments, search_top, PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < total
    seg = _segment_of(cu_seqlens_ptr, tokens, row_len, num_segments, search_top, PACKED)
    x_rows = x_ptr + tokens[:, None] * dim
    u_rows = u_ptr + seg[:, None] * dim
    acc = tl.zeros((BLOCK_T, BLOCK_D), tl.float32)
    for col in range(0, dim, BLOCK_D):
        cols = col + tl.arange(0, BLOCK_D)
        ok = token_ok[:, None] & (cols < dim)[None, :]
        xs = tl.load(x_rows + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += xs * tl.load(u_rows + cols[None, :], mask=ok, other=0.0)
    score = tl.sum(acc, 1) + tl.load(c_ptr + seg, mask=token_ok, other=0.0)
    tl.store(out_ptr + tokens, score, mask=token_ok)


@triton.jit(do_not_specialize=["row_len", "total", "num_segments", "search_top"])
def _input_grad_kernel(grad_ptr, u_ptr, w_ptr, cu_seqlens_ptr, out_ptr, dim, row_len, total,
                       num_segments, search_top, PACKED: tl.constexpr, BLOCK_T: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    token_ok = tokens < total
    ok = token_ok[:, None] & (cols < dim)[None, :]
    seg = _segment_of(cu_seqlens_ptr, tokens, row_len, num_segments, search_top, PACKED)
    g = tl.load(grad_ptr + tokens, mask=token_ok, other=0.0)
    segment_cols = seg[:, None] * dim + cols[None, :]
    u = tl.load(u_ptr + segment_cols, mask=ok, other=0.0)
    w = tl.load(w_ptr + segment_cols, mask=ok, other=0.0)
    tl.store(out_ptr + tokens[:, None] * dim + cols[None, :],
             (g[:, None] * u + w).to(out_ptr.dtype.element_ty), mask=ok)


class _Layout:
    """Host-known sizes of a launch: segments, tokens, padded row length (0 when packed) and
    the binary search's first step."""

    def __init__(self, token_shape, cu_seqlens: torch.Tensor | None):
        self.packed = cu_seqlens is not None
        if self.packed:
            assert len(token_shape) == 1, token_shape
            self.segments = cu_seqlens.numel() - 1
            self.tokens, self.row_len = token_shape[0], 0
        else:
            assert len(token_shape) == 2, token_shape
            self.segments, self.row_len = token_shape
            self.tokens = self.segments * self.row_len
        self.search_top = 1 << ((self.segments - 1).bit_length() - 1) if self.segments > 1 else 0

    def args(self, cu_seqlens, placeholder):
        """cu_seqlens (any tensor stands in when padded) and the size arguments."""
        cu = cu_seqlens if self.packed else placeholder
        return cu, self.row_len, self.tokens, self.segments, self.search_top


def _block_columns(dim: int) -> int:
    return min(TILE_COLUMNS, triton.next_power_of_2(dim))


def lis_segment_sum(x: torch.Tensor, token_weight: torch.Tensor | None,
                    cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Same contract as ``vsops.reference.lis_segment_sum`` for float16/bfloat16/float32 x."""
    _common.check_dtype(x.dtype, "lis_segment_sum", "x")
    layout = _Layout(x.shape[:-1], cu_seqlens)
    dim = x.shape[-1]
    assert token_weight is None or token_weight.shape == x.shape[:-1], token_weight.shape
    out = torch.empty(layout.segments, dim, dtype=torch.float32, device=x.device)
    if layout.tokens == 0 or layout.segments == 0 or dim == 0:
        return out.zero_()
    chunks = triton.cdiv(layout.tokens, SUM_CHUNK_TOKENS)
    block_d = _block_columns(dim)
    column_tiles = triton.cdiv(dim, block_d)
    # Row c + s for the piece of chunk c in segment s (see _sum_chunks_kernel).
    partial = torch.empty(chunks + layout.segments - 1, dim, dtype=torch.float32, device=x.device)
    cu, row_len, total, segments, search_top = layout.args(cu_seqlens, x)
    weighted = token_weight is not None
    _sum_chunks_kernel[(chunks, column_tiles)](
        x, token_weight if weighted else x, cu, partial, dim, row_len, total, segments,
        search_top, WEIGHTED=weighted, PACKED=layout.packed, CHUNK=SUM_CHUNK_TOKENS,
        BLOCK_T=TILE_TOKENS, BLOCK_D=block_d, num_warps=NUM_WARPS)
    _sum_pieces_kernel[(segments, column_tiles)](
        partial, cu, out, dim, row_len, total, MEAN=not weighted, PACKED=layout.packed,
        CHUNK=SUM_CHUNK_TOKENS, BLOCK_R=TILE_TOKENS, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out


def lis_segment_dot(x: torch.Tensor, u: torch.Tensor, c: torch.Tensor,
                    cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Same contract as ``vsops.reference.lis_segment_dot`` for float16/bfloat16/float32 x."""
    _common.check_dtype(x.dtype, "lis_segment_dot", "x")
    layout = _Layout(x.shape[:-1], cu_seqlens)
    dim = x.shape[-1]
    assert u.shape == (layout.segments, dim) and c.shape == (layout.segments,), (u.shape, c.shape)
    out = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if layout.tokens == 0:
        return out
    cu, row_len, total, segments, search_top = layout.args(cu_seqlens, x)
    _dot_kernel[(triton.cdiv(total, TILE_TOKENS),)](
        x, u, c, cu, out, dim, row_len, total, segments, search_top, PACKED=layout.packed,
        BLOCK_T=TILE_TOKENS, BLOCK_D=_block_columns(max(dim, 1)), num_warps=NUM_WARPS)
    return out


def lis_input_grad(grad: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                   cu_seqlens: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Same contract as ``vsops.reference.lis_input_grad`` for a float16/bfloat16/float32
    ``dtype`` (grad, u and w float32)."""
    _common.check_dtype(dtype, "lis_input_grad", "dtype")
    layout = _Layout(grad.shape, cu_seqlens)
    dim = u.shape[-1]
    assert u.shape == (layout.segments, dim) and w.shape == u.shape, (u.shape, w.shape)
    out = torch.empty(*grad.shape, dim, dtype=dtype, device=grad.device)
    if layout.tokens == 0 or dim == 0:
        return out
    block_d = _block_columns(dim)
    cu, row_len, total, segments, search_top = layout.args(cu_seqlens, grad)
    _input_grad_kernel[(triton.cdiv(total, TILE_TOKENS), triton.cdiv(dim, block_d))](
        grad, u, w, cu, out, dim, row_len, total, segments, search_top, PACKED=layout.packed,
        BLOCK_T=TILE_TOKENS, BLOCK_D=block_d, num_warps=NUM_WARPS)
    return out
