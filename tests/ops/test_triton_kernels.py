"""The Triton kernels against vsops.reference on the same inputs.

CI has no GPU: it runs this file with TRITON_INTERPRET=1, which executes the kernels on CPU
tensors (fp32 only, as the interpreter is reliable there). With CUDA the kernels are compiled
and the half-precision dtypes are tested too.
"""
import math

import pytest
import torch

from triton_preamble import DEVICE, DTYPES  # first: it skips the module where Triton cannot run

from vsops import reference
from vsops.triton import _common, difftopk, topk

# Mask tolerance: fp32 accumulation, then rounding to the output dtype.
MASK_ATOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}

# The interpreter evaluates lanes that tl.where then discards (inf - inf, log(0)) with numpy,
# which warns about them.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _packed(lengths, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    scores = torch.randn(int(cu[-1]), generator=g) * scale
    return scores.to(DEVICE), cu.to(DEVICE)


def _ks(lengths, seed=0):
    """A k per segment, cycling through 0, 1, random, n and n - 1."""
    g = torch.Generator().manual_seed(seed)
    ks = []
    for i, n in enumerate(lengths):
        picks = [0, min(1, n), int(torch.randint(0, n + 1, (1,), generator=g)), n, max(n - 1, 0)]
        ks.append(picks[i % len(picks)])
    return torch.tensor(ks, dtype=torch.int64, device=DEVICE)


def _segments(x, cu_seqlens):
    if cu_seqlens is None:
        return list(x)
    bounds = cu_seqlens.tolist()
    return [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _check(scores, k, cu_seqlens=None, *, check_t=True, mask_atol=None):
    """Forward, backward and hard top-k of the Triton kernels against the reference."""
    mask, state = difftopk.difftopk_forward(scores, k, cu_seqlens)
    ref_mask, ref_state = reference.difftopk_forward(scores, k, cu_seqlens)
    assert mask.shape == scores.shape and mask.dtype == scores.dtype
    assert state.shape == ref_state.shape and state.dtype == torch.float32
    atol = MASK_ATOL[scores.dtype] if mask_atol is None else mask_atol
    torch.testing.assert_close(mask.float(), ref_mask.float(), atol=atol, rtol=0, equal_nan=True)
    # The limit values are closed forms: equal up to fp32 rounding.
    torch.testing.assert_close(state[:, 2:], ref_state[:, 2:], equal_nan=True)
    # The threshold is anchor + t; where each backend anchors may differ.
    t, ref_t = (x[:, 0].double() + x[:, 1].double() for x in (state, ref_state))
    assert torch.equal(t.isnan(), ref_t.isnan()) and torch.equal(t.isinf(), ref_t.isinf())
    assert torch.equal(t[t.isinf()], ref_t[ref_t.isinf()])
    if check_t:
        # The search stops on a Newton step below 1e-5 (anchored where t is too coarse for
        # that): t is that close, with room for the GPU's approximate exp.
        finite = t.isfinite()
        tol = 1e-5 * ref_t[finite].abs().clamp(min=1)
        assert ((t[finite] - ref_t[finite]).abs() <= tol).all()
    if scores.dtype == torch.float32:
        for row_mask, row_k, row_t in zip(_segments(mask, cu_seqlens), k.tolist(), t.tolist()):
            if math.isnan(row_t):
                assert row_mask.isnan().all()
                continue
            n = row_mask.numel()
            assert abs(row_mask.double().sum().item() - min(row_k, n)) <= max(1e-3, 1e-5 * n)

    # Same row_state on both sides, so the backward is tested on its own.
    g = torch.randn(scores.shape, generator=torch.Generator().manual_seed(1)).to(scores)
    grad = difftopk.difftopk_backward(g, scores, state, cu_seqlens)
    ref_grad = reference.difftopk_backward(g, scores, state, cu_seqlens)
    assert grad.shape == scores.shape and grad.dtype == scores.dtype
    torch.testing.assert_close(
        grad.float(), ref_grad.float(), atol=MASK_ATOL[scores.dtype], rtol=0, equal_nan=True
    )

    keep = topk.topk_mask(scores, k, cu_seqlens)
    assert keep.dtype == torch.bool
    assert torch.equal(keep, reference.topk_mask(scores, k, cu_seqlens))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 37), (1, 1), (2, 1000), (4, 0)])
def test_padded(shape, dtype):
    b, n = shape
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(n)).to(DEVICE, dtype)
    _check(scores, _ks([n] * b, seed=n))


@pytest.mark.parametrize("dtype", DTYPES)
def test_packed_ragged(dtype):
    lengths = [0, 1, 5, 0, 37, 2, 1, 100]
    scores, cu = _packed(lengths)
    k = _ks(lengths)
    _check(scores.to(dtype), k, cu)
    # Knowing the longest segment changes nothing but the host sync.
    assert torch.equal(
        topk.topk_mask(scores, k, cu, max_seqlen=100), topk.topk_mask(scores, k, cu)
    )
    torch.testing.assert_close(
        difftopk.difftopk_forward(scores, k, cu, max_seqlen=100),
        difftopk.difftopk_forward(scores, k, cu),
    )


