"""What a patched model returns: its output class extended with the selection, the
language-model loss on the labels of the kept tokens, and an MoE model's router balance loss
over the tokens its language model saw."""
from __future__ import annotations

import dataclasses
import sys

import torch

from vsops.integrations.runtime import Selection
from vsops.varlen import select_and_pad

__all__ = ["attach_selection", "causal_lm_loss", "kept_mask", "replaced", "router_balance_loss", "routes_experts"]


def kept_mask(output, attention_mask: torch.Tensor | None, shape: tuple[int, int] | None = None) -> torch.Tensor:
    """bool ``[B, L]``: the tokens of a call its language model saw. From the output's
    ``visionselector`` where the call selected; where it pruned nothing (budget 1.0: the output
    is the unpatched model's, without that field), every token the caller's ``attention_mask``
    holds (all ``shape = (B, L)`` tokens without one)."""
    selection = output.get("visionselector") if hasattr(output, "get") else None
    if selection is not None and selection.keep is not None:
        return selection.keep
    if attention_mask is not None:
        return attention_mask.bool()
    if shape is None:
        raise ValueError("the call pruned nothing and passed no attention_mask: give its shape (B, L)")
    return torch.ones(shape, dtype=torch.bool)


def attach_selection(output, selection: Selection | None):
    """``output`` as an instance of its class extended with the fields ``visionselector`` and
    ``constraint_loss``: a plain extra key would not survive the output's pytree round trip
    (DistributedDataParallel and torch.compile rebuild outputs from their class's fields)."""
    if selection is None or not hasattr(output, "keys"):
        return output
    return replaced(output, _output_class(type(output)), visionselector=selection,
                    constraint_loss=selection.constraint_loss)


def replaced(output, cls=None, **changes):
    """``output`` as a ``cls`` (its own class by default) with the fields ``changes``. Keys
    that are not fields of the class (transformers 4.57 records e.g. ``router_logits`` into
    outputs whose class lacks that field) are carried over as keys."""
    cls = type(output) if cls is None else cls
    fields = {f.name for f in dataclasses.fields(cls)}
    values = {**dict(output.items()), **changes}
    out = cls(**{k: v for k, v in values.items() if k in fields})
    for key, value in values.items():
        if key not in fields:
            out[key] = value
    return out


def _output_class(cls):
    if "visionselector" in getattr(cls, "__dataclass_fields__", {}):
        return cls
    name = cls.__name__ + "WithVisionSelector"
    extended = globals().get(name)
    if extended is None:
        extended = dataclasses.make_dataclass(
            name,
            [("visionselector", Selection | None, None), ("constraint_loss", torch.Tensor | None, None)],
            bases=(cls,),
            namespace={"__module__": __name__},
        )
        globals()[name] = extended  # importable by name, so outputs pickle
    return extended


def causal_lm_loss(loss_function, logits, labels, selection: Selection | None, vocab_size: int,
                   **loss_kwargs) -> torch.Tensor:
    """The model's causal-LM ``loss_function`` on ``logits`` (``[B, L', V]`` padded or
    ``[1, total, V]`` packed) against the ``labels [B, L]`` of the tokens the selection kept.

    ``loss_kwargs`` are what the model hands its loss function besides the labels:
    ``num_items_in_batch`` (the Trainer's gradient accumulation) goes through; ``shift_labels
    [B, L]`` (the target of each position, which transformers prefers to shifting the labels)
    is read as the labels they shift: a kept token's target is its next kept token's label."""
    shift_labels = loss_kwargs.pop("shift_labels", None)
    if selection is None or selection.keep is None:
        if shift_labels is not None:
            loss_kwargs["shift_labels"] = shift_labels
        return loss_function(logits=logits, labels=labels, vocab_size=vocab_size, **loss_kwargs)
    if shift_labels is not None:
        labels = torch.cat([shift_labels.new_full((shift_labels.shape[0], 1), -100), shift_labels[:, :-1]], dim=1)
    # Each kept token predicts the next kept token of its own sample: never across a sample
    # boundary (packed) nor from a padding slot (padded).
    if selection.cu_seqlens is None:
        padded = select_and_pad(selection.keep, labels, pad_values=-100, counts=selection.lengths,
                                padding_side=selection.padding_side)
        kept, real = padded.tensors[0], padded.attention_mask.bool()
        shift = torch.cat([kept[:, 1:], kept.new_full((kept.shape[0], 1), -100)], dim=1).masked_fill(~real, -100)
    else:
        kept = labels[selection.keep]
        shift = torch.cat([kept[1:], kept.new_full((1,), -100)])
        shift[selection.cu_seqlens[1:].long() - 1] = -100
        shift = shift.unsqueeze(0)
    return loss_function(logits=logits, labels=None, shift_labels=shift, vocab_size=vocab_size, **loss_kwargs)


def routes_experts(model) -> bool:
    """Whether ``model`` (a ``...ForConditionalGeneration``) adds its MoE routers' balance loss
    to its output (transformers' ``load_balancing_loss_func`` of its module)."""
    return _balance_function(model) is not None


def router_balance_loss(model, router_logits, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """The model's router load-balancing loss (what transformers returns as ``aux_loss``) over
    the tokens its language model saw: ``router_logits`` (one ``[tokens, experts]`` tensor per
    MoE layer) with the language model's own ``attention_mask`` ``[B, L']`` (the pruned
    layout's, or None for packed tokens); a float32 scalar."""
    text = model.config.get_text_config()
    return _balance_function(model)(router_logits, text.num_experts, text.num_experts_per_tok, attention_mask)


def _balance_function(model):
    return getattr(sys.modules.get(type(model).__module__), "load_balancing_loss_func", None)
