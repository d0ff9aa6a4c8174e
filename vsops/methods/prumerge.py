"""PruMerge+ (Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv:2403.15388; the "+" variant) on packed visual tokens,
batched over segments."""
from __future__ import annotations

import torch

from vsops.difftopk import topk_mask
from vsops.methods.base import (
    VISION_ATTENTION,
    VISUAL_TOKENS,
    Selected,
    SelectionMethod,
    VisionAttention,
    merge_rows,
    check_token_rows,
    segments_of,
)
from vsops.methods.registry import register_method
from vsops.ops import validation
from vsops.reference import TILE_ELEMENTS

__all__ = ["PruMergePlusMethod", "prumerge_plus", "outlier_counts"]


def outlier_counts(received: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """int64 ``[S]``: the tokens of each segment whose ``received`` (float ``[total]``) lies
    above ``Q3 + 1.5 (Q3 - Q1)``, the quartiles linearly interpolated (NumPy's default
    percentile) over the segment's values that are not NaN, in float64."""
    device = received.device
    lengths = cu_seqlens.diff().long()
    if received.numel() == 0:
        return torch.zeros_like(lengths)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=device), lengths)
    value = received.double()
    valid = ~torch.isnan(value)
    # Ascending within each segment, NaN last: a stable sort by value, then by segment.
    order = torch.sort(value, stable=True).indices
    ordered = value[order[torch.sort(segment[order], stable=True).indices]]
    highest = torch.zeros_like(lengths).index_add_(0, segment, valid.long()).sub_(1).clamp_min_(0)
    # Empty segments read any value (clamped into range); no token of theirs compares to it.
    start, last = cu_seqlens[:-1].long(), received.shape[0] - 1

    def quartile(q: float) -> torch.Tensor:
        position = highest.double() * q
        below = position.floor()
        lower = (start + below.long()).clamp(max=last)
        upper = (start + torch.minimum(below.long() + 1, highest)).clamp(max=last)
        return ordered[lower] + (position - below) * (ordered[upper] - ordered[lower])

    q1, q3 = quartile(0.25), quartile(0.75)
    bound = (q3 + 1.5 * (q3 - q1))[segment]
    return torch.zeros_like(lengths).index_add_(0, segment, (valid & (value > bound)).long())


