"""Small random Qwen2.5-VL models built from configs (no hub access) and their batches.

Patch size 4, spatial merge 2, temporal patch size 2: a pixel row holds ``3 * 2 * 4 * 4 = 96``
values; prompts as in :mod:`vsops.integrations.testing.prompts`.
"""
from __future__ import annotations

import torch

from vsops.integrations.testing.prompts import TOKENS, PromptLayout, multimodal_batch

__all__ = ["TOKENS", "QWEN2_5_VL_LAYOUT", "tiny_qwen2_5_vl_config", "qwen2_5_vl_batch"]

QWEN2_5_VL_LAYOUT = PromptLayout(patch_dim=3 * 2 * 4 * 4, temporal_patch_size=2, spatial_merge_size=2, tokens=TOKENS)


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
        spatial_merge_size=QWEN2_5_VL_LAYOUT.spatial_merge_size,
        temporal_patch_size=QWEN2_5_VL_LAYOUT.temporal_patch_size,
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


def qwen2_5_vl_batch(prompts, *, seed: int = 0, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Model inputs for ``prompts`` (see :mod:`~vsops.integrations.testing.prompts`), padded to
    the longest; :func:`~vsops.integrations.testing.prompts.multimodal_batch` in the Qwen2.5-VL
    layout (pixel rows of 96 float32 values, videos in pairs of frames).

    Prompt i draws from seed ``seed + i``, so ``qwen2_5_vl_batch([prompts[i]], seed=seed + i)``
    is sample i of the batch alone. Adds ``mm_token_type_ids`` (int32 ``[B, L]``) where the
    installed transformers takes it (5.x).
    """
    from vsops.integrations.qwen2_5_vl import mm_token_type_ids

    batch = multimodal_batch(prompts, QWEN2_5_VL_LAYOUT, seed=seed, padding_side=padding_side)
    kinds = mm_token_type_ids(batch["input_ids"], TOKENS["image"], TOKENS["video"])
    if kinds is not None:
        batch["mm_token_type_ids"] = kinds
    return batch
