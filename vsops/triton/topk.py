"""Hard top-k mask in Triton, one program per segment.

Scores are ranked by the ordered 32-bit keys of ``csrc/include/vsops/topk_math.h`` (NaN lowest,
-0.0 tied with +0.0). An MSB-first radix search finds the k-th largest key K* in 32 counting
passes; the mask keeps every key above K* and the first ``k - count(key > K*)`` keys equal to
K* in index order, so ties go to the lower index. As in the DiffTopK kernels, the first BLOCK
keys stay in registers and a longer segment streams the rest from memory on every pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.triton import _common
from vsops.triton._common import load_chunk, segment_bounds, stream_end

__all__ = ["topk_mask"]

SIGN_BIT: tl.constexpr = tl.constexpr(0x80000000)


@triton.jit
def _chunk_keys(scores_ptr, start, chunk, length, offs):
    x, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    # Negative floats order backwards as integers: flip all their bits; flip the sign bit of
    # positives to put them above. NaN gets 0, below the key of -inf.
    key = tl.where((bits & SIGN_BIT) != 0, ~bits, bits | SIGN_BIT)
    return tl.where(x != x, tl.zeros_like(key), key), valid


@triton.jit
def _count_at_least(scores_ptr, start, length, key0, valid0, offs, candidate,
                    BLOCK: tl.constexpr, STREAM: tl.constexpr):
    count = tl.sum((valid0 & (key0 >= candidate)).to(tl.int32), 0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        key, valid = _chunk_keys(scores_ptr, start, chunk, length, offs)
        count += tl.sum((valid & (key >= candidate)).to(tl.int32), 0)
    return count


@triton.jit
def _select_chunk(key, valid, kth_key, ties_kept, ties_before):
    """Keep flags of one chunk; ``ties_before`` counts keys equal to K* in earlier chunks."""
    tie = (valid & (key == kth_key)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, 0) - tie
    keep = valid & ((key > kth_key) | ((tie != 0) & (tie_rank < ties_kept)))
    return keep, ties_before + tl.sum(tie, 0)


@triton.jit(do_not_specialize=["row_len"])
def _topk_mask_kernel(scores_ptr, k_ptr, cu_seqlens_ptr, out_ptr, row_len,
                      PACKED: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr):
    row = tl.program_id(0)
    start, length = segment_bounds(cu_seqlens_ptr, row, row_len, PACKED)
    offs = tl.arange(0, BLOCK)
    key0, valid0 = _chunk_keys(scores_ptr, start, 0, length, offs)
    k = tl.minimum(tl.maximum(tl.load(k_ptr + row).to(tl.int64), 0), length)

    # kth_key (K*) ends as the largest key with count(key >= K*) >= k: the k-th largest key.
    # The candidates rejected are exactly its zero bits; the last one rejected is kth_key + 1
    # (its lowest zero bit set, the ones below it cleared), so its count is count(key > K*)
    # and no extra pass is needed. With no rejection K* is all ones and nothing lies above.
    kth_key = tl.zeros((), tl.uint32)
    n_greater = tl.zeros((), tl.int32)
    bit = tl.full((), SIGN_BIT, tl.uint32)
    for _ in range(32):
        candidate = kth_key | bit
        count = _count_at_least(scores_ptr, start, length, key0, valid0, offs, candidate,
                                BLOCK, STREAM)
        accept = count >= k
        kth_key = tl.where(accept, candidate, kth_key)
        n_greater = tl.where(accept, n_greater, count)
        bit = bit >> 1

    ties_kept = k - n_greater
    keep, ties_before = _select_chunk(key0, valid0, kth_key, ties_kept, tl.zeros((), tl.int32))
    tl.store(out_ptr + start + offs, keep, mask=valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        key, valid = _chunk_keys(scores_ptr, start, chunk, length, offs)
        keep, ties_before = _select_chunk(key, valid, kth_key, ties_kept, ties_before)
        tl.store(out_ptr + start + chunk + offs, keep, mask=valid)


def topk_mask(scores: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, *,
              max_seqlen: int | None = None) -> torch.Tensor:
    """Same contract as ``vsops.reference.topk_mask`` for float16/bfloat16/float32.
    ``max_seqlen`` (packed layout) avoids a host sync."""
    _common.check_dtype(scores.dtype, "topk_mask")
    scores = scores.contiguous()
    segments, row_len, block, stream, num_warps = _common.launch_geometry(
        scores, cu_seqlens, max_seqlen)
    # Packed elements outside every segment are False, as in the reference.
    alloc = torch.empty if cu_seqlens is None else torch.zeros
    keep = alloc(scores.shape, dtype=torch.bool, device=scores.device)
    if segments > 0:
        _topk_mask_kernel[(segments,)](
            scores, k.contiguous(), cu_seqlens if cu_seqlens is not None else k, keep, row_len,
            PACKED=cu_seqlens is not None, BLOCK=block, STREAM=stream, num_warps=num_warps)
    return keep
