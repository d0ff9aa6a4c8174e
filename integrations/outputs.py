"""What a patched model returns: its output class extended with the selection, and the
language-model loss on the labels of the kept tokens."""
from __future__ import annotations

import dataclasses

import torch

from vsops.integrations.runtime import Selection
from vsops.varlen import select_and_pad

__all__ = ["attach_selection", "causal_lm_loss"]


def attach_selection(output, selection: Selection | None):
    """``output`` as an instance of its class extended with the fields ``visionselector`` and
    ``constraint_loss``: a plain extra key would not survive the output's pytree round trip
    (DistributedDataParallel and torch.compile rebuild outputs from their class's fields)."""
    if selection is None or not hasattr(output, "keys"):
        return output
    return _output_class(type(output))(
        **output, visionselector=selection, constraint_loss=selection.constraint_loss
    )


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


def causal_lm_loss(loss_function, logits, labels, selection: Selection | None, vocab_size: int) -> torch.Tensor:
    """The model's causal-LM ``loss_function`` on ``logits`` (``[B, L', V]`` padded or
    ``[1, total, V]`` packed) against the ``labels [B, L]`` of the tokens the selection kept."""
    if selection is None or selection.keep is None:
        return loss_function(logits=logits, labels=labels, vocab_size=vocab_size)
    # Each kept token predicts the next kept token of its own sample: never across a sample
    # boundary (packed) nor from a padding slot (padded).
    if selection.cu_seqlens is None:
        padded = select_and_pad(selection.keep, labels, pad_values=-100, counts=selection.lengths)
        kept, real = padded.tensors[0], padded.attention_mask.bool()
        shift = torch.cat([kept[:, 1:], kept.new_full((kept.shape[0], 1), -100)], dim=1).masked_fill(~real, -100)
    else:
        kept = labels[selection.keep]
        shift = torch.cat([kept[1:], kept.new_full((1,), -100)])
        shift[selection.cu_seqlens[1:].long() - 1] = -100
        shift = shift.unsqueeze(0)
    return loss_function(logits=logits, labels=None, shift_labels=shift, vocab_size=vocab_size)
