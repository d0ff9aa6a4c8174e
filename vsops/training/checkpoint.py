"""Saving the trained scorer with the published key names, and the training state for resume."""
from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

__all__ = ["SCORER_PREFIX", "save_scorer", "load_scorer", "save_training_state", "load_training_state", "latest_checkpoint"]

# The published VisionSelector checkpoints' key prefix for Qwen2.5-VL (LLaVA-OneVision-1.5
# prefixes "model."); the integration's models load either.
SCORER_PREFIX = "visual.importance_scorer."


def save_scorer(path: str, scorer: nn.Module, *, prefix: str = SCORER_PREFIX, metadata: dict | None = None) -> None:
    """Writes ``scorer``'s weights as safetensors under ``prefix`` (by default
    ``visual.importance_scorer.q_proj.weight`` etc., the published names), in float32.

    ``metadata``: string-valued notes stored in the file header (budget, steps, ...).
    """
    from safetensors.torch import save_file

    tensors = {prefix + k: v.detach().float().contiguous().cpu() for k, v in scorer.state_dict().items()}
    note = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, path + ".tmp", metadata=note)
    os.replace(path + ".tmp", path)  # never leave a half-written scorer behind


def load_scorer(path: str, scorer: nn.Module) -> nn.Module:
    """Loads a scorer file written by :func:`save_scorer` or published with VisionSelector
    (keys under ``visual.importance_scorer.`` or ``model.visual.importance_scorer.``; a
    whole-model safetensors file works too) into ``scorer``, e.g.
    ``model.visionselector.scorer`` of a patched model. Returns ``scorer``."""
    from safetensors.torch import load_file

    from vsops.integrations.loading import SCORER_PREFIXES, scorer_weights

    found = scorer_weights(load_file(path))
    if not found:
        raise ValueError(f"{path} holds no scorer weights (keys starting with one of {SCORER_PREFIXES})")
    scorer.load_state_dict(found)
    return scorer


def save_training_state(directory: str, *, step: int, engine, scorer: nn.Module, config: dict, history: list,
                        is_main: bool = True) -> str:
    """Writes ``directory/step-{step}/`` with ``scorer.safetensors`` and ``state.pt``
    (optimizer, schedule, scaler, config, logged history); returns that path.

    Every process calls it (a sharded engine gathers its state from all of them); the main
    process (``is_main``) writes."""
    path = os.path.join(directory, f"step-{step:07d}")
    state = {"step": step, "engine": engine.state_dict(), "config": config, "history": history}
    with engine.gathered():
        if is_main:
            save_scorer(os.path.join(path, "scorer.safetensors"), scorer, metadata={"step": step})
    if is_main:
        torch.save(state, os.path.join(path, "state.pt.tmp"))
        os.replace(os.path.join(path, "state.pt.tmp"), os.path.join(path, "state.pt"))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    return path


def load_training_state(path: str, *, engine, scorer: nn.Module, config: dict | None = None) -> dict:
    """Restores a :func:`save_training_state` checkpoint into ``engine`` and ``scorer`` (on
    every process); returns the state (``step``, ``config``, ``history``).

    ``config``: the run's configuration; a checkpoint written with another one is refused
    before anything is loaded."""
    state_file = os.path.join(path, "state.pt")
    if not os.path.isfile(state_file):
        raise ValueError(f"{path} is not a training checkpoint (no state.pt)")
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    if config is not None and state["config"] != config:
        raise ValueError(f"{path} was written with another configuration: {state['config']}")
    with engine.gathered():
        load_scorer(os.path.join(path, "scorer.safetensors"), scorer)
    engine.load_state_dict(state["engine"])
    return state


def latest_checkpoint(directory: str) -> str | None:
    """The newest complete ``step-*`` checkpoint under ``directory``, or None."""
    if not os.path.isdir(directory):
        return None
    steps = [
        name for name in os.listdir(directory)
        if re.fullmatch(r"step-\d+", name) and os.path.isfile(os.path.join(directory, name, "state.pt"))
    ]
    return os.path.join(directory, max(steps)) if steps else None
