"""Small random models of the Qwen-VL family (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5 and their
MoE variants) built from configs (no hub access), and their batches.

Patch size 4, spatial merge 2, temporal patch size 2: a pixel row holds ``3 * 2 * 4 * 4 = 96``
values; prompts as in :mod:`vsops.integrations.testing.prompts`, a Qwen3-VL video with a
2-token timestamp before each frame, as its processor writes them (Qwen3.5 too).
"""
from __future__ import annotations

import dataclasses
import types

from vsops.integrations.testing.prompts import TOKENS, PromptLayout, multimodal_batch
from vsops.integrations.testing.sizes import MEDIA_IDS, SPECIAL_IDS, TinySizes

__all__ = [
    "QWEN_VL_MODEL_TYPES",
    "QWEN2_5_VL_LAYOUT",
    "QWEN3_VL_LAYOUT",
    "tiny_qwen_vl_config",
    "tiny_qwen2_5_vl_config",
    "qwen_vl_batch",
    "qwen2_5_vl_batch",
]

QWEN2_5_VL_LAYOUT = PromptLayout(patch_dim=3 * 2 * 4 * 4, temporal_patch_size=2, spatial_merge_size=2, tokens=TOKENS)
QWEN3_VL_LAYOUT = dataclasses.replace(QWEN2_5_VL_LAYOUT, timestamp_tokens=2)
# model_type -> (config class name, layout)
_MODELS = {
    "qwen2_vl": ("Qwen2VLConfig", QWEN2_5_VL_LAYOUT),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", QWEN2_5_VL_LAYOUT),
    "qwen3_vl": ("Qwen3VLConfig", QWEN3_VL_LAYOUT),
    "qwen3_vl_moe": ("Qwen3VLMoeConfig", QWEN3_VL_LAYOUT),
    "qwen3_5": ("Qwen3_5Config", QWEN3_VL_LAYOUT),
    "qwen3_5_moe": ("Qwen3_5MoeConfig", QWEN3_VL_LAYOUT),
}
QWEN_VL_MODEL_TYPES = tuple(_MODELS)


