"""The DivPrune selection op (also ``divprune_keep_reference``):

* ``torch.ops.vsops.divprune_keep(x, k, cu_seqlens) -> keep``: ``x`` ``[total, D]`` packed
  tokens of any float dtype, ``k`` int64 ``[S]``, int32 ``cu_seqlens [S + 1]``; returns bool
  ``[total]`` with ``k[s]`` True in segment ``s`` (see ``vsops.reference.divprune_keep``).

Compiled for the CPU; on GPU tensors the reference runs until the CUDA and Triton kernels exist.
Not differentiable (a selection).
"""
from __future__ import annotations

import torch

from vsops import backends, reference
from vsops.ops.registry import Operator


def _keep_fake(x, k, cu_seqlens):
    return x.new_empty((x.shape[0],), dtype=torch.bool)


keep = Operator(
    "divprune_keep",
    "(Tensor x, Tensor k, Tensor cu_seqlens) -> Tensor",
    _keep_fake,
    {"reference": reference.divprune_keep},
)


def divprune_keep(x: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The op on the backend for ``x``'s device: the compiled CPU kernel, else the reference."""
    backend = backends.select(x.device, x.dtype)
    return keep(x.contiguous(), k, cu_seqlens, backend=backend if backend in keep.backends() else "reference")
