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
from vsops.ops import validation


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



def check_arguments(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """What the compiled kernels check (``check_divprune_inputs``), for the Python backends;
    returns cu_seqlens contiguous."""
    validation.check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be [total, D], got shape {tuple(x.shape)}")
    validation.check_tensor(k, "k", like=("x", x))
    if k.dtype != torch.long or k.dim() != 1:
        raise TypeError(f"k must be an int64 tensor [S], got {k.dtype} of shape {tuple(k.shape)}")
    cu_seqlens = validation.check_cu_seqlens(cu_seqlens, like=("x", x))
    if k.numel() != cu_seqlens.numel() - 1:
        raise ValueError(f"k must have one entry per segment ({cu_seqlens.numel() - 1}), got {k.numel()}")
    validation.raise_failed(
        validation.cu_seqlens_checks(cu_seqlens, x.shape[0], "the number of tokens")
        + validation.k_bounds_checks(k, cu_seqlens.diff())
    )
    return cu_seqlens


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The op on the backend chosen for ``x`` among those that implement it; the arguments are
    checked first (the compiled kernels check them too, the Python ones rely on this)."""
    cu_seqlens = check_arguments(x, k, cu_seqlens)
    backend = backends.select_implemented(x.device, x.dtype, keep.implemented(), "x")
    return keep(x.contiguous(), k.contiguous(), cu_seqlens, backend=backend)
