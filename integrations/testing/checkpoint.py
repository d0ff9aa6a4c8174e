"""A tiny Qwen-VL checkpoint directory with everything a serving engine loads: random weights
(optionally a scorer under either published key layout), a word-level tokenizer whose special
ids are those of :data:`~vsops.integrations.testing.prompts.TOKENS`, the image processor
(patch 4, merge 2) and a chat template. Nothing is downloaded.

The tokenizer splits on spaces: text is ``"w5 w17 ..."`` (token ``wN`` is id N) and the Qwen
markers ``<|vision_start|><|image_pad|><|vision_end|>``.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from vsops.integrations.testing.prompts import TOKENS
from vsops.integrations.testing.qwen_vl import tiny_qwen_vl_config
from vsops.scorer import SCORER_PREFIXES

__all__ = ["write_tiny_checkpoint", "tiny_tokenizer", "text_of"]

_MARKERS = {"pad": "<|endoftext|>", "bos": "<|im_start|>", "eos": "<|im_end|>", "image": "<|image_pad|>",
            "video": "<|video_pad|>", "vision_start": "<|vision_start|>", "vision_end": "<|vision_end|>"}
_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' or part['type'] == 'image_url' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
    "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def tiny_tokenizer(vocab_size: int = 128):
    """A fast tokenizer of ``vocab_size`` words: ``wN`` is id N, the Qwen markers sit at the
    ids of :data:`~vsops.integrations.testing.prompts.TOKENS`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    for name, marker in _MARKERS.items():
        del vocab[f"w{TOKENS[name]}"]
        vocab[marker] = TOKENS[name]
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w3"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token=_MARKERS["eos"], pad_token=_MARKERS["pad"],
        additional_special_tokens=[_MARKERS[n] for n in ("bos", "image", "video", "vision_start", "vision_end")],
        chat_template=_CHAT_TEMPLATE,
    )


def text_of(ids) -> str:
    """The prompt text of token ids, one image marker per run of image placeholders."""
    words, previous = [], None
    for i in ids:
        i = int(i)
        if not (i == TOKENS["image"] and previous == TOKENS["image"]):
            marker = next((m for n, m in _MARKERS.items() if TOKENS[n] == i), None)
            words.append(marker if marker is not None else f"w{i}")
        previous = i
    return " ".join(words)


def write_tiny_checkpoint(path, model_type: str = "qwen2_5_vl", *, scorer_layout: str | None = SCORER_PREFIXES[1],
                          proj_dim: int = 16, seed: int = 0, max_pixels: int = 64 * 64, **sizes) -> Path:
    """Writes a random ``model_type`` checkpoint (float32) with its tokenizer and processor to
    ``path`` and returns it.

    Args:
        scorer_layout: the key prefix of a random scorer saved with the model (one of
            :data:`vsops.scorer.SCORER_PREFIXES`), or None for a checkpoint without one.
        proj_dim: the scorer's projection size.
        seed: the weights' seed.
        max_pixels: the image processor's bound on an image's pixels (larger ones are resized
            down; 16 pixels per patch side, 4 patches per token).
        sizes: :class:`~vsops.integrations.testing.sizes.TinySizes` keywords.
    """
    import transformers
    from safetensors.torch import load_file, save_file

    from vsops.scorer import LearnableImportanceScorer

    if scorer_layout is not None and scorer_layout not in SCORER_PREFIXES:
        raise ValueError(f"scorer_layout must be one of {SCORER_PREFIXES} or None, got {scorer_layout!r}")
    path = Path(path)
    config = tiny_qwen_vl_config(model_type, **sizes)
    torch.manual_seed(seed)
    model = transformers.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if scorer_layout is not None:
        scorer = LearnableImportanceScorer(config.text_config.hidden_size, proj_dim)
        with torch.no_grad():  # a clear ranking (the published init nearly ties)
            for p in scorer.parameters():
                p.normal_()
        weights = load_file(path / "model.safetensors")
        weights.update({scorer_layout + k: v.contiguous() for k, v in scorer.state_dict().items()})
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    tokenizer = tiny_tokenizer(config.text_config.vocab_size)
    tokenizer.save_pretrained(path)
    # Every preprocessing value written out: vLLM normalizes on the device from these, and
    # would otherwise fall back to other defaults than transformers'.
    image = dict(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=8 * 8, max_pixels=max_pixels,
                 do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True, do_convert_rgb=True,
                 image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
                 image_processor_type="Qwen2VLImageProcessor")
    (path / "preprocessor_config.json").write_text(json.dumps(image, indent=1))
    video = "Qwen3VLVideoProcessor" if model_type.startswith("qwen3") else "Qwen2VLVideoProcessor"
    (path / "video_preprocessor_config.json").write_text(json.dumps({**image, "video_processor_type": video},
                                                                    indent=1))
    processor = {"Qwen3VLConfig": "Qwen3VLProcessor"}.get(type(config).__name__, type(config).__name__.replace(
        "Config", "Processor"))
    (path / "processor_config.json").write_text(json.dumps({"processor_class": processor}, indent=1))
    return path
