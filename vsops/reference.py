"""Plain-PyTorch reference of every vsops operator.

These functions define what the operators compute: every compiled, CUDA and Triton backend
is tested against them on the same inputs, and they are the fallback where no faster backend
exists. They favour clarity and precision (float64 throughout) over speed, but stay
vectorised over rows so the fallback has no per-row Python loop.

Layout conventions shared by all backends (checked by ``vsops.ops.validation``):

* padded: ``scores`` is ``[B, N]`` and ``cu_seqlens`` is None; each row is one segment.
* packed: ``scores`` is ``[total]`` and ``cu_seqlens`` is int32 ``[S + 1]`` (FlashAttention's
  convention), segment ``i`` being ``scores[cu_seqlens[i]:cu_seqlens[i + 1]]``.

``k`` is always an int64 tensor ``[S]`` here; the public API validates it.
"""
from __future__ import annotations

import torch

from vsops.ops.validation import check_allocation, num_segments

__all__ = [
    "TILE_ELEMENTS",
    "attention_received",
    "divprune_keep",
    "divprune_keeps_similarity",
    "difftopk_forward",
    "difftopk_backward",
    "topk_mask",
    "difftopk_algorithm1",
    "state_dtype_for",
    "segment_ids",
    "lis_segment_sum",
    "lis_segment_dot",
    "lis_input_grad",
    "lis_score_dense",
    "varlen_pack",
    "varlen_unpack",
]

# Bisection steps of the oracle between checks that it has converged: from a bracket of
# width w the error is w * 2**-64, below the float64 resolution of t for most rows.
_BISECTION_STEPS = 64
# A row's threshold is anchor + t (difftopk_math.h's RowSolution); row_state holds
# [anchor, t, value of +inf scores, value of -inf scores] per segment.
ROW_STATE_WIDTH = 4


def state_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of the kernels (and of ``row_state``): float64 for float64 input,
    float32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _to_rows(values: torch.Tensor, cu_seqlens: torch.Tensor | None, pad: float):
    """Returns (rows [S, Nmax], valid [S, Nmax] bool, index [S, Nmax] into the flat input)."""
    if cu_seqlens is None:
        s, n = values.shape
        valid = torch.ones(s, n, dtype=torch.bool, device=values.device)
        index = torch.arange(s * n, device=values.device).view(s, n)
        return values, valid, index
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    n_max = int(lengths.max()) if lengths.numel() else 0
    offsets = torch.arange(n_max, device=values.device)
    valid = offsets.unsqueeze(0) < lengths.unsqueeze(1)
    index = (starts.unsqueeze(1) + offsets.unsqueeze(0)).clamp(max=max(values.numel() - 1, 0))
    if values.numel() == 0:
        rows = torch.full(valid.shape, pad, dtype=values.dtype, device=values.device)
    else:
        rows = torch.where(valid, values[index], torch.full_like(valid, pad, dtype=values.dtype))
    return rows, valid, index


def _from_rows(rows: torch.Tensor, valid: torch.Tensor, index: torch.Tensor, like: torch.Tensor):
    if like.dim() == 2:
        return rows.to(like.dtype).reshape(like.shape)
    out = torch.empty_like(like)
    out[index[valid]] = rows[valid].to(like.dtype)
    return out


def _mask_value(s: torch.Tensor, anchor: torch.Tensor, t: torch.Tensor, pos_inf_value, neg_inf_value):
    m = torch.sigmoid((s + anchor) + t)
    m = torch.where(s == float("inf"), pos_inf_value, m)
    return torch.where(s == float("-inf"), neg_inf_value, m)


def _bisect(scores, anchor, lo, hi, k):
    """Bisects each row's bracket [lo, hi] on t for sum(sigmoid((s + anchor) + t)) = k, to
    float64 resolution: in rounds of _BISECTION_STEPS until no midpoint falls strictly
    inside (one host sync per round; a bracket spanning 1e300 takes ~35 rounds)."""
    while True:
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            f = torch.sigmoid((scores + anchor.unsqueeze(1)) + mid.unsqueeze(1)).sum(1)
            below = f < k
            lo = torch.where(below, mid, lo)
            hi = torch.where(below, hi, mid)
        mid = 0.5 * (lo + hi)
        if not bool(((mid > lo) & (mid < hi)).any()):
            return lo, hi


