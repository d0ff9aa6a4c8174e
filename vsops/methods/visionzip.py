"""VisionZip (Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language
Models", CVPR 2025) on packed visual tokens, batched over segments."""
from __future__ import annotations

import math

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
from vsops.reference import TILE_ELEMENTS

__all__ = ["VisionZipMethod", "visionzip", "contextual_counts"]



def contextual_counts(n: torch.Tensor, k: torch.Tensor, contextual_ratio: float) -> torch.Tensor:
    """int64 ``[S]``: the contextual (merged) tokens among the ``k[s]`` kept of ``n[s]``:
    ``floor(contextual_ratio * n)``, leaving at least one dominant token (none when k = 0)."""
    wanted = torch.floor(n.double() * contextual_ratio + 1e-6).long()
    return torch.minimum(wanted, (k - 1).clamp_min(0))


@register_method
class VisionZipMethod(SelectionMethod):
    """VisionZip: the dominant tokens by the attention they receive inside the vision tower,
    plus contextual tokens that merge the rest.

    What it computes, per segment (a sample's visual tokens, or one image's with
    ``scope="image"``) of ``n`` tokens keeping ``k = budget_to_k(n, budget)``:

    - ``c = min(floor(contextual_ratio * n), k - 1)`` contextual tokens and ``k - c`` dominant
      ones: the tokens of largest ``vision.received`` (the attention the token's patches receive
      in the tower's last full-attention block; from the CLS query on towers with one, else
      the mean over heads and queries; see :class:`~vsops.methods.VisionAttention`). Ties go to
      the lower index, NaN ranks last.
    - the ``r = n - (k - c)`` remaining tokens, in order: targets at stride ``max(1, r // c)``
      (the first ``c``); every other remaining token joins the target whose key
      (``vision.keys``) is most cosine-similar (ties to the lower target); a target's embedding
      becomes its own plus the mean of those that joined it (its own when none did).
    - kept: the dominant tokens and the targets, at their own positions; the targets carry the
      merged embeddings (``Selected.embeds``), computed in float32 (float64 for float64 tokens),
      and say which tokens they merged (``Selected.merged_into``), so that a model's other rows
      per visual token (Qwen3-VL's deepstack features) are merged the same way.

    Where it differs from the published implementation (dvlab-research/VisionZip, and the
    Qwen2.5-VL / LLaVA-OV-1.5 ports shipped with the VisionSelector baselines):

    - budget: published fixed counts (e.g. 54 dominant + 10 contextual of 576); here
      ``budget_to_k`` and ``contextual_ratio`` of each segment, at least one dominant token.
    - the merged tokens are those entering the language model (after the merger), attention and
      keys averaged over each merge unit's patches; the published CLIP version merges the
      tower's patches before the projector.
    - the attention is computed by ``vsops.ops.attention_received`` from the layer's queries and
      keys, so it works with sdpa and flash-attention towers, which never return attention
      weights; published code needs eager attention weights (O(n^2) per head).
    - contextual tokens keep the target's position, which the published code drops (it appends
      them after the dominant tokens).
    - the key similarity normalizes with an epsilon (a zero key is similar to nothing) where
      the published ``x / x.norm()`` gives NaN.
    - received attention is scaled by the patch count of its segment, so that images of
      different sizes compare under ``scope="sample"``; within one image the ranking is the
      published one.
    """

    name = "visionzip"
    needs = frozenset({VISUAL_TOKENS, VISION_ATTENTION})

    def __init__(self, contextual_ratio: float = 0.05):
        if isinstance(contextual_ratio, bool) or not isinstance(contextual_ratio, (int, float)):
            raise TypeError(f"contextual_ratio must be a float in [0, 1), got {contextual_ratio!r}")
        if not (0 <= contextual_ratio < 1) or math.isnan(contextual_ratio):
            raise ValueError(f"contextual_ratio must be in [0, 1), got {contextual_ratio}")
        self.contextual_ratio = float(contextual_ratio)

    def select(self, x, k, cu_seqlens, vision: VisionAttention | None = None) -> Selected:
        if not isinstance(vision, VisionAttention):
            raise ValueError("the visionzip method needs the vision tower's attention (vision=VisionAttention)")
        if vision.received.shape != (x.shape[0],) or vision.keys.dim() != 2 or vision.keys.shape[0] != x.shape[0]:
            raise ValueError(
                f"vision.received must be [{x.shape[0]}] and vision.keys [{x.shape[0]}, d], got "
                f"{tuple(vision.received.shape)} and {tuple(vision.keys.shape)}"
            )
        lengths = cu_seqlens.diff().long()
        contextual = contextual_counts(lengths, k, self.contextual_ratio)
        dominant = topk_mask(vision.received.float(), k - contextual, cu_seqlens=cu_seqlens)
        keep = dominant.clone()
        merged_into = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
        bounds = cu_seqlens.tolist()
        for s, c in enumerate(contextual.tolist()):
            if c > 0:
                start, end = bounds[s], bounds[s + 1]
                _assign_segment(vision.keys[start:end], dominant[start:end], c, keep[start:end],
                                merged_into[start:end], start)
        return Selected(keep, merge_rows(x, merged_into), merged_into)

    def __repr__(self) -> str:
        return f"VisionZipMethod(contextual_ratio={self.contextual_ratio})"


def _assign_segment(keys, dominant, c, keep, merged_into, start: int) -> None:
    """Writes the targets into ``keep`` and, for every other remaining token, the target it
    joins into ``merged_into`` (views of one segment starting at token ``start``)."""
    remaining = (~dominant).nonzero().squeeze(1)
    step = max(1, remaining.numel() // c)
    chosen = torch.zeros(remaining.numel(), dtype=torch.bool, device=keys.device)
    chosen[torch.arange(0, remaining.numel(), step, device=keys.device)[:c]] = True
    targets, others = remaining[chosen], remaining[~chosen]
    keep[targets] = True
    if others.numel():
        unit = torch.nn.functional.normalize(keys.float(), dim=-1)
        target_unit = unit[targets]
        rows = max(1, TILE_ELEMENTS // c)
        assign = torch.cat([(unit[others[r : r + rows]] @ target_unit.T).argmax(1) for r in range(0, others.numel(), rows)])
        merged_into[others] = start + targets[assign]


def visionzip(
    x: torch.Tensor,
    k,
    received: torch.Tensor,
    keys: torch.Tensor,
    *,
    cu_seqlens: torch.Tensor | None = None,
    contextual_ratio: float = 0.05,
) -> Selected:
    """:class:`VisionZipMethod` on ``x [N, D]`` (or packed ``[total, D]`` with int32
    ``cu_seqlens [S + 1]``), ``k`` an int or one per segment, with the attention each token
    receives (float ``[N]``) and its keys (``[N, d]``): a :class:`~vsops.methods.Selected` with
    bool ``keep [N]`` (``k`` True per segment), ``embeds [N, D]`` (the merged embeddings at
    the contextual tokens, the tokens' own elsewhere) and int64 ``merged_into [N]`` (the
    contextual token each merged token joined, -1 elsewhere)."""
    k, cu_seqlens = segments_of(x, k, cu_seqlens)
    check_token_rows(x, received=(received, 1), keys=(keys, 2))
    method = VisionZipMethod(contextual_ratio)
    return method.select(x, k, cu_seqlens, vision=VisionAttention(received, keys))
