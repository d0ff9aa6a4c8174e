"""VisionSelector inside Hugging Face's Qwen2.5-VL (transformers 4.52+ and 5.x).

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    apply_visionselector_to_qwen2_5_vl(budget=0.2)            # classes: models created later
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(...)
    apply_visionselector_to_qwen2_5_vl(model, budget=0.2)     # or one instance
    model.visionselector.budget = 0.1                         # any time; or per call:
    model(**inputs, visionselector_budget=0.3)

The scorer lives at ``visual.importance_scorer`` of the vision tower, so the published
checkpoints' keys load unchanged; it scores the merger's output. The language model takes 3-row
M-RoPE positions (4 rows in transformers 5, the first for text).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from vsops.integrations.adapter import ModelAdapter, register_adapter
from vsops.integrations.patching import apply_visionselector
from vsops.integrations.runtime import VisionSelector

__all__ = ["apply_visionselector_to_qwen2_5_vl", "mm_token_type_ids", "Qwen2_5_VLAdapter"]


class Qwen2_5_VLAdapter(ModelAdapter):
    name = "qwen2_5_vl"
    model_types = ("qwen2_5_vl",)
    position_rows = 3
    # transformers 5 may hand precomputed vision features instead of pixels.
    visual_inputs = ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")

    def classes(self):
        try:
            import transformers
            from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
        except ImportError as e:  # pragma: no cover - exercised only without transformers
            raise ImportError("the Qwen2.5-VL integration needs transformers >= 4.52") from e
        from packaging.version import Version

        # 4.52 split the model into Qwen2_5_VLModel(visual, language_model), which the hooks target.
        if Version(transformers.__version__).release < (4, 52):
            raise ImportError(f"the Qwen2.5-VL integration needs transformers >= 4.52 (found {transformers.__version__})")
        return modeling.Qwen2_5_VLModel, modeling.Qwen2_5_VLForConditionalGeneration

    def class_names(self):
        return "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLModel"

    def load(self, path, **hf_kwargs):
        return self.classes()[1].from_pretrained(path, **hf_kwargs)

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

    def extra_inputs(self, input_ids, config):
        kinds = mm_token_type_ids(input_ids, config.image_token_id, config.video_token_id)
        return {} if kinds is None else {"mm_token_type_ids": kinds}


ADAPTER = register_adapter(Qwen2_5_VLAdapter())


def apply_visionselector_to_qwen2_5_vl(
    model: nn.Module | None = None,
    *,
    budget: float = 0.2,
    scope: str = "sample",
    proj_dim: int | None = None,
    packed: bool | None = None,
    method=None,
) -> VisionSelector | None:
    """Puts VisionSelector into Qwen2.5-VL: :func:`vsops.integrations.apply_visionselector`
    for a ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2_5_VLModel``, or with None for the
    transformers classes, so that every model created afterwards (``from_pretrained``
    included) carries the selector. Kept tokens keep their original 3-D rope positions."""
    settings = dict(budget=budget, scope=scope, proj_dim=proj_dim, packed=packed, method=method)
    if model is None:
        return apply_visionselector(None, model_type=ADAPTER.name, **settings)
    ADAPTER.split(model)  # a TypeError naming the classes for any other module
    return apply_visionselector(model, model_type=ADAPTER.name, **settings)


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None):
    """The ``mm_token_type_ids`` (int32 ``[B, L]``: 1 at image, 2 at video placeholders, 0
    elsewhere) for ``input_ids`` where the installed transformers' Qwen2.5-VL takes them
    (5.x); None where it does not (4.x)."""
    inner_cls, _ = ADAPTER.classes()
    if "mm_token_type_ids" not in inspect.signature(inner_cls.forward).parameters:
        return None
    kinds = torch.zeros_like(input_ids, dtype=torch.int32)
    kinds[input_ids == image_token_id] = 1
    if video_token_id is not None:
        kinds[input_ids == video_token_id] = 2
    return kinds
