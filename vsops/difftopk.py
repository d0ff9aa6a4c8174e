"""Differentiable top-k (VisionSelector, Eq. 3-8) and the hard top-k used at inference.

Importable on its own by any model::

    from vsops.difftopk import difftopk, topk_mask, DiffTopK, constraint_loss

Layouts: padded ``scores [B, N]`` (each row a segment), or packed ``scores [total]`` with
``cu_seqlens`` int32 ``[S + 1]`` (FlashAttention's convention). ``k`` is an int or an
integer tensor ``[S]`` (one per segment, on any device).

Limits and special values, identical on every backend:

* ``k = 0`` gives zeros, ``k = n`` gives ones; ``k < 0`` or ``k > n`` is a ValueError.
* ``+inf``/``-inf`` scores behave as limits of large finite scores: ``+inf`` entries get 1
  (``k / P`` each when more than k of the P entries are ``+inf``), ``-inf`` entries get 0 (or
  share what the other entries cannot hold).
* NaN: with ``nan_policy="propagate"`` (default) a segment containing NaN gives NaN for its
  whole soft mask and gradient, other segments are unaffected, and the search stops at once;
  the hard top-k ranks NaN below ``-inf``. ``nan_policy="raise"`` raises ValueError instead
  (one host sync on GPU tensors).
* Empty segments give empty outputs; size-1 segments give 0 or 1.
"""
from __future__ import annotations

import torch
from torch import nn

from vsops import backends
from vsops.budget import budget_to_k, check_budget
from vsops.ops import difftopk as _ops
from vsops.ops import validation

__all__ = ["difftopk", "topk_mask", "constraint_loss", "DiffTopK", "budget_to_k"]


def _prepare(scores, k, cu_seqlens, nan_policy):
    """Validated (scores, k tensor, cu_seqlens, backend) for one call."""
    cu_seqlens = validation.check_scores(scores, cu_seqlens)
    validation.check_nan_policy(nan_policy)
    k_checked_on_host = cu_seqlens is None and not isinstance(k, torch.Tensor)
    k = validation.k_tensor(k, scores, cu_seqlens)
    backend = backends.select(scores.device, scores.dtype, "scores")
    bounds_checked = backend == "cpu" or k_checked_on_host
    validation.check_data(scores, k, cu_seqlens, nan_policy, bounds_checked=bounds_checked)
    return scores.contiguous(), k, cu_seqlens, backend


def difftopk(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    nan_policy: str = "propagate",
) -> torch.Tensor:
    """Soft top-k mask ``M = sigmoid(s + t)`` with ``t`` solved per segment so ``sum(M) = k``.

    Args:
        scores: ``[B, N]``, or ``[total]`` with ``cu_seqlens``; float16, bfloat16, float32 or
            float64. The search and the sums run in float32 (float64 for float64 input).
        k: tokens to keep per segment: an int, or an integer tensor ``[S]``.
        cu_seqlens: int32 ``[S + 1]`` segment offsets into packed ``scores``.
        nan_policy: ``"propagate"`` or ``"raise"`` (see the module docstring).

    Returns:
        The soft mask, shape and dtype of ``scores``, values in [0, 1]. Differentiable: the
        backward is the implicit-differentiation formula (Eq. 8), not a backprop through the
        search.
    """
    scores, k, cu_seqlens, backend = _prepare(scores, k, cu_seqlens, nan_policy)
    mask, _ = _ops.forward(scores, k, cu_seqlens, backend=backend)
    return mask


def topk_mask(
    scores: torch.Tensor,
    k: int | torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    nan_policy: str = "propagate",
) -> torch.Tensor:
    """Hard top-k: bool mask of the shape of ``scores`` with exactly ``k`` True per segment.

    Ties go to the lower index; NaN ranks below ``-inf`` (or raises with
    ``nan_policy="raise"``). Arguments as in :func:`difftopk`. Not differentiable.
    """
    scores, k, cu_seqlens, backend = _prepare(scores, k, cu_seqlens, nan_policy)
    return _ops.topk_mask(scores, k, cu_seqlens, backend=backend)


def constraint_loss(soft: torch.Tensor, hard: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """Eq. 11: ``BCE(M_soft, M_hard)``, pushing the soft mask towards the hard selection.

    Args:
        soft: soft mask (any shape, any float dtype), values in [0, 1].
        hard: hard mask of the same shape (bool or float 0/1).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Computed in float32 with the soft mask clamped to [eps, 1 - eps] (eps = float32
    machine epsilon), so exact 0 and 1 give finite values and gradients. Empty masks give 0
    for ``"mean"`` as for ``"sum"`` (no token, no penalty; the gradient is the empty tensor)
    rather than the NaN of an empty mean.
    """
    validation.check_float(soft, "soft")
    validation.check_tensor(hard, "hard", like=("soft", soft))
    if hard.is_complex():
        raise TypeError(f"hard must be a bool or real tensor of 0/1, got {hard.dtype}")
    if soft.shape != hard.shape:
        raise ValueError(f"soft and hard must have the same shape, got {tuple(soft.shape)} and {tuple(hard.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    eps = torch.finfo(torch.float32).eps
    m = soft.float().clamp(eps, 1 - eps)
    h = hard.to(torch.float32)
    loss = -(h * torch.log(m) + (1 - h) * torch.log1p(-m))
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" and loss.numel() else loss.sum()


class DiffTopK(nn.Module):
    """Keeps ``k`` of each segment's tokens: soft mask in training, hard mask in eval.

    Give exactly one of ``budget`` (fraction in (0, 1], turned into k per segment by
    :func:`vsops.budget_to_k`) or ``k`` (a fixed count). ``forward(scores, cu_seqlens=None)``
    returns ``difftopk(scores, k)`` (same dtype as ``scores``) in training mode and
    ``topk_mask(scores, k)`` (bool) in eval mode.
    """

    def __init__(self, budget: float | None = None, *, k: int | None = None):
        super().__init__()
        if (budget is None) == (k is None):
            raise ValueError("give exactly one of budget or k")
        if budget is not None:
            budget = check_budget(budget)
        elif isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be an int >= 0, got {k!r}")
        self.budget = budget
        self.k = k

    def extra_repr(self) -> str:
        return f"budget={self.budget}" if self.budget is not None else f"k={self.k}"

    def segment_k(self, scores: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> int | torch.Tensor:
        """k for each segment of ``scores``: the fixed k, or ``budget_to_k`` of each length."""
        if self.k is not None:
            return self.k
        cu_seqlens = validation.check_scores(scores, cu_seqlens)
        if cu_seqlens is None:
            return budget_to_k(scores.shape[1], self.budget)
        return budget_to_k(cu_seqlens[1:] - cu_seqlens[:-1], self.budget)

    def forward(self, scores: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        k = self.segment_k(scores, cu_seqlens)
        if self.training:
            return difftopk(scores, k, cu_seqlens=cu_seqlens)
        return topk_mask(scores, k, cu_seqlens=cu_seqlens)
