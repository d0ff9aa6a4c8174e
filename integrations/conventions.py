"""transformers' call conventions, read in one place.

transformers renames the keywords its models are called with (the KV cache went from
``past_key_values`` to ``cache`` in 5.24; ``cache_position`` left the Qwen models in 5.0; some
models name their cache ``cache_params``), and callers still pass the old names, which the
models rename inside ``forward``. The hooks see a call before that renaming, so every reading of
a call's keywords by name goes through this module: a rename in a later release is one change
here, and ``tests/test_conventions.py`` checks each name against the installed transformers'
models, so that it fails there rather than as a silently wrong answer.

Where a call does not say which cache it continues in a way this module knows, it raises
(:class:`ValueError`) instead of guessing.
"""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

__all__ = [
    "ATTENTION_MASK",
    "CACHE_KEYWORDS",
    "CACHE_POSITION",
    "ENCODER_OUTPUTS",
    "INPUTS_EMBEDS",
    "INPUT_IDS",
    "LABELS",
    "LOSS_KEYWORDS",
    "MASK_MAKER",
    "MASK_MAKER_EMBEDS",
    "OUTPUT_ROUTER_LOGITS",
    "POSITION_IDS",
    "RETURN_DICT",
    "USE_CACHE",
    "cache_length",
    "cache_of",
    "keywords",
    "new_token_count",
    "takes",
    "with_cache",
]

# The KV cache, newest name first: ``cache`` (5.24+), ``past_key_values`` (4.x to 5.23, still
# accepted with a deprecation warning), ``cache_params`` (recurrent-state models).
CACHE_KEYWORDS = ("cache", "past_key_values", "cache_params")
# The positions of the new tokens in the caller's sequence: taken by 4.x models and remote code,
# gone from transformers' own models in 5.x (which derive positions from position_ids).
CACHE_POSITION = "cache_position"
POSITION_IDS = "position_ids"
ATTENTION_MASK = "attention_mask"
INPUT_IDS = "input_ids"
INPUTS_EMBEDS = "inputs_embeds"
USE_CACHE = "use_cache"
LABELS = "labels"
# What a causal LM hands its loss function besides the labels: the Trainer's gradient
# accumulation count and labels already shifted (padding-free training).
LOSS_KEYWORDS = ("shift_labels", "num_items_in_batch")
RETURN_DICT = "return_dict"
OUTPUT_ROUTER_LOGITS = "output_router_logits"
# Vision features computed before the forward (``generate`` and callers of 5.x hand them over
# instead of pixels); absent in 4.x.
ENCODER_OUTPUTS = "mm_encoder_outputs"
# What generate calls, on the model when it has one, to turn the 2-D mask into the 4-D masks of a
# static (compilable) cache before each forward; it is given the call's shape as an empty tensor
# under ``inputs_embeds`` (5.x) or ``input_embeds`` (4.x).
MASK_MAKER = "create_masks_for_generate"
MASK_MAKER_EMBEDS = ("inputs_embeds", "input_embeds")


@functools.lru_cache(maxsize=None)
def _parameters(forward) -> tuple[frozenset[str], tuple[str, ...]]:
    """The names a forward's signature has, and those it takes positionally (read once per
    forward: the hooks ask at every call)."""
    signature = inspect.signature(forward)  # follows functools.wraps through transformers' decorators
    positional = tuple(
        name for name, p in signature.parameters.items()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and name != "self"
    )
    return frozenset(signature.parameters), positional


def takes(module: nn.Module, name: str) -> bool:
    """Whether ``module``'s forward names the keyword ``name`` in its signature."""
    return name in _parameters(type(module).forward)[0]


def keywords(module: nn.Module, args: tuple, kwargs: dict) -> dict:
    """The arguments of a call to ``module`` all by keyword: positional ``args`` bound to the
    names of its forward's parameters, as the forward itself would bind them. A TypeError for
    more positional arguments than the forward names, or an argument given twice."""
    if not args:
        return dict(kwargs)
    names = _parameters(type(module).forward)[1]
    if len(args) > len(names):
        raise TypeError(f"{type(module).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    out = dict(kwargs)
    for name, value in zip(names, args):
        if name in out:
            raise TypeError(f"{type(module).__name__}.forward got {name!r} both by position and by keyword")
        out[name] = value
    return out


def cache_of(kwargs: dict):
    """The KV cache a call passes (under any of :data:`CACHE_KEYWORDS`), or None.

    Raises ValueError when the call passes two different caches under different names, or a
    transformers ``Cache`` under a keyword this module does not know (a rename it has not
    learned: the selector could not tell whether the call continues a cache it pruned).
    """
    found = [(name, kwargs[name]) for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len({id(value) for _, value in found}) > 1:
        names = " and ".join(name for name, _ in found)
        raise ValueError(f"the call passes two different caches ({names}); pass one")
    unknown = [name for name, value in kwargs.items() if name not in CACHE_KEYWORDS and _is_cache(value)]
    if unknown:
        raise ValueError(
            f"the call passes a KV cache as {unknown[0]!r}, a keyword VisionSelector does not know (it knows "
            f"{list(CACHE_KEYWORDS)}): it cannot tell whether the call continues a cache it pruned. This "
            "transformers is newer than vsops supports; see vsops.integrations.conventions"
        )
    return found[0][1] if found else None


def with_cache(kwargs: dict, cache, module: nn.Module) -> dict:
    """``kwargs`` passing ``cache`` under the keyword the call already uses for its cache (even
    if that is None), or else the one ``module``'s forward takes."""
    present = [name for name in CACHE_KEYWORDS if name in kwargs]
    if present:
        name = present[0]
    else:
        taken = [name for name in CACHE_KEYWORDS if takes(module, name)]
        if not taken:
            raise ValueError(f"{type(module).__name__}.forward takes none of {list(CACHE_KEYWORDS)}: VisionSelector "
                             "cannot hand it the cache it prunes")
        name = taken[0]
    return {**{k: v for k, v in kwargs.items() if k not in CACHE_KEYWORDS}, name: cache}


def cache_length(cache) -> int:
    """The tokens ``cache`` holds (0 for None). A TypeError for anything that is not a
    transformers cache (e.g. the legacy tuple of tuples), whose length and origin the selector
    cannot read."""
    if cache is None:
        return 0
    if not _is_cache(cache):
        raise TypeError(f"the KV cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}")
    return int(cache.get_seq_length())


def _is_cache(value) -> bool:
    try:
        from transformers.cache_utils import Cache
    except ImportError:  # pragma: no cover - the integrations need transformers
        return False
    return isinstance(value, Cache)


def new_token_count(kwargs: dict) -> tuple[int, torch.device] | None:
    """How many tokens a call brings per sample and where, from ``input_ids`` or
    ``inputs_embeds``; None when it passes neither."""
    tokens = kwargs.get(INPUT_IDS)
    if tokens is None:
        tokens = kwargs.get(INPUTS_EMBEDS)
    return None if tokens is None else (tokens.shape[1], tokens.device)
