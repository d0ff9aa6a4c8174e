"""HoloV (Zou et al., "Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic
Context Retention", NeurIPS 2025, arXiv:2510.02912) on packed visual tokens, batched over
segments."""
from __future__ import annotations

import torch

from vsops.difftopk import topk_mask
from vsops.methods.base import (
    VISION_ATTENTION,
    VISUAL_TOKENS,
    Selected,
    SelectionMethod,
    VisionAttention,
    check_token_rows,
    segments_of,
)
from vsops.methods.registry import register_method
from vsops.ops import validation
from vsops.reference import TILE_ELEMENTS

__all__ = ["HoloVMethod", "holov", "chunk_counts"]

# The published token score: attention plus BETA times the similarity variance, rescaled to the
# attention's magnitude; EPS keeps a chunk of identical tokens (variance 0) at its attention.
BETA = 0.09
EPS = 1e-6


def chunk_counts(n: torch.Tensor, k: torch.Tensor, chunks: int | None = None) -> torch.Tensor:
    """int64 ``[S]``: the chunks HoloV splits each segment of ``n[s]`` tokens keeping ``k[s]``
    into: ``chunks`` when given, else ``floor(16 n / (9 k))`` (the published Qwen2.5-VL rule,
    ``int(1024 / 576 * n / k)``: 16 chunks of 576 tokens keeping 64), at least 1 and at most
    ``n`` (0 for an empty segment; 1 when ``k = 0``)."""
    wanted = (16 * n) // (9 * k.clamp_min(1)) if chunks is None else torch.full_like(n, chunks)
    return torch.where(k == 0, 1, wanted).clamp_min(1).minimum(n)


