"""Selecting each image's (or video's) tokens after vLLM's vision tower and merger, and placing
them: their M-RoPE offsets ride along as extra columns of the embeddings until the model runner
asks the model to write the prompt's positions (vLLM's pruned-media path)."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vsops.budget import budget_to_k
from vsops.methods import SelectionMethod, check_selected
from vsops.varlen import cu_seqlens_from_counts

__all__ = ["OFFSET_COLUMNS", "media_positions", "select_media", "write_media_positions"]

OFFSET_COLUMNS = 3  # (t, h, w) appended to each kept row


def media_positions(grid_thw: Sequence[int], merge: int, seconds_per_grid: float = 1.0,
                    tokens_per_second: float = 1.0) -> torch.Tensor:
    """int64 ``[n, 3]``: each merged token's (t, h, w) rope offsets from its medium's first
    position, as transformers' Qwen-VL ``get_rope_index`` gives them."""
    t, h, w = int(grid_thw[0]), int(grid_thw[1]) // merge, int(grid_thw[2]) // merge
    frames = (torch.arange(t) * seconds_per_grid * tokens_per_second).long()
    return torch.stack(torch.meshgrid(frames, torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1).T


def write_media_positions(media: torch.Tensor, offsets: torch.Tensor, positions: torch.Tensor,
                          first: int) -> torch.Tensor:
    """The prompt's M-RoPE positions with the kept tokens of some media written in.

    Args:
        media: bool ``[N]``, the prompt's media placeholder tokens (each medium one run, after a
            text token: Qwen-VL's ``<|vision_start|>``).
        offsets: int64 ``[R, 3]``, the offsets (:func:`media_positions`) of the kept tokens of
            the placeholders from ``first`` on, in order (the media a prefill chunk brings).
        positions: int64 ``[3, N]``, the prompt's positions; text ones final.
        first: the prompt index the chunk starts at.

    Returns:
        A new ``[3, N]`` tensor: each of those placeholders at its medium's first position (the
        one after the text token before its run) plus its offsets.
    """
    out = positions.clone()
    where = media.nonzero().squeeze(1)
    where = where[where >= first][: offsets.shape[0]]
    if where.numel():
        index = torch.arange(media.numel(), device=media.device)
        previous = torch.cat([media.new_zeros(1), media[:-1]])
        run_start = torch.where(media & ~previous, index, torch.zeros_like(index)).cummax(0).values
        base = positions[0, run_start[where] - 1] + 1
        out[:, where] = (base.unsqueeze(1) + offsets.to(out.device)).T.to(out.dtype)
    return out


def select_media(embeds: Sequence[torch.Tensor], positions: Sequence[torch.Tensor], budget: float,
                 method: SelectionMethod, score_width: int | None = None) -> tuple[torch.Tensor, ...]:
    """The kept tokens of each medium, in their order, with their positions appended.

    Args:
        embeds: per medium ``[n_i, D]``, the merged visual tokens.
        positions: per medium int64 ``[n_i, 3]`` (:func:`media_positions`).
        budget: ``budget_to_k(n_i, budget)`` tokens are kept of medium i.
        method: selects ``k`` tokens per medium from the first ``score_width`` columns (all
            with None; Qwen3-VL's rows carry deepstack features after the token); its
            ``embeds`` (merged tokens) replace the kept rows when it returns them.

    Returns:
        per medium ``[k_i, D + 3]`` in the embeddings' dtype: the kept rows, then their offsets
        (exact in bfloat16 below 256).
    """
    sizes = [e.shape[0] for e in embeds]
    x = torch.cat(list(embeds))
    cu = cu_seqlens_from_counts(sizes, x.device)
    k = torch.tensor([budget_to_k(n, budget) for n in sizes], dtype=torch.long, device=x.device)
    scored = x if score_width is None else x[:, :score_width]
    chosen = check_selected(method.select(scored, k, cu), method, scored, k, cu)
    if chosen.embeds is not None and score_width is not None:
        raise ValueError(f"the {method.name!r} method merges tokens, which the deepstack rows cannot follow here")
    rows = x if chosen.embeds is None else chosen.embeds
    out = []
    for start, end, where in zip(cu[:-1].tolist(), cu[1:].tolist(), positions):
        keep = chosen.keep[start:end]
        out.append(torch.cat([rows[start:end][keep], where.to(x.device)[keep.to(where.device)].to(x.dtype)], 1))
    return tuple(out)
