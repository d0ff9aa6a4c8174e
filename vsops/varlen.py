"""From scores to FlashAttention's packed (varlen) layout: select the visual tokens to keep,
then gather every per-token tensor of the batch in one pass.

    keep = select_visual_tokens(scores, visual_mask, budget=0.2)        # bool [B, L]
    packed = select_and_pack(keep, embeds, position_ids, labels)       # PackedBatch
    out = flash_attn_varlen_func(q, k, v, packed.cu_seqlens, packed.cu_seqlens,
                                 packed.max_seqlen, packed.max_seqlen)

``select_and_pad`` gives the same selection re-padded (for ``generate`` and attention without
varlen support) and ``unpack`` is the inverse of the pack. Host syncs: none in
``select_visual_tokens``; none in ``select_and_pack`` / ``select_and_pad`` when the per-sample
kept counts are passed as ``counts`` (known on the host for a fixed budget and known
lengths), otherwise exactly one, to read them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from vsops import backends
from vsops.budget import budget_to_k, check_budget
from vsops.ops import difftopk as _topk_ops
from vsops.ops import validation
from vsops.ops import varlen as _ops

__all__ = [
    "select_visual_tokens",
    "select_and_pack",
    "select_and_pad",
    "unpack",
    "kept_counts",
    "cu_seqlens_from_counts",
    "PackedBatch",
    "PaddedBatch",
]

SCOPES = ("sample", "image")


def _check_batch_mask(mask, name: str, like: tuple[str, torch.Tensor] | None = None) -> None:
    """A bool ``[B, L]`` mask, of the shape and device of ``like`` when given."""
    validation.check_tensor(mask, name, like=like)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:
        raise ValueError(f"{name} must be [B, L], got shape {tuple(mask.shape)}")
    if like is not None and mask.shape != like[1].shape:
        raise ValueError(f"{name} must have shape {tuple(like[1].shape)}, got {tuple(mask.shape)}")


def _ranking_key(scores: torch.Tensor) -> torch.Tensor:
    """Scores with NaN ranked as -inf, so that a NaN visual token still outranks every text
    token in the selection below."""
    return torch.where(torch.isnan(scores), torch.full_like(scores, float("-inf")), scores)


def select_visual_tokens(
    scores: torch.Tensor,
    visual_mask: torch.Tensor,
    budget: float,
    *,
    scope: str = "sample",
    image_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which tokens to keep: every text token, and the top ``budget_to_k(n, budget)`` visual
    tokens of each sample (``scope="sample"``, as the published checkpoints were trained) or
    of each image (``scope="image"``).

    Args:
        scores: ``[B, L]`` floating scores, one per token (only visual positions are read).
        visual_mask: bool ``[B, L]``, True at visual tokens.
        budget: fraction of visual tokens kept, in (0, 1].
        scope: ``"sample"`` or ``"image"``.
        image_index: with ``scope="image"``, integer ``[B, L]``: the image (numbered from 0
            within its sample, below L) of each visual token, and -1 at text tokens.

    Returns:
        bool ``[B, L]``. Ties go to the lower index and NaN scores rank as ``-inf``; samples
        (or images) with n visual tokens keep ``budget_to_k(n, budget)`` of them, so a sample
        without visual tokens passes through unchanged. No host sync, except one to check
        ``image_index`` against ``visual_mask`` with ``scope="image"``.
    """
    budget = check_budget(budget)
    validation.check_float(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, L], got shape {tuple(scores.shape)}")
    _check_batch_mask(visual_mask, "visual_mask", like=("scores", scores))
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if scope == "sample":
        if image_index is not None:
            raise ValueError('image_index is only used with scope="image"')
        k = budget_to_k(visual_mask.sum(1), budget)
        key = torch.where(visual_mask, _ranking_key(scores), torch.full_like(scores, float("nan")))
        backend = backends.select(scores.device, scores.dtype, "scores")
        # k <= the visual count <= L by construction, so the op's data checks are not needed.
        return _topk_ops.topk_mask(key.contiguous(), k, None, backend=backend) | ~visual_mask
    return _select_per_image(scores, visual_mask, budget, image_index)


