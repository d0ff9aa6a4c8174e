"""Static (compilable) caches below budget 1.0.

With a static cache, transformers' ``generate`` turns the caller's 2-D padding mask into 4-D
masks before every forward, so that a compiled step always sees the cache's fixed shape. Two
things follow for a pruned prompt:

- At the prefill, the 4-D mask of the whole prompt arrives. Its key padding is read back from it
  (:func:`prefill_padding`) and the prompt is pruned as with a 2-D mask; the language model then
  makes the 4-D mask of the pruned prompt for the cache itself.
- At a step on the pruned cache, the caller's 2-D mask counts the unpruned sequence while the
  cache's slots hold the pruned one. :class:`GenerateMasks`, which ``generate`` finds as the
  patched model's ``create_masks_for_generate``, rewrites the 2-D mask to the slots before the
  4-D mask is made from it. The 4-D mask keeps the cache's shape whatever the budget, so a
  compiled step is not compiled again for another budget.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from vsops.integrations import conventions

__all__ = ["GenerateMasks", "prefill_padding"]


def prefill_padding(mask, length: int) -> torch.Tensor | None:
    """The key-padding mask, int64 ``[B, length]``, of a prefill's 4-D attention mask.

    Args:
        mask: ``[B, 1 or H, length, C]`` over ``C >= length`` cache slots, this call's tokens in
            the first ``length``; bool (True where a query attends a key) or float (0 there, as
            transformers' additive masks); or a dict of masks per layer type, as transformers
            makes them for models with several (None, or the 2-D padding mask ``[B, length]``
            itself, for layers that take no 4-D mask, such as linear attention).
        length: the tokens of the call.

    Returns:
        1 at the keys that are not padding, when every mask is causal attention over those keys
        and nothing else (what transformers makes from a 2-D mask); None for any other mask
        (sliding windows, bidirectional blocks, packed sequences), which cannot be pruned as a
        padding mask.
    """
    masks = [m for m in mask.values() if m is not None] if isinstance(mask, dict) else [mask]
    found = [_causal_padding(m, length) for m in masks]
    if not found or any(f is None or not torch.equal(f, found[0]) for f in found):
        return None
    return found[0]


def _causal_padding(mask, length: int) -> torch.Tensor | None:
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] == length:
        return mask.long()  # the padding mask itself (linear-attention layers take it so)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[2] != length or mask.shape[3] < length:
        return None
    attends = mask if mask.dtype == torch.bool else mask == 0
    # A token attends itself unless it is padding.
    keys = attends[:, 0, :, :length].diagonal(dim1=1, dim2=2)
    slots = mask.shape[3]
    causal = torch.ones(length, slots, dtype=torch.bool, device=mask.device).tril()
    expected = causal & F.pad(keys, (0, slots - length))[:, None, None, :]
    if not torch.equal(attends, expected.expand_as(attends)):
        return None
    return keys.long()


class GenerateMasks:
    """The patched model's ``create_masks_for_generate`` (an instance attribute, which
    ``generate`` looks up before the class's own or transformers' function): on a cache a
    selector pruned, the caller's 2-D mask (and 4.x's ``cache_position``) are rewritten to the
    cache's slots, then the model's own mask maker makes the 4-D masks from them. The tensors it
    made last are :attr:`made`, which the selector accepts as already in slot coordinates."""

    def __init__(self, model: nn.Module, selector) -> None:
        self.model = model
        self.selector = selector
        self.made: list[torch.Tensor] = []

    def __call__(self, **kwargs):
        cache = conventions.cache_of(kwargs)
        mask = kwargs.get(conventions.ATTENTION_MASK)
        if self.selector.continues_pruned_cache(cache) and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            embeds = next(kwargs[name] for name in conventions.MASK_MAKER_EMBEDS if kwargs.get(name) is not None)
            kwargs = self.selector.slot_inputs(kwargs, cache, conventions.cache_length(cache), embeds.shape[1])
        out = self._original()(**kwargs)
        self.made = list(out.values()) if isinstance(out, dict) else [out]
        return out

    def _original(self):
        """The mask maker ``generate`` would call on the unpatched model."""
        own = inspect.getattr_static(type(self.model), conventions.MASK_MAKER, None)
        if isinstance(own, (staticmethod, classmethod)):
            return own.__get__(None, type(self.model))
        if own is not None:
            return own.__get__(self.model)
        from transformers import masking_utils

        return getattr(masking_utils, conventions.MASK_MAKER)

    def owns(self, mask) -> bool:
        """Whether ``mask`` (a tensor, or a dict of them per layer type) is what this made last."""
        tensors = list(mask.values()) if isinstance(mask, dict) else [mask]
        return bool(tensors) and all(any(t is m for m in self.made) for t in tensors)
