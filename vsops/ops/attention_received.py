"""The attention-received op (also ``attention_received_triton`` and
``attention_received_reference``):

* ``torch.ops.vsops.attention_received(q, k, cu_seqlens_q, cu_seqlens_k, scale) -> received``:
  ``q [Tq, H, d]`` and ``k [Tk, H, d]`` packed by segment (int32 ``cu_seqlens_* [S + 1]``, the
  queries of a segment attend to its keys), any float dtype; returns float32 ``[Tk]`` (float64
  for float64 input): the softmax attention each key receives, averaged over heads and over its
  segment's queries (see ``vsops.reference.attention_received``).

Two passes over the keys per query tile (softmax statistics, then column sums); the per-head
n x n attention is never held. Compiled for the CPU and (in CUDA builds) for CUDA, and in
Triton. Not differentiable (it feeds a selection).
"""
from __future__ import annotations

import math

import torch

from vsops import backends, reference
from vsops.ops.registry import Operator
from vsops.ops import validation

__all__ = ["attention_received", "check_arguments"]


def _triton_attention():
    from vsops.triton import attention_received as kernel

    return kernel


def _received_fake(q, k, cu_seqlens_q, cu_seqlens_k, scale):
    return k.new_empty((k.shape[0],), dtype=reference.state_dtype_for(k.dtype))


received = Operator(
    "attention_received",
    "(Tensor q, Tensor k, Tensor cu_seqlens_q, Tensor cu_seqlens_k, float scale) -> Tensor",
    _received_fake,
    {"reference": reference.attention_received, "triton": lambda *a: _triton_attention().attention_received(*a)},
)



def check_arguments(q, k, cu_seqlens_q, cu_seqlens_k, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """What the compiled kernels check (``check_attention_received_inputs``), for the Python
    backends, with the argument named; returns the offsets contiguous."""
    validation.check_float(q, "q")
    validation.check_float(k, "k", like=("q", q))
    for name, t in (("q", q), ("k", k)):
        if t.dim() != 3:
            raise ValueError(f"{name} must be [T, H, d], got shape {tuple(t.shape)}")
    if q.dtype != k.dtype:
        raise TypeError(f"q and k must have one dtype, got {q.dtype} and {k.dtype}")
    if q.shape[1:] != k.shape[1:]:
        raise ValueError(f"q and k must have the same heads and head size, got {tuple(q.shape)} and {tuple(k.shape)}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float, got {scale!r}")
    cu_seqlens_q = validation.check_offsets(cu_seqlens_q, q.shape[0], like=("q", q), name="cu_seqlens_q",
                                            total_name="the queries")
    cu_seqlens_k = validation.check_offsets(cu_seqlens_k, k.shape[0], like=("q", q), name="cu_seqlens_k",
                                            total_name="the keys")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(
            f"cu_seqlens_q and cu_seqlens_k must have one entry per segment each, got {cu_seqlens_q.numel()} "
            f"and {cu_seqlens_k.numel()}"
        )
    return cu_seqlens_q, cu_seqlens_k


def attention_received(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """The softmax attention each key receives, averaged over heads and over the queries of
    its segment, without forming any head's attention matrix.

    Args:
        q: ``[Tq, H, d]`` queries (float16, bfloat16, float32 or float64), packed by segment.
        k: ``[Tk, H, d]`` keys, same dtype, heads and head size.
        cu_seqlens_q, cu_seqlens_k: int32 ``[S + 1]`` segment offsets (the queries of segment
            ``s`` attend to its keys only); both None: one segment. ``cu_seqlens_k`` alone
            (self-attention) serves as both.
        scale: the logits' factor, default ``d ** -0.5``.

    Returns:
        float32 ``[Tk]`` (float64 for float64 input): for key ``j`` of segment ``s``,
        ``(1 / (H n_q)) sum_h sum_i softmax(scale q_ih . k_h)[j]``; the keys of a segment with
        queries sum to 1, those of a segment without queries are 0.

    Example: attention to each patch from the CLS token at the start of each of two images of
    ``k`` rows ``[0, 5)`` and ``[5, 9)``::

        cls = torch.tensor([0, 5])
        attention_received(q[cls], k, torch.tensor([0, 1, 2], dtype=torch.int32),
                           torch.tensor([0, 5, 9], dtype=torch.int32))
    """
    if cu_seqlens_q is None and cu_seqlens_k is None:
        if isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor):
            cu_seqlens_q = torch.tensor([0, q.shape[0]], dtype=torch.int32, device=q.device)
            cu_seqlens_k = torch.tensor([0, k.shape[0]], dtype=torch.int32, device=k.device)
    elif cu_seqlens_q is None:
        cu_seqlens_q = cu_seqlens_k
    elif cu_seqlens_k is None:
        raise ValueError("give cu_seqlens_k with cu_seqlens_q (or cu_seqlens_k alone for self-attention)")
    if scale is None and isinstance(q, torch.Tensor) and q.dim() == 3:
        scale = q.shape[-1] ** -0.5
    cu_seqlens_q, cu_seqlens_k = check_arguments(q, k, cu_seqlens_q, cu_seqlens_k, scale)
    backend = backends.select_implemented(q.device, q.dtype, received.implemented(), "q")
    return received(q.contiguous(), k.contiguous(), cu_seqlens_q, cu_seqlens_k, float(scale), backend=backend)
