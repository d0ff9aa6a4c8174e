"""Properties that must hold on every input, checked with hypothesis on the reference and the
compiled CPU backends (the Triton interpreter is too slow for this many calls; the backend
tests cover it): the hard top-k's count, tie rule and order; pack/unpack round trips; the LIS
score against Eq. 2 computed densely; DiffTopK's sum, monotonicity and shift invariance.

Examples are drawn deterministically (the ``vsops`` hypothesis profile of tests/conftest.py).
"""
from __future__ import annotations

import contextlib
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import vsops
from vsops import backends
from vsops.varlen import select_and_pack, select_and_pad, select_visual_tokens

BACKENDS = ["reference", "cpu"] if backends.available()["cpu"] else ["reference"]


@contextlib.contextmanager
def forced(backend: str):
    """VSOPS_BACKEND for the body (monkeypatch is function-scoped, hypothesis runs many
    examples per function call)."""
    before = os.environ.get("VSOPS_BACKEND")
    os.environ["VSOPS_BACKEND"] = backend
    try:
        yield
    finally:
        if before is None:
            del os.environ["VSOPS_BACKEND"]
        else:
            os.environ["VSOPS_BACKEND"] = before


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@st.composite
def segments(draw, max_segments=4, max_length=12, min_length=0):
    """(lengths, int32 cu_seqlens) of a packed batch."""
    lengths = draw(st.lists(st.integers(min_length, max_length), min_size=1, max_size=max_segments))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return lengths, cu


# Scores with many ties and the special values, as a few distinct levels.
SCORE_LEVELS = st.sampled_from([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0, float("inf"), float("-inf"), float("nan")])


@st.composite
def packed_scores(draw):
    lengths, cu = draw(segments())
    scores = torch.tensor(draw(st.lists(SCORE_LEVELS, min_size=sum(lengths), max_size=sum(lengths))))
    k = torch.tensor([draw(st.integers(0, n)) for n in lengths], dtype=torch.long)
    return scores, k, cu


def _rank_key(value: float, index: int):
    """The order of the hard top-k: by score, highest first, NaN below -inf, then by index."""
    return (value != value, -value if value == value else 0.0, index)


# --- hard top-k ----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=packed_scores())
def test_topk_mask_keeps_exactly_k_ties_to_the_lower_index(backend, case):
    scores, k, cu = case
    with forced(backend):
        keep = vsops.topk_mask(scores, k, cu_seqlens=cu)
    bounds = cu.tolist()
    for s, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        segment = scores[start:end].tolist()
        chosen = sorted(range(len(segment)), key=lambda i: _rank_key(segment[i], i))[: int(k[s])]
        expected = torch.zeros(len(segment), dtype=torch.bool)
        expected[chosen] = True
        assert torch.equal(keep[start:end], expected), (segment, int(k[s]))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=packed_scores(), budget=st.sampled_from([0.1, 0.25, 0.5, 0.99, 1.0]))
def test_selection_then_pack_keeps_the_tokens_in_order(backend, case, budget):
    """The kept tokens of a padded batch, packed: each sample's in their original order."""
    scores, _, _ = case
    length = 5
    rows = scores[: scores.numel() // length * length].view(-1, length)
    visual = rows != 0.0
    visual[:, 0] = False  # a text token per sample
    with forced(backend):
        keep = select_visual_tokens(rows, visual, budget)
        packed = select_and_pack(keep, torch.arange(rows.numel()).view(rows.shape))
    assert torch.equal(packed.tensors[0], packed.indices)
    assert bool((packed.indices[1:] > packed.indices[:-1]).all())
    assert torch.equal(keep.sum(1), (~visual).sum(1) + vsops.budget_to_k(visual.sum(1), budget))


# --- pack / unpack ---------------------------------------------------------------------------


@st.composite
def batches(draw):
    b, length, width = draw(st.integers(0, 4)), draw(st.integers(0, 9)), draw(st.integers(0, 3))
    seed = draw(st.integers(0, 2**16))
    g = _generator(seed)
    keep = torch.rand(b, length, generator=g) < draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    x = torch.randint(-50, 50, (b, length, width), generator=g).to(draw(st.sampled_from([torch.float32, torch.int64, torch.bfloat16])))
    return keep, x


@pytest.mark.parametrize("backend", BACKENDS)
@given(batch=batches(), fill=st.sampled_from([0, -1, 7]), side=st.sampled_from(["left", "right"]))
def test_pack_unpack_and_pad_round_trip(backend, batch, fill, side):
    keep, x = batch
    with forced(backend):
        packed = select_and_pack(keep, x)
        restored = packed.unpack(packed.tensors[0], fill=fill)
        padded = select_and_pad(keep, x, padding_side=side, pad_values=fill, counts=keep.sum(1).tolist())
    assert torch.equal(restored, torch.where(keep.unsqueeze(-1), x, torch.full_like(x, fill)))
    assert packed.cu_seqlens.tolist() == [0, *keep.sum(1).cumsum(0).tolist()]
    assert packed.max_seqlen == int(keep.sum(1).max()) if keep.numel() else packed.max_seqlen == 0
    kept = padded.attention_mask.bool()
    assert torch.equal(padded.tensors[0][kept], packed.tensors[0])
    assert bool((padded.tensors[0][~kept] == fill).all())
    assert torch.equal(padded.indices, packed.indices)


# --- LIS score: Eq. 2 -----------------------------------------------------------------------------


@st.composite
def lis_inputs(draw):
    lengths, cu = draw(segments(max_segments=3, max_length=9, min_length=1))
    hidden, proj = draw(st.integers(1, 8)), draw(st.integers(1, 6))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    g = _generator(draw(st.integers(0, 2**16)))
    x = torch.randn(sum(lengths), hidden, generator=g, dtype=torch.float64) * scale
    weights = [torch.randn(proj, hidden, generator=g, dtype=torch.float64), torch.randn(proj, generator=g, dtype=torch.float64),
               torch.randn(proj, hidden, generator=g, dtype=torch.float64), torch.randn(proj, generator=g, dtype=torch.float64)]
    if draw(st.booleans()):
        weights[1] = weights[3] = None
    return x, weights, cu


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=lis_inputs())
def test_lis_score_is_eq2(backend, case):
    """``s_i = (1/N) sum_j q_i . k_j / sqrt(d)``, with Q and K formed and every product summed."""
    x, (q_weight, q_bias, k_weight, k_bias), cu = case
    with forced(backend):
        got = vsops.lis_score(x, q_weight, q_bias, k_weight, k_bias, cu_seqlens=cu)
    d = q_weight.shape[0]
    q = x @ q_weight.T + (0 if q_bias is None else q_bias)
    k = x @ k_weight.T + (0 if k_bias is None else k_bias)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        n = end - start
        expected = torch.stack([sum(q[i] @ k[j] for j in range(start, end)) / n / d**0.5 for i in range(start, end)])
        size = (q[start:end].abs() @ k[start:end].abs().T).mean(1) / d**0.5
        assert bool(((got[start:end] - expected).abs() <= 1e-10 * size + 1e-300).all())


