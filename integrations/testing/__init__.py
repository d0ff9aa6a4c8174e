"""Tiny random multimodal models built from configs (no hub access) and prompt batches for them,
for the tests, the benchmarks and the synthetic training task.

Importing this package imports neither transformers nor lmms-engine.
"""
from vsops.integrations.testing.llava_ov_1_5 import (
    LLAVA_OV_1_5_LAYOUT,
    llava_ov_1_5_batch,
    llava_ov_1_5_model_dir,
    make_tiny_llava_ov_1_5,
    tiny_llava_ov_1_5_config,
)
from vsops.integrations.testing.prompts import TEXT_IDS, TOKENS, PromptLayout, multimodal_batch
from vsops.integrations.testing.qwen_vl import (
    QWEN2_5_VL_LAYOUT,
    QWEN3_VL_LAYOUT,
    QWEN_VL_MODEL_TYPES,
    qwen2_5_vl_batch,
    qwen_vl_batch,
    tiny_qwen2_5_vl_config,
    tiny_qwen_vl_config,
)

__all__ = [
    "TOKENS",
    "TEXT_IDS",
    "PromptLayout",
    "multimodal_batch",
    "QWEN_VL_MODEL_TYPES",
    "QWEN2_5_VL_LAYOUT",
    "QWEN3_VL_LAYOUT",
    "tiny_qwen_vl_config",
    "tiny_qwen2_5_vl_config",
    "qwen_vl_batch",
    "qwen2_5_vl_batch",
    "LLAVA_OV_1_5_LAYOUT",
    "tiny_llava_ov_1_5_config",
    "llava_ov_1_5_model_dir",
    "make_tiny_llava_ov_1_5",
    "llava_ov_1_5_batch",
]
