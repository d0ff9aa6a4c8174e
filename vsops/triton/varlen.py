"""The varlen pack and unpack ops (vsops/ops/varlen.py) in Triton, without a host sync.

Any dtype is copied as raw words: every tensor is viewed as the widest integer type (8, 4, 2
or 1 bytes) that divides its row's bytes and its byte offset, so one kernel serves float,
integer and bool rows alike, and a row of fp16 embeddings (D a multiple of 4) moves as int64
words.

* pack: a count kernel writes the number of kept tokens in each block of TOKEN_BLOCK tokens, and a
  cumsum over these block counts (n / TOKEN_BLOCK elements) gives each block's first
  destination. The copy kernel, program (token block, column tile), scans its block's keep
  flags for the destination of each kept token and copies that column tile of every tensor
  of ``rows`` in the same launch (a tuple of tensors, one specialization per tuple of dtypes);
  column tile 0 also writes the indices. Only kept rows are read, and the kept rows of a
  block land on consecutive destination rows.
* unpack: a kernel scatters ``source[indices[j]] = j`` into an int64 map that starts at -1;
  then program (row block, column tile) writes every output row exactly once, from packed
  where the map says so and from a one-row fill pattern (``fill`` in packed's dtype, as
  words) elsewhere.

Grids depend only on host-known sizes (tokens, total, row widths). Out-of-range values on the
device (``total`` below the kept count, bad ``indices``) are masked rather than checked, so
they cannot send a kernel out of bounds; the compiled CPU kernel raises on them instead.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.ops.validation import check_allocation

__all__ = ["varlen_pack", "varlen_unpack"]

# Copy tile: 16 rows x 128 words is 16 KiB of int64 words over 4 warps, 128 bytes a thread.
# Not tuned on a GPU.
TOKEN_BLOCK = 16
WORD_BLOCK = 128
NUM_WARPS = 4
# Token blocks counted per program of the count kernel (one block alone is too little work),
# and indices per program of the unpack's scatter.
COUNT_GROUP = 64
SCATTER_BLOCK = 1024

_WORD_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _as_words(row_bytes: int, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``tensors`` (contiguous, rows of ``row_bytes`` bytes) viewed as the widest integer words
    that divide the row and every tensor's byte offset, which ``Tensor.view(dtype)`` requires."""
    offsets = [t.storage_offset() * t.element_size() for t in tensors]
    width = next(w for w in _WORD_DTYPES if row_bytes % w == 0 and all(o % w == 0 for o in offsets))
    return tuple(t.view(_WORD_DTYPES[width]) for t in tensors)


def _row_bytes(t: torch.Tensor) -> int:
    return t.shape[-1] * t.element_size()


def _column_tiles(words: int) -> int:
    return triton.cdiv(words, WORD_BLOCK)


@triton.jit(do_not_specialize=["tokens", "num_blocks"])
def _count_kernel(keep_ptr, counts_ptr, tokens, num_blocks,
                  TOKEN_BLOCK: tl.constexpr, GROUP: tl.constexpr):
    blocks = tl.program_id(0).to(tl.int64) * GROUP + tl.arange(0, GROUP)
    toks = blocks[:, None] * TOKEN_BLOCK + tl.arange(0, TOKEN_BLOCK)[None, :]
    kept = tl.load(keep_ptr + toks, mask=toks < tokens, other=0) != 0
    tl.store(counts_ptr + blocks, tl.sum(kept.to(tl.int64), 1), mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["tokens", "total"])
def _pack_kernel(keep_ptr, block_end_ptr, indices_ptr, srcs, dsts, words, tokens, total,
                 TOKEN_BLOCK: tl.constexpr, WORD_BLOCK: tl.constexpr):
    block = tl.program_id(0)
    tile = tl.program_id(1)
    toks = block.to(tl.int64) * TOKEN_BLOCK + tl.arange(0, TOKEN_BLOCK)
    kept = (tl.load(keep_ptr + toks, mask=toks < tokens, other=0) != 0).to(tl.int64)
    # block_end holds the kept tokens up to the end of each block (inclusive scan), so the
    # block's first destination needs no load from the previous block.
    first = tl.load(block_end_ptr + block) - tl.sum(kept, 0)
    dest = first + tl.cumsum(kept, 0) - 1
    write = (kept != 0) & (dest < total)
    if tile == 0:
        tl.store(indices_ptr + dest, toks, mask=write)
    cols = tile * WORD_BLOCK + tl.arange(0, WORD_BLOCK)
    for j in tl.static_range(len(srcs)):
        if tile * WORD_BLOCK < words[j]:
            mask = write[:, None] & (cols < words[j])[None, :]
            x = tl.load(srcs[j] + toks[:, None] * words[j] + cols[None, :], mask=mask)
            tl.store(dsts[j] + dest[:, None] * words[j] + cols[None, :], x, mask=mask)


@triton.jit(do_not_specialize=["total", "rows"])
def _inverse_kernel(indices_ptr, source_ptr, total, rows, BLOCK: tl.constexpr):
    j = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = j < total
    target = tl.load(indices_ptr + j, mask=inside, other=-1)
    tl.store(source_ptr + target, j, mask=inside & (target >= 0) & (target < rows))


