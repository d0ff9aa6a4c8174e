"""The varlen pack and unpack ops (each also ``*_triton`` and ``*_reference``):

* ``torch.ops.vsops.varlen_pack(keep, total, rows) -> (indices, packed)``: ``keep`` is a
  bool mask over the flattened tokens (``[B, L]``), ``rows`` a list of contiguous ``[B * L, R]``
  tensors of any dtype; returns the int64 flat positions of the ``total`` kept tokens (in
  order) and each tensor's kept rows ``[total, R]``, gathered in one pass.
* ``torch.ops.vsops.varlen_unpack(packed, indices, rows, fill) -> [rows, R]``: packed row j at
  ``indices[j]``, ``fill`` elsewhere, every output row written once (no zero fill followed by
  a scatter).

``total`` must equal the number of kept tokens: the compiled CPU kernel checks it; GPU
kernels cannot without a host sync, and write at most ``total`` rows. Autograd: the gradient
of a packed tensor is ``varlen_unpack`` of it (fill 0), and of an unpacked one a gather.
"""
from __future__ import annotations

import torch

from vsops import reference
from vsops.ops.registry import LIBRARY, Operator


def _triton_varlen():
    from vsops.triton import varlen

    return varlen


def _pack_fake(keep, total, rows):
    indices = keep.new_empty((total,), dtype=torch.long)
    return indices, [r.new_empty((total, r.shape[1])) for r in rows]


def _unpack_fake(packed, indices, rows, fill):
    return packed.new_empty((rows, packed.shape[1]))


pack = Operator(
    "varlen_pack",
    "(Tensor keep, SymInt total, Tensor[] rows) -> (Tensor, Tensor[])",
    _pack_fake,
    {"reference": reference.varlen_pack, "triton": lambda *a: _triton_varlen().varlen_pack(*a)},
)

unpack = Operator(
    "varlen_unpack",
    "(Tensor packed, Tensor indices, SymInt rows, Scalar fill) -> Tensor",
    _unpack_fake,
    {"reference": reference.varlen_unpack, "triton": lambda *a: _triton_varlen().varlen_unpack(*a)},
)


def _pack_setup_context(ctx, inputs, output):
    keep, _, rows = inputs
    indices, _ = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(indices)
    ctx.tokens = keep.numel()


def _unpack_setup_context(ctx, inputs, output):
    _, indices, _, _ = inputs
    ctx.save_for_backward(indices)


def _register_autograd(backend: str) -> None:
    unpack_op = unpack.op(backend)

    def _pack_backward(ctx, _grad_indices, grad_packed):
        (indices,) = ctx.saved_tensors
        grads = [
            None if g is None else unpack_op(g.contiguous(), indices, ctx.tokens, 0) for g in grad_packed
        ]
        return None, None, grads

    def _unpack_backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return grad.index_select(0, indices), None, None, None

    torch.library.register_autograd(
        pack.qualified_name(backend), _pack_backward, setup_context=_pack_setup_context, lib=LIBRARY
    )
    torch.library.register_autograd(
        unpack.qualified_name(backend), _unpack_backward, setup_context=_unpack_setup_context, lib=LIBRARY
    )


for _backend in pack.backends():
    _register_autograd(_backend)
