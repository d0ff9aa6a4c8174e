"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More", 2025) as a plain function on one sequence's state at a
language-model layer."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vsops.methods.sequence import top_indices, visual_positions
from vsops.ops import validation

__all__ = ["dart"]


def dart(hidden: torch.Tensor, key: torch.Tensor, visual: torch.Tensor, k: int, *, image_pivots: int = 4,
         text_pivots: int = 4) -> torch.Tensor:
    """DART's selection: bool ``[L]``, True at every non-visual position and at exactly ``k``
    visual tokens that duplicate a few pivot tokens least.

    Args:
        hidden: ``[L, D]``, the state the tokens are compared in (as published: the output of
            the layer before the drop, through the model's final norm).
        key: ``[L, Hkv, d]``, that layer's keys (after rotary embedding), one sequence
            without padding.
        visual: bool ``[L]``, the visual tokens.
        k: visual tokens kept, in ``[0, visual.sum()]``.
        image_pivots, text_pivots: pivots taken among the visual tokens, and among the text
            after the last visual token (the instruction; all the text when none follows).

    What it computes: a token's key norm is the L1 norm of its keys over every head. The
    ``image_pivots`` visual tokens of largest norm are kept (all of ``k`` when ``k`` is
    smaller); the ``text_pivots`` text tokens of largest norm are pivots too. The other
    ``r = k - kept pivots`` tokens are shared out over the pivots, visual ones first, each in
    decreasing norm: ``r // P`` each and one more for the first ``r % P`` (``P`` pivots). In
    that order, each pivot takes its share of the visual tokens not yet kept whose ``hidden``
    is least cosine-similar to its own. Ties go to the lower index; similarities are computed
    in float32 (float64 for float64 input).

    Where it differs from the published code (DART's LLaVA and Qwen2-VL patches, batch 1):

    - the count there is ``image_pivots + P * (max // P)`` whatever the budget; here exactly
      ``k``, the remainder given one token per pivot in pivot order;
    - the pivots are visited there in the order of a Python set of indices; here in the order
      stated above;
    - the image there is the span from its first token over ``image_len`` positions (text
      between several images counted as image), and the text pivots the tokens after it;
      here exactly the ``visual`` positions, and the text after the last of them.
    """
    _check(hidden, key)
    where, k = visual_positions(visual, hidden.shape[0], k)
    n = where.numel()
    for value, name in ((image_pivots, "image_pivots"), (text_pivots, "text_pivots")):
        validation.check_int(value, name)
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    norm = key.to(compute).flatten(1).abs().sum(1)
    text = (~visual).nonzero().squeeze(1)
    after = text[text > where.max()] if n else text
    text = after if after.numel() else text

    chosen = torch.zeros(n, dtype=torch.bool, device=visual.device)
    first = top_indices(norm[where], min(image_pivots, k))
    chosen[first] = True
    pivots = torch.cat([where[first], text[top_indices(norm[text], min(text_pivots, text.numel()))]])
    remaining = k - int(chosen.sum())
    if remaining and pivots.numel():
        states = hidden.to(compute)
        share, extra = divmod(remaining, pivots.numel())
        for i, pivot in enumerate(pivots.tolist()):
            quota = min(share + (i < extra), int((~chosen).sum()))
            if quota == 0:
                continue
            similarity = F.cosine_similarity(states[where], states[pivot].unsqueeze(0), dim=-1)
            candidates = (~chosen).nonzero().squeeze(1)
            chosen[candidates[top_indices(-similarity[candidates], quota)]] = True
    keep = ~visual
    keep[where[chosen]] = True
    return keep


def _check(hidden, key) -> None:
    validation.check_float(hidden, "hidden")
    validation.check_float(key, "key")
    if hidden.dim() != 2 or key.dim() != 3 or key.shape[0] != hidden.shape[0]:
        raise ValueError(f"hidden must be [L, D] and key [L, Hkv, d] of the same L, got {tuple(hidden.shape)} and "
                         f"{tuple(key.shape)}")
