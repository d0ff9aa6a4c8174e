"""The DivPrune selection op (also ``divprune_keep_triton`` and ``divprune_keep_reference``):

* ``torch.ops.vsops.divprune_keep(x, k, cu_seqlens) -> keep``: ``x`` ``[total, D]`` packed
  tokens of any float dtype, ``k`` int64 ``[S]``, int32 ``cu_seqlens [S + 1]``; returns bool
  ``[total]`` with ``k[s]`` True in segment ``s`` (see ``vsops.reference.divprune_keep``).

Compiled for the CPU and (in CUDA builds) for CUDA, and in Triton. Not differentiable (a
selection).
"""
from __future__ import annotations

import torch

from vsops import backends, reference
from vsops.ops.registry import Operator
from vsops.ops.validation import check_offsets


def _triton_divprune():
    from vsops.triton import divprune

    return divprune


def _keep_fake(x, k, cu_seqlens):
    return x.new_empty((x.shape[0],), dtype=torch.bool)


keep = Operator(
    "divprune_keep",
    "(Tensor x, Tensor k, Tensor cu_seqlens) -> Tensor",
    _keep_fake,
    {"reference": reference.divprune_keep, "triton": lambda *a: _triton_divprune().divprune_keep(*a)},
)



def check_arguments(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """What the compiled kernels check (``check_divprune_inputs``), for the Python backends."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
        raise TypeError(f"x must be a floating-point tensor [total, D], got {getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(k, torch.Tensor) or k.dtype != torch.long or k.dim() != 1:
        raise TypeError("k must be an int64 tensor [S]")
    if k.device != x.device:
        raise ValueError(f"k must be on the device of x ({x.device})")
    check_offsets(cu_seqlens, x.shape[0], device=x.device)
    if k.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"k must have one entry per segment ({cu_seqlens.numel() - 1}), got {k.numel()}")
    lengths = cu_seqlens.diff()
    if bool(((k < 0) | (k > lengths)).any()):
        raise ValueError("k must be in [0, n] for every segment")


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The op on the backend chosen for ``x`` among those that implement it; the arguments are
    checked first (the compiled kernels check them too, the Python ones rely on this)."""
    check_arguments(x, k, cu_seqlens)
    backend = backends.select_implemented(x.device, x.dtype, keep.implemented())
    return keep(x.contiguous(), k, cu_seqlens, backend=backend)
