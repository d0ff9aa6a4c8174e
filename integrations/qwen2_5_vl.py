"""VisionSelector inside Hugging Face's Qwen2.5-VL (transformers 4.57 to 5.25).

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    apply_visionselector_to_qwen2_5_vl(budget=0.2)            # classes: models created later
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(...)
    apply_visionselector_to_qwen2_5_vl(model, budget=0.2)     # or one instance
    model.visionselector.budget = 0.1                         # any time; or per call:
    model(**inputs, visionselector_budget=0.3)

The scorer lives at ``visual.importance_scorer`` of the vision tower, so the published
checkpoints' keys load unchanged; it scores the merger's output. The language model takes 3-row
M-RoPE positions (4 rows in transformers 5, the first for text). Qwen2-VL's adapter with the
vision tower's window order.
"""
from __future__ import annotations

import torch

from vsops.integrations.adapter import register_adapter
from vsops.integrations.patching import named_entry_point
from vsops.integrations.qwen2_vl import Qwen2VLAdapter

__all__ = ["apply_visionselector_to_qwen2_5_vl", "Qwen2_5_VLAdapter"]


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    transformers_module = "qwen2_5_vl"
    class_prefix = "Qwen2_5_VL"

    def vision_merged_order(self, tower, grid):
        # The tower runs its blocks on merge units in window order and restores the order after
        # the merger; the attention layer's rows follow the window order.
        if hasattr(tower, "get_window_index"):  # transformers 4.x
            window_index, _ = tower.get_window_index(grid)
        else:
            from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

            window_index, _ = modeling.get_vision_window_index(
                grid, spatial_merge_size=tower.spatial_merge_size, window_size=tower.window_size,
                patch_size=tower.patch_size,
            )
        return torch.argsort(window_index)


ADAPTER = register_adapter(Qwen2_5_VLAdapter())

apply_visionselector_to_qwen2_5_vl = named_entry_point(ADAPTER, """Puts VisionSelector into Qwen2.5-VL:
    :func:`vsops.integrations.apply_visionselector` for a ``Qwen2_5_VLForConditionalGeneration``
    or ``Qwen2_5_VLModel``, or with None for the transformers classes, so that every model
    created afterwards (``from_pretrained`` included) carries the selector. Kept tokens keep
    their original 3-D rope positions.""")
