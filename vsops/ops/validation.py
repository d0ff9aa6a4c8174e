"""Argument checks shared by the operators' public entry points.

Shape, dtype and device errors are found without touching data. Checks that read data
(cu_seqlens bounds, k against segment lengths, NaN) are free on CPU tensors and cost one
host sync, for all of them together, on GPU tensors. Inside ``torch.compile`` the data checks
are skipped (the kernels clamp k and never read out of bounds), since they would break the graph.
"""
from __future__ import annotations

import math

import torch

NAN_POLICIES = ("propagate", "raise")

# Outputs past this size are refused before allocating: more memory than any one machine or GPU
# has, so the size must come from a wrong argument. kMaxAllocationBytes in
# python_bindings/op_common.h is the same limit, for the compiled kernels.
MAX_ALLOCATION_BYTES = 1 << 48


def check_scores(scores, cu_seqlens) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"scores must be a floating-point tensor, got {scores.dtype}")
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(
                f"scores must be [B, N] (or [total] with cu_seqlens), got shape {tuple(scores.shape)}"
            )
        return
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32 (FlashAttention's convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != scores.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but scores is on {scores.device}")
    if scores.dim() != 1:
        raise ValueError(f"with cu_seqlens, scores must be packed [total], got shape {tuple(scores.shape)}")


def check_nan_policy(nan_policy: str) -> None:
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")


def num_segments(scores: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    return scores.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def segment_lengths(scores: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """int64 [S] lengths on the scores' device (no sync)."""
    if cu_seqlens is None:
        return torch.full((scores.shape[0],), scores.shape[1], dtype=torch.long, device=scores.device)
    return (cu_seqlens[1:] - cu_seqlens[:-1]).long()


def k_tensor(k, scores: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """k as a contiguous int64 [S] tensor on the scores' device; checks what needs no data."""
    s = num_segments(scores, cu_seqlens)
    if isinstance(k, torch.Tensor):
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must be an int or an integer tensor, got {k.dtype}")
        if k.dim() == 0:
            k = k.expand(s)
        if k.shape != (s,):
            raise ValueError(f"k must be an int or a [{s}] tensor (one per segment), got shape {tuple(k.shape)}")
        return k.to(device=scores.device, dtype=torch.long, non_blocking=True).contiguous()
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int or an integer tensor, got {type(k).__name__}")
    if cu_seqlens is None and not 0 <= k <= scores.shape[1]:
        raise ValueError(f"k must be in [0, N] = [0, {scores.shape[1]}], got {k}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return torch.full((s,), k, dtype=torch.long, device=scores.device)


def check_data(scores, k: torch.Tensor, cu_seqlens, nan_policy: str, *, bounds_checked: bool = False) -> None:
    """The data-dependent checks, with at most one host sync for all of them.

    ``bounds_checked``: cu_seqlens and k need no check here, because the backend about to run
    checks them itself (the compiled CPU kernels do, for free) or because ``k_tensor`` did (an
    int k for a padded batch); only the NaN policy is left. So a padded GPU batch with an int
    k and nan_policy="propagate" costs no host sync.
    """
    if torch.compiler.is_compiling():
        return
    checks: list[tuple[torch.Tensor, str]] = []
    if bounds_checked:
        if nan_policy == "raise" and torch.isnan(scores).any():
            raise ValueError("scores contain NaN (nan_policy='raise')")
        return
    if cu_seqlens is not None:
        checks += cu_seqlens_checks(cu_seqlens, scores.numel(), "scores.numel()")
    lengths = segment_lengths(scores, cu_seqlens)
    checks.append(((k < 0).any(), "k must be >= 0 in every segment"))
    checks.append(((k > lengths).any(), "k must not exceed the segment's length"))
    if nan_policy == "raise":
        checks.append((torch.isnan(scores).any(), "scores contain NaN (nan_policy='raise')"))
    raise_failed(checks)


def cu_seqlens_checks(cu_seqlens: torch.Tensor, total: int, total_name: str,
                      name: str = "cu_seqlens") -> list[tuple[torch.Tensor, str]]:
    """The (flag, message) checks of cu_seqlens' bounds against ``total`` tokens, unread."""
    c = cu_seqlens
    return [
        (c[0] != 0, f"{name} must start at 0"),
        ((c[1:] < c[:-1]).any(), f"{name} must be non-decreasing"),
        (c[-1] != total, f"{name} must end at {total_name} = {total}"),
    ]


def check_offsets(cu_seqlens, total: int, *, name: str = "cu_seqlens", device=None,
                  total_name: str = "the number of tokens") -> None:
    """An int32 ``[S + 1]`` offsets tensor into ``total`` packed rows (on ``device`` when
    given): its type and shape, then its bounds with one host sync (:func:`cu_seqlens_checks`)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError(f"{name} must be an int32 tensor [S + 1]")
    if cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must have at least one entry, [S + 1]")
    if device is not None and cu_seqlens.device != device:
        raise ValueError(f"{name} is on {cu_seqlens.device}, the tokens on {device}")
    raise_failed(cu_seqlens_checks(cu_seqlens, total, total_name, name))


def raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Reads every flag with one host sync; raises ValueError with the first failed message."""
    flags = torch.stack([flag.reshape(()) for flag, _ in checks]).cpu()
    for bad, (_, message) in zip(flags.tolist(), checks):
        if bad:
            raise ValueError(message)


def check_allocation(shape, dtype: torch.dtype, what: str) -> None:
    """Raises ValueError naming ``what`` (the argument the size comes from) when a tensor of
    ``shape`` and ``dtype`` would exceed :data:`MAX_ALLOCATION_BYTES`, rather than letting the
    allocation fail inside a kernel."""
    if any(size < 0 for size in shape):
        raise ValueError(f"{what} gives a negative size, {tuple(shape)}")
    if math.prod(shape) * dtype.itemsize > MAX_ALLOCATION_BYTES:
        raise ValueError(
            f"{what} asks for a tensor of shape {tuple(shape)} and dtype {dtype}: more than 2^48 bytes, "
            "more memory than any machine has"
        )
