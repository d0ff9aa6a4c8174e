"""The DiffTopK operator: forward (threshold search), backward (Eq. 8), and the hard top-k.

Ops (each also as ``*_triton`` and ``*_reference``):

* ``torch.ops.vsops.difftopk_forward(scores, k, cu_seqlens) -> (mask, row_state)``
* ``torch.ops.vsops.difftopk_backward(grad, scores, row_state, cu_seqlens) -> grad_scores``
* ``torch.ops.vsops.topk_mask(scores, k, cu_seqlens) -> keep``

``k`` is int64 ``[S]``; see ``vsops.reference`` for the layouts. Autograd is registered on
every forward op; its backward calls the backward op of the same backend.
"""
from __future__ import annotations

import torch

from vsops import reference
from vsops.ops import validation
from vsops.ops.registry import LIBRARY, Operator


def _triton_difftopk():
    from vsops.triton import difftopk

    return difftopk


def _triton_topk():
    from vsops.triton import topk

    return topk


def _forward_fake(scores, k, cu_seqlens):
    state = scores.new_empty(
        (validation.num_segments(scores, cu_seqlens), reference.ROW_STATE_WIDTH),
        dtype=reference.state_dtype_for(scores.dtype),
    )
    return torch.empty_like(scores), state


def _check_row_state(scores, row_state, cu_seqlens) -> None:
    """The backward takes the forward's row_state, as the compiled op checks too."""
    if row_state.dtype != reference.state_dtype_for(scores.dtype):
        raise TypeError(f"row_state must be {reference.state_dtype_for(scores.dtype)} for {scores.dtype} scores, "
                        f"got {row_state.dtype}")
    expected = (validation.num_segments(scores, cu_seqlens), reference.ROW_STATE_WIDTH)
    if tuple(row_state.shape) != expected:
        raise ValueError(f"row_state must be the forward's [S, {reference.ROW_STATE_WIDTH}] = {list(expected)}, "
                         f"got {list(row_state.shape)}")


def _row_state_checked(backward):
    def checked(grad, scores, row_state, cu_seqlens):
        _check_row_state(scores, row_state, cu_seqlens)
        return backward(grad, scores, row_state, cu_seqlens)

    return checked


def _backward_fake(grad, scores, row_state, cu_seqlens):
    _check_row_state(scores, row_state, cu_seqlens)
    return torch.empty_like(scores)


def _topk_fake(scores, k, cu_seqlens):
    return torch.empty_like(scores, dtype=torch.bool)


forward = Operator(
    "difftopk_forward",
    "(Tensor scores, Tensor k, Tensor? cu_seqlens) -> (Tensor, Tensor)",
    _forward_fake,
    {
        "reference": reference.difftopk_forward,
        "triton": lambda *a: _triton_difftopk().difftopk_forward(*a),
    },
)

backward = Operator(
    "difftopk_backward",
    "(Tensor grad, Tensor scores, Tensor row_state, Tensor? cu_seqlens) -> Tensor",
    _backward_fake,
    {
        "reference": _row_state_checked(reference.difftopk_backward),
        "triton": _row_state_checked(lambda *a: _triton_difftopk().difftopk_backward(*a)),
    },
)

topk_mask = Operator(
    "topk_mask",
    "(Tensor scores, Tensor k, Tensor? cu_seqlens) -> Tensor",
    _topk_fake,
    {"reference": reference.topk_mask, "triton": lambda *a: _triton_topk().topk_mask(*a)},
)


def _setup_context(ctx, inputs, output):
    scores, _, cu_seqlens = inputs
    mask, row_state = output
    ctx.mark_non_differentiable(row_state)
    ctx.save_for_backward(scores, row_state, cu_seqlens)


def _register_autograd(backend: str) -> None:
    backward_op = backward.op(backend)

    def _backward(ctx, grad_mask, _grad_state):
        scores, row_state, cu_seqlens = ctx.saved_tensors
        if grad_mask is None:
            return None, None, None
        return backward_op(grad_mask.contiguous(), scores, row_state, cu_seqlens), None, None

    torch.library.register_autograd(
        forward.qualified_name(backend), _backward, setup_context=_setup_context, lib=LIBRARY
    )


for _backend in forward.backends():
    _register_autograd(_backend)
