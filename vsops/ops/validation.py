"""Argument checks shared by the operators' public entry points and by their registrations.

Every public function runs its arguments through these before choosing a backend, so the
reference, compiled and Triton backends all see inputs that passed the same checks.

Shape, dtype and device errors are found without touching data. Checks that read data
(cu_seqlens bounds, k against segment lengths, NaN) are free on CPU tensors and cost one
host sync, for all of them together, on GPU tensors. Inside ``torch.compile`` the data checks
are skipped (the kernels clamp k and never read out of bounds), since they would break the graph.

The public functions compute values, so they refuse tensors on the meta device (which hold
none); the raw ops ``torch.ops.vsops.*`` take all-meta arguments (their fake kernels give the
output shapes) but refuse a mix of devices, meta included (:func:`check_op_devices`).
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

NAN_POLICIES = ("propagate", "raise")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Outputs past this size are refused before allocating: more memory than any one machine or GPU
# has, so the size must come from a wrong argument. kMaxAllocationBytes in
# python_bindings/op_common.h is the same limit, for the compiled kernels.
MAX_ALLOCATION_BYTES = 1 << 48


def check_tensor(value, name: str, *, like: tuple[str, torch.Tensor] | None = None) -> None:
    """``value`` is a tensor with data (not on the meta device), on the device of ``like``
    (``(its name, tensor)``) when given."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.device.type == "meta":
        raise ValueError(
            f"{name} is on meta, which holds no data to compute with (for shapes alone, call "
            "torch.ops.vsops.* with every tensor on meta)"
        )
    if like is not None and value.device != like[1].device:
        raise ValueError(f"{name} is on {value.device} but {like[0]} is on {like[1].device}")


def check_float(value, name: str, *, like: tuple[str, torch.Tensor] | None = None) -> None:
    """:func:`check_tensor`, and a dtype the kernels take: float16, bfloat16, float32, float64."""
    check_tensor(value, name, like=like)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {value.dtype}")


def is_integer(t: torch.Tensor) -> bool:
    """Whether ``t`` holds integers (bool, floating and complex tensors do not)."""
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_int(value, name: str, *, minimum: int = 0) -> int:
    """An integer (a Python or NumPy int, not a bool) >= ``minimum``, as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_fill(value, name: str, dtype: torch.dtype) -> None:
    """A real number (not a bool) that ``dtype`` holds exactly: an integral value in range
    for integer and bool tensors (``torch.full`` would truncate 0.5 to 0 silently), any value
    in range (NaN and inf included) for floating ones."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number (int or float), got {type(value).__name__}")
    if dtype.is_floating_point or dtype.is_complex:
        limit = torch.finfo(dtype).max
        if abs(value) > limit and value not in (math.inf, -math.inf):
            raise ValueError(f"{name} = {value} is out of the range of {dtype} (|x| <= {limit})")
        return
    low, high = (0, 1) if dtype == torch.bool else (torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    integral = isinstance(value, numbers.Integral) or (math.isfinite(value) and float(value).is_integer())
    if not (integral and low <= value <= high):
        raise ValueError(f"{name} must be an integer in [{low}, {high}] for {dtype} tensors, got {value}")


def check_cu_seqlens(cu_seqlens, *, like: tuple[str, torch.Tensor], name: str = "cu_seqlens") -> torch.Tensor:
    """An int32 ``[S + 1]`` offsets tensor on the device of ``like``, returned contiguous (the
    kernels read it as a plain array); its bounds are checked by :func:`cu_seqlens_checks`."""
    check_tensor(cu_seqlens, name, like=like)
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must be int32 (FlashAttention's convention), got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{name} must be 1-D [S + 1], got shape {tuple(cu_seqlens.shape)}")
    return cu_seqlens.contiguous()


def check_scores(scores, cu_seqlens) -> torch.Tensor | None:
    """Padded ``[B, N]`` or packed ``[total]`` float scores; returns cu_seqlens contiguous."""
    check_float(scores, "scores")
    if cu_seqlens is None:
        if scores.dim() != 2:
            raise ValueError(
                f"scores must be [B, N] (or [total] with cu_seqlens), got shape {tuple(scores.shape)}"
            )
        return None
    cu_seqlens = check_cu_seqlens(cu_seqlens, like=("scores", scores))
    if scores.dim() != 1:
        raise ValueError(f"with cu_seqlens, scores must be packed [total], got shape {tuple(scores.shape)}")
    return cu_seqlens


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
        check_tensor(k, "k")
        if not is_integer(k):
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


def k_bounds_checks(k: torch.Tensor, lengths: torch.Tensor) -> list[tuple[torch.Tensor, str]]:
    """The (flag, message) checks of ``k [S]`` against the segment ``lengths [S]``, unread."""
    return [
        ((k < 0).any(), "k must be in [0, n] for every segment: k must be >= 0"),
        ((k > lengths).any(), "k must be in [0, n] for every segment: k must not exceed the segment's length n"),
    ]


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
    checks += k_bounds_checks(k, segment_lengths(scores, cu_seqlens))
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


def check_offsets(cu_seqlens, total: int, *, like: tuple[str, torch.Tensor], name: str = "cu_seqlens",
                  total_name: str = "the number of tokens") -> torch.Tensor:
    """:func:`check_cu_seqlens`, then its bounds against ``total`` packed rows with one host
    sync (:func:`cu_seqlens_checks`); returns it contiguous."""
    cu_seqlens = check_cu_seqlens(cu_seqlens, like=like, name=name)
    raise_failed(cu_seqlens_checks(cu_seqlens, total, total_name, name))
    return cu_seqlens


def check_unpack_indices(indices: torch.Tensor, rows: int) -> None:
    """The packed rows' destinations, as the compiled CPU kernel checks them: each in
    ``[0, rows)``, none repeated (a repeat would leave which row lands there unspecified)."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(f"indices must be in [0, batch * length) = [0, {rows}), got {bad}")
    if torch.unique(indices).numel() != indices.numel():
        raise ValueError("indices must not repeat: each packed row has its own destination")


def raise_failed(checks: list[tuple[torch.Tensor, str]]) -> None:
    """Reads every flag with one host sync; raises ValueError with the first failed message."""
    flags = torch.stack([flag.reshape(()) for flag, _ in checks]).cpu()
    for bad, (_, message) in zip(flags.tolist(), checks):
        if bad:
            raise ValueError(message)


def check_op_devices(op: str, names: Sequence[str], args: Sequence) -> torch.device | None:
    """The one device of a raw op's tensor arguments (lists of tensors included); ValueError
    naming the first argument on another device. Meta counts as a device: all-meta arguments
    pass (shape tracing), a meta tensor among real ones does not (the fake kernel would return
    uninitialised memory on the real device)."""
    first: tuple[str, torch.device] | None = None
    for name, value in zip(names, args):
        items = value if isinstance(value, (list, tuple)) else (value,)
        for i, t in enumerate(items):
            if not isinstance(t, torch.Tensor):
                continue
            label = name if items is not value else f"{name}[{i}]"
            if first is None:
                first = (label, t.device)
            elif t.device != first[1]:
                raise ValueError(
                    f"{op}: {label} is on {t.device} but {first[0]} is on {first[1]}; every tensor "
                    "argument must be on one device"
                )
    return None if first is None else first[1]


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
