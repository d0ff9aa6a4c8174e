"""The one rule that turns a retention budget into a token count."""
from __future__ import annotations

import math

import torch

from vsops.ops.validation import check_tensor, is_integer

__all__ = ["budget_to_k", "check_budget"]

# Absorbs float error in budget * n (0.3 * 10 = 2.9999999999999996) without ever adding a token.
_EPS = 1e-6


def check_budget(budget: float, name: str = "budget") -> float:
    """Returns ``budget`` as a float, or raises if it is not a number in (0, 1]."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(budget).__name__}")
    budget = float(budget)
    if not (0.0 < budget <= 1.0):  # also rejects NaN
        raise ValueError(f"{name} must be in (0, 1], got {budget}")
    return budget


def budget_to_k(n: int | torch.Tensor, budget: float) -> int | torch.Tensor:
    """Tokens kept out of ``n`` at retention ``budget``: ``max(1, floor(budget * n + 1e-6))``,
    clamped to ``n`` (so an empty segment keeps 0 and a non-empty one keeps at least 1).

    Args:
        n: segment length, an int >= 0 or an integer tensor of lengths >= 0 (any shape;
            checked on CPU tensors, and trusted on GPU tensors, where reading them would sync).
        budget: fraction of tokens to keep, in (0, 1].

    Returns:
        An int, or an int64 tensor of the shape and device of ``n``.
    """
    budget = check_budget(budget)
    if isinstance(n, torch.Tensor):
        check_tensor(n, "n")
        if not is_integer(n):
            raise TypeError(f"n must be an integer tensor, got {n.dtype}")
        n = n.long()
        if n.device.type == "cpu" and not torch.compiler.is_compiling() and bool((n < 0).any()):
            raise ValueError(f"n must be >= 0, got a length of {int(n.min())}")
        k = torch.floor(n.double() * budget + _EPS).long().clamp(min=1)
        return torch.minimum(k, n)
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int or an integer tensor, got {type(n).__name__}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return min(n, max(1, math.floor(budget * n + _EPS)))