def _select_per_image(scores, visual_mask, budget, image_index) -> torch.Tensor:
    """Top-k per (sample, image) group by two stable sorts: by score, then by group."""
    if image_index is None:
        raise TypeError('scope="image" needs image_index, an integer tensor [B, L]')
    validation.check_tensor(image_index, "image_index", like=("scores", scores))
    if not validation.is_integer(image_index):
        raise TypeError(f"image_index must be an integer tensor, got {image_index.dtype}")
    if image_index.shape != visual_mask.shape:
        raise ValueError(f"image_index must have shape {tuple(visual_mask.shape)}, got {tuple(image_index.shape)}")
    b, length = visual_mask.shape
    image_index = image_index.long()
    if not torch.compiler.is_compiling():
        inconsistent = (visual_mask != (image_index >= 0)) | (image_index >= length)
        if bool(inconsistent.any()):
            raise ValueError(
                "image_index must be in [0, L) exactly at the visual tokens and negative at the text tokens"
            )
    groups = b * length  # group id b * L + image; text tokens get the id `groups`
    sample = torch.arange(b, device=scores.device).unsqueeze(1)
    group = torch.where(visual_mask, sample * length + image_index, groups).reshape(-1)
    order = torch.sort(_ranking_key(scores).reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    sorted_group = group[order]
    counts = torch.bincount(group, minlength=groups + 1)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(order.numel(), device=order.device) - starts[sorted_group]
    chosen = (rank < budget_to_k(counts, budget)[sorted_group]) & (sorted_group < groups)
    keep = torch.zeros(order.numel(), dtype=torch.bool, device=order.device).scatter_(0, order, chosen)
    return keep.view(b, length) | ~visual_mask


def kept_counts(
    visual_counts: Sequence[int] | Sequence[Sequence[int]],
    text_counts: Sequence[int],
    budget: float,
    *,
    scope: str = "sample",
) -> list[int]:
    """Tokens :func:`select_visual_tokens` keeps per sample, computed on the host; pass it as
    ``counts`` to pack or pad without a host sync.

    Args:
        visual_counts: per sample, its visual token count (``scope="sample"``), or the list of
            the token counts of its images and videos (``scope="image"``), e.g. from the image
            grid sizes.
        text_counts: per sample, the tokens that are always kept (text; not padding).
        budget: fraction of visual tokens kept, in (0, 1].
        scope: ``"sample"`` or ``"image"``, as given to :func:`select_visual_tokens`.

    Returns:
        One int per sample: ``text + budget_to_k(visual)`` (``"sample"``) or ``text + the sum
        of budget_to_k over its images`` (``"image"``).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if len(visual_counts) != len(text_counts):
        raise ValueError("visual_counts and text_counts must have one entry per sample")
    if scope == "sample":
        return [int(t) + budget_to_k(int(v), budget) for v, t in zip(visual_counts, text_counts)]
    for i, items in enumerate(visual_counts):
        if not isinstance(items, Sequence):
            raise TypeError(f'with scope="image", visual_counts[{i}] must be the list of its images\' counts')
    return [int(t) + sum(budget_to_k(int(n), budget) for n in items) for items, t in zip(visual_counts, text_counts)]


@dataclasses.dataclass
class PackedBatch:
    """The kept tokens of a batch, packed without padding (FlashAttention's varlen layout).

    Attributes:
        tensors: the packed tensors, in the order given: ``[B, L, ...]`` inputs become
            ``[total, ...]`` and ``[..., B, L]`` inputs ``[..., total]``.
        cu_seqlens: int32 ``[B + 1]`` offsets of each sample's tokens, on the batch's device.
        max_seqlen: the longest sample's kept token count (a Python int).
        indices: int64 ``[total]`` flat source positions ``b * L + l`` (for ``unpack``).
        batch, length: B and L of the source batch.
    """

    tensors: tuple[torch.Tensor, ...]
    cu_seqlens: torch.Tensor
    max_seqlen: int
    indices: torch.Tensor
    batch: int
    length: int

    def unpack(self, packed: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """``packed [total, ...]`` back to ``[B, L, ...]``, ``fill`` at the dropped tokens."""
        return unpack(packed, self.indices, self.batch, self.length, fill)


@dataclasses.dataclass
class PaddedBatch:
    """The kept tokens re-padded to the longest kept sample.

    Attributes:
        tensors: ``[B, M, ...]`` (or ``[..., B, M]``) for inputs ``[B, L, ...]`` (``[..., B, L]``).
        attention_mask: int64 ``[B, M]``, 1 at kept tokens and 0 at padding.
        lengths: the kept count of each sample (Python ints); M is their maximum.
        indices: int64 ``[total]`` flat source positions of the kept tokens, in order.
    """

    tensors: tuple[torch.Tensor, ...]
    attention_mask: torch.Tensor
    lengths: list[int]
    indices: torch.Tensor


def _layouts(keep: torch.Tensor, tensors) -> list[bool]:
    """For each tensor: True for ``[B, L, ...]``, False for ``[..., B, L]``."""
    bl = tuple(keep.shape)
    leading = []
    for i, t in enumerate(tensors):
        validation.check_tensor(t, f"tensors[{i}]", like=("keep", keep))
        if tuple(t.shape[:2]) == bl:
            leading.append(True)
        elif t.dim() >= 2 and tuple(t.shape[-2:]) == bl:
            leading.append(False)
        else:
            raise ValueError(
                f"tensors[{i}] has shape {tuple(t.shape)}: expected [B, L, ...] or [..., B, L] with "
                f"B, L = {bl} (the shape of keep)"
            )
    return leading


def _as_rows(t: torch.Tensor, leading: bool, tokens: int) -> torch.Tensor:
    # Widths spelled out, not -1: a batch without tokens has rows of a known width too.
    if leading:
        return t.reshape(tokens, math.prod(t.shape[2:])).contiguous()
    return t.reshape(math.prod(t.shape[:-2]), tokens).T.contiguous()


def _from_rows(rows: torch.Tensor, t: torch.Tensor, leading: bool, count: int, b_l: tuple) -> torch.Tensor:
    """Rows ``[count, R]`` in the layout of ``t`` with the (B, L) dims replaced by ``b_l``."""
    if leading:
        return rows.reshape(*b_l, *t.shape[2:]) if b_l else rows.reshape(count, *t.shape[2:])
    lead = t.shape[:-2]
    return rows.T.reshape(*lead, *b_l) if b_l else rows.T.reshape(*lead, count)


def _host_counts(keep: torch.Tensor, counts) -> list[int]:
    b, length = keep.shape
    if counts is None:
        return keep.sum(1).tolist()  # the one host sync
    if isinstance(counts, torch.Tensor):
        if counts.device.type != "cpu":
            raise ValueError(f"counts must be on the host (a list or a CPU tensor), got a tensor on {counts.device}")
        counts = counts.tolist()
    elif isinstance(counts, (str, bytes)) or not hasattr(counts, "__iter__"):
        raise TypeError(f"counts must be a sequence of ints (or a CPU tensor), got {type(counts).__name__}")
    counts = [validation.check_int(c, f"counts[{i}]") for i, c in enumerate(counts)]
    if len(counts) != b:
        raise ValueError(f"counts must have one entry per sample (B = {b}), got {len(counts)}")
    if any(c < 0 or c > length for c in counts):
        raise ValueError(f"counts must be in [0, L] = [0, {length}], got {counts}")
    # Free on the CPU; on a GPU it would cost the sync counts save, and under torch.compile
    # reading data would break the graph (as the other data checks, it is skipped there).
    if keep.device.type == "cpu" and not torch.compiler.is_compiling():
        actual = keep.sum(1).tolist()
        if actual != counts:
            raise ValueError(f"counts must be the True per row of keep, {actual}; got {counts}")
    return counts


def _pack(keep, tensors, counts):
    _check_batch_mask(keep, "keep")
    leading = _layouts(keep, tensors)
    counts = _host_counts(keep, counts)
    b, length = keep.shape
    tokens = b * length
    total = sum(counts)
    backend = backends.select(keep.device, torch.float32, "keep")
    rows = [_as_rows(t, lead, tokens) for t, lead in zip(tensors, leading)]
    indices, packed = _ops.pack(keep.contiguous(), total, rows, backend=backend)
    return leading, counts, indices, packed


def cu_seqlens_from_counts(counts: Sequence[int], device) -> torch.Tensor:
    """int32 ``[len(counts) + 1]`` offsets of consecutive segments of the host ``counts``, on
    ``device``: no host sync (the copy to a GPU is asynchronous, from pinned memory)."""
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
    if device.type == "cpu":
        return cu
    # From pinned memory the copy is asynchronous: no wait on the device queue.
    return cu.pin_memory().to(device, non_blocking=True)


def select_and_pack(keep: torch.Tensor, *tensors: torch.Tensor, counts: Sequence[int] | None = None) -> PackedBatch:
    """Gathers the kept tokens of every tensor into the packed layout, in one pass.

    Args:
        keep: bool ``[B, L]`` (e.g. from :func:`select_visual_tokens`).
        tensors: any number of tensors laid out ``[B, L, ...]`` (embeddings ``[B, L, H]``,
            labels ``[B, L]``) or ``[..., B, L]`` (3-D rope position ids ``[3, B, L]``), any
            dtype, on the device of ``keep``. A ``[B, L]`` tensor counts as ``[B, L, ...]``.
        counts: the number of True per row of ``keep``, on the host, when known: saves the
            one host sync that reading it otherwise costs. It must be right: it is checked
            against ``keep`` on the CPU; on a GPU the check would cost that sync, so there a
            wrong split gives wrong ``cu_seqlens``.

    Returns:
        A :class:`PackedBatch`. Tokens keep their original order. Differentiable: the
        gradient of a packed tensor is scattered back to its source positions (written once,
        zeros at the dropped tokens).
    """
    leading, counts, indices, packed = _pack(keep, tensors, counts)
    b, length = keep.shape
    total = sum(counts)
    outputs = tuple(_from_rows(p, t, lead, total, ()) for p, t, lead in zip(packed, tensors, leading))
    return PackedBatch(
        tensors=outputs,
        cu_seqlens=cu_seqlens_from_counts(counts, keep.device),
        max_seqlen=max(counts, default=0),
        indices=indices,
        batch=b,
        length=length,
    )


def select_and_pad(
    keep: torch.Tensor,
    *tensors: torch.Tensor,
    padding_side: str = "left",
    pad_values: float | Sequence[float] = 0,
    counts: Sequence[int] | None = None,
) -> PaddedBatch:
    """The selection of :func:`select_and_pack`, re-padded to the longest kept sample.

    Args:
        keep, tensors, counts: as for :func:`select_and_pack`.
        padding_side: ``"left"`` (for ``generate``) or ``"right"``.
        pad_values: the fill of the padding, one value for all tensors or one per tensor
            (e.g. 0 for embeddings, -100 for labels, 1 for position ids).

    Returns:
        A :class:`PaddedBatch` with the new attention mask. Differentiable as the pack.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(pad_values, (int, float)) and not isinstance(pad_values, bool):
        pad_values = [pad_values] * len(tensors)
    elif isinstance(pad_values, Sequence) and not isinstance(pad_values, str):
        pad_values = list(pad_values)
        if len(pad_values) != len(tensors):
            raise ValueError(f"pad_values must be one number or one per tensor ({len(tensors)}), got {len(pad_values)}")
    else:
        raise TypeError(f"pad_values must be a number or a sequence of numbers (one per tensor), got {type(pad_values).__name__}")
    leading, counts, indices, packed = _pack(keep, tensors, counts)
    for i, (fill, t) in enumerate(zip(pad_values, tensors)):
        validation.check_fill(fill, "pad_values" if len(tensors) == 1 else f"pad_values[{i}]", t.dtype)
    b = keep.shape[0]
    width = max(counts, default=0)
    device = keep.device
    lengths = torch.tensor(counts, dtype=torch.long)
    starts = (width - lengths) if padding_side == "left" else torch.zeros_like(lengths)
    # Slot of packed token j of sample s: s * width + start_s + (j - first_s), built on the
    # host from the counts and copied once.
    first = torch.cumsum(lengths, 0) - lengths
    sample = torch.repeat_interleave(torch.arange(b), lengths)
    slots = sample * width + starts[sample] + torch.arange(int(lengths.sum())) - first[sample]
    if device.type != "cpu":
        slots = slots.pin_memory().to(device, non_blocking=True)
    backend = backends.select(device, torch.float32, "keep")
    padded = tuple(
        _from_rows(_ops.unpack(p, slots, b * width, fill, backend=backend), t, lead, 0, (b, width))
        for p, t, lead, fill in zip(packed, tensors, leading, pad_values)
    )
    positions = torch.arange(width).unsqueeze(0)
    mask = (positions >= starts.unsqueeze(1)) & (positions < (starts + lengths).unsqueeze(1))
    return PaddedBatch(
        tensors=padded,
        attention_mask=mask.long().to(device, non_blocking=True),
        lengths=counts,
        indices=indices,
    )


def unpack(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int, fill: float = 0) -> torch.Tensor:
    """The inverse of the pack: ``packed [total, ...]`` to ``[batch, length, ...]`` with packed
    row j at flat position ``indices[j]`` and ``fill`` elsewhere; each output row is written
    once (no zero fill then scatter). Differentiable (its backward is a gather).

    Args:
        packed: ``[total, ...]``, any dtype.
        indices: int64 ``[total]``, distinct flat positions in ``[0, batch * length)`` (as
            :class:`PackedBatch` holds them). Checked on CPU tensors; trusted on GPU tensors,
            where reading them would sync.
        batch, length: ints >= 0, the shape of the output's first two dims.
        fill: a number that ``packed``'s dtype holds exactly (an integer for integer and bool
            tensors).
    """
    validation.check_tensor(packed, "packed")
    validation.check_tensor(indices, "indices", like=("packed", packed))
    if indices.dtype != torch.long or indices.dim() != 1:
        raise TypeError(f"indices must be a 1-D int64 tensor, got {indices.dtype} of shape {tuple(indices.shape)}")
    if packed.dim() < 1 or packed.shape[0] != indices.shape[0]:
        raise ValueError(f"packed must be [total, ...] with total = {indices.shape[0]}, got {tuple(packed.shape)}")
    rows_out = validation.check_int(batch, "batch") * validation.check_int(length, "length")
    if indices.shape[0] > rows_out:
        raise ValueError(f"packed has {indices.shape[0]} rows, more than batch * length = {rows_out}")
    validation.check_fill(fill, "fill", packed.dtype)
    validation.check_allocation((batch, length, *packed.shape[1:]), packed.dtype, f"batch * length: rows = {rows_out}")
    backend = backends.select(packed.device, torch.float32, "packed")
    if backend != "cpu" and packed.device.type == "cpu":  # the compiled CPU kernel checks them itself
        validation.check_unpack_indices(indices, rows_out)
    rows = packed.reshape(packed.shape[0], math.prod(packed.shape[1:])).contiguous()
    out = _ops.unpack(rows, indices.contiguous(), rows_out, fill, backend=backend)
    return out.reshape(batch, length, *packed.shape[1:])
