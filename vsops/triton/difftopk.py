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

from vsops import reference
from vsops.triton import _common
from vsops.triton._common import load_chunk, segment_bounds, stream_end

__all__ = ["difftopk_forward", "difftopk_backward"]

# Same cap as kMaxSearchIterations: Newton needs 3-8 steps; the cap only bounds the loop.
MAX_SEARCH_ITERATIONS: tl.constexpr = tl.constexpr(200)
INF: tl.constexpr = tl.constexpr(float("inf"))
# search_tolerance<float>: a Newton step this small ends the search (absolute, at any |t|).
TOLERANCE: tl.constexpr = tl.constexpr(1e-5)
EPSILON: tl.constexpr = tl.constexpr(1.1920929e-07)
# Per row: anchor, t (the threshold is anchor + t), the values of +inf and -inf scores.
STATE_WIDTH: tl.constexpr = tl.constexpr(reference.ROW_STATE_WIDTH)


@triton.jit
def _sigmoid_terms(z):
    """(p, e p) with e = exp(-|z|) and p = 1 / (1 + e), as in math.h: sigma(z) is p for
    z >= 0 and e p below, the slope is e p p. The exponential never overflows, and z = +-inf
    gives exactly 1 or 0 with slope 0."""
    e = tl.exp(-tl.abs(z))
    p = 1.0 / (1.0 + e)
    return p, e * p


@triton.jit
def _mask_and_slope(s, anchor, t, pos_value, neg_value):
    """mask_value and mask_slope of difftopk_math.h: infinite scores take the row's limit
    values, and where s or t is infinite the slope is M(1 - M) of that limit."""
    z = (s + anchor) + t
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
def _chunk_sigmoid_parts(x, anchor, t):
    """Chunk sums of sigmoid_parts (math.h) at z = (x + anchor) + t: sigma(z) = [z >= 0] +
    deviation, the count of z >= 0 an exact integer, and of the slope."""
    z = (x + anchor) + t
    p, ep = _sigmoid_terms(z)
    above = z >= 0
    return (tl.sum(above.to(tl.int32), 0), tl.sum(tl.where(above, -ep, ep), 0),
            tl.sum(ep * p, 0))


@triton.jit
def _sum_sigmoid_parts(scores_ptr, start, length, x0, anchor, t, offs,
                       BLOCK: tl.constexpr, STREAM: tl.constexpr):
    """f(t) by parts and f'(t) over the row. Lanes past the end hold -inf, which adds exactly
    0 to all three, as do -inf scores; +inf scores add exactly 1 to the count, so no
    per-element test is needed."""
    above, deviation, df = _chunk_sigmoid_parts(x0, anchor, t)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        x, _ = load_chunk(scores_ptr, start, chunk, length, offs, -INF)
        c_above, c_deviation, c_df = _chunk_sigmoid_parts(x, anchor, t)
        above += c_above
        deviation += c_deviation
        df += c_df
    return above, deviation, df


@triton.jit
def _widened(x, magnitude):
    """x moved by 4 units of the magnitude's last place (its sign the direction), unless
    that overflows (difftopk_math.h's widened)."""
    moved = x + 4.0 * EPSILON * magnitude
    return tl.where(tl.abs(moved) < INF, moved, x)


