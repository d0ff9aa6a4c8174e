"""DiffTopK forward and backward in Triton, one program per segment.

The kernels follow ``csrc/include/vsops/difftopk_math.h`` step for step (row statistics,
closed-form rows, bracket and start, safeguarded Newton, limit values of infinite scores), in
fp32 whatever the input dtype. The first BLOCK elements of a segment are loaded once and stay
in registers for the whole program; a segment longer than the block (only when the longest
segment exceeds ``BLOCK_CAP``) streams its remaining chunks from memory on every pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vsops.triton import _common
from vsops.triton._common import load_chunk, segment_bounds, stream_end

__all__ = ["difftopk_forward", "difftopk_backward"]

# Same cap as kMaxSearchIterations: Newton needs 3-8 steps; the cap only bounds the loop.
MAX_SEARCH_ITERATIONS: tl.constexpr = tl.constexpr(200)
INF: tl.constexpr = tl.constexpr(float("inf"))


@triton.jit
def _sigmoid_terms(z):
    """(p, e p) with e = exp(-|z|) and p = 1 / (1 + e), as in math.h: sigma(z) is p for
    z >= 0 and e p below, the slope is e p p. The exponential never overflows, and z = +-inf
    gives exactly 1 or 0 with slope 0."""
    e = tl.exp(-tl.abs(z))
    p = 1.0 / (1.0 + e)
    return p, e * p


@triton.jit
def _mask_and_slope(s, t, pos_value, neg_value):
    """mask_value and mask_slope of difftopk_math.h: infinite scores take the row's limit
    values, and where s or t is infinite the slope is M(1 - M) of that limit."""
    z = s + t
    p, ep = _sigmoid_terms(z)
    m = tl.where(s == INF, pos_value, tl.where(s == -INF, neg_value, tl.where(z >= 0, p, ep)))
    # z is not finite whenever s or t is infinite or NaN. It also is when s + t overflows or
    # only t is infinite, but there M is exactly 0 or 1, so M(1 - M) = 0 = the sigmoid slope.
    at_limit = ~(tl.abs(z) < INF)
    return m, tl.where(at_limit, m * (1.0 - m), ep * p)


@triton.jit
def _chunk_stats(x, valid):
    finite = valid & (tl.abs(x) < INF)
    return (
        tl.max(tl.where(finite, x, -INF), 0),
        tl.min(tl.where(finite, x, INF), 0),
        tl.sum(tl.where(finite, x, 0.0), 0),
        tl.sum(finite.to(tl.int32), 0),
        tl.sum((valid & (x == INF)).to(tl.int32), 0),
        tl.sum((valid & (x == -INF)).to(tl.int32), 0),
        tl.sum((valid & (x != x)).to(tl.int32), 0),
    )


@triton.jit
def _row_stats(scores_ptr, start, length, x0, valid0, offs,
               BLOCK: tl.constexpr, STREAM: tl.constexpr):
    max_f, min_f, sum_f, n_f, n_pos, n_neg, n_nan = _chunk_stats(x0, valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        x, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
        c_max, c_min, c_sum, c_f, c_pos, c_neg, c_nan = _chunk_stats(x, valid)
        max_f = tl.maximum(max_f, c_max)
        min_f = tl.minimum(min_f, c_min)
        sum_f += c_sum
        n_f += c_f
        n_pos += c_pos
        n_neg += c_neg
        n_nan += c_nan
    return max_f, min_f, sum_f, n_f, n_pos, n_neg, n_nan


@triton.jit
def _chunk_sigmoid_parts(x, t):
    """Chunk sums of sigmoid_parts (math.h): sigma(z) = [z >= 0] + deviation, the count of
    z >= 0 an exact integer, and of the slope."""
    z = x + t
    p, ep = _sigmoid_terms(z)
    above = z >= 0
    return (tl.sum(above.to(tl.int32), 0), tl.sum(tl.where(above, -ep, ep), 0),
            tl.sum(ep * p, 0))


@triton.jit
def _sum_sigmoid_parts(scores_ptr, start, length, x0, t, offs,
                       BLOCK: tl.constexpr, STREAM: tl.constexpr):
    """f(t) by parts and f'(t) over the row. Lanes past the end hold -inf, which adds exactly
    0 to all three, as do -inf scores; +inf scores add exactly 1 to the count, so no
    per-element test is needed."""
    above, deviation, df = _chunk_sigmoid_parts(x0, t)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        x, _ = load_chunk(scores_ptr, start, chunk, length, offs, -INF)
        c_above, c_deviation, c_df = _chunk_sigmoid_parts(x, t)
        above += c_above
        deviation += c_deviation
        df += c_df
    return above, deviation, df


@triton.jit(do_not_specialize=["row_len"])
def _forward_kernel(scores_ptr, k_ptr, cu_seqlens_ptr, mask_ptr, state_ptr, row_len,
                    PACKED: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr):
    row = tl.program_id(0)
    start, length = segment_bounds(cu_seqlens_ptr, row, row_len, PACKED)
    offs = tl.arange(0, BLOCK)
    x0, valid0 = load_chunk(scores_ptr, start, 0, length, offs, -INF)
    max_f, min_f, sum_f, n_f, n_pos, n_neg, n_nan = _row_stats(
        scores_ptr, start, length, x0, valid0, offs, BLOCK, STREAM)

    # plan_row: NaN rows, rows whose k sits on +inf entries (k = 0 included) and rows that keep
    # every finite entry (k = n included) are closed-form; only the rest search. k is clamped
    # to [0, n] so that a bad k cannot make the search loop.
    k = tl.minimum(tl.maximum(tl.load(k_ptr + row).to(tl.int64), 0), n_f + n_pos + n_neg)
    has_nan = n_nan > 0
    saturated_pos = k <= n_pos
    saturated_fin = k >= n_pos + n_f
    searching = (~has_nan) & (~saturated_pos) & (~saturated_fin)
    # With 0 < k - P < F, f(base - max) <= k <= f(base - min) for base = logit((k - P) / F).
    finite_target = (k - n_pos).to(tl.float32)
    n_ff = n_f.to(tl.float32)
    base = tl.log(finite_target) - tl.log(n_ff - finite_target)
    lo = base - max_f
    hi = base - min_f
    # Exact when all finite scores are equal (Jensen), so a good start for clustered rows.
    t = base - sum_f / n_ff
    t = tl.where(t < lo, lo, tl.where(t > hi, hi, t))
    last_step = hi - lo
    iterations = tl.zeros((), tl.int32)
    active = searching & (lo < hi)
    while active:
        above, deviation, df = _sum_sigmoid_parts(
            scores_ptr, start, length, x0, t, offs, BLOCK, STREAM)
        # newton_residual: f - k with the integer part exact, then one rounding (the same as
        # the header's double sum rounded to float, for rows below 2**24 elements).
        r = (above - k).to(tl.float32) + deviation
        # search_step: shrink the bracket around the root. A Newton step within tolerance
        # (search_tolerance<float>) ends the search, kept only if it lands strictly inside
        # the bracket; otherwise Newton while it stays inside and at least halves the previous
        # step (rtsafe), else bisect. A residual that is neither < 0 nor > 0 ends the search
        # where it stands.
        exact = (r >= 0) & (r <= 0)
        lo = tl.where(r < 0, t, lo)
        hi = tl.where(r > 0, t, hi)
        has_slope = df > 0
        newton_step = tl.where(has_slope, -r / tl.where(has_slope, df, 1.0), 0.0)
        newton_t = t + newton_step
        inside = (newton_t > lo) & (newton_t < hi)
        small = has_slope & (tl.abs(newton_step) <= 1e-5 + 4.8e-7 * tl.abs(t))
        newton_ok = has_slope & inside & (tl.abs(2.0 * newton_step) <= tl.abs(last_step))
        step = tl.where(newton_ok, newton_step, (lo + hi) * 0.5 - t)
        step = tl.where(small, tl.where(inside, newton_step, 0.0), step)
        next_t = t + step
        iterations += 1
        bracket_exhausted = ~((next_t > lo) & (next_t < hi))
        active = ~exact & ~small & ~bracket_exhausted & (iterations < MAX_SEARCH_ITERATIONS)
        t = tl.where(exact, t, next_t)
        last_step = tl.where(exact, last_step, step)

    # The closed forms of plan_row. A zero count discards its quotient; the divisor is still
    # kept nonzero so that no lane divides by zero.
    pos_share = k.to(tl.float32) / tl.maximum(n_pos, 1).to(tl.float32)
    neg_share = (k - n_pos - n_f).to(tl.float32) / tl.maximum(n_neg, 1).to(tl.float32)
    pos_value = tl.where(saturated_pos, tl.where(n_pos > 0, pos_share, 0.0), 1.0)
    neg_value = tl.where(saturated_fin & ~saturated_pos, tl.where(n_neg > 0, neg_share, 1.0), 0.0)
    t = tl.where(saturated_pos, -INF, tl.where(saturated_fin, INF, t))
    t = tl.where(has_nan, float("nan"), t)
    pos_value = tl.where(has_nan, float("nan"), pos_value)
    neg_value = tl.where(has_nan, float("nan"), neg_value)
    tl.store(state_ptr + row * 3, t)
    tl.store(state_ptr + row * 3 + 1, pos_value)
    tl.store(state_ptr + row * 3 + 2, neg_value)

    out_ty = mask_ptr.dtype.element_ty
    m, _ = _mask_and_slope(x0, t, pos_value, neg_value)
    tl.store(mask_ptr + start + offs, m.to(out_ty), mask=valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        x, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
        m, _ = _mask_and_slope(x, t, pos_value, neg_value)
        tl.store(mask_ptr + start + chunk + offs, m.to(out_ty), mask=valid)


@triton.jit
def _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, t, pos_value, neg_value):
    s, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
    g, _ = load_chunk(grad_ptr, start, chunk, length, offs, 0.0)
    _, v = _mask_and_slope(s, t, pos_value, neg_value)
    return tl.where(valid, v, 0.0), g, valid


@triton.jit(do_not_specialize=["row_len"])
def _backward_kernel(grad_ptr, scores_ptr, state_ptr, cu_seqlens_ptr, out_ptr, row_len,
                     PACKED: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr):
    row = tl.program_id(0)
    start, length = segment_bounds(cu_seqlens_ptr, row, row_len, PACKED)
    offs = tl.arange(0, BLOCK)
    t = tl.load(state_ptr + row * 3).to(tl.float32)
    pos_value = tl.load(state_ptr + row * 3 + 1).to(tl.float32)
    neg_value = tl.load(state_ptr + row * 3 + 2).to(tl.float32)

    v0, g0, valid0 = _chunk_slope(scores_ptr, grad_ptr, start, 0, length, offs, t, pos_value,
                                  neg_value)
    sum_vg = tl.sum(v0 * g0, 0)
    sum_v = tl.sum(v0, 0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        v, g, _ = _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, t, pos_value,
                               neg_value)
        sum_vg += tl.sum(v * g, 0)
        sum_v += tl.sum(v, 0)
    # backward_shift: a fully saturated row (sum v = 0) has zero gradient.
    shift = tl.where(sum_v > 0, sum_vg / tl.where(sum_v > 0, sum_v, 1.0), 0.0)

    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + start + offs, (v0 * (g0 - shift)).to(out_ty), mask=valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        v, g, valid = _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, t,
                                   pos_value, neg_value)
        tl.store(out_ptr + start + chunk + offs, (v * (g - shift)).to(out_ty), mask=valid)


def difftopk_forward(scores: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None,
                     *, max_seqlen: int | None = None):
    """Same contract as ``vsops.reference.difftopk_forward`` for float16/bfloat16/float32;
    ``row_state`` is float32. ``max_seqlen`` (packed layout) avoids a host sync."""
    _common.check_dtype(scores.dtype, "difftopk_forward")
    scores = scores.contiguous()
    segments, row_len, block, stream, num_warps = _common.launch_geometry(
        scores, cu_seqlens, max_seqlen)
    mask = torch.empty_like(scores)
    state = torch.empty(segments, 3, dtype=torch.float32, device=scores.device)
    if segments > 0:
        _forward_kernel[(segments,)](
            scores, k.contiguous(), cu_seqlens if cu_seqlens is not None else k, mask, state,
            row_len, PACKED=cu_seqlens is not None, BLOCK=block, STREAM=stream, num_warps=num_warps)
    return mask, state


def difftopk_backward(grad: torch.Tensor, scores: torch.Tensor, row_state: torch.Tensor,
                      cu_seqlens: torch.Tensor | None, *, max_seqlen: int | None = None):
    """Same contract as ``vsops.reference.difftopk_backward`` for float16/bfloat16/float32."""
    _common.check_dtype(scores.dtype, "difftopk_backward")
    scores = scores.contiguous()
    segments, row_len, block, stream, num_warps = _common.launch_geometry(
        scores, cu_seqlens, max_seqlen)
    out = torch.empty_like(scores)
    if segments > 0:
        _backward_kernel[(segments,)](
            grad.contiguous(), scores, row_state.contiguous(),
            cu_seqlens if cu_seqlens is not None else row_state, out, row_len,
            PACKED=cu_seqlens is not None, BLOCK=block, STREAM=stream, num_warps=num_warps)
    return out
