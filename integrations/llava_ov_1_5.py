"""VisionSelector inside LLaVA-OneVision-1.5 (remote code, transformers 4.57).

The model ships as remote code (``trust_remote_code=True``): its classes exist only once a
checkpoint is loaded, so it is patched per instance, or loaded patched::

    from vsops.integrations import from_pretrained
    model = from_pretrained("path/to/VisionSelector-LLaVA-OV-1.5-8B", budget=0.2, trust_remote_code=True)

As published: the scorer (text hidden size -> hidden / 2) sits at ``model.visual.importance_scorer``
and scores the merger's output, with one budget over all visual tokens of a sample (and, beyond
the published code, ``scope="image"``: one per image or video); the language model (Qwen3) takes
1-D rope positions, and kept tokens keep theirs; decode positions continue at the unpruned
length.
"""
from __future__ import annotations

from vsops.integrations.adapter import ModelAdapter, register_adapter
from vsops.integrations.patching import named_entry_point

__all__ = ["apply_visionselector_to_llava_ov_1_5", "LlavaOneVision1_5Adapter"]


class LlavaOneVision1_5Adapter(ModelAdapter):
    name = "llava_ov_1_5"
    model_types = ("llavaonevision1_5",)
    position_rows = 1
    remote_code = True
    vision_class_token = True  # RICE opens each image with a CLS token

    def class_names(self):
        return "LLaVAOneVision1_5_ForConditionalGeneration", "LLaVAOneVision1_5_Model"

    def load(self, path, **hf_kwargs):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **hf_kwargs)


ADAPTER = register_adapter(LlavaOneVision1_5Adapter())

apply_visionselector_to_llava_ov_1_5 = named_entry_point(ADAPTER, """Puts VisionSelector into a loaded
    LLaVA-OneVision-1.5 (``LLaVAOneVision1_5_ForConditionalGeneration`` or its
    ``LLaVAOneVision1_5_Model``): :func:`vsops.integrations.apply_visionselector` with this
    model's adapter. The model must be an instance (remote code has no classes to patch before
    loading: None is a ValueError saying so).""")
