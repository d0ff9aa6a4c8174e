"""vLLM's model runners told that a VisionSelector model rewrites its media positions.

A runner calls the model's ``recompute_mrope_positions`` after the encoder only when its
``is_multimodal_pruning_enabled`` is set. The GPU runner sets it from ``video_pruning_rate``
alone, and the CPU runner never does; so after either loads a model, the flag is also set
where the model prunes (vsops' models whose config has a ``visionselector`` entry). Nothing
else of the runners changes.
"""
from __future__ import annotations

import functools
import importlib

__all__ = ["follow_pruning_models"]

_RUNNERS = (
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner"),
    ("vllm.v1.worker.cpu_model_runner", "CPUModelRunner"),
)
_MARK = "_vsops_follows_pruning"


def follow_pruning_models() -> None:
    """Wraps each runner class's own ``load_model`` (once) to set its flag from the model's."""
    for module_name, class_name in _RUNNERS:
        try:
            runner = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            continue  # a vLLM build without this runner
        load = runner.__dict__.get("load_model")
        if load is None or getattr(load, _MARK, False):
            continue

        @functools.wraps(load)
        def load_model(self, *args, _load=load, **kwargs):
            _load(self, *args, **kwargs)
            if getattr(self.get_model(), "visionselector", None) is not None:
                self.is_multimodal_pruning_enabled = True

        setattr(load_model, _MARK, True)
        runner.load_model = load_model
