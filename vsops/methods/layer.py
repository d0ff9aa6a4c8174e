"""Methods that drop visual tokens inside the language model (FastV, PyramidDrop, DART): what a
method reads at a drop, and the keep mask it returns for one sequence. The integration runtime
(:mod:`vsops.integrations.layer_drops`) runs them at the layers they name and removes the
dropped tokens from every later layer."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from vsops.budget import budget_to_k, check_budget
from vsops.methods.base import Selected, SelectionMethod
from vsops.methods.dart import dart
from vsops.methods.fastv import ROWS, causal_attention_received
from vsops.methods.pdrop import pdrop_layers, pdrop_ratio
from vsops.methods.registry import available, make_method, register_method
from vsops.methods.sequence import top_indices
from vsops.ops import validation

__all__ = [
    "LAYER_ATTENTION",
    "LAYER_HIDDEN",
    "LayerState",
    "LayerMethod",
    "FastVMethod",
    "PDropMethod",
    "DARTMethod",
    "Stages",
    "attention_received_by_rows",
]

# What a method reads at a drop before layer K: the queries and keys of layer K - 1 after the
# rotary embedding (LAYER_ATTENTION), and the hidden state entering layer K (LAYER_HIDDEN).
LAYER_ATTENTION = "layer_attention"
LAYER_HIDDEN = "layer_hidden"


@dataclasses.dataclass
class LayerState:
    """One sequence (no padding) at a drop before layer ``layer``.

    Attributes:
        layer: the first layer that sees the kept tokens only.
        visual: bool ``[L]``, the visual tokens still present.
        segment: int64 ``[L]``: the budget segment of each visual token (its image or video
            numbered from 0 with ``scope="image"``, else 0), -1 at text.
        query: ``[L, Hq, d]``: layer ``layer - 1``'s queries after rotary embedding.
        key: ``[L, Hkv, d]``: its keys after rotary embedding (``Hq`` a multiple of ``Hkv``).
        hidden: ``[L, D]``: the state entering layer ``layer``, through the model's final norm;
            None unless the method needs :data:`LAYER_HIDDEN`.
    """

    layer: int
    visual: torch.Tensor
    segment: torch.Tensor
    query: torch.Tensor
    key: torch.Tensor
    hidden: torch.Tensor | None = None


class LayerMethod(SelectionMethod):
    """A method that acts inside the language model: before each of its drop layers it keeps
    ``k`` of the visual tokens still present in each segment, and the layers from there on see
    only those. Subclasses implement :meth:`drop_layers`, :meth:`kept` and :meth:`keep`."""

    needs = frozenset({LAYER_ATTENTION})
    stage = "language"

    def drop_layers(self, num_layers: int) -> tuple[int, ...]:
        """The increasing layers before which the drops happen, each in ``[1, num_layers)``
        (layer ``K`` is the first to see the kept tokens; the attention read is layer
        ``K - 1``'s)."""
        raise NotImplementedError

    def kept(self, n: int, budget: float, num_layers: int, drop: int) -> int:
        """Visual tokens a segment of ``n`` (those still present) keeps at the ``drop``-th
        drop (from 0) at ``budget``."""
        raise NotImplementedError

    def reaches(self, budget: float, num_layers: int) -> bool:
        """Whether the method can keep ``budget`` in a language model of ``num_layers``."""
        return True

    def keep(self, state: LayerState, k: Sequence[int]) -> torch.Tensor:
        """bool ``[L]``: True at every non-visual position and at ``k[s]`` visual tokens of
        each segment ``s``."""
        raise NotImplementedError

    def select(self, x, k, cu_seqlens) -> Selected:
        raise TypeError(f"the {self.name!r} method drops tokens inside the language model, from the attention there; "
                        "it has no selection on the visual tokens alone (use it in a model, or its plain function)")

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


def _check_layer(layer, name: str = "layer") -> int:
    layer = validation.check_int(layer, name)
    if layer < 1:
        raise ValueError(f"{name} must be >= 1 (the drop reads the layer before it), got {layer}")
    return layer


def _within(layer: int | None, num_layers: int, name: str = "layer") -> tuple[int, ...]:
    if layer is None:
        # The published layer 2, or the last but one of a language model of 2 layers.
        return (max(1, min(2, num_layers - 1)),)
    if layer >= num_layers:
        raise ValueError(f"{name} must be below the language model's {num_layers} layers, got {layer}")
    return (layer,)


def attention_received_by_rows(query: torch.Tensor, key: torch.Tensor, rows: str) -> torch.Tensor:
    """:func:`~vsops.methods.causal_attention_received`, with the last row's attention (which
    sees every position, so needs no causal mask) taken by the fused
    :func:`vsops.attention_received` operator; float32 ``[L]`` (float64 for float64 input)."""
    if rows != "last" or query.shape[0] == 0:
        return causal_attention_received(query, key, rows=rows)
    from vsops.ops.attention_received import attention_received

    groups = query.shape[1] // key.shape[1]
    return attention_received(query[-1:], key.repeat_interleave(groups, dim=1))


def _top_per_segment(scores: torch.Tensor, state: LayerState, k: Sequence[int]) -> torch.Tensor:
    keep = ~state.visual
    for s, count in enumerate(k):
        where = (state.segment == s).nonzero().squeeze(1)
        keep[where[top_indices(scores[where], count)]] = True
    return keep


@register_method
class FastVMethod(LayerMethod):
    """FastV (ECCV 2024): before layer ``layer`` (default 2, as published; 1 in a language
    model of 2 layers), keep the visual tokens that
    receive the most attention in layer ``layer - 1``, averaged over heads and over the query
    rows (``rows="all"``, as the published runs) or the last row (``rows="last"``); per
    segment ``budget_to_k(n, budget)``, ties to the lower index (:func:`vsops.methods.fastv`
    on each segment)."""

    name = "fastv"

    def __init__(self, layer: int | None = None, rows: str = "all"):
        if rows not in ROWS:
            raise ValueError(f"rows must be one of {ROWS}, got {rows!r}")
        self.layer, self.rows = None if layer is None else _check_layer(layer), rows

    def drop_layers(self, num_layers):
        return _within(self.layer, num_layers)

    def kept(self, n, budget, num_layers, drop):
        return budget_to_k(n, budget)

    def keep(self, state, k):
        return _top_per_segment(attention_received_by_rows(state.query, state.key, self.rows), state, k)


@register_method
class PDropMethod(LayerMethod):
    """PyramidDrop (CVPR 2025): drops before ``layers`` (default the published 8, 16, 24 of 32
    scaled to the model's depth, :func:`~vsops.methods.pdrop_layers`), each keeping ``λ`` of
    the visual tokens still present (``budget_to_k(n, λ)`` per segment), ranked by the last
    position's attention in the layer before, ties to the lower index. ``λ`` is
    :func:`~vsops.methods.pdrop_ratio`: the kept fraction averaged over the layers is the
    budget."""

    name = "pdrop"

    def __init__(self, layers: Sequence[int] | None = None):
        if layers is not None:
            layers = tuple(_check_layer(layer, "layers") for layer in layers)
        self.layers = layers

    def drop_layers(self, num_layers):
        return pdrop_layers(num_layers, self.layers)

    def kept(self, n, budget, num_layers, drop):
        return budget_to_k(n, pdrop_ratio(budget, num_layers, self.layers))

    def reaches(self, budget, num_layers):
        try:
            pdrop_ratio(budget, num_layers, self.layers)
        except ValueError:
            return False
        return True

    def keep(self, state, k):
        return _top_per_segment(attention_received_by_rows(state.query, state.key, "last"), state, k)


@register_method
class DARTMethod(LayerMethod):
    """DART (2025): before layer ``layer`` (default 2, as published; 1 in a language model of 2
    layers), keep per segment exactly
    ``budget_to_k(n, budget)`` visual tokens: the pivots of largest key norm (layer
    ``layer - 1``'s keys) and those least similar to the pivots in the state entering the layer
    through the final norm (:func:`vsops.methods.dart` on each segment, the text pivots taken
    from the text after the segment's last visual token)."""

    name = "dart"
    needs = frozenset({LAYER_ATTENTION, LAYER_HIDDEN})

    def __init__(self, layer: int | None = None, image_pivots: int = 4, text_pivots: int = 4):
        self.layer = None if layer is None else _check_layer(layer)
        self.image_pivots = validation.check_int(image_pivots, "image_pivots")
        self.text_pivots = validation.check_int(text_pivots, "text_pivots")

    def drop_layers(self, num_layers):
        return _within(self.layer, num_layers)

    def kept(self, n, budget, num_layers, drop):
        return budget_to_k(n, budget)

    def keep(self, state, k):
        keep = ~state.visual
        for s, count in enumerate(k):
            in_segment = state.segment == s
            keep |= dart(state.hidden, state.key, in_segment, count, image_pivots=self.image_pivots,
                         text_pivots=self.text_pivots) & in_segment
        return keep


class Stages(SelectionMethod):
    """A vision-stage method followed by a method inside the language model: ``vision``
    keeps ``vision_budget`` of the visual tokens before the language model, then ``language``
    keeps the selector's budget of those it was handed. The output's
    :class:`~vsops.integrations.runtime.Selection` reports the overall kept fraction.

    Example: the learned scorer at 0.5, then FastV keeping half of the rest at layer 2::

        model.visionselector.method = Stages("visionselector", 0.5, "fastv")
        model.visionselector.budget = 0.5
    """

    name = "stages"

    def __init__(self, vision, vision_budget: float, language):
        self.vision = vision if vision == "visionselector" else make_method(vision)
        if isinstance(self.vision, LayerMethod):
            raise ValueError(f"vision must be a method of the vision stage, got the in-LM {self.vision.name!r}")
        self.vision_budget = check_budget(vision_budget, "vision_budget")
        self.language = make_method(language)
        if not isinstance(self.language, LayerMethod):
            raise ValueError(f"language must be a method inside the language model ({available('language')}), got "
                             f"{getattr(self.language, 'name', self.language)!r}")

    @property
    def needs(self):
        return getattr(self.vision, "needs", frozenset()) | self.language.needs

    def select(self, x, k, cu_seqlens) -> Selected:
        raise TypeError("Stages runs in a model; select with its vision method")

    def __repr__(self) -> str:
        return f"Stages({self.vision!r}, {self.vision_budget}, {self.language!r})"

