"""The ``visionselector`` entry of a model's config, as vLLM serves it, read and checked once."""
from __future__ import annotations

import dataclasses
import json

from vsops.budget import check_budget
from vsops.methods import VISUAL_TOKENS, available, make_method, method_class

__all__ = ["CONFIG_KEY", "ServingSettings", "settings_of"]

CONFIG_KEY = "visionselector"
_KEYS = ("budget", "method", "scope")


@dataclasses.dataclass(frozen=True)
class ServingSettings:
    """What the plugin does for one served model.

    Attributes:
        budget: the fraction of each image's (and video's) visual tokens kept, in (0, 1).
        method: a registered selection method that needs only the visual tokens.
        options: the method's keyword arguments (none for the learned scorer, whose weights
            come from the checkpoint).
    """

    budget: float
    method: str = "visionselector"
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def needs_scorer(self) -> bool:
        return self.method == "visionselector"


def settings_of(config) -> ServingSettings | None:
    """The plugin's settings from ``config.visionselector`` (a dict, or its JSON: set by
    ``hf_overrides`` / ``--hf-overrides``, or in the checkpoint's ``config.json``); None where
    the model is served as vLLM serves it (no entry, or budget 1.0).

    The entry's keys: ``budget`` (default 0.2), ``method`` (default ``"visionselector"``, the
    learned scorer), ``scope`` (only ``"image"``: vLLM fixes each image's placeholder count
    before its encoder runs, so a budget shared by a prompt's images cannot be served), and the
    method's options. Anything else is a ValueError naming the key, raised at engine start-up.
    """
    entry = getattr(config, CONFIG_KEY, None)
    if entry is None:
        return None
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except json.JSONDecodeError as e:
            raise ValueError(f"the model config's {CONFIG_KEY!r} entry is not JSON: {e}") from None
    if not isinstance(entry, dict):
        raise ValueError(f"the model config's {CONFIG_KEY!r} entry must be a dict, got {type(entry).__name__}")
    try:
        budget = check_budget(entry.get("budget", 0.2), f"{CONFIG_KEY}.budget")
    except TypeError as e:
        raise ValueError(str(e)) from None
    scope = entry.get("scope", "image")
    if scope != "image":
        raise ValueError(
            f"{CONFIG_KEY}.scope must be 'image' under vLLM (got {scope!r}): vLLM fixes each image's placeholder "
            "count before its encoder runs, so one budget shared by a prompt's images cannot be served"
        )
    method = entry.get("method", "visionselector")
    if method not in available():
        raise ValueError(f"{CONFIG_KEY}.method {method!r} is not a registered method; registered: {available()}")
    if method_class(method).stage == "language":
        raise ValueError(
            f"{CONFIG_KEY}.method {method!r} drops tokens inside the language model, which the vLLM plugin does not "
            "do (vLLM's scheduler sizes each request's KV cache from its prompt); use a vision-stage method: "
            f"{available('vision')}"
        )
    if method_class(method).needs - {VISUAL_TOKENS}:
        raise ValueError(
            f"{CONFIG_KEY}.method {method!r} reads the vision tower's attention, which the vLLM plugin does not "
            "capture; use a method that needs only the visual tokens"
        )
    options = {k: v for k, v in entry.items() if k not in _KEYS}
    if method == "visionselector" and options:
        raise ValueError(f"{CONFIG_KEY}: the learned scorer takes no options, got {sorted(options)}")
    if method != "visionselector":
        try:
            make_method(method, **options)
        except TypeError as e:
            raise ValueError(f"{CONFIG_KEY}: the {method!r} method's options {sorted(options)}: {e}") from None
    if budget == 1.0:
        return None
    return ServingSettings(budget, method, options)
