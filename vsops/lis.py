"""LIS scoring (VisionSelector, Eq. 1-2) without the N x N matrix.

The score of token i of a segment is the mean of its row of ``Q K^T / sqrt(d)``. With no
softmax in between this collapses exactly to

    k_bar = W_k v_bar + b_k,   u = W_q^T k_bar / sqrt(d),   c = b_q . k_bar / sqrt(d),
    s_i = x_i . u + c,

where ``v_bar`` is the segment mean of x. So the forward is two passes over x (segment mean,
then one dot product per token) around two GEMVs with the weights, and Q, K and the N x N
matrix are never formed. With ``g = dL/ds`` and ``G = sum_i g_i`` per segment, the backward is
one pass over x (``a = sum_i g_i x_i``), rank-1 updates and GEMVs for the weights

    dL/dW_q = k_bar (x) a / sqrt(d),   dL/db_q = G k_bar / sqrt(d),
    r = (W_q a + G b_q) / sqrt(d),     dL/db_k = r,   dL/dW_k = r (x) v_bar,

and one write pass ``dL/dx_i = g_i u + (W_k^T r) / n``. Extra memory is O(S (D + d)) for S
segments, never O(N d).
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

from vsops import backends
from vsops.ops import lis as _ops
from vsops.ops import validation
from vsops.reference import segment_ids

__all__ = ["lis_score"]

def _check_like_x(t, name: str, x: torch.Tensor, dim: int) -> None:
    validation.check_tensor(t, name, like=("x", x))
    if t.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}), got {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def _check_arguments(x, q_weight, q_bias, k_weight, k_bias, cu_seqlens) -> torch.Tensor | None:
    """Shape, dtype and device checks (no data read); returns cu_seqlens contiguous."""
    validation.check_float(x, "x")
    if cu_seqlens is None:
        if x.dim() != 3:
            raise ValueError(f"x must be [B, N, D] (or [total, D] with cu_seqlens), got shape {tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("x has N = 0 tokens per sample: the segment mean of an empty segment is undefined")
    else:
        if x.dim() != 2:
            raise ValueError(f"with cu_seqlens, x must be packed [total, D], got shape {tuple(x.shape)}")
        cu_seqlens = validation.check_cu_seqlens(cu_seqlens, like=("x", x))
    _check_like_x(q_weight, "q_weight", x, 2)
    _check_like_x(k_weight, "k_weight", x, 2)
    hidden = x.shape[-1]
    if q_weight.shape[1] != hidden or k_weight.shape[1] != hidden:
        raise ValueError(
            f"q_weight and k_weight must be [d, D] with D = x.shape[-1] = {hidden}, got "
            f"{tuple(q_weight.shape)} and {tuple(k_weight.shape)}"
        )
    if q_weight.shape[0] != k_weight.shape[0]:
        raise ValueError(
            f"q_weight and k_weight must have the same projection size d, got {q_weight.shape[0]} and {k_weight.shape[0]}"
        )
    for bias, name in ((q_bias, "q_bias"), (k_bias, "k_bias")):
        if bias is not None:
            _check_like_x(bias, name, x, 1)
            if bias.shape[0] != q_weight.shape[0]:
                raise ValueError(f"{name} must be [d] = [{q_weight.shape[0]}], got shape {tuple(bias.shape)}")
    return cu_seqlens


def _check_cu_seqlens_data(x: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
    """cu_seqlens bounds and no empty segment: free on CPU, one host sync on GPU."""
    if torch.compiler.is_compiling():
        return
    checks = validation.cu_seqlens_checks(cu_seqlens, x.shape[0], "the number of tokens, x.shape[0]")
    checks.append(((cu_seqlens[1:] == cu_seqlens[:-1]).any(), "cu_seqlens has an empty segment: the segment mean is undefined"))
    validation.raise_failed(checks)


# Segments up to which the CPU weight-side kernels beat the library GEMM. Past it the products
# are compute-bound and MKL's blocking wins (measured at 32 segments: 6.3 against 5.8 ms for
# the GEMV with W_k^T; at 16: 3.4 against 4.1 ms).
_CPU_STREAMED_VECTORS = 16


def _times_weight(vectors: torch.Tensor, weight: torch.Tensor, transpose: bool, backend: str) -> torch.Tensor:
    """``vectors @ weight.T`` (``transpose``) or ``vectors @ weight`` in the accumulation dtype.

    One vector (a single segment, the common case) goes through the backend's own streaming
    passes, with the weight as a segment of ``d`` tokens: ``W v`` is a segment dot and
    ``v^T W`` a weighted segment sum. They read the weight once at the speed of x, where a
    library GEMV reaches about two thirds of it on CPU, and accumulate in float32 whatever the
    weight's dtype. Up to 16 vectors on CPU go through ``lis_weight_product``, which also
    reads the weight once (a library GEMM with a few vectors reaches a third of the bandwidth).
    Elsewhere they use the library GEMM; low-precision weights are then used as they are (a
    float32 copy would cost more traffic than the scoring passes) and the vectors are scaled
    into range before their cast, and for float16 weights far enough that no sum of products
    can pass float16's range.
    """
    if vectors.shape[0] == 1:
        rows = weight.unsqueeze(0)
        if transpose:
            return _ops.segment_dot(rows, vectors, vectors.new_zeros(1), None, backend=backend)
        return _ops.segment_sum(rows, vectors, None, backend=backend)
    if backend == "cpu" and vectors.shape[0] <= _CPU_STREAMED_VECTORS:
        return _ops.weight_product(vectors, weight, transpose, backend=backend)
    acc = vectors.dtype
    if weight.dtype == acc:
        return F.linear(vectors, weight) if transpose else vectors @ weight
    scale = vectors.abs().amax().clamp(min=torch.finfo(torch.float32).tiny)
    if weight.dtype == torch.float16:
        # Each output is a sum of `inner` products |v / scale| * |w| <= max|w|: scaled down
        # further when that bound passes half of float16's range (one read of the weight,
        # no copy and no host sync).
        inner = weight.shape[1] if transpose else weight.shape[0]
        w_min, w_max = torch.aminmax(weight)
        bound = torch.maximum(w_min.abs(), w_max.abs()).to(acc) * inner
        scale = scale * (bound / (torch.finfo(torch.float16).max / 2)).clamp(min=1)
    low = (vectors / scale).to(weight.dtype)
    out = F.linear(low, weight) if transpose else low @ weight
    return out.to(acc) * scale


def _outer_sum(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """``left^T @ right`` (``[S, d]``, ``[S, D]`` -> ``[d, D]``) in ``dtype``: a weight gradient.

    On CPU, for up to 16 vectors, ``lis_weight_grad`` writes it once, in the weight's dtype (a
    library GEMM with so few vectors writes at a third of the bandwidth, then a cast reads and
    writes it again); otherwise the library GEMM.
    """
    if backend == "cpu" and left.shape[0] <= _CPU_STREAMED_VECTORS:
        return _ops.weight_grad(left, right, dtype, backend=backend)
    return (left.T @ right).to(dtype)


def _segment_totals(values: torch.Tensor, x: torch.Tensor, cu_seqlens, num_segments: int) -> torch.Tensor:
    if cu_seqlens is None:
        return values.sum(1)
    totals = values.new_zeros(num_segments)
    return totals.index_add_(0, segment_ids(x, cu_seqlens), values)


def _own_precision(tensor: torch.Tensor):
    """Autocast off: the passes pick their own accumulation dtype, and an autocast matmul
    would hand the kernels a low-precision ``u`` (autocast regions of mixed-precision
    training)."""
    return torch.autocast(device_type=tensor.device.type, enabled=False)


class _LisScore(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q_weight, q_bias, k_weight, k_bias, cu_seqlens, backend):
        with _own_precision(x):
            return _LisScore._forward(ctx, x, q_weight, q_bias, k_weight, k_bias, cu_seqlens, backend)

    @staticmethod
    def _forward(ctx, x, q_weight, q_bias, k_weight, k_bias, cu_seqlens, backend):
        scale = q_weight.shape[0] ** -0.5
        mean = _ops.segment_sum(x, None, cu_seqlens, backend=backend)
        k_mean = _times_weight(mean, k_weight, True, backend)
        if k_bias is not None:
            k_mean = k_mean + k_bias.to(mean.dtype)
        u = _times_weight(k_mean, q_weight, False, backend) * scale
        c = (k_mean @ q_bias.to(mean.dtype)) * scale if q_bias is not None else mean.new_zeros(mean.shape[0])
        scores = _ops.segment_dot(x, u, c, cu_seqlens, backend=backend)
        ctx.save_for_backward(x, q_weight, q_bias, k_weight, cu_seqlens, mean, k_mean, u)
        ctx.backend = backend
        ctx.has_k_bias = k_bias is not None
        return scores

    @staticmethod
    def backward(ctx, grad):
        with _own_precision(grad):
            return _LisScore._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        x, q_weight, q_bias, k_weight, cu_seqlens, mean, k_mean, u = ctx.saved_tensors
        needs_x, needs_qw, needs_qb, needs_kw, needs_kb = ctx.needs_input_grad[:5]
        if not any(ctx.needs_input_grad[:5]):
            return (None,) * 7
        scale = q_weight.shape[0] ** -0.5
        g = grad.contiguous().to(mean.dtype)
        # dL/du and dL/dc, per segment.
        grad_u = _ops.segment_sum(x, g, cu_seqlens, backend=ctx.backend) * scale
        grad_c = _segment_totals(g, x, cu_seqlens, mean.shape[0]) * scale
        r = _times_weight(grad_u, q_weight, True, ctx.backend)
        if q_bias is not None:
            r = r + grad_c.unsqueeze(1) * q_bias.to(r.dtype)
        grad_x = grad_qw = grad_qb = grad_kw = grad_kb = None
        if needs_qw:
            grad_qw = _outer_sum(k_mean, grad_u, q_weight.dtype, ctx.backend)
        if needs_qb:
            grad_qb = (grad_c @ k_mean).to(q_weight.dtype)
        if needs_kw:
            grad_kw = _outer_sum(r, mean, k_weight.dtype, ctx.backend)
        if needs_kb and ctx.has_k_bias:
            grad_kb = r.sum(0).to(k_weight.dtype)
        if needs_x:
            w = _times_weight(r, k_weight, False, ctx.backend) / validation.segment_lengths(x, cu_seqlens).to(r.dtype).unsqueeze(1)
            grad_x = _ops.input_grad(g, u, w, cu_seqlens, x.dtype, backend=ctx.backend)
        return grad_x, grad_qw, grad_qb, grad_kw, grad_kb, None, None


def lis_score(
    x: torch.Tensor,
    q_weight: torch.Tensor,
    q_bias: torch.Tensor | None,
    k_weight: torch.Tensor,
    k_bias: torch.Tensor | None,
    *,
    cu_seqlens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Learnable Importance Scorer scores (Eq. 2): ``s_i = mean_j (q_i . k_j) / sqrt(d)``.

    Args:
        x: visual tokens, ``[B, N, D]`` (each sample one segment of N tokens) or packed
            ``[total, D]`` with ``cu_seqlens``; float16, bfloat16, float32 or float64.
        q_weight, k_weight: ``[d, D]`` (``nn.Linear`` layout), dtype and device of ``x``.
        q_bias, k_bias: ``[d]`` or None.
        cu_seqlens: int32 ``[S + 1]`` segment offsets into packed ``x``; no segment may be empty
            (its mean is undefined).

    Returns:
        float32 scores (float64 for float64 ``x``): ``[B, N]``, or ``[total]`` when packed.
        Sums accumulate in float32 whatever the input dtype. Differentiable with respect to
        ``x``, the weights and the biases; see the module docstring for the cost.

    Errors: TypeError or ValueError naming the argument for a wrong dtype, device or shape,
    mismatched D or d, a malformed ``cu_seqlens`` and empty segments. The ``cu_seqlens`` data
    checks cost one host sync on GPU tensors (none under torch.compile).
    """
    cu_seqlens = _check_arguments(x, q_weight, q_bias, k_weight, k_bias, cu_seqlens)
    if cu_seqlens is not None:
        _check_cu_seqlens_data(x, cu_seqlens)
    backend = backends.select(x.device, x.dtype, "x")
    return _LisScore.apply(
        x.contiguous(),
        q_weight.contiguous(),
        None if q_bias is None else q_bias.contiguous(),
        k_weight.contiguous(),
        None if k_bias is None else k_bias.contiguous(),
        cu_seqlens,
        backend,
    )

