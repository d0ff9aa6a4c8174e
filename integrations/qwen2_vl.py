"""VisionSelector inside Hugging Face's Qwen2-VL (transformers 4.57 to 5.25), and the adapter
of the Qwen2-VL family that Qwen2.5-VL and Qwen3-VL extend.

    from vsops.integrations import apply_visionselector_to_qwen2_vl
    apply_visionselector_to_qwen2_vl(model, budget=0.2)       # or None: the classes

The scorer lives at ``visual.importance_scorer`` of the vision tower and scores the merger's
output; the language model takes 3-row M-RoPE positions (4 rows in transformers 5, the first for
text), and kept tokens keep theirs. The vision tower attends over each image or video frame
whole (no windows), so VisionZip reads its last block in the merger's order.
"""
from __future__ import annotations

import inspect

import torch

from vsops.integrations.adapter import ModelAdapter, register_adapter
from vsops.integrations.conventions import ENCODER_OUTPUTS
from vsops.integrations.patching import named_entry_point

__all__ = ["apply_visionselector_to_qwen2_vl", "mm_token_type_ids", "Qwen2VLAdapter"]


class Qwen2VLAdapter(ModelAdapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl",)
    transformers_module = "qwen2_vl"
    class_prefix = "Qwen2VL"
    position_rows = 3
    # transformers 5 may hand precomputed vision features instead of pixels.
    visual_inputs = ("pixel_values", "pixel_values_videos", ENCODER_OUTPUTS)

    def takes_token_types(self) -> bool:
        """Whether the installed transformers' multimodal model takes ``mm_token_type_ids`` (5.x)."""
        return "mm_token_type_ids" in inspect.signature(self.classes()[0].forward).parameters

    def extra_inputs(self, input_ids, config):
        if not self.takes_token_types():
            return {}
        return {"mm_token_type_ids": mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id)}


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None) -> torch.Tensor:
    """int32 ``[B, L]``: 1 at image, 2 at video placeholders of ``input_ids``, 0 elsewhere (the
    Qwen processors' ``mm_token_type_ids``)."""
    kinds = torch.zeros_like(input_ids, dtype=torch.int32)
    kinds[input_ids == image_token_id] = 1
    if video_token_id is not None:
        kinds[input_ids == video_token_id] = 2
    return kinds


ADAPTER = register_adapter(Qwen2VLAdapter())

apply_visionselector_to_qwen2_vl = named_entry_point(ADAPTER, """Puts VisionSelector into Qwen2-VL:
    :func:`vsops.integrations.apply_visionselector` for a ``Qwen2VLForConditionalGeneration`` or
    ``Qwen2VLModel``, or with None for the transformers classes, so that every model created
    afterwards (``from_pretrained`` included) carries the selector. Kept tokens keep their
    original 3-D rope positions.""")
