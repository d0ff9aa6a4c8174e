"""DivPrune (vsops/ops/divprune.py) in Triton: two launches for a batch of segments.

The rows are normalized in float32 first (``torch.nn.functional.normalize``, as the reference).

* nearest: program (segment, row block) computes the similarities of its BLOCK_M rows with
  every row of the segment, BLOCK_N columns at a time (``tl.dot`` over the feature dim in
  BLOCK_D chunks), and keeps a running maximum that skips the diagonal: ``nearest = 1 - max``.
  The n x n matrix is never written.
* greedy: one program per segment runs its ``k`` picks. Each pick sweeps the segment in
  BLOCK_N tiles: the dot products with the picked row, the running minimum distance (a float32
  vector in global memory, which stays in L2 for the segments of a prefill) and the argmax of
  the next pick over the unpicked tokens (NaN below every number, ties to the lower index).

Float32 sums in another order than the reference's GEMM: the picks equal the reference's except
where two candidates' distances differ by rounding (exact ties still go to the lower index).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.triton import _common

__all__ = ["divprune_keep"]

# Not tuned on a GPU; tl.dot needs 16 or more on every side.
BLOCK_M = 32
BLOCK_N = 32
BLOCK_D = 32
SWEEP_BLOCK = 128
NEG_MAX: tl.constexpr = tl.constexpr(-3.4028234663852886e38)


@triton.jit
def _nearest_kernel(unit_ptr, cu_ptr, nearest_ptr, D,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0)
    block = tl.program_id(1)
    start = tl.load(cu_ptr + segment).to(tl.int64)
    n = tl.load(cu_ptr + segment + 1).to(tl.int64) - start
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    if block * BLOCK_M < n:
        best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        nan_seen = tl.zeros((BLOCK_M,), tl.int1)
        feats = tl.arange(0, BLOCK_D)
        for col0 in range(0, n, BLOCK_N):
            cols = col0 + tl.arange(0, BLOCK_N)
            acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                f = d0 + feats
                a = tl.load(unit_ptr + (start + rows)[:, None] * D + f[None, :],
                            mask=(rows[:, None] < n) & (f[None, :] < D), other=0.0)
                b = tl.load(unit_ptr + (start + cols)[None, :] * D + f[:, None],
                            mask=(cols[None, :] < n) & (f[:, None] < D), other=0.0)
                acc += tl.dot(a, b, input_precision="ieee")  # float32 products, not TF32
            valid = (cols[None, :] < n) & (cols[None, :] != rows[:, None])
            nan_seen = nan_seen | (tl.sum((valid & (acc != acc)).to(tl.int32), 1) > 0)
            best = tl.maximum(best, tl.max(tl.where(valid & (acc == acc), acc, float("-inf")), 1))
        nearest = tl.where(nan_seen, float("nan"), 1.0 - best)
        tl.store(nearest_ptr + start + rows, nearest, mask=rows < n)


@triton.jit
def _rank_key(value):
    return tl.where(value != value, NEG_MAX, value)


@triton.jit
def _better(best_key, best_index, key, index):
    take = (key > best_key) | ((key == best_key) & (index < best_index))
    return tl.where(take, key, best_key), tl.where(take, index, best_index)


@triton.jit
def _greedy_kernel(unit_ptr, cu_ptr, k_ptr, nearest_ptr, distance_ptr, keep_ptr, D,
                   BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    segment = tl.program_id(0)
    start = tl.load(cu_ptr + segment).to(tl.int64)
    n = tl.load(cu_ptr + segment + 1).to(tl.int64) - start
    count = tl.minimum(tl.maximum(tl.load(k_ptr + segment), 0), n)  # never past the segment
    offs = tl.arange(0, BLOCK)
    feats = tl.arange(0, BLOCK_D)
    # The first pick: the largest nearest-neighbour distance.
    best_key = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 2**62, tl.int64)
    for c0 in range(0, n, BLOCK):
        idx = (c0 + offs).to(tl.int64)
        key = tl.where(idx < n, _rank_key(tl.load(nearest_ptr + start + idx, mask=idx < n, other=0.0)),
                       float("-inf"))
        block_best = tl.max(key, 0)
        block_index = tl.min(tl.where(key == block_best, idx, 2**62), 0)
        best_key, best_index = _better(best_key, best_index, block_best, block_index)
    choice = best_index
    for step in range(0, count):
        tl.store(keep_ptr + start + choice, 1)
        tl.debug_barrier()  # the sweep's threads read the flag this store sets
        best_key = tl.full((), float("-inf"), tl.float32)
        best_index = tl.full((), 2**62, tl.int64)
        for c0 in range(0, n, BLOCK):
            idx = (c0 + offs).to(tl.int64)
            inside = idx < n
            sim = tl.zeros((BLOCK,), tl.float32)
            for d0 in range(0, D, BLOCK_D):
                f = d0 + feats
                pick = tl.load(unit_ptr + (start + choice) * D + f, mask=f < D, other=0.0)
                rows = tl.load(unit_ptr + (start + idx)[:, None] * D + f[None, :],
                               mask=inside[:, None] & (f[None, :] < D), other=0.0)
                sim += tl.sum(rows * pick[None, :], 1)
            old = tl.load(distance_ptr + start + idx, mask=inside, other=float("inf"))
            new = 1.0 - sim
            distance = tl.where((old != old) | (new != new), float("nan"), tl.minimum(old, new))
            tl.store(distance_ptr + start + idx, distance, mask=inside)
            picked = tl.load(keep_ptr + start + idx, mask=inside, other=1) != 0
            key = tl.where(inside & ~picked, _rank_key(distance), float("-inf"))
            block_best = tl.max(key, 0)
            block_index = tl.min(tl.where((key == block_best) & inside & ~picked, idx, 2**62), 0)
            best_key, best_index = _better(best_key, best_index, block_best, block_index)
        choice = best_index


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``torch.ops.vsops.divprune_keep`` on the Triton backend (float16, bfloat16, float32)."""
    _common.check_dtype(x.dtype, "divprune_keep", "x")
    segments = cu_seqlens.numel() - 1
    total, dim = x.shape
    keep = torch.zeros(total, dtype=torch.int8, device=x.device)
    if total == 0 or segments == 0:
        return keep.bool()
    unit = torch.nn.functional.normalize(x.float(), dim=-1).contiguous()
    lengths = cu_seqlens.diff()
    # A segment keeping all its tokens skips the search: 1 here, and k = 0 for the kernel.
    full = k == lengths.to(k.dtype)
    nearest = torch.empty(total, dtype=torch.float32, device=x.device)
    distance = torch.full((total,), float("inf"), dtype=torch.float32, device=x.device)
    longest = int(lengths.max().item())  # the grid needs it: one host sync
    _nearest_kernel[(segments, triton.cdiv(max(longest, 1), BLOCK_M))](
        unit, cu_seqlens, nearest, dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D
    )
    _greedy_kernel[(segments,)](
        unit, cu_seqlens, torch.where(full, 0, k).contiguous(), nearest, distance, keep, dim,
        BLOCK=SWEEP_BLOCK, BLOCK_D=BLOCK_D,
    )
    keep = keep.bool()
    if bool(full.any()):
        segment_of = torch.repeat_interleave(torch.arange(segments, device=x.device), lengths.long())
        keep |= full[segment_of]
    return keep
