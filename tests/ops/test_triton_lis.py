"""The LIS Triton kernels (vsops/triton/lis.py) against vsops.reference on the same inputs.

CI has no GPU: it runs this file with TRITON_INTERPRET=1 (CPU tensors, fp32). With CUDA the
kernels are compiled and half-precision x and dx are tested too. The ``small_tiles`` cases
shrink the tiles so that small shapes cross every tile, chunk and piece boundary.
"""
import pytest
import torch

from triton_preamble import DEVICE, DTYPES  # first: it skips the module where Triton cannot run

from vsops import reference
from vsops.ops import lis as lis_ops
from vsops.triton import lis

# The reference sums in float64 from the same inputs: the kernels differ by fp32 accumulation,
# and dx also by one rounding to its dtype (fp32 fma against float64 then rounded).
SUM_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = {
    torch.float32: dict(rtol=1e-6, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}


def _packed(lengths, dim, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    x = torch.randn(int(cu[-1]), dim, generator=g)
    return x.to(DEVICE, dtype), cu.to(DEVICE)


def _per_segment(num_segments, dim, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(num_segments, dim, generator=g)
    return u.to(DEVICE), torch.randn(num_segments, generator=g).to(DEVICE)


def _check(x, cu_seqlens=None):
    """The three kernels on x against the reference."""
    token_shape, dim = x.shape[:-1], x.shape[-1]
    segments = token_shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    token_weight = torch.randn(token_shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    for weight in (None, token_weight):
        out = lis.lis_segment_sum(x, weight, cu_seqlens)
        assert out.shape == (segments, dim) and out.dtype == torch.float32
        torch.testing.assert_close(out, reference.lis_segment_sum(x, weight, cu_seqlens), **SUM_TOL)
        # No atomics: the same launch gives the same bits.
        assert torch.equal(out, lis.lis_segment_sum(x, weight, cu_seqlens))

    u, c = _per_segment(segments, dim, seed=2)
    scores = lis.lis_segment_dot(x, u, c, cu_seqlens)
    assert scores.shape == token_shape and scores.dtype == torch.float32
    torch.testing.assert_close(scores, reference.lis_segment_dot(x, u, c, cu_seqlens), **SUM_TOL)

    grad = torch.randn(token_shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    w, _ = _per_segment(segments, dim, seed=4)
    for dtype in DTYPES:
        dx = lis.lis_input_grad(grad, u, w, cu_seqlens, dtype)
        assert dx.shape == x.shape and dx.dtype == dtype
        ref = reference.lis_input_grad(grad, u, w, cu_seqlens, dtype)
        torch.testing.assert_close(dx.float(), ref.float(), **GRAD_TOL[dtype])


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(lis, "TILE_TOKENS", 4)
    monkeypatch.setattr(lis, "TILE_COLUMNS", 16)
    monkeypatch.setattr(lis, "SUM_CHUNK_TOKENS", 8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37, 40), (1, 1, 1), (2, 0, 5), (2, 300, 260)])
def test_padded(shape, dtype):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(shape[1]))
    _check(x.to(DEVICE, dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_ragged(dtype):
    # Empty segments first, last and between; several segments in one chunk; one of 300 tokens
    # over four chunks; D = 260 leaves a partial column tile.
    x, cu = _packed([0, 1, 5, 0, 37, 2, 1, 300, 0], 260, dtype=dtype)
    _check(x, cu)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize(
    "lengths",
    [
        # 50 tokens from token 7: 8 pieces, more than one load of the piece reduction; 8 and 16
        # tokens, a chunk's worth and two, but not aligned to chunks.
        [3, 0, 1, 1, 0, 2, 50, 9, 8, 16, 0],
        [20],  # one segment: no search step
        [0, 21],  # two: a single search step
        [21, 0],
        [8, 8, 8],  # aligned to chunks
    ],
)
def test_packed_small_tiles(lengths):
    x, cu = _packed(lengths, 37, seed=len(lengths))
    _check(x, cu)


@pytest.mark.usefixtures("small_tiles")
def test_padded_small_tiles():
    _check(torch.randn(3, 19, 37, generator=torch.Generator().manual_seed(5)).to(DEVICE))


def test_no_tokens():
    x, cu = _packed([0, 0], 6)
    _check(x, cu)
    _check(*_packed([], 6))


def test_registered_ops(monkeypatch):
    """The ops reach these kernels: forced to the Triton backend and as ``*_triton`` ops."""
    monkeypatch.setenv("VSOPS_BACKEND", "triton")
    calls = []

    def spy(name, kernel):
        return lambda *args: calls.append(name) or kernel(*args)

    for name in lis.__all__:
        monkeypatch.setattr(lis, name, spy(name, getattr(lis, name)))
    x, cu = _packed([4, 0, 9], 10, seed=6)
    u, c = _per_segment(3, 10, seed=7)
    w, _ = _per_segment(3, 10, seed=8)
    grad = torch.randn(13, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    ops = torch.ops.vsops
    results = [
        (lis_ops.segment_sum(x, None, cu), reference.lis_segment_sum(x, None, cu)),
        (ops.lis_segment_sum_triton(x, grad, cu), reference.lis_segment_sum(x, grad, cu)),
        (lis_ops.segment_dot(x, u, c, cu), reference.lis_segment_dot(x, u, c, cu)),
        (ops.lis_segment_dot_triton(x, u, c, cu), reference.lis_segment_dot(x, u, c, cu)),
        (lis_ops.input_grad(grad, u, w, cu, torch.float32),
         reference.lis_input_grad(grad, u, w, cu, torch.float32)),
        (ops.lis_input_grad_triton(grad, u, w, cu, torch.float32),
         reference.lis_input_grad(grad, u, w, cu, torch.float32)),
    ]
    assert calls == [name for name in lis.__all__ for _ in range(2)]
    for got, expected in results:
        torch.testing.assert_close(got, expected, **SUM_TOL)


def test_rejects_float64():
    x = torch.zeros(1, 4, 3, dtype=torch.float64, device=DEVICE)
    u = torch.zeros(1, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError):
        lis.lis_segment_sum(x, None, None)
    with pytest.raises(TypeError):
        lis.lis_segment_dot(x, u, u[:, 0], None)
    with pytest.raises(TypeError):
        lis.lis_input_grad(x[..., 0], u, u, None, torch.float64)