@triton.jit(do_not_specialize=["rows"])
def _unpack_kernel(packed_ptr, source_ptr, fill_ptr, out_ptr, rows, words,
                   TOKEN_BLOCK: tl.constexpr, WORD_BLOCK: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * TOKEN_BLOCK + tl.arange(0, TOKEN_BLOCK)
    cols = tl.program_id(1) * WORD_BLOCK + tl.arange(0, WORD_BLOCK)
    col_ok = cols < words
    src = tl.load(source_ptr + r, mask=r < rows, other=-1)
    packed_row = (src >= 0)[:, None]
    x = tl.load(packed_ptr + src[:, None] * words + cols[None, :], mask=packed_row & col_ok[None, :])
    fill = tl.load(fill_ptr + cols, mask=col_ok)
    tl.store(out_ptr + r[:, None] * words + cols[None, :], tl.where(packed_row, x, fill[None, :]),
             mask=(r < rows)[:, None] & col_ok[None, :])


def varlen_pack(keep: torch.Tensor, total: int, rows: list[torch.Tensor]):
    """Same contract as ``vsops.reference.varlen_pack``, for rows of any dtype. ``total`` is
    trusted (checking it would cost a host sync): with fewer kept tokens, the last rows of
    the outputs are left unwritten; with more, the tokens past ``total`` are dropped."""
    if keep.dtype != torch.bool:
        raise TypeError(f"vsops.triton.varlen_pack: keep must be bool, got {keep.dtype}")
    if not keep.is_contiguous():
        raise ValueError("vsops.triton.varlen_pack: keep must be contiguous")
    if total < 0:
        raise ValueError(f"vsops.triton.varlen_pack: total must be >= 0, got {total}")
    tokens = keep.numel()
    for j, r in enumerate(rows):
        if r.dim() != 2 or r.shape[0] != tokens or not r.is_contiguous():
            raise ValueError(f"vsops.triton.varlen_pack: rows[{j}] must be a contiguous [{tokens}, R] "
                             f"tensor, got shape {tuple(r.shape)}")
        if r.device != keep.device:
            raise ValueError(f"vsops.triton.varlen_pack: rows[{j}] must be on the device of keep")
    check_allocation((total,), torch.long, f"total = {total}")
    for r in rows:
        check_allocation((total, r.shape[1]), r.dtype, f"total = {total}")
    indices = torch.empty(total, dtype=torch.long, device=keep.device)
    packed = [torch.empty((total, r.shape[1]), dtype=r.dtype, device=r.device) for r in rows]
    if tokens == 0 or total == 0:
        return indices, packed

    srcs, dsts = [], []
    for r, p in zip(rows, packed):
        if r.shape[1] == 0:
            continue  # nothing to copy, and a [n, 0] tensor's strides refuse a word view
        src, dst = _as_words(_row_bytes(r), r, p)
        srcs.append(src)
        dsts.append(dst)
    words = tuple(s.shape[1] for s in srcs)
    flat_keep = keep.reshape(-1).view(torch.uint8)
    num_blocks = triton.cdiv(tokens, TOKEN_BLOCK)
    block_end = torch.empty(num_blocks, dtype=torch.long, device=keep.device)
    _count_kernel[(triton.cdiv(num_blocks, COUNT_GROUP),)](
        flat_keep, block_end, tokens, num_blocks, TOKEN_BLOCK=TOKEN_BLOCK, GROUP=COUNT_GROUP)
    block_end.cumsum_(0)
    # At least one column tile, which writes the indices even when no tensor has columns.
    column_tiles = max([1, *map(_column_tiles, words)])
    _pack_kernel[(num_blocks, column_tiles)](
        flat_keep, block_end, indices, tuple(srcs), tuple(dsts), words, tokens, total,
        TOKEN_BLOCK=TOKEN_BLOCK, WORD_BLOCK=WORD_BLOCK, num_warps=NUM_WARPS)
    return indices, packed


def varlen_unpack(packed: torch.Tensor, indices: torch.Tensor, rows: int, fill) -> torch.Tensor:
    """Same contract as ``vsops.reference.varlen_unpack``, for any dtype (``fill`` converted
    to it as ``torch.full`` does). Indices outside [0, rows) are skipped; with a repeated
    index, which packed row lands there is unspecified."""
    if packed.dim() != 2 or not packed.is_contiguous():
        raise ValueError("vsops.triton.varlen_unpack: packed must be a contiguous [total, R] tensor, "
                         f"got shape {tuple(packed.shape)}")
    total, width = packed.shape
    if indices.dtype != torch.long:
        raise TypeError(f"vsops.triton.varlen_unpack: indices must be int64, got {indices.dtype}")
    if indices.dim() != 1 or indices.shape[0] != total or not indices.is_contiguous():
        raise ValueError(f"vsops.triton.varlen_unpack: indices must be a contiguous [{total}] tensor, "
                         f"got shape {tuple(indices.shape)}")
    if indices.device != packed.device:
        raise ValueError("vsops.triton.varlen_unpack: indices must be on the device of packed")
    if rows < total:
        raise ValueError(f"vsops.triton.varlen_unpack: rows = {rows} is fewer than the {total} packed rows")
    check_allocation((rows, width), packed.dtype, f"rows = {rows}")
    out = torch.empty((rows, width), dtype=packed.dtype, device=packed.device)
    if rows == 0 or width == 0:
        return out
    check_allocation((rows,), torch.long, f"rows = {rows}")

    source = torch.full((rows,), -1, dtype=torch.long, device=packed.device)
    if total > 0:
        _inverse_kernel[(triton.cdiv(total, SCATTER_BLOCK),)](
            indices, source, total, rows, BLOCK=SCATTER_BLOCK)
    fill_row = torch.full((width,), fill, dtype=packed.dtype, device=packed.device)
    packed_words, out_words, fill_words = _as_words(_row_bytes(packed), packed, out, fill_row)
    words = out_words.shape[1]
    _unpack_kernel[(triton.cdiv(rows, TOKEN_BLOCK), _column_tiles(words))](
        packed_words, source, fill_words, out_words, rows, words,
        TOKEN_BLOCK=TOKEN_BLOCK, WORD_BLOCK=WORD_BLOCK, num_warps=NUM_WARPS)
    return out