@register_method
class PruMergePlusMethod(SelectionMethod):
    """PruMerge+: the tokens of outlying attention inside the vision tower plus spatially
    uniform samples, each kept token merging the dropped tokens nearest to it by key.

    What it computes, per segment (a sample's visual tokens, or one image's with
    ``scope="image"``) of ``n`` tokens keeping ``k = budget_to_k(n, budget)``, from
    ``a = vision.received`` (the attention the tokens receive in the tower) and
    ``vision.keys`` (see :class:`~vsops.methods.VisionAttention`):

    - outliers: the ``o`` tokens with ``a > Q3 + 1.5 IQR`` (:func:`outlier_counts`); the
      ``t = min(max(o, 1), k)`` tokens of largest ``a`` are kept (the outliers, truncated to
      ``k`` by ``a``; the single largest when there is no outlier). Ties go to the lower index,
      NaN ranks last and is never an outlier.
    - uniform samples: at stride ``max(1, n // k)`` over the segment (tokens 0, stride,
      2 stride, ...), those not kept yet, in order, the first ``k - t``. The grid holds at
      least ``ceil(n / stride) >= k`` tokens, so this always reaches exactly ``k``.
    - merge: each kept token's neighbourhood is its ``neighbours`` (32) tokens of most
      cosine-similar key among the other tokens of the segment (kept ones included, as
      published; ties to the lower index, NaN similarities last). A dropped token in some
      neighbourhood joins the kept token most similar to it among those whose neighbourhood
      holds it (ties to the lower kept token); the other dropped tokens join none. A kept
      token's embedding becomes its own plus the mean of those that joined it
      (:func:`~vsops.methods.merge_rows`, float32, float64 for float64 tokens), and
      ``Selected.merged_into`` says who joined whom, so that a model's other rows per visual
      token (Qwen3-VL's deepstack features) merge the same way. The key similarities are taken
      in float32 (float64 for float64 keys), ``k x n`` per segment in tiles of about
      ``TILE_ELEMENTS``, one segment at a time.

    Where it differs from the published implementation (42Shawn/LLaVA-PruMerge for LLaVA-1.5,
    and the Qwen2.5-VL port shipped with the VisionSelector baselines, which this follows):

    - scatter order: the published Qwen2.5-VL port returns the merged tokens in selection order
      (outliers by decreasing attention, then the uniform samples) with the kept indices
      sorted, and scatters the former into the places of the latter: the ``j``-th merged token
      lands at the position (and 3-D rope position) of the ``j``-th smallest kept index, which
      shuffles the kept tokens across the image. Here ``Selected.keep`` marks each kept token
      at its own index and ``Selected.embeds`` holds its merged embedding at that index, in the
      language model's order. (That port does restore raster order from the tower's window
      order for the attention and keys; here ``vision`` comes in the language model's order,
      the capture undoing the window order, :mod:`vsops.integrations.vision_attention`.)
    - budget: the published LLaVA-1.5 code keeps an adaptive count (the outliers plus a grid
      at a third of the outliers' stride); the Qwen2.5-VL port keeps ``int(ratio * n)`` with
      ``max(int(n * (o / n)), 1)`` outliers, which loses an outlier to float rounding for many
      ``n`` (e.g. 2 of 49); here ``budget_to_k`` and the exact count ``o``.
    - merge weights: published, a kept token adds the attention-weighted sum of its whole
      neighbourhood (``x_i + sum_j a_j x_j``, kept neighbours included, a dropped token possibly
      in several sums). The protocol's merge is a partition with an unweighted mean
      (:attr:`~vsops.methods.Selected.merged_into`), which the model's other rows follow; here
      the neighbourhoods decide only who joins whom.
    - keys: ``vision.keys`` are the layer's keys before the rotary embedding, averaged over
      heads; the published ones are the rotated keys of all heads concatenated, averaged over
      merge units. The attention is ``vision.received``; published, the mean over heads and
      queries of eager attention weights (LLaVA-1.5: the CLS row).
    - the key similarity normalizes with an epsilon (a zero key is similar to nothing); ties
      in the published ``torch.topk`` calls have no rule; here the lower index wins.
    """

    name = "prumerge_plus"
    needs = frozenset({VISUAL_TOKENS, VISION_ATTENTION})

    def __init__(self, neighbours: int = 32):
        self.neighbours = validation.check_int(neighbours, "neighbours", minimum=1)

    def select(self, x, k, cu_seqlens, *, vision: VisionAttention | None = None) -> Selected:
        if not isinstance(vision, VisionAttention):
            raise ValueError("the prumerge_plus method needs the vision tower's attention (vision=VisionAttention)")
        if vision.received.shape != (x.shape[0],) or vision.keys.dim() != 2 or vision.keys.shape[0] != x.shape[0]:
            raise ValueError(
                f"vision.received must be [{x.shape[0]}] and vision.keys [{x.shape[0]}, d], got "
                f"{tuple(vision.received.shape)} and {tuple(vision.keys.shape)}"
            )
        keep = _keep(vision.received, k, cu_seqlens)
        merged_into = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        unit = torch.nn.functional.normalize(vision.keys.to(torch.promote_types(vision.keys.dtype, torch.float32)),
                                             dim=-1)
        bounds = cu_seqlens.tolist()
        for s, kept in enumerate(k.tolist()):
            start, end = bounds[s], bounds[s + 1]
            if 0 < kept < end - start:
                _assign_segment(unit[start:end], keep[start:end], self.neighbours, merged_into[start:end], start)
        return Selected(keep, merge_rows(x, merged_into), merged_into)

    def __repr__(self) -> str:
        return f"PruMergePlusMethod(neighbours={self.neighbours})"