@triton.jit
def _move_inside(t, lo, hi, newton_step, has_slope, last_step):
    """move_inside of difftopk_math.h: the Newton step when it lands strictly inside the
    bracket and at least halves the step before it (rtsafe) or spans at most a quarter of
    the bracket, else bisection. Returns (new t, whether it is strictly inside, the step)."""
    newton_t = t + newton_step
    inside = (newton_t > lo) & (newton_t < hi)
    newton_ok = has_slope & inside & ((tl.abs(2.0 * newton_step) <= tl.abs(last_step))
                                      | (tl.abs(4.0 * newton_step) <= hi - lo))
    step = tl.where(newton_ok, newton_step, (lo + hi) * 0.5 - t)
    moved = t + step
    return moved, (moved > lo) & (moved < hi), step


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
    # Widened by the rounding of both ends, so the bracket holds t even for equal scores.
    lo = _widened(base - max_f, -(tl.abs(base) + tl.abs(max_f)))
    hi = _widened(base - min_f, tl.abs(base) + tl.abs(min_f))
    # Exact when all finite scores are equal (Jensen), so a good start for clustered rows.
    t = base - sum_f / n_ff
    t = tl.where(t < lo, lo, tl.where(t > hi, hi, t))
    last_step = hi - lo
    iterations = tl.zeros((), tl.int32)
    anchor = tl.zeros((), tl.float32)
    lo_slope = tl.zeros((), tl.float32)
    hi_slope = tl.zeros((), tl.float32)
    anchored = iterations != 0
    active = searching & (lo < hi)
    while active:
        above, deviation, df = _sum_sigmoid_parts(
            scores_ptr, start, length, x0, anchor, t, offs, BLOCK, STREAM)
        # newton_residual: f - k with the integer part exact, then one rounding (the same as
        # the header's double sum rounded to float, for rows below 2**24 elements).
        r = (above - k).to(tl.float32) + deviation
        # search_step: shrink the bracket around the root. A residual that is neither < 0 nor
        # > 0 ends the search where it stands; a Newton step within tolerance ends it, kept
        # only if it lands strictly inside the bracket; so does the iteration cap.
        exact = (r >= 0) & (r <= 0)
        lo = tl.where(r < 0, t, lo)
        lo_slope = tl.where(r < 0, df, lo_slope)
        hi = tl.where(r > 0, t, hi)
        hi_slope = tl.where(r > 0, df, hi_slope)
        has_slope = df > 0
        newton_step = tl.where(has_slope, -r / tl.where(has_slope, df, 1.0), 0.0)
        newton_t = t + newton_step
        inside = (newton_t > lo) & (newton_t < hi)
        # Unanchored, t resolves only to half a unit of its last place: a search that has
        # converged that far anchors once and goes on relative to the anchor (search_step):
        # at t after a small Newton step, else at the bracket end with the larger slope.
        converged_here = has_slope & (tl.abs(newton_step) <= TOLERANCE)
        small = converged_here & (anchored | (tl.abs(t) * EPSILON <= TOLERANCE))
        iterations += 1
        proceed = ~exact & ~small & (iterations < MAX_SEARCH_ITERATIONS)
        moved_t, moved, moved_step = _move_inside(t, lo, hi, newton_step, has_slope, last_step)
        moved = proceed & ~converged_here & moved
        anchor_now = proceed & ~moved & ~anchored & (converged_here | (hi - lo > TOLERANCE))
        new_anchor = tl.where(converged_here, t, tl.where(hi_slope > lo_slope, hi, lo))
        anchor_at_t = new_anchor == t
        relative_lo = lo - new_anchor
        relative_hi = hi - new_anchor
        relative_t, moved_anchored, anchored_step = _move_inside(
            0.0, relative_lo, relative_hi, newton_step, has_slope, relative_hi - relative_lo)
        # From an anchor other than t the next pass evaluates at the anchor.
        moved_anchored = anchor_now & anchor_at_t & moved_anchored
        goes_on_anchored = anchor_now & (moved_anchored | ~anchor_at_t)
        anchor = tl.where(anchor_now, new_anchor, anchor)
        lo = tl.where(anchor_now, relative_lo, lo)
        hi = tl.where(anchor_now, relative_hi, hi)
        anchored = anchored | anchor_now
        next_t = tl.where(anchor_now, tl.where(moved_anchored, relative_t, 0.0),
                          tl.where(moved, moved_t, t))
        next_t = tl.where(small, tl.where(inside, newton_t, t), next_t)
        t = tl.where(exact, t, next_t)
        last_step = tl.where(moved, moved_step,
                             tl.where(moved_anchored, anchored_step,
                                      tl.where(anchor_now, hi - lo, last_step)))
        active = moved | goes_on_anchored

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
    state = state_ptr + row * STATE_WIDTH
    tl.store(state, anchor)
    tl.store(state + 1, t)
    tl.store(state + 2, pos_value)
    tl.store(state + 3, neg_value)

    out_ty = mask_ptr.dtype.element_ty
    m, _ = _mask_and_slope(x0, anchor, t, pos_value, neg_value)
    tl.store(mask_ptr + start + offs, m.to(out_ty), mask=valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        x, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
        m, _ = _mask_and_slope(x, anchor, t, pos_value, neg_value)
        tl.store(mask_ptr + start + chunk + offs, m.to(out_ty), mask=valid)


@triton.jit
def _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, anchor, t, pos_value,
                 neg_value):
    s, valid = load_chunk(scores_ptr, start, chunk, length, offs, 0.0)
    g, _ = load_chunk(grad_ptr, start, chunk, length, offs, 0.0)
    _, v = _mask_and_slope(s, anchor, t, pos_value, neg_value)
    return tl.where(valid, v, 0.0), g, valid


@triton.jit(do_not_specialize=["row_len"])
def _backward_kernel(grad_ptr, scores_ptr, state_ptr, cu_seqlens_ptr, out_ptr, row_len,
                     PACKED: tl.constexpr, BLOCK: tl.constexpr, STREAM: tl.constexpr):
    row = tl.program_id(0)
    start, length = segment_bounds(cu_seqlens_ptr, row, row_len, PACKED)
    offs = tl.arange(0, BLOCK)
    state = state_ptr + row * STATE_WIDTH
    anchor = tl.load(state).to(tl.float32)
    t = tl.load(state + 1).to(tl.float32)
    pos_value = tl.load(state + 2).to(tl.float32)
    neg_value = tl.load(state + 3).to(tl.float32)

    v0, g0, valid0 = _chunk_slope(scores_ptr, grad_ptr, start, 0, length, offs, anchor, t,
                                  pos_value, neg_value)
    sum_vg = tl.sum(v0 * g0, 0)
    sum_v = tl.sum(v0, 0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        v, g, _ = _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, anchor, t,
                               pos_value, neg_value)
        sum_vg += tl.sum(v * g, 0)
        sum_v += tl.sum(v, 0)
    # backward_shift: a fully saturated row (sum v = 0) has zero gradient.
    shift = tl.where(sum_v > 0, sum_vg / tl.where(sum_v > 0, sum_v, 1.0), 0.0)

    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + start + offs, (v0 * (g0 - shift)).to(out_ty), mask=valid0)
    for chunk in range(BLOCK, stream_end(length, STREAM), BLOCK):
        v, g, valid = _chunk_slope(scores_ptr, grad_ptr, start, chunk, length, offs, anchor,
                                   t, pos_value, neg_value)
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
    state = torch.empty(segments, reference.ROW_STATE_WIDTH, dtype=torch.float32,
                        device=scores.device)
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
