"""The three memory-bound passes of LIS scoring, as ops (each also ``*_triton`` and
``*_reference``):

* ``torch.ops.vsops.lis_segment_sum(x, token_weight, cu_seqlens) -> [S, D]``:
  ``sum_i w_i x_i`` per segment, ``w_i = 1 / n_s`` (the mean) when ``token_weight`` is None.
* ``torch.ops.vsops.lis_segment_dot(x, u, c, cu_seqlens) -> scores``:
  ``x_i . u_s + c_s`` per token.
* ``torch.ops.vsops.lis_input_grad(grad, u, w, cu_seqlens, dtype) -> [..., D]``:
  ``grad_i u_s + w_s`` per token, in ``dtype``.

* ``torch.ops.vsops.lis_weight_product(vectors, weight, transpose) -> [S, d] | [S, D]``:
  ``vectors @ weight.T`` (``transpose``, vectors ``[S, D]``) or ``vectors @ weight`` (vectors
  ``[S, d]``) for the ``[d, D]`` projection weights, summed in the accumulation dtype; the
  GEMVs between the passes when a batch has several segments. Compiled for CPU only (and
  ``*_reference``): on GPU the library GEMM serves them.

* ``torch.ops.vsops.lis_weight_grad(left, right, dtype) -> [d, D]``: ``left^T @ right`` for
  ``left [S, d]`` and ``right [S, D]`` in the accumulation dtype, written in ``dtype``: the
  weight gradients, each a sum of S outer products. Compiled for CPU only (and
  ``*_reference``), like ``lis_weight_product``.

``x`` is padded ``[B, N, D]`` (segment b = row b) or packed ``[total, D]`` with int32
``cu_seqlens [S + 1]``; fp16, bf16, fp32 or fp64, contiguous. Per-token tensors are
``[B, N]`` / ``[total]`` and per-segment ones ``[S, D]`` / ``[S]``, all contiguous and in the
accumulation dtype ``reference.state_dtype_for(x.dtype)`` (float32; float64 for float64 x).
Forward scoring is sum (mean) then dot: two reads of x; the backward is sum (weighted by the
incoming gradient) then input_grad: one read of x and one write of dx. The small GEMVs between
them are shared by every backend (``vsops.lis``). These ops have no autograd of their own:
``vsops.lis.lis_score`` differentiates the whole score at once.
"""
from __future__ import annotations

from vsops import reference
from vsops.ops import validation
from vsops.ops.registry import Operator


def _triton_lis():
    from vsops.triton import lis

    return lis


def _segment_sum_fake(x, token_weight, cu_seqlens):
    return x.new_empty((validation.num_segments(x, cu_seqlens), x.shape[-1]), dtype=reference.state_dtype_for(x.dtype))


def _segment_dot_fake(x, u, c, cu_seqlens):
    return x.new_empty(x.shape[:-1], dtype=u.dtype)


def _weight_product_fake(vectors, weight, transpose):
    return vectors.new_empty((vectors.shape[0], weight.shape[0] if transpose else weight.shape[1]))


def _weight_grad_fake(left, right, dtype):
    return right.new_empty((left.shape[1], right.shape[1]), dtype=dtype)


def _input_grad_fake(grad, u, w, cu_seqlens, dtype):
    return grad.new_empty((*grad.shape, u.shape[-1]), dtype=dtype)


segment_sum = Operator(
    "lis_segment_sum",
    "(Tensor x, Tensor? token_weight, Tensor? cu_seqlens) -> Tensor",
    _segment_sum_fake,
    {
        "reference": reference.lis_segment_sum,
        "triton": lambda *a: _triton_lis().lis_segment_sum(*a),
    },
)

segment_dot = Operator(
    "lis_segment_dot",
    "(Tensor x, Tensor u, Tensor c, Tensor? cu_seqlens) -> Tensor",
    _segment_dot_fake,
    {
        "reference": reference.lis_segment_dot,
        "triton": lambda *a: _triton_lis().lis_segment_dot(*a),
    },
)

weight_product = Operator(
    "lis_weight_product",
    "(Tensor vectors, Tensor weight, bool transpose) -> Tensor",
    _weight_product_fake,
    {"reference": reference.lis_weight_product},
)

weight_grad = Operator(
    "lis_weight_grad",
    "(Tensor left, Tensor right, ScalarType dtype) -> Tensor",
    _weight_grad_fake,
    {"reference": reference.lis_weight_grad},
)

input_grad = Operator(
    "lis_input_grad",
    "(Tensor grad, Tensor u, Tensor w, Tensor? cu_seqlens, ScalarType dtype) -> Tensor",
    _input_grad_fake,
    {
        "reference": reference.lis_input_grad,
        "triton": lambda *a: _triton_lis().lis_input_grad(*a),
    },
)
