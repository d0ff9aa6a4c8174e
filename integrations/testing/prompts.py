"""Prompts -> padded multimodal batches, shared by the tiny models of this package.

A prompt is a list of items: an int ``n`` (n random text tokens), ``("image", h, w)`` (an image
of ``h x w`` patches) or ``("video", t, h, w)`` (t frames of ``h x w`` patches); ``h`` and ``w``
are multiples of the model's spatial merge size and ``t`` of its temporal patch size. Each image
or video becomes ``<vision_start> <placeholder> * (t'*h*w / merge**2) <vision_end>`` with
``t' = t / temporal_patch_size``, the layout of the Qwen2-VL processor family; with
``PromptLayout.timestamp_tokens`` set, each of a video's ``t'`` frames is a block of its own
preceded by that many text tokens, as Qwen3-VL's processor writes a timestamp before each frame.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

__all__ = ["TOKENS", "TEXT_IDS", "PromptLayout", "multimodal_batch"]

TOKENS = {"pad": 0, "bos": 1, "eos": 2, "image": 100, "video": 101, "vision_start": 102, "vision_end": 103}
TEXT_IDS = (4, 100)  # [low, high) of the random text tokens: clear of the special ids above

_TOKEN_NAMES = ("pad", "image", "video", "vision_start", "vision_end")


@dataclasses.dataclass(frozen=True)
class PromptLayout:
    """How a model lays out its visual inputs.

    Attributes:
        patch_dim: features of one ``pixel_values`` row, ``channels * temporal_patch_size *
            patch_size**2``.
        temporal_patch_size: video frames per patch (1 for images too).
        spatial_merge_size: the merger folds ``merge x merge`` patches into one token.
        tokens: ids of ``pad``, ``image``, ``video``, ``vision_start`` and ``vision_end``.
        text_ids: ``[low, high)`` range of the random text tokens.
        timestamp_tokens: None: a video is one block of placeholders; an int: each frame is
            its own block, after that many random text tokens (Qwen3-VL's timestamps).
    """

    patch_dim: int
    temporal_patch_size: int
    spatial_merge_size: int
    tokens: Mapping[str, int]
    text_ids: tuple[int, int] = TEXT_IDS
    timestamp_tokens: int | None = None

    def __post_init__(self):
        for name in ("patch_dim", "temporal_patch_size", "spatial_merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        missing = [name for name in _TOKEN_NAMES if name not in self.tokens]
        if missing:
            raise ValueError(f"tokens lacks {missing}")
        low, high = self.text_ids
        if not 0 <= low < high:
            raise ValueError(f"text_ids must be a range [low, high) with 0 <= low < high, got {self.text_ids}")
        stamps = self.timestamp_tokens
        if stamps is not None and (not isinstance(stamps, int) or isinstance(stamps, bool) or stamps < 0):
            raise ValueError(f"timestamp_tokens must be None or an int >= 0, got {stamps!r}")


def _grid(item, layout: PromptLayout) -> tuple[int, int, int]:
    """``(t', h, w)`` patches of an image or video item, validated."""
    if not isinstance(item, (tuple, list)) or not item or item[0] not in ("image", "video"):
        raise ValueError(f"unknown prompt item {item!r}: expected an int, ('image', h, w) or ('video', t, h, w)")
    sizes = item[1:]
    if len(sizes) != (2 if item[0] == "image" else 3) or not all(isinstance(s, int) and s > 0 for s in sizes):
        raise ValueError(f"prompt item {item!r}: expected ('image', h, w) or ('video', t, h, w) of positive ints")
    *frames, h, w = sizes
    merge = layout.spatial_merge_size
    if h % merge or w % merge:
        raise ValueError(f"prompt item {item!r}: h and w must be multiples of the spatial merge size {merge}")
    if not frames:
        return 1, h, w
    if frames[0] % layout.temporal_patch_size:
        raise ValueError(
            f"prompt item {item!r}: t must be a multiple of the temporal patch size {layout.temporal_patch_size}"
        )
    return frames[0] // layout.temporal_patch_size, h, w


def multimodal_batch(
    prompts: Sequence[Sequence], layout: PromptLayout, *, seed: int = 0, padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Model inputs for ``prompts`` (see the module docstring) in ``layout``, padded to the longest.

    Prompt i draws its random tokens and pixels from seed ``seed + i``, in item order, so that
    ``multimodal_batch([prompts[i]], layout, seed=seed + i)`` is sample i of the batch alone.

    Returns:
        ``input_ids`` and ``attention_mask`` (int64 ``[B, L]``, ``padding_side`` padded with
        ``tokens["pad"]``) and, when the prompts hold any, ``pixel_values`` (float32
        ``[sum t'*h*w over images, patch_dim]``, standard normal) with ``image_grid_thw``
        (int64 ``[images, 3]`` of ``(1, h, w)``), and ``pixel_values_videos`` /
        ``video_grid_thw`` likewise (``(t', h, w)`` per video); images and videos in prompt order.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise TypeError(f"prompts must be a non-empty list of prompts, got {prompts!r}")
    tokens = layout.tokens
    merged = layout.spatial_merge_size**2
    rows, images, videos, pixels, video_pixels = [], [], [], [], []
    for index, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence):
            raise TypeError(f"prompts[{index}] must be a list of items, got {prompt!r}")
        generator = torch.Generator().manual_seed(seed + index)
        ids = []
        for item in prompt:
            if isinstance(item, int) and not isinstance(item, bool):
                if item < 0:
                    raise ValueError(f"prompts[{index}]: a text item must be >= 0 tokens, got {item}")
                ids += torch.randint(*layout.text_ids, (item,), generator=generator).tolist()
                continue
            grid = _grid(item, layout)
            t, h, w = grid
            rows_of_patches = torch.randn(t * h * w, layout.patch_dim, generator=generator)
            placeholder = tokens[item[0]]
            (images if item[0] == "image" else videos).append(grid)
            (pixels if item[0] == "image" else video_pixels).append(rows_of_patches)
            blocks, stamps = 1, []
            if item[0] == "video" and layout.timestamp_tokens is not None:
                blocks = t
                stamps = torch.randint(*layout.text_ids, (t, layout.timestamp_tokens), generator=generator).tolist()
            for block in range(blocks):
                ids += stamps[block] if stamps else []
                ids += [tokens["vision_start"]] + [placeholder] * (t * h * w // merged // blocks) + [tokens["vision_end"]]
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokens["pad"], dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        input_ids[i, span] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(images))
    if videos:
        batch.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(videos))
    return batch
