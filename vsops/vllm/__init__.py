"""VisionSelector inside vLLM: an out-of-tree plugin (entry point ``vllm.general_plugins``).

With vsops installed beside vLLM, vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL architectures resolve to
:mod:`vsops.vllm.qwen_vl`'s subclasses, which serve a model as vLLM does unless its config has
a ``visionselector`` entry::

    LLM(model=DIR, hf_overrides={"visionselector": {"budget": 0.2, "method": "visionselector"}})
    python -m vllm.entrypoints.openai.api_server --model DIR \\
        --hf-overrides '{"visionselector": {"budget": 0.2}}'

or the same entry in the checkpoint's ``config.json`` (see :func:`vsops.vllm.settings.settings_of`
for its keys). Nothing in vLLM is changed; importing this package does not import vLLM.
"""
from __future__ import annotations

__all__ = ["ARCHITECTURES", "register"]

# vLLM architecture name -> the vsops class serving it.
ARCHITECTURES = {
    "Qwen2VLForConditionalGeneration": "vsops.vllm.qwen_vl:VisionSelectorQwen2VL",
    "Qwen2_5_VLForConditionalGeneration": "vsops.vllm.qwen_vl:VisionSelectorQwen2_5_VL",
    "Qwen3VLForConditionalGeneration": "vsops.vllm.qwen_vl:VisionSelectorQwen3VL",
}


def register() -> None:
    """vLLM's plugin hook, run in every vLLM process: registers the models (imported lazily,
    when vLLM resolves the architecture) and makes the runners follow their pruning."""
    from vllm import ModelRegistry

    from vsops.vllm.runner import follow_pruning_models

    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
    follow_pruning_models()