def _mask_slope_sum(scores, threshold):
    """sum(sigmoid'(s + threshold)) per row."""
    m = torch.sigmoid(scores + threshold.unsqueeze(1))
    return (m * (1 - m)).sum(1)


def difftopk_forward(scores: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """DiffTopK forward: ``(mask, row_state)``.

    ``mask`` has the shape and dtype of ``scores``: ``sigmoid(s + t)`` per segment with
    ``sum(mask) = k``. ``row_state`` is ``[S, ROW_STATE_WIDTH]`` in
    ``state_dtype_for(scores.dtype)``: the threshold as ``anchor + t`` (each score is shifted
    by ``(s + anchor) + t``) and the values given to ``+inf`` and ``-inf`` scores. Semantics of the
    limits (k = 0, k = n, infinite scores, NaN) are those of ``csrc/include/vsops/difftopk_math.h``.
    """
    s, valid, index = _to_rows(scores.double(), cu_seqlens, float("-inf"))
    finite = valid & torch.isfinite(s)
    n_pos = (valid & (s == float("inf"))).sum(1).double()
    n_neg = (valid & (s == float("-inf"))).sum(1).double()
    n_fin = finite.sum(1).double()
    has_nan = (valid & torch.isnan(s)).any(1)
    n = n_pos + n_neg + n_fin
    kk = torch.minimum(k.to(s.device).double().clamp(min=0), n)

    big = torch.finfo(torch.float64).max
    s_max = torch.where(finite, s, torch.full_like(s, -big)).amax(1) if s.shape[1] else n * 0
    s_min = torch.where(finite, s, torch.full_like(s, big)).amin(1) if s.shape[1] else n * 0

    saturated_pos = kk <= n_pos
    saturated_fin = ~saturated_pos & (kk >= n_pos + n_fin)
    searching = ~saturated_pos & ~saturated_fin
    frac = torch.where(searching, (kk - n_pos) / n_fin.clamp(min=1), torch.full_like(kk, 0.5))
    base = torch.log(frac) - torch.log1p(-frac)
    # Widened by the rounding of both ends, so the bracket holds t even for equal scores.
    eps = 4 * torch.finfo(torch.float64).eps
    lo = torch.where(searching, base - s_max - eps * (base.abs() + s_max.abs()), torch.zeros_like(kk))
    hi = torch.where(searching, base - s_min + eps * (base.abs() + s_min.abs()), torch.zeros_like(kk))
    s_search = torch.where(finite, s, torch.where(s == float("inf"), s, torch.full_like(s, float("-inf"))))
    lo, hi = _bisect(s_search, torch.zeros_like(lo), lo, hi, kk)
    # The threshold of scores near 1e20 is near -1e20, where float64 resolves steps of 2**14
    # only: bisect again relative to an anchor there (as the kernels do), where (s + anchor)
    # is exact for the scores that decide the threshold. The anchor is a bracket end rounded
    # to the dtype row_state keeps (so that the backward shifts by the same value): the one
    # with the larger slope, where the threshold is when the scores are spaced far apart.
    state_dtype = state_dtype_for(scores.dtype)
    ends = [end.to(state_dtype).double() for end in (lo, hi)]
    slope_lo, slope_hi = (_mask_slope_sum(s_search, end) for end in ends)
    anchor = torch.where(searching, torch.where(slope_hi > slope_lo, ends[1], ends[0]), torch.zeros_like(lo))
    lo, hi = _bisect(s_search, anchor, lo - anchor, hi - anchor, kk)
    t = torch.where(searching, 0.5 * (lo + hi), torch.where(saturated_pos, -torch.inf, torch.inf))
    pos_value = torch.where(saturated_pos, torch.where(n_pos > 0, kk / n_pos.clamp(min=1), 0.0), 1.0)
    neg_value = torch.where(
        saturated_fin, torch.where(n_neg > 0, (kk - n_pos - n_fin) / n_neg.clamp(min=1), 1.0), 0.0
    )
    nan = torch.full_like(t, float("nan"))
    t, pos_value, neg_value = (torch.where(has_nan, nan, x) for x in (t, pos_value, neg_value))
    anchor = torch.where(has_nan, torch.zeros_like(anchor), anchor)

    state = torch.stack([anchor, t, pos_value, neg_value], dim=1)
    m = _mask_value(s, *(column.unsqueeze(1) for column in state.unbind(1)))
    m = torch.where(valid, m, torch.zeros_like(m))
    state = state.to(state_dtype)
    return _from_rows(m, valid, index, scores), state


def _mask_slope(s: torch.Tensor, state: torch.Tensor):
    anchor, t, pos_value, neg_value = (column.double().unsqueeze(1) for column in state.unbind(1))
    m = _mask_value(s, anchor, t, pos_value, neg_value)
    return m * (1 - m)


def difftopk_backward(
    grad: torch.Tensor, scores: torch.Tensor, row_state: torch.Tensor, cu_seqlens: torch.Tensor | None
):
    """Eq. 8: ``dL/ds = v * (g - sum(v g) / sum(v))`` with ``v = M (1 - M)``, per segment.

    ``grad`` and the result have the shape of ``scores``; the result has its dtype.
    """
    s, valid, index = _to_rows(scores.double(), cu_seqlens, 0.0)
    g, _, _ = _to_rows(grad.double(), cu_seqlens, 0.0)
    v = torch.where(valid, _mask_slope(s, row_state), torch.zeros_like(s))
    sum_v = v.sum(1, keepdim=True)
    sum_vg = (v * g).sum(1, keepdim=True)
    shift = torch.where(sum_v > 0, sum_vg / torch.where(sum_v > 0, sum_v, 1.0), torch.zeros_like(sum_v))
    out = torch.where(valid, v * (g - shift), torch.zeros_like(s))
    return _from_rows(out, valid, index, scores)


def topk_mask(scores: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Hard top-k per segment: bool mask of the shape of ``scores`` with ``min(k, n)`` True
    entries per segment. Ties go to the lower index; NaN ranks below ``-inf``."""
    s, valid, index = _to_rows(scores.double(), cu_seqlens, 0.0)
    # Category: 0 real score, 1 NaN, 2 padding; then score descending; then index ascending.
    category = torch.where(valid, torch.isnan(s).long(), torch.full_like(s, 2, dtype=torch.long))
    value = torch.where(category == 0, s, torch.full_like(s, float("-inf")))
    order = torch.sort(value, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(category.gather(1, order), dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order).contiguous())
    keep = valid & (rank < k.to(s.device).unsqueeze(1))
    if scores.dim() == 2:
        return keep
    out = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    out[index[valid]] = keep[valid]
    return out


def difftopk_algorithm1(scores: torch.Tensor, k: int, steps: int = 64) -> torch.Tensor:
    """Algorithm 1 of the paper as published, for benchmarks: ``[B, N]`` scores, one int k,
    ``steps`` bisection iterations over the whole batch in the input dtype, no limit cases.
    Differentiable through the paper's Eq. 8 backward."""
    return _Algorithm1.apply(scores, k, steps)


class _Algorithm1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, k, steps):
        lower = -s.amax(dim=1) - 10
        upper = -s.amin(dim=1) + 10
        for _ in range(steps):
            mid = (lower + upper) / 2
            m_sum = torch.sigmoid(s + mid.unsqueeze(1)).sum(dim=1)
            mask = m_sum < k
            lower = torch.where(mask, mid, lower)
            upper = torch.where(mask, upper, mid)
        t = (lower + upper) / 2
        ctx.save_for_backward(s, t)
        return torch.sigmoid(s + t.unsqueeze(1))

    @staticmethod
    def backward(ctx, grad):
        s, t = ctx.saved_tensors
        m = torch.sigmoid(s + t.unsqueeze(1))
        v = m * (1 - m)
        uv = grad * v
        return uv - uv.sum(1, keepdim=True) / v.sum(1, keepdim=True) * v, None, None


# --- LIS scoring -------------------------------------------------------------------------
# Layouts: padded ``x [B, N, D]`` (segment b is row b) or packed ``x [total, D]`` with int32
# ``cu_seqlens [S + 1]``. Per-token values (token weights, scores, grads) are ``[B, N]`` or
# ``[total]``; per-segment values are ``[S, D]`` / ``[S]``. Everything per-token or
# per-segment that is not ``x`` itself is in ``state_dtype_for(x.dtype)``.


def segment_ids(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """int64 segment index of every token, flat ``[B * N]`` or ``[total]`` (no host sync)."""
    if cu_seqlens is None:
        b, n = x.shape[0], x.shape[1]
        return torch.arange(b, device=x.device).repeat_interleave(n)
    tokens = torch.arange(x.shape[0], device=x.device, dtype=torch.int32)
    return torch.searchsorted(cu_seqlens[1:], tokens, right=True).long()


def _tokens(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def lis_segment_sum(x: torch.Tensor, token_weight: torch.Tensor | None, cu_seqlens: torch.Tensor | None):
    """``out[s] = sum_i w_i x_i`` over the tokens of segment s: ``[S, D]``.

    With ``token_weight=None`` the weights are ``1 / n_s`` (the segment mean; 0 for an empty
    segment), else ``token_weight`` has the per-token shape.
    """
    seg = segment_ids(x, cu_seqlens)
    s = num_segments(x, cu_seqlens)
    xt = _tokens(x).double()
    if token_weight is None:
        counts = torch.zeros(s, dtype=torch.float64, device=x.device).index_add_(
            0, seg, torch.ones_like(seg, dtype=torch.float64)
        )
        w = (1.0 / counts.clamp(min=1))[seg]
    else:
        w = token_weight.reshape(-1).double()
    out = torch.zeros(s, x.shape[-1], dtype=torch.float64, device=x.device)
    out.index_add_(0, seg, xt * w.unsqueeze(1))
    return out.to(state_dtype_for(x.dtype))


def lis_segment_dot(x: torch.Tensor, u: torch.Tensor, c: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """Per-token ``x_i . u_s + c_s`` (s the token's segment): ``[B, N]`` or ``[total]``."""
    seg = segment_ids(x, cu_seqlens)
    out = (_tokens(x).double() * u.double()[seg]).sum(1) + c.double()[seg]
    return out.to(state_dtype_for(x.dtype)).reshape(x.shape[:-1])


def lis_weight_product(vectors: torch.Tensor, weight: torch.Tensor, transpose: bool):
    """``vectors @ weight.T`` (``transpose``: ``[S, D]`` -> ``[S, d]``) or ``vectors @ weight``
    (``[S, d]`` -> ``[S, D]``) for a ``[d, D]`` weight, in the vectors' dtype."""
    check_allocation((vectors.shape[0], weight.shape[0 if transpose else 1]), vectors.dtype, "vectors and weight")
    w = weight.double()
    out = vectors.double() @ (w.T if transpose else w)
    return out.to(vectors.dtype)


def lis_weight_grad(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype):
    """``left^T @ right`` (``[S, d]``, ``[S, D]`` -> ``[d, D]``) in ``dtype``: a weight gradient."""
    check_allocation((left.shape[1], right.shape[1]), dtype, "left and right")
    return (left.double().T @ right.double()).to(dtype)


def lis_input_grad(
    grad: torch.Tensor, u: torch.Tensor, w: torch.Tensor, cu_seqlens: torch.Tensor | None, dtype: torch.dtype
):
    """Per-token ``grad_i * u_s + w_s``: ``[B, N, D]`` or ``[total, D]`` in ``dtype``."""
    if cu_seqlens is None:
        out = grad.double().unsqueeze(2) * u.double().unsqueeze(1) + w.double().unsqueeze(1)
        return out.to(dtype)
    seg = segment_ids(grad.unsqueeze(1), cu_seqlens)
    return (grad.double().unsqueeze(1) * u.double()[seg] + w.double()[seg]).to(dtype)


def lis_score_dense(x, q_weight, q_bias, k_weight, k_bias, cu_seqlens=None) -> torch.Tensor:
    """Eq. 1-2 as published, in float64: ``s = mean_j(Q K^T)_ij / sqrt(d)`` with the N x N
    matrix materialised, one segment at a time. The tests' oracle and the benchmarks' baseline."""
    def one(v):
        q = torch.nn.functional.linear(v, q_weight.double(), None if q_bias is None else q_bias.double())
        k = torch.nn.functional.linear(v, k_weight.double(), None if k_bias is None else k_bias.double())
        return (q @ k.T / q_weight.shape[0] ** 0.5).mean(1)

    x = x.double()
    if cu_seqlens is None:
        return torch.stack([one(v) for v in x]) if x.shape[0] else x.new_zeros(x.shape[:2])
    bounds = cu_seqlens.tolist()
    parts = [one(x[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return torch.cat(parts) if parts else x.new_zeros(0)


# --- varlen pack -------------------------------------------------------------------------
# ``keep`` is a bool mask over the flattened tokens of a batch (``[B, L]``); the tensors to
# pack are viewed as rows ``[B * L, R]`` of any dtype. Packed order is the flattened order, so
# each sample's kept tokens are contiguous, in their original order.


def varlen_pack(keep: torch.Tensor, total: int, rows: list[torch.Tensor]):
    """``(indices, packed)``: the int64 flat positions of the ``total`` kept tokens, and each
    of ``rows`` gathered at them (``[total, R]``). ``total`` must equal ``keep.sum()``."""
    indices = torch.nonzero(keep.reshape(-1)).squeeze(1)
    if indices.numel() != total:
        raise ValueError(f"total = {total} but keep has {indices.numel()} kept tokens")
    return indices, [r.index_select(0, indices) for r in rows]


def varlen_unpack(packed: torch.Tensor, indices: torch.Tensor, rows: int, fill: float):
    """The inverse: ``[rows, R]`` with packed row j at ``indices[j]`` and ``fill`` elsewhere."""
    check_allocation((rows, packed.shape[1]), packed.dtype, f"rows = {rows}")
    out = torch.full((rows, packed.shape[1]), fill, dtype=packed.dtype, device=packed.device)
    return out.index_copy_(0, indices, packed)


# Elements of one tile of an n x n product (similarities, attention logits): the rows of a
# tile are chosen so that it holds about 16M whatever the segment length, and no n x n matrix
# is ever held (a 50,000-token video needs 64 MB of tile). The CPU kernels tile alike.
TILE_ELEMENTS = 1 << 24


def divprune_keeps_similarity(n: int, d: int) -> bool:
    """Whether DivPrune keeps the n x n similarities of the nearest-neighbour pass for its
    greedy passes (one row read per pick instead of an n x d product): when they take at most
    twice the tokens' memory, or one tile, so that memory stays O(n d)."""
    return n * n <= max(2 * n * d, TILE_ELEMENTS)


def _divprune_argmax(values: torch.Tensor, picked: torch.Tensor) -> int:
    """The first index of the largest value among tokens not yet picked; NaN ranks below every
    number, picked tokens below NaN."""
    key = torch.where(torch.isnan(values), torch.full_like(values, -torch.finfo(values.dtype).max), values)
    return int(torch.where(picked, torch.full_like(key, float("-inf")), key).argmax())


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """DivPrune's max-min diverse subset of each segment: bool ``[total]``.

    Per segment of ``x [total, D]`` (rows L2-normalized in float32, float64 for float64
    input; a zero row stays zero, at distance 1 from everything), with cosine distance
    ``d(i, j) = 1 - x_i . x_j``: the first pick is the token whose nearest other token is
    farthest; each next pick is the unpicked token whose distance to the nearest picked one is
    largest; ``k[s]`` picks. Ties go to the lower index. Memory O(n D + n) per segment: the
    nearest-neighbour pass runs over row tiles, kept for the greedy passes only where they are
    no larger than that (:func:`divprune_keeps_similarity`); otherwise each pick is one
    product with the tokens.
    """
    dtype = state_dtype_for(x.dtype)
    keep = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    bounds = cu_seqlens.tolist()
    for start, end, count in zip(bounds[:-1], bounds[1:], k.tolist()):
        n = end - start
        if count == n:
            keep[start:end] = True
            continue
        if count == 0:
            continue
        unit = torch.nn.functional.normalize(x[start:end].to(dtype), dim=-1)
        nearest = torch.empty(n, dtype=dtype, device=x.device)
        rows = max(1, TILE_ELEMENTS // n)
        tiles = []
        for r in range(0, n, rows):
            similarity = unit[r : r + rows] @ unit.T
            tile = torch.arange(similarity.shape[0], device=x.device)
            # A token is not its own neighbour. Its similarity to itself is not needed later
            # either: a picked token is never a candidate again.
            similarity[tile, r + tile] = float("-inf")
            nearest[r : r + rows] = 1 - similarity.max(1).values
            if divprune_keeps_similarity(n, x.shape[1]):
                tiles.append(similarity)
        matrix = torch.cat(tiles) if tiles else None
        picked = torch.zeros(n, dtype=torch.bool, device=x.device)
        choice = _divprune_argmax(nearest, picked)
        distance = torch.full((n,), float("inf"), dtype=dtype, device=x.device)
        for step in range(count):
            picked[choice] = True
            if step + 1 == count:
                break
            similarity = matrix[choice] if matrix is not None else unit @ unit[choice]
            distance = torch.minimum(distance, 1 - similarity)
            choice = _divprune_argmax(distance, picked)
        keep[start:end] = picked
    return keep



def attention_received(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, scale: float
) -> torch.Tensor:
    """The attention each key receives, averaged over heads and over its segment's queries:
    float32 ``[Tk]`` (float64 for float64 input).

    ``q [Tq, H, d]`` and ``k [Tk, H, d]`` are packed by segment (``cu_seqlens_q``,
    ``cu_seqlens_k`` int32 ``[S + 1]``): the queries of segment ``s`` attend to the keys of
    segment ``s`` only. For key ``j`` of segment ``s`` with ``n_q`` queries,
    ``out[j] = (1 / (H n_q)) sum_h sum_i softmax_j(scale * q[i, h] . k[:, h])[j]``; a segment
    without queries gives 0 to its keys. So the keys of a segment with queries sum to 1.
    Accumulated in float32 (float64 for float64), over tiles of query rows.
    """
    dtype = state_dtype_for(q.dtype)
    out = torch.zeros(k.shape[0], dtype=dtype, device=k.device)
    heads = q.shape[1]
    for (qa, qb), (ka, kb) in zip(zip(cu_seqlens_q.tolist()[:-1], cu_seqlens_q.tolist()[1:]),
                                  zip(cu_seqlens_k.tolist()[:-1], cu_seqlens_k.tolist()[1:])):
        n_q, n_k = qb - qa, kb - ka
        if n_q == 0 or n_k == 0:
            continue
        queries = q[qa:qb].to(dtype).transpose(0, 1)  # [H, n_q, d]
        keys = k[ka:kb].to(dtype).transpose(0, 1)  # [H, n_k, d]
        rows = max(1, TILE_ELEMENTS // (heads * n_k))
        received = torch.zeros(n_k, dtype=dtype, device=k.device)
        for r in range(0, n_q, rows):
            logits = torch.matmul(queries[:, r : r + rows], keys.transpose(1, 2)) * scale
            received += logits.softmax(-1).sum((0, 1))
        out[ka:kb] = received / (heads * n_q)
    return out