def _keep(received, k, cu_seqlens) -> torch.Tensor:
    """The bool keep mask ``[total]`` of :class:`PruMergePlusMethod`."""
    device = received.device
    lengths = cu_seqlens.diff().long()
    segments = torch.arange(lengths.numel(), device=device)
    segment = torch.repeat_interleave(segments, lengths)
    local = torch.arange(received.shape[0], device=device) - cu_seqlens[:-1].long()[segment]
    top = torch.minimum(outlier_counts(received, cu_seqlens).clamp_min(1), k)
    keep = topk_mask(received, top, cu_seqlens=cu_seqlens)
    stride = (lengths // k.clamp_min(1)).clamp_min(1)
    grid = (local % stride[segment] == 0) & ~keep
    # The grid tokens' order within their segment: a running count less the earlier segments'.
    before = torch.zeros_like(lengths).index_add_(0, segment, grid.long())
    before = before.cumsum(0) - before
    order = grid.long().cumsum(0) - 1 - before[segment]
    return keep | (grid & (order < (k - top)[segment]))


def _assign_segment(unit, keep, neighbours: int, merged_into, start: int) -> None:
    """Writes into ``merged_into`` (a view of one segment starting at token ``start``) the kept
    token each dropped token joins, from the unit keys ``unit [n, d]`` of the segment."""
    n = unit.shape[0]
    kept = keep.nonzero().squeeze(1)
    count = min(neighbours, n - 1)
    best = torch.full((n,), float("-inf"), dtype=unit.dtype, device=unit.device)
    owner = torch.full((n,), -1, dtype=torch.long, device=unit.device)
    rows = max(1, TILE_ELEMENTS // n)
    for r in range(0, kept.numel(), rows):
        ids = kept[r : r + rows]
        similarity = unit[ids] @ unit.T
        # A token is not its own neighbour.
        similarity[torch.arange(ids.numel(), device=ids.device), ids] = float("-inf")
        cu = torch.arange(0, (ids.numel() + 1) * n, n, dtype=torch.int32, device=ids.device)
        near = topk_mask(similarity.flatten(), count, cu_seqlens=cu).view_as(similarity)
        joinable = near & ~keep & ~torch.isnan(similarity)
        value, row = torch.where(joinable, similarity, float("-inf")).max(0)
        # Tiles go in increasing kept index and max returns the first maximum: among equal
        # similarities the lower kept token wins.
        better = value > best
        best = torch.where(better, value, best)
        owner = torch.where(better, ids[row], owner)
    joined = owner >= 0
    merged_into[joined] = start + owner[joined]


def prumerge_plus(
    x: torch.Tensor,
    k,
    received: torch.Tensor,
    keys: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    neighbours: int = 32,
) -> Selected:
    """:class:`PruMergePlusMethod` on ``x [N, D]`` (or packed ``[total, D]`` with int32
    ``cu_seqlens [S + 1]``), any float dtype, ``k`` an int or one per segment, with the
    attention each token receives in the vision tower (float ``[N]``) and its keys (float
    ``[N, d]``), both in the order of ``x``: a :class:`~vsops.methods.Selected` with bool
    ``keep [N]`` (``k`` True per segment), ``embeds [N, D]`` in the dtype of ``x`` (the merged
    embeddings at the kept tokens that absorbed others, the tokens' own elsewhere) and int64
    ``merged_into [N]`` (the kept token each merged token joined, -1 elsewhere)."""
    k, cu_seqlens = segments_of(x, k, cu_seqlens)
    check_token_rows(x, received=(received, 1), keys=(keys, 2))
    return PruMergePlusMethod(neighbours).select(x, k, cu_seqlens, vision=VisionAttention(received, keys))