@register_method
class HoloVMethod(SelectionMethod):
    """HoloV: the budget spread over spatial chunks by a holistic chunk score, then the tokens of
    largest attention inside each chunk, so that the kept tokens cover the whole image rather
    than its few highlighted regions.

    What it computes, per segment (a sample's visual tokens, or one image's with
    ``scope="image"``) of ``n`` tokens keeping ``k = budget_to_k(n, budget)``:

    - chunks: ``c = chunk_counts(n, k, chunks)`` contiguous runs of the tokens in the language
      model's order (raster order within an image: runs of whole rows, as the published code
      cuts its crops), of ``n // c`` tokens, the first ``n % c`` one more.
    - chunk score, from ``a = vision.received`` (the attention the tokens receive in the tower;
      see :class:`~vsops.methods.VisionAttention`) and the cosine similarities ``S`` of the
      chunk's tokens ``x`` (the diagonal set to 0): for each token ``i`` of a chunk of ``m``,
      ``mu_i = sum_j S_ij / (m - 1)`` and ``var_i = sum_j (S_ij - mu_i)^2 / (m - 1)`` (over all
      ``m`` columns, the zeroed diagonal included, as published); with ``V`` the mean of
      ``var_i`` over the chunk, the score is
      ``mean(a) + 0.09 * mean(|a|) * V / (V + 1e-6)``: the mean over the chunk of the
      published token scores ``a_i + 0.09 * var_i * mean(|a|) / (V + 1e-6)`` (the published
      ones are 1000 times these; a one-token chunk scores ``a``). ``V`` is far above 1e-6
      unless the chunk's tokens are mutually orthogonal (identical tokens give ``1 / (m - 1)``
      by the zeroed diagonal), so in practice the score is about ``1.09 * mean(a)``. NaN attention counts as 0, a NaN variance as 0, a
      negative score as 0. The similarities are computed in float32 (float64 for float64
      tokens), one size of chunk at a time, tiled: memory O(tile + n D), work O(n m D) per
      segment; a segment's only chunk is not scored.
    - allocation: weights ``w = score / sum(score)`` (all 0 when the sum is 0); each chunk gets
      ``floor(w k)``, and the ``r = k - sum floor(w k)`` chunks of largest weight one more
      (ties to the lower chunk). A chunk keeps its ``min(allocation, m)`` tokens of largest
      ``a`` (ties to the lower index, NaN last).
    - exactly ``k``: where allocations exceed their chunk the published code keeps fewer than
      ``k`` and pads with zero embeddings; here the shortfall goes round-robin to the chunks
      with tokens left, in decreasing weight (one more token each per round, the next by ``a``
      in the chunk), until ``k`` are kept.

    The kept tokens stay at their positions: ``Selected.keep`` only, no merge.

    Where it differs from the published implementation (obananas/HoloV, LLaVA-1.5 and
    Qwen2.5-VL, also shipped with the VisionSelector baselines):

    - window order: Qwen2.5-VL's tower runs its blocks on the merge units in window order and
      restores raster order after the merger. The published Qwen2.5-VL code averages the last
      block's attention over heads, queries and merge units in window order and never restores
      it, while the tokens are restored: token ``i`` (raster) is ranked and its chunk scored by
      the attention of the ``i``-th merge unit in window order, another region of the image.
      Here ``vision.received`` is in the language model's order (the capture undoes the window
      order, :mod:`vsops.integrations.vision_attention`), the order of ``x``.
    - scatter order: published kept tokens enter the language model chunk by chunk, in
      decreasing attention within a chunk (their position ids carried along), and a short count
      is padded with zero embeddings at the position of the image's last token. Here kept
      tokens stay in the language model's order at their own positions, exactly ``k`` of them.
    - budget: published ``int(ratio * n)`` (LLaVA: 64 tokens in 16 chunks); here
      ``budget_to_k`` and :func:`chunk_counts`, and exactly ``k`` (above).
    - a one-token chunk's published score is its raw attention, 1000 times below the scaled
      score of the other chunks; here every chunk scores on one scale.
    - the attention is ``vision.received`` (see :class:`~vsops.methods.VisionAttention`), scaled
      by the segment's patch count, which rescales every chunk score of a segment alike; the
      published one is the mean over queries of eager attention weights (CLIP: the CLS row).
    - ties in the published ``torch.topk`` calls have no rule; here the lower index wins.
    """

    name = "holov"
    needs = frozenset({VISUAL_TOKENS, VISION_ATTENTION})

    def __init__(self, chunks: int | None = None):
        if chunks is not None:
            chunks = validation.check_int(chunks, "chunks", minimum=1)
        self.chunks = chunks

    def select(self, x, k, cu_seqlens, *, vision: VisionAttention | None = None) -> Selected:
        if not isinstance(vision, VisionAttention):
            raise ValueError("the holov method needs the vision tower's attention (vision=VisionAttention)")
        if vision.received.shape != (x.shape[0],):
            raise ValueError(f"vision.received must be [{x.shape[0]}], got {tuple(vision.received.shape)}")
        return Selected(_keep(x, vision.received, k, cu_seqlens, self.chunks))

    def __repr__(self) -> str:
        return f"HoloVMethod(chunks={self.chunks})"