def tiny_qwen_vl_config(model_type: str = "qwen2_5_vl", *, attn_implementation: str = "sdpa", **sizes):
    """The config of a random-init ``model_type`` (one of :data:`QWEN_VL_MODEL_TYPES`) with
    the :class:`~vsops.integrations.testing.sizes.TinySizes` ``sizes`` (keywords); patch size
    4, merge 2, head dim ``hidden_size // heads`` (a multiple of 16), untied head, the special
    ids of :data:`~vsops.integrations.testing.prompts.TOKENS`.

    Qwen3-VL: interleaved M-RoPE, deepstack features from every vision block (one per language
    layer at most), a learned position grid of 8 x 8; the MoE variant has 4 experts of
    ``intermediate_size // 2``, 2 per token. Qwen3.5: Qwen3-VL's tower without deepstack, and
    language layers alternating Gated DeltaNet (linear attention: 2 key heads, ``heads`` value
    heads of head dim) and full attention, rope over the whole head; its MoE variant has the
    same experts and a shared one of ``intermediate_size // 2``.
    """
    if model_type not in _MODELS:
        raise ValueError(f"model_type must be one of {QWEN_VL_MODEL_TYPES}, got {model_type!r}")
    import transformers

    sizes = TinySizes(**sizes)
    head_dim, vision_hidden_size = sizes.head_dim, sizes.vision_hidden_size
    if head_dim % 16:
        raise ValueError(f"hidden_size // heads must be a multiple of 16, got {head_dim}")
    quarter = head_dim // 16  # the rope sections split head_dim / 2
    qwen3 = model_type.startswith("qwen3")
    text = sizes.text_config()
    vision = dict(
        depth=sizes.vision_depth,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=QWEN2_5_VL_LAYOUT.spatial_merge_size,
        temporal_patch_size=QWEN2_5_VL_LAYOUT.temporal_patch_size,
    )
    if qwen3:
        text.update(rope_scaling={"rope_type": "default", "mrope_section": [4 * quarter, 2 * quarter, 2 * quarter],
                                  "mrope_interleaved": True})
        vision.update(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, out_hidden_size=sizes.hidden_size,
                      num_position_embeddings=64)
        moe = model_type.endswith("_moe")
        if moe:
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=sizes.intermediate_size // 2)
        if model_type.startswith("qwen3_5"):
            text["rope_scaling"]["partial_rotary_factor"] = 1.0
            text.update(head_dim=head_dim, layer_types=["linear_attention" if i % 2 == 0 else "full_attention"
                                                         for i in range(sizes.layers)],
                        linear_key_head_dim=head_dim, linear_value_head_dim=head_dim, linear_num_key_heads=2,
                        linear_num_value_heads=sizes.heads)
            if moe:  # experts and a shared expert instead of one MLP
                del text["intermediate_size"]
                text.update(shared_expert_intermediate_size=sizes.intermediate_size // 2)
        else:
            if moe:
                text.update(decoder_sparse_step=1)
            else:
                text.update(head_dim=head_dim)
            vision.update(deepstack_visual_indexes=list(range(min(sizes.vision_depth, sizes.layers))))
    else:
        text.update(rope_scaling={"type": "mrope", "mrope_section": [2 * quarter, 3 * quarter, 3 * quarter]})
    if model_type == "qwen2_vl":
        vision.update(embed_dim=vision_hidden_size, hidden_size=sizes.hidden_size, mlp_ratio=2)
    elif model_type == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden_size, intermediate_size=2 * vision_hidden_size, window_size=16,
                      out_hidden_size=sizes.hidden_size, fullatt_block_indexes=[sizes.vision_depth - 1], tokens_per_second=2)
    config_cls = getattr(transformers, _MODELS[model_type][0])
    config = config_cls(text_config=text, vision_config=vision, **MEDIA_IDS, **SPECIAL_IDS, tie_word_embeddings=False)
    config._attn_implementation = attn_implementation
    config.text_config._attn_implementation = attn_implementation
    return config


def tiny_qwen2_5_vl_config(**sizes):
    """:func:`tiny_qwen_vl_config` of a Qwen2.5-VL (window size 16, the last vision block full)."""
    return tiny_qwen_vl_config("qwen2_5_vl", **sizes)


def qwen_vl_batch(prompts, model_type: str = "qwen2_5_vl", *, seed: int = 0, padding_side: str = "left") -> dict:
    """Model inputs of ``model_type`` for ``prompts`` (see
    :mod:`~vsops.integrations.testing.prompts`), padded to the longest:
    :func:`~vsops.integrations.testing.prompts.multimodal_batch` in the model's layout (pixel
    rows of 96 float32 values, videos in pairs of frames).

    Prompt i draws from seed ``seed + i``, so ``qwen_vl_batch([prompts[i]], ..., seed=seed + i)``
    is sample i of the batch alone. Adds ``mm_token_type_ids`` (int32 ``[B, L]``) where the
    installed transformers takes it (5.x).
    """
    from vsops.integrations.adapter import adapter_for

    if model_type not in _MODELS:
        raise ValueError(f"model_type must be one of {QWEN_VL_MODEL_TYPES}, got {model_type!r}")
    batch = multimodal_batch(prompts, _MODELS[model_type][1], seed=seed, padding_side=padding_side)
    ids = types.SimpleNamespace(image_token_id=TOKENS["image"], video_token_id=TOKENS["video"])
    batch.update(adapter_for(model_type).extra_inputs(batch["input_ids"], ids))
    return batch


def qwen2_5_vl_batch(prompts, *, seed: int = 0, padding_side: str = "left") -> dict:
    """:func:`qwen_vl_batch` of a Qwen2.5-VL."""
    return qwen_vl_batch(prompts, "qwen2_5_vl", seed=seed, padding_side=padding_side)
