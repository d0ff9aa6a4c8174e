"""Small random LLaVA-OneVision-1.5 models (no hub access) and their batches.

LLaVA-OV-1.5 ships as remote code (``trust_remote_code=True``): a RICE vision tower and patch
merger in front of a Qwen3 language model with 1-D RoPE. lmms-engine 0.1.4 carries the two
files of that code; :func:`llava_ov_1_5_model_dir` copies them next to a tiny config and random
weights, so the directory loads the way the hub checkpoint does::

    AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)

Patch size 4, spatial merge 2 and temporal patch size 1: RICE's patch embedding is a 2-D
convolution that views every pixel row as ``(3, patch, patch)`` (``RicePatchEmbed`` sets its
temporal patch size to 1 whatever the config says), and the model's video processor (in
transformers' port, ``LlavaOnevision1_5VideoProcessor``) patchifies with
``temporal_patch_size=1``: every video frame is a ``t`` step of the grid and a RICE segment of
its own. A pixel row holds ``3 * 4 * 4 = 48`` values. Prompts as in
:mod:`vsops.integrations.testing.prompts`; the same special token ids as the tiny Qwen2.5-VL.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path

import torch

from vsops.integrations.testing.prompts import TOKENS, PromptLayout, multimodal_batch
from vsops.integrations.testing.sizes import MEDIA_IDS, SPECIAL_IDS, TinySizes

__all__ = [
    "LLAVA_OV_1_5_LAYOUT",
    "REMOTE_CODE_FILES",
    "remote_code_dir",
    "unavailable_reason",
    "tiny_llava_ov_1_5_config",
    "llava_ov_1_5_model_dir",
    "make_tiny_llava_ov_1_5",
    "llava_ov_1_5_batch",
]

LLAVA_OV_1_5_LAYOUT = PromptLayout(patch_dim=3 * 1 * 4 * 4, temporal_patch_size=1, spatial_merge_size=2, tokens=TOKENS)
REMOTE_CODE_FILES = ("configuration_llavaonevision1_5.py", "modeling_llavaonevision1_5.py")
_INSTALL_HINT = "pip install --no-deps lmms-engine==0.1.4"
# A fixed folder name: transformers 4.x names the dynamic module of remote code after it, so
# repeated temporary directories share one module instead of adding one each to the HF cache.
_DIR_NAME = "tiny_llava_ov_1_5"


def unavailable_reason() -> str | None:
    """Why the tiny LLaVA-OV-1.5 cannot be built here (no transformers, no lmms-engine, or
    transformers 5, whose loader mangles the remote code's checkpoint), or None."""
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if importlib.util.find_spec("lmms_engine") is None:
        return f"the LLaVA-OneVision-1.5 model code comes from lmms-engine: {_INSTALL_HINT}"
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return (
            f"LLaVA-OneVision-1.5's remote code runs on transformers 4.57 (found {transformers.__version__}): "
            "5.x's save_pretrained fails on its list-valued _tied_weights_keys and from_pretrained drops the "
            "language model's weights of a hub-layout checkpoint"
        )
    return None


def remote_code_dir() -> Path:
    """The installed lmms-engine's ``models/llava_onevision1_5`` folder, found without importing
    ``lmms_engine`` (its ``__init__`` imports dozens of models); ImportError when absent."""
    spec = importlib.util.find_spec("lmms_engine")  # a top-level find_spec runs no __init__
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the LLaVA-OneVision-1.5 remote code comes from lmms-engine: {_INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0]) / "models" / "llava_onevision1_5"
    missing = [name for name in REMOTE_CODE_FILES if not (folder / name).is_file()]
    if missing:
        raise ImportError(f"{folder} lacks {missing}; the tiny model needs lmms-engine 0.1.4: {_INSTALL_HINT}")
    return folder