# --- DiffTopK -----------------------------------------------------------------------------------


@st.composite
def moderate_scores(draw):
    """Padded scores with |s| <= 1e3 on a grid of 2**-10, so that adding an integer shift of
    at most 1e3 is exact in float32; and k per row."""
    rows, n = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0, 1e3]))
    g = _generator(draw(st.integers(0, 2**16)))
    scores = ((torch.rand(rows, n, generator=g, dtype=torch.float64) * 2 - 1) * scale * 1024).round() / 1024
    if draw(st.booleans()):  # ties
        scores = scores[:, torch.randint(0, n, (n,), generator=g)]
    k = torch.tensor([draw(st.integers(0, n)) for _ in range(rows)], dtype=torch.long)
    return scores.float(), k


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=moderate_scores(), shift=st.integers(-1000, 1000))
def test_difftopk_sums_to_k_is_monotone_and_shift_invariant(backend, case, shift):
    scores, k = case
    with forced(backend):
        mask = vsops.difftopk(scores, k)
        shifted = vsops.difftopk(scores + shift, k)
    n = scores.shape[1]
    assert bool(((mask >= 0) & (mask <= 1)).all())
    assert bool(((mask.double().sum(1) - k).abs() <= max(1e-3, 1e-5 * n)).all())
    # Higher score, higher (or equal) mask: compare every pair of a row.
    higher = scores.unsqueeze(2) > scores.unsqueeze(1)
    gap = mask.unsqueeze(2) - mask.unsqueeze(1)
    assert bool((gap[higher] >= -1e-6).all())
    # Each is within 1e-5 of the float64 answer, which a shift leaves unchanged.
    torch.testing.assert_close(shifted, mask, atol=2e-5, rtol=0)


# Largest power of ten that scores of each dtype may reach (so that center + spread stays finite).
MAX_EXPONENT = {torch.float16: 4, torch.bfloat16: 36, torch.float32: 36, torch.float64: 300}


@st.composite
def scores_at_any_scale(draw):
    """Scores of any float dtype: a spread of 1e-3 to 1e6 around a center of up to the dtype's
    range, with ties sometimes; the row's first score as an exactly representable pivot."""
    dtype = draw(st.sampled_from(list(MAX_EXPONENT)))
    top = MAX_EXPONENT[dtype]
    rows, n = draw(st.integers(1, 3)), draw(st.integers(1, 40))
    spread = 10.0 ** draw(st.integers(-3, min(6, top)))
    center = draw(st.sampled_from([-1.0, 0.0, 1.0])) * 10.0 ** draw(st.integers(0, top))
    g = _generator(draw(st.integers(0, 2**16)))
    scores = (torch.rand(rows, n, generator=g, dtype=torch.float64) * 2 - 1) * spread + center
    if draw(st.booleans()):  # ties
        scores = scores[:, torch.randint(0, n, (n,), generator=g)]
    k = torch.tensor([draw(st.integers(0, n)) for _ in range(rows)], dtype=torch.long)
    return scores.to(dtype), k


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=scores_at_any_scale())
def test_difftopk_at_any_finite_scale_and_dtype(backend, case):
    """The mask of scores s equals, within the dtype's accuracy, the float64 mask of s - p for
    a score p of the row (Appendix A.9's shift invariance, where s - p is small): at 1e30 as
    at 1; it sums to k and is monotone."""
    scores, k = case
    with forced(backend):
        mask = vsops.difftopk(scores, k).double()
    wide = scores.double()
    oracle, _ = vsops.reference.difftopk_forward(wide - wide[:, :1], k, None)
    exact = scores.dtype in (torch.float32, torch.float64)
    torch.testing.assert_close(mask, oracle, atol=1e-5 if exact else 8e-3, rtol=0)
    if exact:
        assert bool(((mask.sum(1) - k).abs() <= max(1e-3, 1e-5 * scores.shape[1])).all())
    higher = wide.unsqueeze(2) > wide.unsqueeze(1)
    gap = mask.unsqueeze(2) - mask.unsqueeze(1)
    assert bool((gap[higher] >= -1e-6).all())
