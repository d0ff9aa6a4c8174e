"""VisionSelector inside Hugging Face's Qwen3.5 and Qwen3.5-MoE (transformers 5.x), natively
multimodal.

    from vsops.integrations import apply_visionselector_to_qwen3_5
    apply_visionselector_to_qwen3_5(model, budget=0.2)        # or None: the classes

Its language model interleaves Gated DeltaNet (linear attention, a recurrent state in the
cache) with full-attention layers. Pruned tokens are dropped before the first layer, so the
recurrent state never sees them; the kept tokens are re-padded on the left and the padding mask
reaches the linear layers too. They are never packed: transformers' linear-attention layers do
not keep packed sequences apart. Positions are the interleaved M-RoPE ones the unpatched model
computes for the full sequence (videos as frames, each after its timestamp text); no deepstack.
"""
from __future__ import annotations

from vsops.integrations.adapter import register_adapter
from vsops.integrations.patching import named_entry_point
from vsops.integrations.qwen2_vl import Qwen2VLAdapter

__all__ = ["apply_visionselector_to_qwen3_5", "apply_visionselector_to_qwen3_5_moe", "Qwen3_5Adapter",
           "Qwen3_5MoeAdapter"]


class Qwen3_5Adapter(Qwen2VLAdapter):
    name = "qwen3_5"
    model_types = ("qwen3_5",)
    transformers_module = "qwen3_5"
    class_prefix = "Qwen3_5"
    min_transformers = (5, 0)
    # Checked in transformers 5.23: the layers' short convolution runs over the whole packed
    # row (its torch path takes no sequence bounds, the causal-conv1d kernel gets none), and the
    # torch path of the delta rule refuses sequence bounds without flash-linear-attention.
    unpackable = ("the Gated DeltaNet layers of transformers' Qwen3.5 do not keep packed sequences apart (their "
                  "convolution spans the sequence bounds); the kept tokens are re-padded instead")


class Qwen3_5MoeAdapter(Qwen3_5Adapter):
    name = "qwen3_5_moe"
    model_types = ("qwen3_5_moe",)
    transformers_module = "qwen3_5_moe"
    class_prefix = "Qwen3_5Moe"


ADAPTER = register_adapter(Qwen3_5Adapter())
MOE_ADAPTER = register_adapter(Qwen3_5MoeAdapter())

apply_visionselector_to_qwen3_5 = named_entry_point(ADAPTER, """Puts VisionSelector into Qwen3.5:
    :func:`vsops.integrations.apply_visionselector` for a ``Qwen3_5ForConditionalGeneration`` or
    ``Qwen3_5Model``, or with None for the transformers classes. Kept tokens keep their original
    3-D rope positions; the linear-attention layers' state sees the kept tokens only.""")

apply_visionselector_to_qwen3_5_moe = named_entry_point(MOE_ADAPTER, """Puts VisionSelector into Qwen3.5-MoE
    (``Qwen3_5MoeForConditionalGeneration`` or ``Qwen3_5MoeModel``, or with None the transformers
    classes): as :func:`apply_visionselector_to_qwen3_5`.""")
