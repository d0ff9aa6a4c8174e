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


def implemented() -> list[str]:
    """The backends with this op: the compiled one ("cpu") also serves CUDA tensors where vsops
    was built with CUDA (``backends.select`` only picks "cuda" there)."""
    names = keep.backends()
    return names + ["cuda"] if "cpu" in names else names


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The op on the backend chosen for ``x`` among those that implement it."""
    backend = backends.select_implemented(x.device, x.dtype, implemented())
    return keep(x.contiguous(), k, cu_seqlens, backend=backend)
