"""PyramidDrop (Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via
Pyramid Visual Redundancy Reduction", CVPR 2025) as plain functions: one drop's selection, and
the ratio that makes several drops keep a budget on average over the layers."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from vsops.budget import check_budget
from vsops.methods.fastv import fastv

__all__ = ["DEFAULT_DROP_LAYERS", "pdrop", "pdrop_layers", "pdrop_ratio"]

# The published drops of a 32-layer model.
DEFAULT_DROP_LAYERS = (8, 16, 24)
_PUBLISHED_DEPTH = 32


def pdrop(query: torch.Tensor, key: torch.Tensor, visual: torch.Tensor, k: int) -> torch.Tensor:
    """One PyramidDrop drop: bool ``[L]``, True at every non-visual position and at the ``k``
    visual tokens the last position (the instruction's last token) attends to most, in one
    layer's causal softmax attention averaged over heads (:func:`~vsops.methods.fastv` with
    ``rows="last"``; arguments as there). Ties go to the lower index; the published code ranks
    with ``torch.topk`` and reads the image as one span from its first token."""
    return fastv(query, key, visual, k, rows="last")


def pdrop_layers(num_layers: int, drop_layers: Sequence[int] | None = None) -> tuple[int, ...]:
    """The layers the drops come before: ``drop_layers``, or the published 8, 16, 24 of 32
    scaled to ``num_layers`` (rounded, at least 1, increasing, below ``num_layers``)."""
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 2:
        raise ValueError(f"num_layers must be an int >= 2, got {num_layers!r}")
    if drop_layers is None:
        scaled = sorted({max(1, round(layer * num_layers / _PUBLISHED_DEPTH)) for layer in DEFAULT_DROP_LAYERS})
        drop_layers = [layer for layer in scaled if layer < num_layers]
    layers = tuple(drop_layers)
    if not layers or any(isinstance(x, bool) or not isinstance(x, int) for x in layers) or \
            list(layers) != sorted(set(layers)) or layers[0] < 1 or layers[-1] >= num_layers:
        raise ValueError(f"drop_layers must be increasing ints in [1, {num_layers - 1}], got {drop_layers!r}")
    return layers


def pdrop_ratio(budget: float, num_layers: int, drop_layers: Sequence[int] | None = None) -> float:
    """The ratio λ each drop keeps of the visual tokens left, such that the visual tokens kept,
    averaged over the ``num_layers`` layers, are ``budget`` of them: with drops before layers
    ``l_1 < ... < l_S`` (:func:`pdrop_layers`), ``sum_i (l_{i+1} - l_i) λ^i / num_layers =
    budget`` (``l_0 = 0``, ``l_{S+1} = num_layers``), solved by bisection to 1e-12.

    The layers before the first drop see every token, so ``budget`` must be at least
    ``l_1 / num_layers`` (a ValueError names the least). Budget 1.0 gives λ = 1.
    """
    budget = check_budget(budget)
    layers = pdrop_layers(num_layers, drop_layers)
    bounds = (0, *layers, num_layers)
    spans = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    least = spans[0] / num_layers
    if budget <= least:
        raise ValueError(f"budget must exceed {least:g} with drops before layers {list(layers)} of {num_layers}: "
                         "the layers before the first drop see every visual token")

    def average(ratio: float) -> float:
        return sum(span * ratio ** i for i, span in enumerate(spans)) / num_layers

    low, high = 0.0, 1.0
    while high - low > 1e-12:
        middle = (low + high) / 2
        low, high = (middle, high) if average(middle) < budget else (low, middle)
    return high