def test_k_out_of_range_is_clamped():
    scores = torch.randn(2, 9, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    k = torch.tensor([-4, 50], device=DEVICE)
    mask, state = difftopk.difftopk_forward(scores, k, None)
    assert torch.equal(mask, torch.stack([torch.zeros(9), torch.ones(9)]).to(DEVICE))
    assert torch.equal(topk.topk_mask(scores, k, None), mask.bool())


def test_ties():
    few_values = torch.randint(0, 3, (2, 50), generator=torch.Generator().manual_seed(4)).float()
    signed_zeros = torch.zeros(1, 50)
    signed_zeros[0, 1::2] = -0.0  # -0.0 ties with +0.0: the first 13 indices are kept
    rows = torch.cat([few_values, signed_zeros, torch.full((1, 50), -2.5)]).to(DEVICE)
    _check(rows, torch.tensor([7, 25, 13, 1], device=DEVICE))


def test_infinite_scores():
    inf = float("inf")
    rows = torch.tensor(
        [
            [inf, inf, inf, 1.0, 2.0, -inf],  # k = 2 < 3 +inf entries: they share it
            [inf, 1.0, 2.0, -inf, -inf, -inf],  # k = 5 needs two of the three -inf entries
            [inf, 1.0, 2.0, 0.5, -inf, 3.0],  # search over the finite entries
            [-inf] * 6,  # only -inf entries
            [inf, inf, 0.0, 0.0, -inf, -inf],  # k = 0 with infinite entries
            [inf, inf, -inf, -inf, -inf, -inf],  # k = 2 = number of +inf entries
        ],
        device=DEVICE,
    )
    _check(rows, torch.tensor([2, 5, 3, 1, 0, 2], device=DEVICE))


def test_nan_row_is_nan_and_isolated():
    scores = torch.randn(3, 20, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    scores[1, 7] = float("nan")
    scores[2, 3] = float("nan")
    k = torch.tensor([4, 4, 20], device=DEVICE)
    _check(scores, k)
    mask, state = difftopk.difftopk_forward(scores, k, None)
    assert mask[1].isnan().all() and state[1, 1:].isnan().all()
    assert not mask[0].isnan().any()
    # In the hard top-k NaN ranks last but is still kept when k reaches it.
    assert topk.topk_mask(scores, k, None)[2].all()


def test_accuracy_near_k_equal_n():
    """1e-5 from the float64 oracle where f(t) is a large sum (k close to n) and its slope is
    small (spread scores): the residual has to be summed by parts and the search must not
    stop on a small bisection step."""
    scores = torch.randn(2, 2048, generator=torch.Generator().manual_seed(2)) * 30
    _check(scores.to(DEVICE), torch.tensor([100, 2047], device=DEVICE))
    scores = torch.randn(4, 37, generator=torch.Generator().manual_seed(28)) * 30
    _check(scores.to(DEVICE), torch.tensor([1, 3, 18, 36], device=DEVICE))


@pytest.mark.parametrize("scale", [100.0, 1000.0])
def test_large_magnitude(scale):
    scores, cu = _packed([3, 64, 200, 1], seed=6, scale=scale)
    # M = sigmoid(s + t) moves by up to 1/4 per unit of s + t, which fp32 rounds, as it does t,
    # with |s| and |t| up to ~4 scale. Far apart scores leave f flat between them, so t itself
    # is ill-determined and only the mask is compared.
    atol = MASK_ATOL[torch.float32] + 0.25 * 2.0**-23 * 8 * scale
    _check(scores, torch.tensor([1, 10, 77, 1], device=DEVICE), cu, check_t=False, mask_atol=atol)


@pytest.fixture
def small_blocks(monkeypatch):
    """Shrinks the register block so that short rows take the streaming path."""
    monkeypatch.setattr(_common, "BLOCK_CAP", 64)
    monkeypatch.setattr(_common, "STREAM_BLOCK", 16)


@pytest.mark.usefixtures("small_blocks")
def test_streaming_path():
    lengths = [0, 150, 3, 64, 65, 16, 17]  # k = 1 for the 150, k = 64 for the 65
    scores, cu = _packed(lengths, seed=7)
    scores[20:100:3] = 0.5  # ties spread over several chunks
    seg65 = 150 + 3 + 64
    scores[100] = float("-inf")
    scores[seg65 + 40] = float("inf")
    # The finite extremes bound the search bracket: put them in late chunks, where k needs them.
    scores[140] = 12.0
    scores[seg65 + 64] = -12.0
    _check(scores, _ks(lengths, seed=7), cu)
    padded = torch.randint(0, 4, (3, 90), generator=torch.Generator().manual_seed(8)).float()
    padded[1, [70, 80]] = float("-inf")  # k = n - 1 gives each of them 1/2
    padded[2, ::3] = float("inf")  # 30 of them share k = 20
    _check(padded.to(DEVICE), torch.tensor([45, 89, 20], device=DEVICE))
    nan_row = torch.randn(1, 70).to(DEVICE)
    nan_row[0, 69] = float("nan")
    _check(nan_row, torch.tensor([3], device=DEVICE))


def test_rejects_float64():
    scores = torch.zeros(1, 4, dtype=torch.float64, device=DEVICE)
    k = torch.ones(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(TypeError):
        difftopk.difftopk_forward(scores, k, None)
    with pytest.raises(TypeError):
        difftopk.difftopk_backward(scores, scores, torch.zeros(1, 3, device=DEVICE), None)
    with pytest.raises(TypeError):
        topk.topk_mask(scores, k, None)
