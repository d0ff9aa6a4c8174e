"""The training objective (Eq. 9) and the statistics of the selection it trains."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["composite_loss", "next_token_cross_entropy", "mask_statistics"]


def composite_loss(ce: torch.Tensor, constraint: torch.Tensor, weight: float) -> torch.Tensor:
    """Eq. 9: ``L = L_CE + λ_t · L_constraint``, with ``constraint`` the BCE of the soft mask
    against the hard top-k (Eq. 11, ``vsops.constraint_loss``) and ``weight`` = ``λ_t``
    (:func:`vsops.training.constraint_weight`). Both losses are scalars."""
    if ce.dim() != 0 or constraint.dim() != 0:
        raise ValueError(f"ce and constraint must be scalars, got shapes {tuple(ce.shape)} and {tuple(constraint.shape)}")
    if not math.isfinite(weight) or weight < 0:
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    return ce + weight * constraint.to(ce.dtype)


def next_token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """``L_CE``: each position's logits ``[B, L, V]`` against the next position's label
    (int64 ``[B, L]``, -100 where no loss applies), in float32; ``reduction`` ``"mean"`` or
    ``"sum"`` over the labelled positions."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100, reduction=reduction
    )


@torch.no_grad()
def mask_statistics(soft: torch.Tensor, hard: torch.Tensor) -> dict[str, float]:
    """How decided the soft selection is, over the visual tokens of a batch.

    Args:
        soft: the soft mask ``M`` at the visual tokens, float, any shape, values in [0, 1].
        hard: the hard top-k selection at the same tokens, bool, same shape.

    Returns:
        ``mask_mean``: mean of M (the budget, when every segment's k is exact);
        ``mask_entropy``: mean binary entropy of M in bits (1 = undecided, 0 = binary);
        ``overlap``: the share of the soft mask's mass on the hard-selected tokens,
        ``Σ M·H / Σ M`` (the budget for a uniform mask, 1 when the soft selection is the hard one).
    """
    if soft.shape != hard.shape:
        raise ValueError(f"soft and hard must have the same shape, got {tuple(soft.shape)} and {tuple(hard.shape)}")
    if soft.numel() == 0:
        return {"mask_mean": 0.0, "mask_entropy": 0.0, "overlap": 0.0}
    m = soft.float()
    eps = torch.finfo(torch.float32).tiny
    entropy = -(m * torch.log2(m.clamp_min(eps)) + (1 - m) * torch.log2((1 - m).clamp_min(eps)))
    mass = m.sum()
    overlap = (m * hard.float()).sum() / mass if mass > 0 else mass
    return {"mask_mean": m.mean().item(), "mask_entropy": entropy.mean().item(), "overlap": overlap.item()}
