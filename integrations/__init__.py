"""Hugging Face model integrations of VisionSelector (installed as ``vsops.integrations``).

One model-agnostic runtime (:mod:`.runtime`), one short adapter per model family
(:mod:`.qwen2_vl`, :mod:`.qwen2_5_vl`, :mod:`.qwen3_vl`, :mod:`.qwen3_5`, :mod:`.llava_ov_1_5`), registered by ``config.model_type``::

    from vsops.integrations import apply_visionselector, from_pretrained
    apply_visionselector(model, budget=0.2)                 # any registered model
    model = from_pretrained(path, budget=0.2, trust_remote_code=True)

Needs ``transformers`` (4.57 to 5.25, the range CI tests; LLaVA-OneVision-1.5's remote code runs on 4.57);
importing this package does not import it.
"""
from vsops.integrations.adapter import ModelAdapter, adapter_for, register_adapter, registered_model_types
from vsops.integrations.llava_ov_1_5 import apply_visionselector_to_llava_ov_1_5
from vsops.integrations.loading import from_pretrained
from vsops.integrations.outputs import kept_mask
from vsops.integrations.patching import apply_visionselector, is_visionselector_applied, revert_visionselector
from vsops.integrations.qwen2_5_vl import apply_visionselector_to_qwen2_5_vl
from vsops.integrations.qwen2_vl import apply_visionselector_to_qwen2_vl
from vsops.integrations.qwen3_5 import apply_visionselector_to_qwen3_5, apply_visionselector_to_qwen3_5_moe
from vsops.integrations.qwen3_vl import apply_visionselector_to_qwen3_vl, apply_visionselector_to_qwen3_vl_moe
from vsops.integrations.runtime import Selection, VisionSelector, register_varlen_attention
from vsops.integrations.varlen_attention import register_reference_varlen_attention, varlen_reference_attention

__all__ = [
    "apply_visionselector",
    "revert_visionselector",
    "is_visionselector_applied",
    "kept_mask",
    "from_pretrained",
    "apply_visionselector_to_qwen2_vl",
    "apply_visionselector_to_qwen2_5_vl",
    "apply_visionselector_to_qwen3_vl",
    "apply_visionselector_to_qwen3_vl_moe",
    "apply_visionselector_to_qwen3_5",
    "apply_visionselector_to_qwen3_5_moe",
    "apply_visionselector_to_llava_ov_1_5",
    "registered_model_types",
    "adapter_for",
    "register_adapter",
    "ModelAdapter",
    "VisionSelector",
    "Selection",
    "register_varlen_attention",
    "register_reference_varlen_attention",
    "varlen_reference_attention",
]
