"""One training example and the collation of examples into a model's batch."""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["Example", "collate", "collate_for_model"]


@dataclasses.dataclass
class Example:
    """One tokenized conversation with its images.

    Attributes:
        input_ids: int64 ``[L]``, the whole conversation, answer included.
        labels: int64 ``[L]``, ``input_ids`` where the loss applies, -100 elsewhere.
        pixel_values: float ``[patches, patch_dim]``, the images' patches as the vision tower
            takes them (``Qwen2VLImageProcessor`` layout); ``[0, patch_dim]`` without images.
        image_grid_thw: int64 ``[images, 3]``.
        prompt_length: tokens before the first answer token (the prompt a model answers).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    prompt_length: int


def collate(examples: list[Example], *, pad_token_id: int = 0, config=None, prompt_only: bool = False) -> dict:
    """Pads examples into model inputs.

    Args:
        examples: the batch.
        pad_token_id: the id padding slots get.
        config: the model's config, when its forward takes per-token inputs besides
            ``input_ids`` (its adapter's ``extra_inputs``, e.g. Qwen2.5-VL's
            ``mm_token_type_ids`` in transformers 5).
        prompt_only: cut every example at its ``prompt_length`` and pad on the left, so that
            ``logits[:, -1]`` is each example's answer prediction (evaluation); otherwise the
            whole conversation, padded on the right, with ``labels``.

    Returns:
        ``input_ids``, ``attention_mask`` (int64 ``[B, L]``), ``labels`` (unless
        ``prompt_only``), ``pixel_values`` and ``image_grid_thw`` when any example has images,
        and the model's extra per-token inputs.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    rows = [(e.input_ids[: e.prompt_length] if prompt_only else e.input_ids) for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (row, example) in enumerate(zip(rows, examples)):
        span = slice(width - len(row), width) if prompt_only else slice(0, len(row))
        input_ids[i, span] = row
        attention_mask[i, span] = 1
        if not prompt_only:
            labels[i, span] = example.labels
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if not prompt_only:
        batch["labels"] = labels
    with_images = [e for e in examples if e.image_grid_thw.numel()]
    if with_images:
        batch["pixel_values"] = torch.cat([e.pixel_values for e in with_images])
        batch["image_grid_thw"] = torch.cat([e.image_grid_thw for e in with_images])
    if config is not None:
        from vsops.integrations import adapter_for

        batch.update(adapter_for(config.model_type).extra_inputs(input_ids, config))
    return batch


def collate_for_model(examples: list[Example], config, *, prompt_only: bool = False) -> dict:
    """:func:`collate` with the padding and extra inputs of the model of ``config``."""
    pad = getattr(config, "pad_token_id", None)
    return collate(examples, pad_token_id=0 if pad is None else pad, config=config, prompt_only=prompt_only)
