"""Which implementation runs an operator, per call.

GPU tensors: compiled CUDA kernels, then Triton, then the PyTorch reference. A GPU the build has
no code for (an arch older than every compiled one, say) is found by asking the CUDA runtime on
its first call, once per device; its calls then go to Triton, with one warning.
CPU tensors: compiled CPU kernels, then the PyTorch reference (Triton runs CPU tensors only
under ``TRITON_INTERPRET=1``, and only when forced, since the interpreter is for testing).
``VSOPS_BACKEND=reference|cpu|cuda|triton`` forces one backend for every call; forcing a
backend that cannot serve a call raises instead of silently falling back.
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

__all__ = ["BACKENDS", "BackendUnavailable", "compiled_extension", "available", "select", "TRITON_DTYPES"]

BACKENDS = ("cuda", "triton", "cpu", "reference")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    from vsops import _C as _compiled

    _COMPILED_ERROR: str | None = None
except ImportError as exc:  # the package can still run on the reference backend
    _compiled = None
    _COMPILED_ERROR = str(exc)


def compiled_extension():
    """The ``vsops._C`` module, or None when it was not built; see ``compiled_error()``."""
    return _compiled


def compiled_error() -> str | None:
    return _COMPILED_ERROR


# Fixed for the life of the process; read once so that per-call selection (which also runs
# while torch.compile traces) only reads the environment.
_COMPILED_CUDA = _compiled is not None and _compiled.built_with_cuda() and torch.cuda.is_available()
_TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
_CUDA_DEVICE = torch.cuda.is_available()


class BackendUnavailable(ValueError, RuntimeError):
    """``VSOPS_BACKEND`` forces a backend that cannot run the call's tensors. A ValueError (the
    tensors' device or dtype is wrong for it) and, as it was first, a RuntimeError."""


def triton_runs_on(device: torch.device) -> bool:
    """Whether Triton kernels can run tensors on ``device``: CUDA ones, or CPU ones under the
    interpreter (``TRITON_INTERPRET=1``, read per call)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


# Device index -> whether the compiled CUDA kernels run on it; filled on each GPU's first call.
_CUDA_KERNELS_RUN: dict[int, bool] = {}


def _cuda_kernel_error(index: int) -> str | None:
    """Why the compiled CUDA kernels cannot run on GPU ``index``; None when they can."""
    error = _compiled.cuda_kernel_error(index)
    if error is None:
        return None
    major, minor = torch.cuda.get_device_capability(index)
    return f"{error} (compute capability {major}.{minor}; rebuild with VSOPS_CUDA_ARCHS including {major}{minor})"


# Called while torch.compile traces too: the answer is a constant of the process.
@torch.compiler.assume_constant_result
def cuda_kernels_run_on(device: torch.device) -> bool:
    """Whether the compiled CUDA kernels can run on this GPU; warns once per GPU when not."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CUDA_KERNELS_RUN:
        error = _cuda_kernel_error(index)
        if error is not None:
            warnings.warn(
                f"vsops: the compiled CUDA kernels cannot run on cuda:{index}: {error}. "
                "Its calls use the Triton kernels instead.",
                RuntimeWarning,
                stacklevel=2,
            )
        _CUDA_KERNELS_RUN[index] = error is None
    return _CUDA_KERNELS_RUN[index]


def available() -> dict[str, bool]:
    """Backends usable in this process (for any device)."""
    return {
        "cuda": _COMPILED_CUDA,
        "triton": _TRITON_IMPORTABLE and (_CUDA_DEVICE or os.environ.get("TRITON_INTERPRET") == "1"),
        "cpu": _compiled is not None,
        "reference": True,
    }


def _can_serve(backend: str, device: torch.device, dtype: torch.dtype, have: dict[str, bool]) -> bool:
    if not have[backend]:
        return False
    if backend == "cuda":
        return device.type == "cuda" and cuda_kernels_run_on(device)
    if backend == "cpu":
        return device.type == "cpu"
    if backend == "triton":
        return dtype in TRITON_DTYPES and triton_runs_on(device)
    return True


# What each backend runs, for the error that a forced one cannot serve a call.
_SERVES = {
    "cuda": "CUDA tensors (in a CUDA build)",
    "cpu": "CPU tensors (vsops._C built)",
    "triton": "float16, bfloat16 and float32 CUDA tensors, or CPU ones under TRITON_INTERPRET=1",
    "reference": "every tensor",
}


def default_order(device: torch.device) -> tuple[str, ...]:
    return ("cuda", "triton", "reference") if device.type == "cuda" else ("cpu", "reference")


def select(device: torch.device, dtype: torch.dtype, what: str = "the tensors") -> str:
    """The backend that runs a call on tensors of this device and dtype; ``what`` names them
    in the error raised when ``VSOPS_BACKEND`` forces a backend that cannot."""
    forced = os.environ.get("VSOPS_BACKEND", "").strip().lower()
    have = available()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"VSOPS_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        if not _can_serve(forced, device, dtype, have):
            why = ""
            if forced in ("cpu", "cuda") and _compiled is None:
                why = f"; vsops._C failed to import: {_COMPILED_ERROR}"
            elif forced == "cuda" and have["cuda"] and device.type == "cuda":
                why = "; the compiled kernels have no code for this GPU (see the warning)"
            raise BackendUnavailable(
                f"VSOPS_BACKEND={forced} cannot run {what} ({dtype} on {device.type}): it runs "
                f"{_SERVES[forced]}{why}"
            )
        return forced
    for backend in default_order(device):
        if _can_serve(backend, device, dtype, have):
            return backend
    raise AssertionError("the reference backend serves every call")


def select_implemented(device: torch.device, dtype: torch.dtype, implemented, what: str = "the tensors") -> str:
    """:func:`select` for an op that only some backends implement: the chosen backend when it
    has the op, else the first of the default order that has it and can serve the call (the
    reference always can)."""
    chosen = select(device, dtype, what)
    if chosen in implemented:
        return chosen
    have = available()
    return next(
        (b for b in default_order(device) if b in implemented and _can_serve(b, device, dtype, have)), "reference"
    )