def tiny_llava_ov_1_5_config(**sizes) -> dict:
    """The ``config.json`` content (a dict) of a tiny LLaVA-OV-1.5 with the
    :class:`~vsops.integrations.testing.sizes.TinySizes` ``sizes`` (keywords); the attention
    implementation is not in it: transformers takes that from ``from_pretrained`` only (it
    overrides a ``config.json`` entry), see :func:`make_tiny_llava_ov_1_5`.

    Language model: Qwen3 with head dim ``hidden_size // heads`` (even), 1-D RoPE (default
    type, theta 1e4), untied head. Vision: RICE of ``vision_depth`` blocks, 2 heads of
    ``vision_hidden_size // 2`` (a multiple of 4: 2-D RoPE), MLP ``2 * vision_hidden_size``,
    patch 4, merge 2, temporal patch 1, merged into ``hidden_size``. float32.
    """
    sizes = TinySizes(**sizes)
    if sizes.head_dim % 2:
        raise ValueError(f"hidden_size // heads must be an even int, got {sizes.hidden_size} / {sizes.heads}")
    if sizes.vision_hidden_size % 8:
        raise ValueError(f"vision_hidden_size must be a multiple of 8 (2 heads, 2-D RoPE), got {sizes.vision_hidden_size}")
    text = dict(
        **sizes.text_config(),
        head_dim=sizes.head_dim,
        hidden_act="silu",
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        rope_scaling=None,
        attention_bias=False,
        attention_dropout=0.0,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=sizes.layers,
        use_cache=True,
        image_token_id=TOKENS["image"],
        video_token_id=TOKENS["video"],
    )
    vision = dict(
        model_type="rice_vit",
        depth=sizes.vision_depth,
        embed_dim=sizes.vision_hidden_size,
        hidden_size=sizes.vision_hidden_size,
        hidden_act="gelu",
        intermediate_size=2 * sizes.vision_hidden_size,
        num_heads=2,
        in_channels=3,
        patch_size=4,
        spatial_merge_size=LLAVA_OV_1_5_LAYOUT.spatial_merge_size,
        temporal_patch_size=LLAVA_OV_1_5_LAYOUT.temporal_patch_size,
        initializer_range=0.02,
        layer_norm_eps=1e-5,
        text_hidden_size=sizes.hidden_size,
    )
    return dict(
        architectures=["LLaVAOneVision1_5_ForConditionalGeneration"],
        auto_map={
            "AutoConfig": "configuration_llavaonevision1_5.Llavaonevision1_5Config",
            "AutoModelForCausalLM": "modeling_llavaonevision1_5.LLaVAOneVision1_5_ForConditionalGeneration",
        },
        model_type="llavaonevision1_5",
        text_config=text,
        vision_config=vision,
        **MEDIA_IDS,
        vocab_size=sizes.vocab_size,
        tie_word_embeddings=False,
        torch_dtype="float32",
        **SPECIAL_IDS,
    )


def llava_ov_1_5_model_dir(path, *, seed: int = 0, **config_kwargs) -> Path:
    """Writes a tiny LLaVA-OV-1.5 checkpoint into the folder ``path`` (created if needed):
    the two remote-code files of lmms-engine, ``config.json`` from
    :func:`tiny_llava_ov_1_5_config` (``config_kwargs``) and the model's own random init
    (seeded by ``seed``, the caller's RNG untouched) as ``model.safetensors``.

    The weights are stored under the hub checkpoint's names (``visual.*``, ``model.*``,
    ``lm_head.weight``), and ``AutoModelForCausalLM.from_pretrained(path,
    trust_remote_code=True)`` loads exactly them. Returns ``path`` as a Path.

    Needs transformers 4.x (ImportError on 5.x): there ``save_pretrained`` rejects the remote
    code's list-valued ``_tied_weights_keys``, and ``from_pretrained`` leaves the language
    model's ``model.*`` weights unmapped (randomly initialized) and RICE's rotary ``inv_freq``
    at zero.
    """
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if int(transformers.__version__.split(".")[0]) >= 5:
        raise ImportError(
            f"the tiny LLaVA-OV-1.5 checkpoint needs transformers 4.x (found {transformers.__version__}): "
            "5.x cannot save or load the remote code's checkpoint faithfully"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {seed!r}")
    config = tiny_llava_ov_1_5_config(**config_kwargs)
    source = remote_code_dir()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(source / name, path / name)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        config_object = AutoConfig.from_pretrained(path, trust_remote_code=True)
        model = AutoModelForCausalLM.from_config(config_object, trust_remote_code=True)
    model.save_pretrained(path)
    # save_pretrained rewrites config.json from the config object; keep the file as written.
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def make_tiny_llava_ov_1_5(*, seed: int = 0, attn_implementation: str = "sdpa", **config_kwargs):
    """A tiny random ``LLaVAOneVision1_5_ForConditionalGeneration`` in eval mode, loaded by
    ``from_pretrained`` from a temporary :func:`llava_ov_1_5_model_dir` with
    ``attn_implementation`` (``"eager"``, ``"sdpa"`` or ``"flash_attention_2"``; the vision
    tower and the language model both take it)."""
    from transformers import AutoModelForCausalLM

    if attn_implementation not in ("eager", "sdpa", "flash_attention_2"):
        raise ValueError(
            f"attn_implementation must be 'eager', 'sdpa' or 'flash_attention_2', got {attn_implementation!r}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path = llava_ov_1_5_model_dir(Path(tmp) / _DIR_NAME, seed=seed, **config_kwargs)
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=True, attn_implementation=attn_implementation
        )
    return model.eval()


def llava_ov_1_5_batch(prompts, *, seed: int = 0, padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Model inputs for ``prompts`` (see :mod:`~vsops.integrations.testing.prompts`), padded to
    the longest: :func:`~vsops.integrations.testing.prompts.multimodal_batch` in the LLaVA-OV-1.5
    layout, i.e. ``input_ids`` / ``attention_mask`` int64 ``[B, L]``, ``pixel_values`` float32
    ``[patches, 48]`` with ``image_grid_thw`` int64 ``[images, 3]`` and ``pixel_values_videos``
    with ``video_grid_thw`` (``(t, h, w)``: one grid row per video, one frame per temporal
    step). The model's forward takes these keys; it derives positions from the cache itself.

    Prompt i draws from seed ``seed + i``, so ``llava_ov_1_5_batch([prompts[i]], seed=seed + i)``
    is sample i of the batch alone.
    """
    return multimodal_batch(prompts, LLAVA_OV_1_5_LAYOUT, seed=seed, padding_side=padding_side)
