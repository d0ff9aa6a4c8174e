"""FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2: Plug-and-Play Inference
Acceleration for Large Vision-Language Models", ECCV 2024) as a plain function on one
sequence's queries and keys of a language-model layer."""
from __future__ import annotations

import torch

from vsops.ops import validation
from vsops.methods.sequence import top_indices, visual_positions
from vsops.reference import TILE_ELEMENTS

__all__ = ["causal_attention_received", "fastv"]

ROWS = ("all", "last")


def causal_attention_received(query: torch.Tensor, key: torch.Tensor, *, rows: str = "all") -> torch.Tensor:
    """The causal softmax attention each position receives in one layer, averaged over heads
    and query rows, without holding the ``[H, L, L]`` attention (query rows in tiles).

    Args:
        query: ``[L, Hq, d]`` after rotary embedding (float16, bfloat16, float32 or float64).
        key: ``[L, Hkv, d]``, same dtype; ``Hq`` a multiple of ``Hkv`` (grouped-query
            attention: query head ``h`` reads key head ``h // (Hq / Hkv)``).
        rows: ``"all"`` (every query row, each attending to the positions up to itself) or
            ``"last"`` (the last row only).

    Returns:
        float32 ``[L]`` (float64 for float64 input): ``(1 / (Hq R)) sum_h sum_i
        softmax_{j <= i}(q_ih . k_j / sqrt(d))[j]`` over the ``R`` rows.
    """
    _check(query, key, rows)
    length, heads, dim = query.shape
    if length == 0:
        return query.new_zeros(0, dtype=torch.float64 if query.dtype == torch.float64 else torch.float32)
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    keys = key.to(compute).repeat_interleave(heads // key.shape[1], dim=1).transpose(0, 1)  # [Hq, L, d]
    queries = query.to(compute).transpose(0, 1) * dim ** -0.5  # [Hq, L, d]
    first = length - 1 if rows == "last" else 0
    received = torch.zeros(length, dtype=compute, device=query.device)
    tile = max(1, TILE_ELEMENTS // max(1, heads * length))
    for start in range(first, length, tile):
        end = min(length, start + tile)
        logits = queries[:, start:end] @ keys[:, :end].transpose(1, 2)  # [Hq, t, end]
        future = torch.arange(end, device=query.device) > torch.arange(start, end, device=query.device)[:, None]
        received[:end] += logits.masked_fill(future, float("-inf")).softmax(-1).sum((0, 1))
    return received / (heads * (length - first))


def fastv(query: torch.Tensor, key: torch.Tensor, visual: torch.Tensor, k: int, *, rows: str = "all") -> torch.Tensor:
    """FastV's selection at one language-model layer: bool ``[L]``, True at every non-visual
    position and at the ``k`` visual tokens that receive the most attention
    (:func:`causal_attention_received`), ties to the lower index.

    Args:
        query, key: the layer's ``[L, Hq, d]`` queries and ``[L, Hkv, d]`` keys after rotary
            embedding, one sequence without padding.
        visual: bool ``[L]``, the visual tokens (any number of images; text between them is
            not visual).
        k: visual tokens kept, in ``[0, visual.sum()]`` (``budget_to_k(n, budget)`` for a
            budget).
        rows: ``"all"`` (as the published runs: the mean over every query row) or ``"last"``.

    Where it differs from the published code (FastV's LLaVA patch, also among the
    VisionSelector baselines), which reads the eager attention weights of batch 1:

    - the image span there runs from the first image token over ``image_len`` positions, so a
      prompt with several images ranks the text between them as image tokens; here exactly the
      ``visual`` positions are ranked;
    - ``round(ratio * n)`` there can keep 0 tokens; the caller's ``k`` here
      (``budget_to_k`` keeps at least one);
    - ties there follow ``torch.topk`` (unspecified order); here the lower index;
    - the attention is never held whole (query rows in tiles), so any attention
      implementation can run the layer.
    """
    _check(query, key, rows)
    where, k = visual_positions(visual, query.shape[0], k)
    scores = causal_attention_received(query, key, rows=rows)
    keep = ~visual
    keep[where[top_indices(scores[where], k)]] = True
    return keep


def _check(query, key, rows) -> None:
    validation.check_float(query, "query")
    validation.check_float(key, "key")
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query and key must be [L, H, d], got {tuple(query.shape)} and {tuple(key.shape)}")
    if key.shape[0] != query.shape[0] or key.shape[2] != query.shape[2]:
        raise ValueError(f"key must be [{query.shape[0]}, Hkv, {query.shape[2]}] like query, got {tuple(key.shape)}")
    if key.dtype != query.dtype or key.device != query.device:
        raise ValueError(f"key must have query's dtype and device, got {key.dtype} on {key.device}, "
                         f"{query.dtype} on {query.device}")
    if key.shape[1] == 0 or query.shape[1] % key.shape[1]:
        raise ValueError(f"query's heads ({query.shape[1]}) must be a multiple of key's ({key.shape[1]})")
    if rows not in ROWS:
        raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
