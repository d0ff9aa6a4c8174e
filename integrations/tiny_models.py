"""Small random Qwen2.5-VL models and multimodal batches built from configs (no hub access),
for the tests, the prefill benchmark and the synthetic training task.

A prompt is a list of items: an int ``n`` (n text tokens), ``("image", h, w)`` (an image of
``h x w`` patches) or ``("video", t, h, w)``; ``h`` and ``w`` are multiples of the spatial
merge size (2) and ``t`` of the temporal patch size (2). Each image or video becomes
``<vision_start> <placeholder> * (t'*h*w/4) <vision_end>`` as Qwen2.5-VL's processor lays it out.
"""
from __future__ import annotations

import torch

__all__ = ["TOKENS", "tiny_qwen2_5_vl_config", "qwen2_5_vl_batch"]

TOKENS = {"pad": 0, "bos": 1, "eos": 2, "image": 100, "video": 101, "vision_start": 102, "vision_end": 103}
_TEXT_IDS = (4, 100)  # random text tokens avoid the special ids above


def tiny_qwen2_5_vl_config(
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vocab_size: int = 128,
    attn_implementation: str = "sdpa",
):
    """A ``Qwen2_5_VLConfig`` with random-init sizes; patch size 4, merge 2, head dim
    ``hidden_size // heads`` (a multiple of 16)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = hidden_size // heads
    if head_dim % 16:
        raise ValueError(f"hidden_size // heads must be a multiple of 16, got {head_dim}")
    quarter = head_dim // 16  # the rope sections split head_dim / 2 as 2:3:3
    text = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=32768,
        rope_scaling={"type": "mrope", "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]},
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=TOKENS["bos"],
        eos_token_id=TOKENS["eos"],
        pad_token_id=TOKENS["pad"],
    )
    vision = dict(
        depth=vision_depth,
        hidden_size=vision_hidden_size,
        intermediate_size=2 * vision_hidden_size,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=16,
        out_hidden_size=hidden_size,
        fullatt_block_indexes=[vision_depth - 1],
        tokens_per_second=2,
    )
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=TOKENS["image"],
        video_token_id=TOKENS["video"],
        vision_start_token_id=TOKENS["vision_start"],
        vision_end_token_id=TOKENS["vision_end"],
        bos_token_id=TOKENS["bos"],
        eos_token_id=TOKENS["eos"],
        pad_token_id=TOKENS["pad"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def _placeholders(grid, token):
    t, h, w = grid
    return [TOKENS["vision_start"]] + [token] * (t * h * w // 4) + [TOKENS["vision_end"]]


def qwen2_5_vl_batch(prompts, *, seed: int = 0, padding_side: str = "left") -> dict:
    """Model inputs for ``prompts`` (see the module docstring), padded to the longest.

    Prompt i draws its random tokens and pixels from seed ``seed + i``, so that
    ``qwen2_5_vl_batch([prompts[i]], seed=seed + i)`` is sample i of the batch alone.

    Returns a dict of ``input_ids``, ``attention_mask`` and, when present, ``pixel_values`` /
    ``image_grid_thw`` and ``pixel_values_videos`` / ``video_grid_thw`` (float32 pixels,
    random), plus ``mm_token_type_ids`` where the installed transformers takes it.
    """
    from vsops.integrations.qwen2_5_vl import mm_token_type_ids

    patch_dim = 3 * 2 * 4 * 4
    rows, images, videos, pixels, video_pixels = [], [], [], [], []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator().manual_seed(seed + index)
        ids = []
        for item in prompt:
            if isinstance(item, int):
                ids += torch.randint(*_TEXT_IDS, (item,), generator=generator).tolist()
            elif item[0] == "image":
                images.append((1, item[1], item[2]))
                pixels.append(torch.randn(item[1] * item[2], patch_dim, generator=generator))
                ids += _placeholders(images[-1], TOKENS["image"])
            elif item[0] == "video":
                videos.append((item[1] // 2, item[2], item[3]))
                video_pixels.append(torch.randn(item[1] // 2 * item[2] * item[3], patch_dim, generator=generator))
                ids += _placeholders(videos[-1], TOKENS["video"])
            else:
                raise ValueError(f"unknown prompt item {item!r}")
        rows.append(ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), TOKENS["pad"], dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, r in enumerate(rows):
        span = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
        input_ids[i, span] = torch.tensor(r)
        attention_mask[i, span] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if images:
        batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(images))
    if videos:
        batch.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(videos))
    kinds = mm_token_type_ids(input_ids, TOKENS["image"], TOKENS["video"])
    if kinds is not None:
        batch["mm_token_type_ids"] = kinds
    return batch
