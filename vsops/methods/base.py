"""The selection-method protocol: what a method needs, and the keep mask it returns for ``k``
tokens of each segment of packed visual tokens."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import torch

from vsops.difftopk import topk_mask
from vsops.ops import validation

__all__ = [
    "VISUAL_TOKENS",
    "VISION_ATTENTION",
    "Selected",
    "merge_rows",
    "VisionAttention",
    "SelectionMethod",
    "ScoringMethod",
    "segments_of",
    "check_token_rows",
    "check_selected",
]

# What a method may need. The runtime hands every method the visual tokens entering the
# language model; methods needing attention inside the vision tower say so, and get it as the
# ``vision`` keyword of select (a VisionAttention).
VISUAL_TOKENS = "visual_tokens"
VISION_ATTENTION = "vision_attention"


@dataclasses.dataclass
class Selected:
    """A method's answer for packed visual tokens.

    Attributes:
        keep: bool ``[total]``, exactly ``k[s]`` True in segment ``s``.
        embeds: optionally ``[total, D]``, embeddings that replace those of the kept tokens
            (e.g. merged contextual tokens); rows of dropped tokens are ignored. None keeps the
            tokens' own embeddings.
        merged_into: optionally int64 ``[total]``: for each dropped token that a kept token
            absorbs, that kept token's index (in the same segment), -1 elsewhere; see
            :func:`merge_rows`. The runtime merges the model's other rows per visual token
            (Qwen3-VL's deepstack features) by it, so that they follow ``embeds``. None: those
            rows stay the kept tokens' own.
    """

    keep: torch.Tensor
    embeds: torch.Tensor | None = None
    merged_into: torch.Tensor | None = None


def merge_rows(rows: torch.Tensor, merged_into: torch.Tensor) -> torch.Tensor:
    """Rows merged as :attr:`Selected.merged_into` says: a token's row becomes its own plus the
    mean of the rows of the tokens merged into it; every other row is unchanged.

    Args:
        rows: ``[total, ...]``, any float dtype.
        merged_into: int64 ``[total]``, the absorbing token of each token or -1.

    Returns:
        A new tensor like ``rows``; the sums are taken in float32 (float64 for float64 rows).
    """
    sources = (merged_into >= 0).nonzero().squeeze(1)
    targets = merged_into.index_select(0, sources)
    flat = rows.flatten(1) if rows.dim() > 1 else rows.unsqueeze(1)
    compute = torch.promote_types(rows.dtype, torch.float32)
    sums = flat.new_zeros(flat.shape, dtype=compute).index_add_(0, targets, flat.index_select(0, sources).to(compute))
    counts = flat.new_zeros(flat.shape[0], dtype=compute).index_add_(0, targets, sums.new_ones(sources.numel()))
    merged = (flat.to(compute) + sums / counts.clamp_min(1).unsqueeze(1)).to(rows.dtype)
    return torch.where((counts > 0).unsqueeze(1), merged, flat).view_as(rows)


@dataclasses.dataclass
class VisionAttention:
    """What one attention layer of the vision tower says about each visual token, in the packed
    order of the tokens (rows of a merge unit's patches averaged into their token).

    Attributes:
        received: float32 ``[total]``: the softmax attention the token's patches receive, from
            the tower's CLS query where it has one, else averaged over heads and over the
            queries of the token's attention segment (an image, or a video frame); multiplied
            by the segment's patch count, so that uniform attention is 1 whatever the image size.
        keys: float ``[total, d]``: the layer's keys (before the rotary embedding, which would
            make their similarity partly one of position) averaged over heads and patches.
    """

    received: torch.Tensor
    keys: torch.Tensor


class SelectionMethod:
    """A rule that keeps ``k[s]`` of the tokens of each segment ``s``.

    Subclasses set ``name`` (the registry key), ``needs`` (what they read; see the constants
    of this module) and implement :meth:`select`. Only the learned scorer is ``trainable``: in
    training mode the runtime takes its soft path, which training-free methods do not have.
    """

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset({VISUAL_TOKENS})
    trainable: ClassVar[bool] = False
    stage: ClassVar[str] = "vision"  # or "language": it acts inside the language model

    def select(self, x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> Selected:
        """The tokens to keep.

        Args:
            x: ``[total, D]`` packed visual tokens (any float dtype).
            k: int64 ``[S]``, tokens to keep per segment, each in ``[0, n_s]``.
            cu_seqlens: int32 ``[S + 1]`` segment offsets into ``x``.

        Methods whose ``needs`` include ``VISION_ATTENTION`` also take ``vision``, a
        :class:`VisionAttention` of the same tokens.
        """
        raise NotImplementedError

    def reset(self) -> None:
        """Restarts any random state, so that an evaluation pass is reproducible."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ScoringMethod(SelectionMethod):
    """A method that rates every token: :meth:`score`, then the hard top-k of each segment
    (ties to the lower index; a NaN score ranks as -inf, as in
    :func:`vsops.varlen.select_visual_tokens`, which the runtime uses for scoring methods)."""

    def score(self, x: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
        """float32 ``[total]`` scores of the packed tokens ``x [total, D]``."""
        raise NotImplementedError

    def select(self, x, k, cu_seqlens) -> Selected:
        scores = self.score(x, cu_seqlens).detach()
        scores = torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)
        return Selected(topk_mask(scores, k, cu_seqlens=cu_seqlens))


def segments_of(x: torch.Tensor, k, cu_seqlens: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(k int64 [S], cu_seqlens int32 [S + 1])`` on ``x``'s device for the plain functions:
    ``x [N, D]`` is one segment without ``cu_seqlens``; ``k`` is an int (every segment) or one
    per segment (a sequence or an integer tensor), each in ``[0, n_s]``."""
    validation.check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be [N, D], got shape {tuple(x.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    cu_seqlens = validation.check_offsets(cu_seqlens, x.shape[0], like=("x", x), total_name="N")
    lengths = cu_seqlens.diff().cpu()
    if isinstance(k, bool) or not isinstance(k, (int, Sequence, torch.Tensor)):
        raise TypeError(f"k must be an int or one int per segment, got {type(k).__name__}")
    if isinstance(k, int):
        k = torch.full((lengths.numel(),), k, dtype=torch.long)
    elif isinstance(k, torch.Tensor):
        validation.check_tensor(k, "k")
        if not validation.is_integer(k) or k.dim() != 1:
            raise TypeError(f"k must be a 1-D integer tensor, got {k.dtype} of shape {tuple(k.shape)}")
        k = k.cpu().long()
    else:
        k = torch.tensor([validation.check_int(v, f"k[{i}]") for i, v in enumerate(k)], dtype=torch.long)
    if k.numel() != lengths.numel():
        raise ValueError(f"k must have one entry per segment ({lengths.numel()}), got {k.numel()}")
    validation.raise_failed(validation.k_bounds_checks(k, lengths))
    return k.to(x.device), cu_seqlens


def check_token_rows(x: torch.Tensor, **tensors: tuple[torch.Tensor, int]) -> None:
    """The plain functions' per-token inputs checked against the tokens ``x [N, D]``: each
    keyword ``name=(tensor, dims)`` must be a float tensor of ``dims`` dimensions with ``N``
    rows, on ``x``'s device (a TypeError naming it otherwise)."""
    for name, (t, dims) in tensors.items():
        validation.check_float(t, name, like=("x", x))
        if t.dim() != dims or t.shape[0] != x.shape[0]:
            raise TypeError(f"{name} must be a float tensor with {x.shape[0]} rows and {dims} dims, got "
                            f"shape {tuple(t.shape)}")


def check_selected(chosen, method, x: torch.Tensor, k: torch.Tensor, cu: torch.Tensor) -> Selected:
    """``chosen``, ``method``'s answer for ``x [total, D]``, ``k`` int64 ``[S]`` and
    ``cu`` int32 ``[S + 1]``, refused (ValueError/TypeError naming the method) unless it is a
    :class:`Selected` keeping exactly ``k[s]`` tokens of each segment on ``x``'s device, with
    ``embeds`` and ``merged_into`` of the right shapes (what callers pack runs on counts derived
    from ``k``, which GPU kernels cannot check). Costs one host sync."""
    name = getattr(method, "name", type(method).__name__)
    if not isinstance(chosen, Selected):
        raise TypeError(f"the {name!r} method must return a vsops.methods.Selected, got {type(chosen).__name__}")
    keep = chosen.keep
    if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != (x.shape[0],):
        raise ValueError(f"the {name!r} method must return a bool keep mask [{x.shape[0]}], got "
                         f"{getattr(keep, 'dtype', type(keep).__name__)} {tuple(getattr(keep, 'shape', ()))}")
    for what, tensor in (("keep mask", keep), ("embeds", chosen.embeds)):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"the {name!r} method's {what} is on {tensor.device}, the tokens on {x.device}")
    segment = torch.repeat_interleave(torch.arange(k.numel(), device=x.device), cu.diff().long())
    kept = torch.zeros_like(k).index_add_(0, segment, keep.long())
    if not bool(torch.equal(kept, k)):
        raise ValueError(f"the {name!r} method kept {kept.tolist()} tokens per segment, not k = {k.tolist()}")
    if chosen.embeds is not None and chosen.embeds.shape != x.shape:
        raise ValueError(f"the {name!r} method's embeds must be {tuple(x.shape)}, got {tuple(chosen.embeds.shape)}")
    into = chosen.merged_into
    if into is not None:
        if (not isinstance(into, torch.Tensor) or into.dtype != torch.long or into.shape != (x.shape[0],)
                or into.device != x.device):
            raise ValueError(f"the {name!r} method's merged_into must be int64 [{x.shape[0]}] on {x.device}, got "
                             f"{getattr(into, 'dtype', type(into).__name__)} {tuple(getattr(into, 'shape', ()))}"
                             f"{' on ' + str(into.device) if isinstance(into, torch.Tensor) else ''}")
        sources = into >= 0
        target = into.clamp(0, max(x.shape[0] - 1, 0))
        wrong = (into < -1) | (into >= x.shape[0]) | (sources & (keep | ~keep[target] | (segment[target] != segment)))
        if bool(wrong.any()):
            raise ValueError(f"the {name!r} method's merged_into must map dropped tokens to kept tokens of their "
                             "own segment (or -1)")
    return chosen
