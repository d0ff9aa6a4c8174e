"""The learned scorer and the simple training-free scores, each a :class:`ScoringMethod` and a
plain function ``f(x, k, *, cu_seqlens=None) -> bool`` on packed tokens."""
from __future__ import annotations

import torch
from torch import nn

from vsops.methods.base import ScoringMethod, segments_of
from vsops.methods.registry import register_method

__all__ = ["VisionSelectorMethod", "RandomMethod", "NormMethod", "MeanAttentionMethod", "random", "norm", "mean_attention"]


@register_method
class VisionSelectorMethod(ScoringMethod):
    """VisionSelector (the paper this library implements): the Learnable Importance Scorer's
    LIS score (Eq. 1-2), then the hard top-k; ``k = budget_to_k(n, budget)``, ties to the lower
    index. The only trainable method: in training mode the runtime scales the visual tokens by
    the soft mask ``difftopk(score, k)`` instead.

    Args:
        scorer: the model's :class:`vsops.LearnableImportanceScorer` (or any module called as
            ``scorer(x [total, D], cu_seqlens) -> float32 [total]``).
    """

    name = "visionselector"
    trainable = True

    def __init__(self, scorer: nn.Module):
        self.scorer = scorer

    def score(self, x, cu_seqlens):
        # The scorer's own dtype (a parameter-free stand-in takes the model's).
        weight = next(self.scorer.parameters(), None)
        return self.scorer(x if weight is None else x.to(weight.dtype), cu_seqlens)


@register_method
class RandomMethod(ScoringMethod):
    """Uniformly random tokens: float32 ``torch.rand`` scores from a CPU generator seeded with
    ``seed`` (restarted by :meth:`reset`), then the hard top-k. Reproducible: the same calls
    after a reset select the same tokens, on any device."""

    name = "random"

    def __init__(self, seed: int = 0):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def score(self, x, cu_seqlens):
        return torch.rand(x.shape[0], generator=self.generator).to(x.device)


@register_method
class NormMethod(ScoringMethod):
    """The L2 norm of each merged visual token (float32), then the hard top-k: keeps the most
    energetic tokens."""

    name = "norm"

    def score(self, x, cu_seqlens):
        return x.float().norm(dim=-1)


@register_method
class MeanAttentionMethod(ScoringMethod):
    """Attention to the mean token: ``x_i . mean(x of its segment)`` (float32), the logit a
    query at the segment's mean token gives each token (the LIS score with identity
    projections), then the hard top-k."""

    name = "mean_attention"

    def score(self, x, cu_seqlens):
        x = x.float()
        lengths = cu_seqlens.diff().long()
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
        sums = torch.zeros(len(lengths), x.shape[1], device=x.device).index_add_(0, segment, x)
        means = sums / lengths.clamp_min(1).unsqueeze(1).float()
        return (x * means[segment]).sum(-1)


def _plain(method: ScoringMethod, x, k, cu_seqlens) -> torch.Tensor:
    k, cu_seqlens = segments_of(x, k, cu_seqlens)
    return method.select(x, k, cu_seqlens).keep


def random(x: torch.Tensor, k, *, cu_seqlens: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """:class:`RandomMethod` on ``x [N, D]`` (or packed ``[total, D]`` with int32 ``cu_seqlens``):
    bool ``[N]``, ``k`` (an int, or one per segment) True per segment."""
    return _plain(RandomMethod(seed), x, k, cu_seqlens)


def norm(x: torch.Tensor, k, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`NormMethod` on ``x [N, D]`` (or packed with ``cu_seqlens``): bool ``[N]``."""
    return _plain(NormMethod(), x, k, cu_seqlens)


def mean_attention(x: torch.Tensor, k, *, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """:class:`MeanAttentionMethod` on ``x [N, D]`` (or packed with ``cu_seqlens``): bool ``[N]``."""
    return _plain(MeanAttentionMethod(), x, k, cu_seqlens)
