"""What the plain functions on one sequence's language-model layer state share (FastV, DART,
PyramidDrop): the visual positions and ``k`` checked, and the top of a ranking."""
from __future__ import annotations

import torch

from vsops.difftopk import topk_mask
from vsops.ops import validation

__all__ = ["visual_positions", "top_indices"]


def visual_positions(visual, length: int, k) -> tuple[torch.Tensor, int]:
    """int64 ``[n]``, the positions where ``visual`` (bool ``[length]``) is True, and ``k``
    checked to be an int in ``[0, n]``; a ValueError/TypeError naming the argument otherwise."""
    if not isinstance(visual, torch.Tensor) or visual.dtype != torch.bool or visual.shape != (length,):
        raise ValueError(f"visual must be a bool tensor [{length}], got "
                         f"{getattr(visual, 'dtype', type(visual).__name__)} {tuple(getattr(visual, 'shape', ()))}")
    k = validation.check_int(k, "k")
    where = visual.nonzero().squeeze(1)
    if not 0 <= k <= where.numel():
        raise ValueError(f"k must be in [0, {where.numel()}] (the visual tokens), got {k}")
    return where, k


def top_indices(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest of ``scores [n]``, in decreasing score, ties to the
    lower index (NaN below every number)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    mask = topk_mask(scores, torch.tensor([count], device=scores.device),
                     cu_seqlens=torch.tensor([0, scores.numel()], dtype=torch.int32, device=scores.device))
    picked = mask.nonzero().squeeze(1)
    # A stable sort of the ascending indices keeps the lower index first among equals.
    return picked[torch.sort(-scores[picked], stable=True).indices]