def _keep(x, received, k, cu_seqlens, chunks) -> torch.Tensor:
    """The bool keep mask ``[total]`` of :class:`HoloVMethod`."""
    device = x.device
    lengths = cu_seqlens.diff().long()
    counts = chunk_counts(lengths, k, chunks)
    segments = torch.arange(lengths.numel(), device=device)
    segment = torch.repeat_interleave(segments, lengths)
    local = torch.arange(x.shape[0], device=device) - cu_seqlens[:-1].long()[segment]
    # Chunk sizes n // c, the first n % c one more: a token's chunk from its index in the segment.
    size = (lengths // counts.clamp_min(1))[segment]
    larger = (lengths % counts.clamp_min(1))[segment]
    head = larger * (size + 1)
    within = torch.where(local < head, local // (size + 1), larger + (local - head) // size)
    first_chunk = counts.cumsum(0) - counts
    chunk = first_chunk[segment] + within
    chunk_segment = torch.repeat_interleave(segments, counts)
    chunk_size = torch.bincount(chunk, minlength=chunk_segment.numel())

    # Through float32, an infinite attention becomes its largest finite value: the float64 sums
    # below stay finite.
    a = torch.nan_to_num(received.float(), nan=0.0).double()
    mean_a = torch.zeros(chunk_size.shape, dtype=torch.float64, device=device).index_add_(0, chunk, a)
    mean_abs = torch.zeros_like(mean_a).index_add_(0, chunk, a.abs())
    mean_a, mean_abs = mean_a / chunk_size.clamp_min(1), mean_abs / chunk_size.clamp_min(1)
    chunk_start = chunk_size.cumsum(0) - chunk_size
    variance = _similarity_variance(x, chunk_start, chunk_size, chunk_segment, counts)
    score = (mean_a + BETA * mean_abs * variance / (variance + EPS)).clamp_min(0)

    total = torch.zeros(counts.shape, dtype=torch.float64, device=device).index_add_(0, chunk_segment, score)
    total = total[chunk_segment]
    weight = torch.where(total > 0, score / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    chunk_k = k[chunk_segment]
    base = torch.floor(weight * chunk_k).long()
    rest = k - torch.zeros_like(k).index_add_(0, chunk_segment, base)
    weight_rank = _rank_within(weight, chunk_segment, first_chunk)
    allocated = torch.minimum(base + (weight_rank < rest[chunk_segment]).long(), chunk_size)

    rank = _rank_within(received.double(), chunk, chunk_start)
    # Every token's place in the filling order: its chunk's allocated tokens first (negative),
    # then round j = rank - allocated of the round-robin, by the chunk's weight rank (below the
    # token count). The places are distinct within a segment, so the k smallest are kept.
    place = (rank - allocated[chunk]) * x.shape[0] + weight_rank[chunk]
    return topk_mask(-place.double(), k, cu_seqlens=cu_seqlens)


def _rank_within(value: torch.Tensor, group: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """int64 rank of each element by decreasing ``value`` among the elements of its group
    (``group``: int64; ``first``: per group, the count of elements in the groups before it),
    ties to the lower index, NaN last."""
    # A stable sort by -value puts NaN last and the lower index first among equals; a stable
    # sort by group then gathers the groups.
    order = torch.sort(-value, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    rank = torch.empty_like(group)
    rank[order] = torch.arange(group.numel(), device=group.device) - first[group[order]]
    return rank


def _similarity_variance(x, chunk_start, chunk_size, chunk_segment, counts) -> torch.Tensor:
    """float64 ``[C]``: each chunk's mean similarity variance ``V``, 0 where the allocation
    does not read it (a chunk of one token, or the only chunk of its segment)."""
    variance = torch.zeros(chunk_size.shape, dtype=torch.float64, device=x.device)
    scored = (chunk_size > 1) & (counts[chunk_segment] > 1)
    if not bool(scored.any()):
        return variance
    compute = torch.promote_types(x.dtype, torch.float32)
    # Chunks of one size at a time (a segment's chunks have at most two), tiled so that a tile's
    # similarities hold about TILE_ELEMENTS.
    for m in chunk_size[scored].unique().tolist():
        ids = (scored & (chunk_size == m)).nonzero().squeeze(1)
        per_tile = max(1, TILE_ELEMENTS // (m * m))
        offsets = torch.arange(m, device=x.device)
        for t in range(0, ids.numel(), per_tile):
            tile = ids[t : t + per_tile]
            unit = torch.nn.functional.normalize(x[chunk_start[tile, None] + offsets].to(compute), dim=-1)
            similarity = unit @ unit.transpose(1, 2)
            similarity.diagonal(dim1=1, dim2=2).zero_()
            mean = similarity.sum(-1, keepdim=True) / (m - 1)
            spread = (similarity - mean).square().sum(-1) / (m - 1)
            variance[tile] = torch.nan_to_num(spread.mean(-1).double(), nan=0.0)
    return variance


def holov(x: torch.Tensor, k, received: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
          chunks: int | None = None) -> torch.Tensor:
    """:class:`HoloVMethod` on ``x [N, D]`` (or packed ``[total, D]`` with int32
    ``cu_seqlens [S + 1]``), any float dtype, ``k`` an int or one per segment, with the
    attention each token receives in the vision tower (float ``[N]``, in the order of ``x``):
    bool ``keep [N]``, ``k`` True per segment. ``chunks`` fixes the chunk count of every
    segment (the published LLaVA-1.5 setting is 16); None derives it from ``n`` and ``k``
    (:func:`chunk_counts`)."""
    k, cu_seqlens = segments_of(x, k, cu_seqlens)
    check_token_rows(x, received=(received, 1))
    return _keep(x, received, k, cu_seqlens, HoloVMethod(chunks).chunks)
