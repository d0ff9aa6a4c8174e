"""The attention-received op (vsops/ops/attention_received.py) in Triton: two launches over a
batch of segments, flash-attention style, so that no head's n x n attention is ever held.

* statistics: program (segment, query block, head) takes BLOCK_M query rows of its segment
  and sweeps the segment's keys BLOCK_N at a time with a running max and sum of exponentials,
  then writes each row's log-sum-exp (base 2) to a float32 ``[Tq, H]`` buffer. The sweep
  covers the whole row, so a block of large logits cannot pass for the row's maximum.
* column sums: program (segment, key block, head) holds BLOCK_N keys of its segment and
  sweeps the segment's queries BLOCK_M at a time: it recomputes the logits, takes
  ``p = exp2(logit - lse)`` (the softmax, exactly normalized) and adds up its columns. It
  writes the sums times ``1 / (H n_q)`` as one float32 row per head, ``[H, Tk]``, and the
  host adds the heads (no atomics, so the result is deterministic). A segment without
  queries leaves its keys at 0.

The logits are float32 ``tl.dot`` products (``input_precision="ieee"``, not TF32) over the
whole head dim in one BLOCK_D chunk, with ``scale * log2(e)`` folded in so that the kernels
use ``exp2``. The grids are sized by the longest query and key segments (one host sync);
programs past the end of their segment return at once.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vsops.triton import _common

__all__ = ["attention_received"]

# Not tuned on a GPU; tl.dot needs 16 or more on every side.
BLOCK_M = 32
BLOCK_N = 32


@triton.jit
def _load_rows(x_ptr, start, rows, n, head, heads, dim, BLOCK_D: tl.constexpr):
    """Rows ``rows`` (int64, [B]) of a segment's head ``head`` as float32 ``[B, BLOCK_D]``,
    zero past the segment's ``n`` rows and past the head dim."""
    feats = tl.arange(0, BLOCK_D)
    offsets = ((start + rows) * heads + head)[:, None] * dim + feats[None, :]
    mask = (rows < n)[:, None] & (feats < dim)[None, :]
    return tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _segment(cu_q_ptr, cu_k_ptr, segment):
    """``(start_q, n_q, start_k, n_k)`` of ``segment``, int64."""
    start_q = tl.load(cu_q_ptr + segment).to(tl.int64)
    start_k = tl.load(cu_k_ptr + segment).to(tl.int64)
    return (start_q, tl.load(cu_q_ptr + segment + 1).to(tl.int64) - start_q,
            start_k, tl.load(cu_k_ptr + segment + 1).to(tl.int64) - start_k)


@triton.jit
def _lse_kernel(q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, lse_ptr, heads, dim, scale_log2,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(1)
    head = tl.program_id(2)
    start_q, n_q, start_k, n_k = _segment(cu_q_ptr, cu_k_ptr, tl.program_id(0))
    # Without keys there is no softmax, and pass 2 has no key to read the statistics for.
    if (block * BLOCK_M < n_q) & (n_k > 0):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        queries = _load_rows(q_ptr, start_q, rows, n_q, head, heads, dim, BLOCK_D)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        for col0 in range(0, n_k, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N).to(tl.int64)
            keys = _load_rows(k_ptr, start_k, cols, n_k, head, heads, dim, BLOCK_D)
            logits = tl.dot(queries, tl.trans(keys), input_precision="ieee") * scale_log2
            logits = tl.where((cols < n_k)[None, :], logits, float("-inf"))
            # The first block has a key, so the new max is finite and exp2(-inf) drops the
            # empty initial sum.
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            row_sum = row_sum * tl.exp2(row_max - new_max) + tl.sum(tl.exp2(logits - new_max[:, None]), 1)
            row_max = new_max
        tl.store(lse_ptr + (start_q + rows) * heads + head, row_max + tl.log2(row_sum), mask=rows < n_q)


@triton.jit
def _column_sum_kernel(q_ptr, k_ptr, cu_q_ptr, cu_k_ptr, lse_ptr, partial_ptr, heads, dim, total_k,
                       scale_log2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    block = tl.program_id(1)
    head = tl.program_id(2)
    start_q, n_q, start_k, n_k = _segment(cu_q_ptr, cu_k_ptr, tl.program_id(0))
    if block * BLOCK_N < n_k:
        cols = block * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
        keys_t = tl.trans(_load_rows(k_ptr, start_k, cols, n_k, head, heads, dim, BLOCK_D))
        received = tl.zeros((BLOCK_N,), tl.float32)
        for row0 in range(0, n_q, BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M).to(tl.int64)
            queries = _load_rows(q_ptr, start_q, rows, n_q, head, heads, dim, BLOCK_D)
            lse = tl.load(lse_ptr + (start_q + rows) * heads + head, mask=rows < n_q, other=0.0)
            logits = tl.dot(queries, keys_t, input_precision="ieee") * scale_log2
            p = tl.where((rows < n_q)[:, None], tl.exp2(logits - lse[:, None]), 0.0)
            received += tl.sum(p, 0)
        # n_q = 0 leaves received at 0; the max keeps the factor finite there.
        received = received / (heads * tl.maximum(n_q, 1)).to(tl.float32)
        tl.store(partial_ptr + head * total_k + start_k + cols, received, mask=cols < n_k)


def attention_received(q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor,
                       cu_seqlens_k: torch.Tensor, scale: float) -> torch.Tensor:
    """``torch.ops.vsops.attention_received`` on the Triton backend.

    Args:
        q: ``[Tq, H, d]`` queries (float16, bfloat16 or float32), packed by segment.
        k: ``[Tk, H, d]`` keys, same dtype, heads and head size.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S + 1]`` segment offsets on q's device.
        scale: the logits' factor.

    Returns:
        float32 ``[Tk]`` on q's device: the softmax attention each key receives, averaged over
        heads and over its segment's queries (0 for the keys of a segment without queries).
    """
    _common.check_dtype(q.dtype, "attention_received", "q")
    q, k = q.contiguous(), k.contiguous()
    total_q, heads, dim = q.shape
    total_k = k.shape[0]
    segments = cu_seqlens_q.numel() - 1
    if total_q == 0 or total_k == 0 or segments == 0 or heads == 0:
        return torch.zeros(total_k, dtype=torch.float32, device=q.device)
    lengths_q, lengths_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    longest_q, longest_k = torch.stack([lengths_q.max(), lengths_k.max()]).tolist()  # one host sync
    block_d = triton.next_power_of_2(max(16, dim))
    scale_log2 = scale * math.log2(math.e)
    lse = torch.empty((total_q, heads), dtype=torch.float32, device=q.device)
    # Every key lies in one segment, whose column-sum programs write its row of every head.
    partial = torch.empty((heads, total_k), dtype=torch.float32, device=q.device)
    _lse_kernel[(segments, triton.cdiv(longest_q, BLOCK_M), heads)](
        q, k, cu_seqlens_q, cu_seqlens_k, lse, heads, dim, scale_log2,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    _column_sum_kernel[(segments, triton.cdiv(longest_k, BLOCK_N), heads)](
        q, k, cu_seqlens_q, cu_seqlens_k, lse, partial, heads, dim, total_k, scale_log2,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
    )
    return partial.sum(0)
