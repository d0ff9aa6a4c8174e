"""DivPrune (Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal
Models", CVPR 2025) on packed visual tokens, batched over segments."""
from __future__ import annotations

import torch

from vsops.methods.base import Selected, SelectionMethod, segments_of
from vsops.methods.registry import register_method

__all__ = ["DivPruneMethod", "divprune"]


@register_method
class DivPruneMethod(SelectionMethod):
    """DivPrune: the max-min diverse subset of the merged visual tokens under cosine distance.

    What it computes, per segment (a sample's visual tokens, or one image's with
    ``scope="image"``): ``d(i, j) = 1 - cos(x_i, x_j)``; the first pick is the token whose
    nearest other token is farthest, then greedily the unpicked token whose distance to the
    nearest picked one is largest, until ``k = budget_to_k(n, budget)`` are picked (at least 1,
    at most n). Ties go to the lower index. Rows are normalized and the distances accumulated
    in float32 (float64 for float64 tokens); a zero token is at distance 1 from every token; NaN
    distances rank below every number. Memory O(n D + n) per segment: the n x n similarities
    are held only where they take at most twice the tokens' memory. Runs as
    ``torch.ops.vsops.divprune_keep`` (compiled for the CPU and CUDA, and in Triton).

    Where it differs from the published implementation (``DivPrune`` in vbdi/divprune, also
    shipped with the VisionSelector baselines), which builds the full n x n cosine matrix in
    the model's dtype and loops over it in Python at batch size 1:

    - budget: published ``round(ratio * n)`` can keep 0 tokens (and crashes on n = 1, whose
      nearest-neighbour ``topk(2)`` needs two tokens); here ``budget_to_k``.
    - a token already picked can be picked again in the published loop (its min distance is a
      rounding error, possibly above an exact duplicate's 0), keeping fewer than k distinct
      tokens; here picked tokens are excluded.
    - the first pick's nearest neighbour excludes the token itself explicitly (published: the
      second-smallest distance of its column, which is itself only when its self-distance
      rounds to the column's minimum).
    - batches, several images per prompt and per-image budgets are segments here; the
      published code handles one image of batch 1.
    """

    name = "divprune"

    def select(self, x, k, cu_seqlens) -> Selected:
        from vsops.ops.divprune import divprune_keep

        return Selected(divprune_keep(x, k, cu_seqlens))


def divprune(x: torch.Tensor, k, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`DivPruneMethod` on ``x [N, D]`` (or packed ``[total, D]`` with int32
    ``cu_seqlens [S + 1]``): bool ``[N]`` with ``k`` (an int, or one per segment) True per
    segment."""
    k, cu_seqlens = segments_of(x, k, cu_seqlens)
    return DivPruneMethod().select(x, k, cu_seqlens).keep
