"""Hugging Face model integrations of VisionSelector (installed as ``vsops.integrations``).

Needs ``transformers`` (4.52+ or 5.x); importing this package does not import it.
"""
from vsops.integrations.qwen2_5_vl import (
    apply_visionselector_to_qwen2_5_vl,
    is_visionselector_applied,
    revert_visionselector,
)
from vsops.integrations.selector import Selection, VisionSelector, register_varlen_attention
from vsops.integrations.varlen_attention import register_reference_varlen_attention, varlen_reference_attention

__all__ = [
    "apply_visionselector_to_qwen2_5_vl",
    "revert_visionselector",
    "is_visionselector_applied",
    "VisionSelector",
    "Selection",
    "register_varlen_attention",
    "register_reference_varlen_attention",
    "varlen_reference_attention",
]
