"""Untrained selection rules to compare a trained scorer against. Each is called like the
scorer, ``scorer(x [total, D], cu_seqlens int32 [S + 1]) -> float32 scores [total]``, so it
can stand in for it in a patched model (:func:`vsops.training.evaluate.scorer_replaced`)."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RandomScorer", "TokenNormScorer", "MeanAttentionScorer", "BASELINES"]


class RandomScorer(nn.Module):
    """Uniform random scores: a random ``budget`` share of each segment, reproducible from
    ``seed`` (the generator restarts at every :meth:`reset`)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.reset()

    def reset(self) -> None:
        self.generator = torch.Generator().manual_seed(self.seed)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape[0], generator=self.generator).to(x.device)


class TokenNormScorer(nn.Module):
    """The L2 norm of each visual token: keeps the most energetic tokens."""

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        return x.float().norm(dim=-1)


class MeanAttentionScorer(nn.Module):
    """Dot product of each token with the mean token of its segment, the attention logit a
    [mean] query would give it (the LIS score with identity projections)."""

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        x = x.float()
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
        segment = torch.repeat_interleave(torch.arange(len(lengths), device=x.device), lengths)
        sums = torch.zeros(len(lengths), x.shape[1], device=x.device).index_add_(0, segment, x)
        means = sums / lengths.clamp_min(1).unsqueeze(1).float()
        return (x * means[segment]).sum(-1)


BASELINES = {"random": RandomScorer, "token_norm": TokenNormScorer, "mean_attention": MeanAttentionScorer}
