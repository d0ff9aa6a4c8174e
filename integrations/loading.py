"""Loading a model with VisionSelector from a checkpoint, whichever registered family it is,
remote code included, and reading the scorer's weights in the published key layouts."""
from __future__ import annotations

import dataclasses
import json

import torch
from torch import nn

from vsops.integrations.adapter import adapter_for
from vsops.integrations.patching import Settings, attach
from vsops.integrations.runtime import VisionSelector
from vsops.scorer import SCORER_PREFIXES

__all__ = ["from_pretrained", "SCORER_PREFIXES", "scorer_weights", "read_scorer_weights", "checkpoint_keys"]


def scorer_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The scorer's entries of a state dict (keys under one of :data:`SCORER_PREFIXES`), with
    the prefix removed (``q_proj.weight``, ...); empty when there are none."""
    for prefix in SCORER_PREFIXES:
        found = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if found:
            return found
    return {}


def checkpoint_keys(path, **hub_kwargs) -> dict[str, list[str]]:
    """The tensor names of a checkpoint (a directory or hub id with ``model.safetensors`` or a
    sharded ``model.safetensors.index.json``) by the file that holds them, empty when it has
    neither (e.g. ``pytorch_model.bin`` only); reads the index or the file's header only."""
    from safetensors import safe_open

    index = _resolve(path, "model.safetensors.index.json", hub_kwargs)
    if index is not None:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        files: dict[str, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(name, []).append(key)
        return files
    single = _resolve(path, "model.safetensors", hub_kwargs)
    if single is None:
        return {}
    with safe_open(single, "pt") as f:
        return {"model.safetensors": list(f.keys())}


def read_scorer_weights(path, keys: dict[str, list[str]] | None = None, **hub_kwargs) -> dict[str, torch.Tensor]:
    """The scorer's tensors of a checkpoint (see :func:`checkpoint_keys`, whose answer ``keys``
    may be passed), reading only those tensors; empty when the checkpoint has no scorer. A
    ValueError when it has no safetensors."""
    from safetensors import safe_open

    if keys is None:
        keys = checkpoint_keys(path, **hub_kwargs)
    if not keys:
        raise ValueError(f"{path} has no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name, names in keys.items():
        wanted = [k for k in names if k.startswith(SCORER_PREFIXES)]
        if wanted:
            with safe_open(_resolve(path, name, hub_kwargs), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in wanted})
    return scorer_weights(tensors)


def _resolve(path, name: str, hub_kwargs: dict):
    from transformers.utils import cached_file

    return cached_file(str(path), name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def from_pretrained(
    path,
    *,
    budget: float = 0.2,
    scope: str = "sample",
    method=None,
    packed: bool | None = None,
    allow_missing_scorer: bool = False,
    **hf_kwargs,
) -> nn.Module:
    """Loads a model with VisionSelector applied and its scorer read from the checkpoint.

    Reads the config, picks the registered adapter by ``config.model_type``, loads the model
    with ``hf_kwargs`` passed through (``trust_remote_code``, ``dtype`` / ``torch_dtype``,
    ``device_map``, ``attn_implementation``, ...), applies the selector and loads the scorer
    weights from the checkpoint's safetensors (single file or sharded) under
    ``visual.importance_scorer.*`` or ``model.visual.importance_scorer.*``. The scorer's
    projection size is the checkpoint's. A checkpoint whose tensors do not fit its config in a
    way transformers would load silently wrong (e.g. Qwen3-VL's deepstack mergers) is a
    ValueError, before the load.

    Args:
        path: a checkpoint directory (or hub id).
        budget, scope, packed: see :func:`vsops.integrations.apply_visionselector`.
        method: the selection method (a name of :func:`vsops.methods.available` or a
            :class:`~vsops.methods.SelectionMethod`); None: the learned scorer. A
            training-free method needs no scorer in the checkpoint.
        allow_missing_scorer: load a checkpoint without scorer weights, with the scorer
            initialized as published (normal, std 1e-4; biases 0) for training; otherwise such
            a checkpoint is a ValueError when the learned scorer selects.

    Returns:
        The model (eval mode, as transformers loads it), with ``model.visionselector``.
    """
    from transformers import AutoConfig

    # The settings are checked before the (long) load.
    settings = Settings(budget=budget, scope=scope, packed=packed, method=method)
    learned = settings.update(VisionSelector(None)).method.trainable
    if not isinstance(allow_missing_scorer, bool):
        raise TypeError(f"allow_missing_scorer must be a bool, got {type(allow_missing_scorer).__name__}")
    hub = {k: hf_kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in hf_kwargs}
    config = AutoConfig.from_pretrained(path, trust_remote_code=hf_kwargs.get("trust_remote_code", False), **hub)
    adapter = adapter_for(config.model_type)
    keys = checkpoint_keys(path, **hub)
    adapter.check_checkpoint(config, [k for names in keys.values() for k in names])
    # A training-free method selects without the scorer; it is attached (initialized) all the same.
    weights = read_scorer_weights(path, keys, **hub) if learned else {}
    if not weights and learned and not allow_missing_scorer:
        raise ValueError(
            f"{path} holds no scorer weights (keys under {SCORER_PREFIXES}); pass allow_missing_scorer=True "
            "to start from a freshly initialized scorer"
        )
    proj_dim = None
    if "q_proj.weight" in weights:
        proj_dim = weights["q_proj.weight"].shape[0]
    model = adapter.load(path, **hf_kwargs)
    hidden = adapter.scorer_size(adapter.split(model)[1])
    if "q_proj.weight" in weights and weights["q_proj.weight"].shape[1] != hidden:
        raise ValueError(
            f"the checkpoint's scorer takes {weights['q_proj.weight'].shape[1]}-dim tokens but the model's "
            f"merger emits {hidden}: q_proj.weight is {tuple(weights['q_proj.weight'].shape)}"
        )
    scorer = attach(adapter, model, dataclasses.replace(settings, proj_dim=proj_dim)).scorer
    if weights:
        _load_checked(scorer, weights)
    else:
        scorer.reset_parameters()  # a class-patched model's scorer went through transformers' init
    return model


def _load_checked(scorer: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    expected = scorer.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ValueError(f"the checkpoint's scorer keys do not fit the model: missing {missing}, unexpected {unexpected}")
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise ValueError(
                f"the checkpoint's scorer {key} is {tuple(value.shape)}, the model's {tuple(expected[key].shape)}"
            )
    scorer.load_state_dict(weights)
