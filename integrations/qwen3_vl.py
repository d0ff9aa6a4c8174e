"""VisionSelector inside Hugging Face's Qwen3-VL and Qwen3-VL-MoE (transformers 4.57 to 5.25).

    from vsops.integrations import apply_visionselector_to_qwen3_vl
    apply_visionselector_to_qwen3_vl(model, budget=0.2)       # or None: the classes

Qwen3-VL's language model adds "deepstack" features of the vision tower's middle blocks to the
hidden states of its first layers at the visual tokens: it takes ``visual_pos_masks`` (bool
``[B, L]``) and ``deepstack_visual_embeds`` (one ``[visual tokens, D]`` tensor per deepstack
layer, rows in the order of the visual tokens). After pruning both describe the kept tokens
only: the mask is gathered with the kept tokens (so it is the pruned layout's), the deepstack
rows with the kept visual tokens, all in one pack each; in training the soft mask scales a
visual token's deepstack rows as it scales its embedding. Positions are the interleaved M-RoPE
ones the unpatched model computes for the full sequence (videos as frames, each after its
timestamp text), kept tokens keep theirs. The scorer scores the merger's output, as on Qwen2.5-VL.
"""
from __future__ import annotations

import re

from vsops.integrations.adapter import TOKENS, VISUAL_ROWS, register_adapter
from vsops.integrations.patching import named_entry_point
from vsops.integrations.qwen2_vl import Qwen2VLAdapter

__all__ = ["apply_visionselector_to_qwen3_vl", "apply_visionselector_to_qwen3_vl_moe", "Qwen3VLAdapter",
           "Qwen3VLMoeAdapter"]

_DEEPSTACK_KEY = re.compile(r"(?:^|\.)visual\.deepstack_merger_list\.(\d+)\.")


class Qwen3VLAdapter(Qwen2VLAdapter):
    name = "qwen3_vl"
    model_types = ("qwen3_vl",)
    transformers_module = "qwen3_vl"
    class_prefix = "Qwen3VL"
    token_inputs = {"visual_pos_masks": TOKENS, "deepstack_visual_embeds": VISUAL_ROWS}

    def check_checkpoint(self, config, keys):
        """A checkpoint whose deepstack mergers (``visual.deepstack_merger_list.<i>``) are not
        one per layer of ``vision_config.deepstack_visual_indexes``: transformers would leave
        the missing ones random, or drop the extra ones, without an error."""
        found = sorted({int(m.group(1)) for key in keys if (m := _DEEPSTACK_KEY.search(key))})
        layers = list(config.vision_config.deepstack_visual_indexes)
        if found != list(range(len(layers))):
            raise ValueError(
                f"the checkpoint has {len(found)} deepstack mergers (visual.deepstack_merger_list.{found}) but its "
                f"config's vision_config.deepstack_visual_indexes lists {len(layers)} layers {layers}: the "
                "checkpoint and its config.json do not belong together"
            )


class Qwen3VLMoeAdapter(Qwen3VLAdapter):
    name = "qwen3_vl_moe"
    model_types = ("qwen3_vl_moe",)
    transformers_module = "qwen3_vl_moe"
    class_prefix = "Qwen3VLMoe"


ADAPTER = register_adapter(Qwen3VLAdapter())
MOE_ADAPTER = register_adapter(Qwen3VLMoeAdapter())

apply_visionselector_to_qwen3_vl = named_entry_point(ADAPTER, """Puts VisionSelector into Qwen3-VL:
    :func:`vsops.integrations.apply_visionselector` for a ``Qwen3VLForConditionalGeneration`` or
    ``Qwen3VLModel``, or with None for the transformers classes. Kept tokens keep their original
    3-D rope positions and their deepstack features; pruned ones lose both.""")

apply_visionselector_to_qwen3_vl_moe = named_entry_point(MOE_ADAPTER, """Puts VisionSelector into
    Qwen3-VL-MoE (``Qwen3VLMoeForConditionalGeneration`` or ``Qwen3VLMoeModel``, or with None the
    transformers classes): as :func:`apply_visionselector_to_qwen3_vl`.""")
