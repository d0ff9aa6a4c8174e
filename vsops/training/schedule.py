"""The paper's schedules (Sections 3.4 and 4.2): the curriculum weight of the constraint loss
and the learning rate's warm-up and cosine decay."""
from __future__ import annotations

import math

__all__ = ["constraint_weight", "cosine_with_warmup"]


def _check_progress(step: int, total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive int, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
        raise ValueError(f"step must be an int in [0, total_steps={total_steps}], got {step!r}")


def constraint_weight(step: int, total_steps: int, start: float = 0.1, end: float = 2.0) -> float:
    """``λ_t`` of Eq. 9 at optimizer step ``step`` (0-based) of ``total_steps``: linear from
    ``start`` at the first step to ``end`` at the last (the paper: 0.1 to 2.0).

    A single-step run uses ``start``.
    """
    _check_progress(step, total_steps)
    if total_steps == 1:
        return float(start)
    return start + (end - start) * min(step, total_steps - 1) / (total_steps - 1)


def cosine_with_warmup(step: int, total_steps: int, warmup_ratio: float = 0.03) -> float:
    """The learning-rate multiplier at optimizer step ``step`` (0-based): linear warm-up over
    ``ceil(warmup_ratio * total_steps)`` steps, starting above zero so the first step already
    moves, then cosine decay to zero at ``total_steps`` (the paper: 3% warm-up)."""
    _check_progress(step, total_steps)
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))
