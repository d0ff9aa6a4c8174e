"""DiffTopK and the hard top-k: every backend against the reference, on the same inputs."""
import math

import pytest
import torch

import vsops
from vsops import reference
from vsops.difftopk import DiffTopK, constraint_loss, difftopk, topk_mask

INF = float("inf")


def sum_tolerance(n):
    return max(1e-3, 1e-5 * n)


def low_precision_ok(backend, dtype):
    """bf16/fp16 run on compiled CPU kernels and on GPUs; the Triton interpreter is fp32 only."""
    name, device = backend
    return dtype in (torch.float32, torch.float64) or not (name == "triton" and device.type == "cpu")


def serves(backend, dtype):
    """Whether the forced backend runs ``dtype`` here (Triton has no float64 kernels)."""
    return low_precision_ok(backend, dtype) and not (backend[0] == "triton" and dtype == torch.float64)


def packed(lengths, device, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32)
    scores = torch.randn(int(cu[-1]), generator=g, dtype=torch.float64).to(dtype)
    return scores.to(device), cu.to(device)


# -- values against the reference -------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (2, 1000), (5, 64)])
@pytest.mark.parametrize("frac", [0.0, 0.2, 0.5, 1.0])
def test_forward_matches_reference_padded(backend, shape, frac):
    _, device = backend
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(1)).to(device)
    k = round(frac * shape[1])
    mask = difftopk(scores, k)
    expected, _ = reference.difftopk_forward(scores.cpu(), torch.full((shape[0],), k), None)
    torch.testing.assert_close(mask.cpu(), expected, atol=1e-5, rtol=0)
    assert (mask.double().sum(1).cpu() - k).abs().max() <= sum_tolerance(shape[1])


def test_forward_matches_reference_ragged(backend):
    _, device = backend
    lengths = [0, 1, 5, 0, 300, 17, 1]
    scores, cu = packed(lengths, device)
    k = torch.tensor([0, 1, 2, 0, 60, 16, 0])
    mask = difftopk(scores, k, cu_seqlens=cu)
    expected, _ = reference.difftopk_forward(scores.cpu(), k, cu.cpu())
    torch.testing.assert_close(mask.cpu(), expected, atol=1e-5, rtol=0)
    sums = torch.stack([mask.cpu()[a:b].double().sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    assert (sums - k.double()).abs().max() <= 1e-3


@pytest.mark.parametrize("scale", [1e-3, 1.0, 30.0, 1000.0])
def test_matches_fp64_bisection_within_1e5(backend, scale):
    """The required accuracy: within 1e-5 of a 64-step fp64 bisection, sums within tolerance."""
    _, device = backend
    g = torch.Generator().manual_seed(2)
    scores = (torch.randn(4, 2048, generator=g, dtype=torch.float64) * scale).float()
    k = torch.tensor([1, 100, 1024, 2047])
    mask = difftopk(scores.to(device), k.to(device)).cpu()
    oracle, _ = reference.difftopk_forward(scores.double(), k, None)
    assert (mask.double() - oracle).abs().max() <= 1e-5
    assert (mask.double().sum(1) - k).abs().max() <= sum_tolerance(2048)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(backend, dtype):
    if not low_precision_ok(backend, dtype):
        pytest.skip("the Triton interpreter runs fp32 only")
    _, device = backend
    scores = torch.randn(3, 513, generator=torch.Generator().manual_seed(3)).to(dtype)
    k = torch.tensor([5, 256, 500])
    try:
        mask = difftopk(scores.to(device), k)
    except RuntimeError as exc:  # a forced backend that does not take this dtype says so
        assert "cannot run" in str(exc)
        return
    assert mask.dtype == dtype and mask.shape == scores.shape
    # The backends accumulate in fp32 (fp64 for fp64) from the same rounded inputs.
    expected, _ = reference.difftopk_forward(scores, k, None)
    atol = 1e-12 if dtype == torch.float64 else torch.finfo(dtype).eps
    torch.testing.assert_close(mask.cpu().double(), expected.double(), atol=atol, rtol=0)


def test_backward_matches_reference(backend):
    _, device = backend
    lengths = [3, 0, 1, 250, 40]
    scores, cu = packed(lengths, device, seed=4)
    k = torch.tensor([1, 0, 1, 50, 39])
    x = scores.clone().requires_grad_(True)
    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(5)).to(device)
    difftopk(x, k, cu_seqlens=cu).backward(grad)
    x_ref = scores.cpu().double().requires_grad_(True)
    mask_ref, state = reference.difftopk_forward(x_ref.detach(), k, cu.cpu())
    expected = reference.difftopk_backward(grad.cpu().double(), x_ref.detach(), state, cu.cpu())
    torch.testing.assert_close(x.grad.cpu().double(), expected, atol=1e-5, rtol=0)


def test_backward_matches_eq8_dense_jacobian(backend):
    """Against Eq. 7 built as a dense matrix: J = diag(v) - v v^T / sum(v)."""
    _, device = backend
    s = torch.randn(1, 50, generator=torch.Generator().manual_seed(6))
    g = torch.randn(1, 50, generator=torch.Generator().manual_seed(7))
    x = s.to(device).requires_grad_(True)
    m = difftopk(x, 10)
    m.backward(g.to(device))
    v = (m * (1 - m)).detach().cpu().double()[0]
    jac = torch.diag(v) - torch.outer(v, v) / v.sum()
    torch.testing.assert_close(x.grad.cpu().double()[0], jac @ g.double()[0], atol=1e-6, rtol=0)


def test_gradcheck_fp64(backend):
    name, device = backend
    if device.type == "cpu" and name == "triton":
        pytest.skip("the Triton interpreter runs fp32 only")
    s = torch.randn(3, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).to(device)
    try:
        torch.autograd.gradcheck(lambda x: difftopk(x, 4), (s.requires_grad_(True),))
    except RuntimeError as exc:
        assert "cannot run" in str(exc)
        return
    cu = torch.tensor([0, 4, 4, 11], dtype=torch.int32, device=device)
    x = torch.randn(11, dtype=torch.float64, device=device, requires_grad=True)
    k = torch.tensor([2, 0, 3])
    assert torch.autograd.gradcheck(lambda y: difftopk(y, k, cu_seqlens=cu), (x,))


def test_gradcheck_reference_fp64(monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "reference")
    x = torch.randn(2, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y: difftopk(y, 3), (x,))


# -- limits and special values ---------------------------------------------------------

def test_k_zero_and_n(backend):
    _, device = backend
    s = torch.randn(2, 10, device=device)
    assert torch.equal(difftopk(s, 0), torch.zeros_like(s))
    assert torch.equal(difftopk(s, 10), torch.ones_like(s))
    x = s.clone().requires_grad_(True)
    difftopk(x, 10).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(s))


def test_infinite_scores_behave_as_limits(backend):
    _, device = backend
    s = torch.tensor([[1.0, INF, INF, 0.0, -INF], [1.0, INF, 2.0, 0.0, -INF], [1.0, -INF, -INF, 0.0, 3.0]])
    k = torch.tensor([1, 3, 4])
    mask = difftopk(s.to(device), k).cpu()
    # Row 0: one slot, two +inf entries share it. Row 2: finite entries full, -inf share 1.
    torch.testing.assert_close(mask[0], torch.tensor([0.0, 0.5, 0.5, 0.0, 0.0]))
    assert mask[1, 1] == 1 and mask[1, 4] == 0 and abs(mask[1].sum().item() - 3) < 1e-4
    torch.testing.assert_close(mask[2], torch.tensor([1.0, 0.5, 0.5, 1.0, 1.0]))
    # The limit: large finite scores converge to the same mask.
    big = torch.where(s.isinf(), s.sign() * 1e4, s).double()
    limit, _ = reference.difftopk_forward(big, k, None)
    torch.testing.assert_close(mask.double(), limit, atol=1e-4, rtol=0)


def test_nan_propagates_to_its_segment_only(backend):
    _, device = backend
    s = torch.randn(3, 20)
    s[1, 5] = float("nan")
    x = s.to(device).requires_grad_(True)
    mask = difftopk(x, 4)
    assert torch.isnan(mask[1]).all()
    assert not torch.isnan(mask[0]).any() and not torch.isnan(mask[2]).any()
    mask.sum().backward()
    assert torch.isnan(x.grad[1]).all() and not torch.isnan(x.grad[[0, 2]]).any()
    hard = topk_mask(x.detach(), 4)
    assert hard[1, 5].item() is False and hard.sum(1).tolist() == [4, 4, 4]


def test_nan_policy_raise(backend):
    _, device = backend
    s = torch.zeros(2, 5, device=device)
    s[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        difftopk(s, 2, nan_policy="raise")
    with pytest.raises(ValueError, match="NaN"):
        topk_mask(s, 2, nan_policy="raise")
    with pytest.raises(ValueError, match="nan_policy"):
        difftopk(s, 2, nan_policy="ignore")


def test_all_equal_and_tied_scores(backend):
    _, device = backend
    s = torch.full((2, 8), 3.0, device=device)
    torch.testing.assert_close(difftopk(s, 2), torch.full_like(s, 0.25))
    ties = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0, 2.0]], device=device)
    assert topk_mask(ties, 2).cpu().tolist() == [[False, True, True, False, False, False]]
    assert topk_mask(-torch.zeros(1, 3, device=device), 1).cpu().tolist() == [[True, False, False]]


def test_empty_and_single_segments(backend):
    _, device = backend
    assert difftopk(torch.empty(0, 5, device=device), 2).shape == (0, 5)
    assert difftopk(torch.empty(3, 0, device=device), 0).shape == (3, 0)
    cu = torch.tensor([0, 0, 1, 1], dtype=torch.int32, device=device)
    s = torch.tensor([7.0], device=device)
    assert difftopk(s, torch.tensor([0, 1, 0]), cu_seqlens=cu).cpu().tolist() == [1.0]
    assert difftopk(s, torch.tensor([0, 0, 0]), cu_seqlens=cu).cpu().tolist() == [0.0]
    assert topk_mask(s, torch.tensor([0, 1, 0]), cu_seqlens=cu).cpu().tolist() == [True]
    none = torch.tensor([0], dtype=torch.int32, device=device)
    assert difftopk(torch.empty(0, device=device), torch.empty(0, dtype=torch.long), cu_seqlens=none).numel() == 0


# -- properties (Appendix A.9) ---------------------------------------------------------

def test_monotone_in_scores_and_shift_invariant(backend):
    _, device = backend
    s = torch.randn(4, 300, generator=torch.Generator().manual_seed(9)).to(device)
    mask = difftopk(s, 60)
    order = s.argsort(dim=1)
    sorted_mask = mask.gather(1, order)
    assert (sorted_mask[:, 1:] >= sorted_mask[:, :-1] - 1e-7).all()
    shifted = difftopk(s + torch.tensor([[5.0], [-3.0], [100.0], [0.5]], device=device), 60)
    torch.testing.assert_close(shifted, mask, atol=2e-5, rtol=0)


# -- any finite scale -------------------------------------------------------------------

GAPS = [(torch.float32, 1e7), (torch.float32, 1e8), (torch.bfloat16, 1e7), (torch.float16, 1e4),
        (torch.float32, 1e30), (torch.float64, 1e20), (torch.float64, 1e300)]


@pytest.mark.parametrize("dtype, scale", GAPS)
def test_gap_beyond_sigmoid_range_gives_the_hard_topk(backend, dtype, scale):
    """Scores a gap of 0.25 * scale apart: the limit of large finite scores is the hard
    top-k, as it is for +-inf (a search ending on a tolerance relative to |t| gave rows
    like [0, 1, 0.5] here)."""
    if not serves(backend, dtype):
        pytest.skip(f"{backend[0]} does not run {dtype} here")
    _, device = backend
    scores = (torch.tensor([[-1.5, -1.0, -1.25], [2.0, 1.0, 3.0]], dtype=torch.float64) * scale)
    for k, expected in ((1, [[0, 1, 0], [0, 0, 1]]), (2, [[0, 1, 1], [1, 0, 1]])):
        mask = difftopk(scores.to(device, dtype), k).cpu().double()
        torch.testing.assert_close(mask, torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


# Offsets from 1 to the dtype's range; each row's scores are shifted back exactly for the
# oracle (all scores of a row within a factor of 2 of its first, so the float64 difference
# is exact).
SHIFTS = {
    torch.float32: [1e3, 3e7, -1e9, 1e30],
    torch.bfloat16: [1e3, 1e8, -1e30],
    torch.float16: [3e3, -3e4],
    torch.float64: [1e6, -1e15, 1e20, 1e300],
}


@pytest.mark.parametrize("dtype", list(SHIFTS))
@pytest.mark.parametrize("spread", [1e-2, 1.0, 30.0])
def test_shift_invariant_at_any_scale(backend, dtype, spread):
    """Forward and backward of scores x + c equal those of x at every finite c (Appendix
    A.9), down to the ties that rounding at c makes."""
    if not serves(backend, dtype):
        pytest.skip(f"{backend[0]} does not run {dtype} here")
    _, device = backend
    g = torch.Generator().manual_seed(11)
    k = torch.tensor([1, 20, 99])
    atol = 1e-5 if dtype in (torch.float32, torch.float64) else 8e-3
    for shift in SHIFTS[dtype]:
        scores = (torch.randn(3, 100, generator=g, dtype=torch.float64) * spread + shift).to(dtype)
        exact = scores.double() - scores.double()[:, :1]
        grad = torch.randn(3, 100, generator=g, dtype=torch.float64)
        oracle = exact.clone().requires_grad_(True)
        expected, _ = reference.difftopk_forward(oracle.detach(), k, None)
        with torch.no_grad():
            v = expected * (1 - expected)
            expected_grad = v * (grad - (v * grad).sum(1, keepdim=True) / v.sum(1, keepdim=True))
        x = scores.to(device).requires_grad_(True)
        mask = difftopk(x, k.to(device))
        mask.backward(grad.to(device, dtype))
        torch.testing.assert_close(mask.cpu().double(), expected, atol=atol, rtol=0)
        torch.testing.assert_close(x.grad.cpu().double(), expected_grad, atol=atol, rtol=0)
        if dtype in (torch.float32, torch.float64):
            assert (mask.double().sum(1).cpu() - k).abs().max() <= sum_tolerance(100)


def test_reference_backend_at_any_scale(monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "reference")
    forced = ("reference", torch.device("cpu"))
    for dtype, scale in GAPS:
        test_gap_beyond_sigmoid_range_gives_the_hard_topk(forced, dtype, scale)
    for dtype in SHIFTS:
        test_shift_invariant_at_any_scale(forced, dtype, 1.0)


# -- hard top-k ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_mask_matches_reference(backend, dtype):
    if not low_precision_ok(backend, dtype):
        pytest.skip("the Triton interpreter runs fp32 only")
    _, device = backend
    lengths = [0, 1, 9, 400, 33]
    scores, cu = packed(lengths, device, dtype=dtype, seed=10)
    scores = (scores * 4).round() / 4  # many ties
    scores[20] = INF
    scores[21] = float("nan")
    scores[22] = -INF
    k = torch.tensor([0, 1, 4, 123, 33])
    try:
        keep = topk_mask(scores, k, cu_seqlens=cu)
    except RuntimeError as exc:
        assert "cannot run" in str(exc)
        return
    assert torch.equal(keep.cpu(), reference.topk_mask(scores.cpu(), k, cu.cpu()))
    padded = scores[10:410].reshape(2, 200)
    assert torch.equal(topk_mask(padded, 37).cpu(), reference.topk_mask(padded.cpu(), torch.tensor([37, 37]), None))


def test_topk_mask_agrees_with_torch_topk():
    s = torch.randn(6, 777)
    keep = topk_mask(s, 100)
    expected = torch.zeros_like(keep).scatter_(1, s.topk(100, dim=1).indices, True)
    assert torch.equal(keep, expected)


# -- long rows: the multi-pass path ----------------------------------------------------

@pytest.mark.slow
def test_million_element_row(backend):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("too slow under the Triton interpreter; "
                    "tests/ops/test_triton_kernels.py covers its multi-pass path")
    n = 1 << 20
    s = torch.randn(1, n, generator=torch.Generator().manual_seed(11)).to(device)
    k = budget = vsops.budget_to_k(n, 0.2)
    mask = difftopk(s, k)
    assert abs(mask.double().sum().item() - budget) <= sum_tolerance(n)
    oracle, _ = reference.difftopk_forward(s.cpu(), torch.tensor([k]), None)
    assert (mask.cpu().double() - oracle.double()).abs().max() <= 1e-5
    assert topk_mask(s, k).sum().item() == k


# -- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("checked_by", ["cpu", "reference"])
def test_bad_inputs_raise_clear_errors(checked_by, monkeypatch):
    """The compiled CPU kernels check bounds themselves; other backends rely on Python."""
    monkeypatch.setenv("VSOPS_BACKEND", checked_by)
    s = torch.randn(2, 5)
    with pytest.raises(ValueError, match="k must be in"):
        difftopk(s, 6)
    with pytest.raises(ValueError, match="k must be in"):
        difftopk(s, -1)
    with pytest.raises(ValueError, match="exceed"):
        difftopk(s, torch.tensor([2, 6]))
    with pytest.raises(ValueError, match=">= 0"):
        topk_mask(s, torch.tensor([2, -1]))
    with pytest.raises(TypeError, match="k must be an int"):
        difftopk(s, 2.5)
    with pytest.raises(TypeError, match="k must be an int"):
        difftopk(s, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"\[2\] tensor"):
        difftopk(s, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="floating-point"):
        difftopk(torch.ones(2, 5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        difftopk(torch.randn(2, 3, 4), 1)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    with pytest.raises(TypeError, match="int32"):
        difftopk(torch.randn(10), 1, cu_seqlens=cu.long())
    with pytest.raises(ValueError, match="packed"):
        difftopk(s, 1, cu_seqlens=cu)
    with pytest.raises(ValueError, match="end at"):
        difftopk(torch.randn(9), 1, cu_seqlens=cu)
    with pytest.raises(ValueError, match="non-decreasing"):
        difftopk(torch.randn(10), 0, cu_seqlens=torch.tensor([0, 5, 3, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        difftopk(torch.randn(10), 0, cu_seqlens=torch.tensor([1, 10], dtype=torch.int32))


def test_forced_backend_that_cannot_serve_raises(monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="VSOPS_BACKEND=cuda"):
        difftopk(torch.randn(2, 4), 1)
    monkeypatch.setenv("VSOPS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="VSOPS_BACKEND"):
        difftopk(torch.randn(2, 4), 1)


# -- budget, loss, module --------------------------------------------------------------

def test_budget_to_k():
    assert vsops.budget_to_k(10, 0.3) == 3  # 0.3 * 10 = 2.9999999999999996 in floats
    assert vsops.budget_to_k(1000, 0.2) == 200
    assert vsops.budget_to_k(3, 0.1) == 1  # at least one token
    assert vsops.budget_to_k(0, 0.5) == 0
    assert vsops.budget_to_k(7, 1.0) == 7
    assert vsops.budget_to_k(torch.tensor([0, 3, 10, 1000]), 0.3).tolist() == [0, 1, 3, 300]
    for bad in (0.0, 1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="budget"):
            vsops.budget_to_k(10, bad)
    with pytest.raises(ValueError, match="n must be"):
        vsops.budget_to_k(-1, 0.5)
    with pytest.raises(ValueError, match="n must be >= 0, got a length of -4"):
        vsops.budget_to_k(torch.tensor([3, -4, 2]), 0.5)  # as the int form
    with pytest.raises(TypeError):
        vsops.budget_to_k(torch.tensor([1.0]), 0.5)


def test_constraint_loss_values_and_safety():
    soft = torch.tensor([0.9, 0.2, 0.0, 1.0, 1.0], requires_grad=True)
    hard = torch.tensor([True, False, False, True, False])
    loss = constraint_loss(soft, hard, reduction="none")
    eps = torch.finfo(torch.float32).eps
    expected = [-math.log(0.9), -math.log(0.8), -math.log1p(-eps), -math.log(1 - eps), -math.log(eps)]
    torch.testing.assert_close(loss.detach(), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    constraint_loss(soft, hard).backward()
    assert torch.isfinite(soft.grad).all()
    torch.testing.assert_close(
        constraint_loss(soft.detach()[:2], hard[:2].float()),
        torch.nn.functional.binary_cross_entropy(soft.detach()[:2], hard[:2].float()),
    )
    with pytest.raises(ValueError, match="same shape"):
        constraint_loss(soft, hard[:2])


def test_difftopk_module_modes():
    scores = torch.randn(2, 50)
    selector = DiffTopK(0.2)
    soft = selector(scores)
    assert soft.dtype == scores.dtype and abs(soft.sum(1) - 10).max() < 1e-3
    selector.eval()
    hard = selector(scores)
    assert hard.dtype == torch.bool and hard.sum(1).tolist() == [10, 10]
    assert torch.equal(hard, topk_mask(scores, 10))
    cu = torch.tensor([0, 10, 10, 35], dtype=torch.int32)
    flat = torch.randn(35)
    assert DiffTopK(0.2).eval()(flat, cu).tolist() == topk_mask(flat, torch.tensor([2, 0, 5]), cu_seqlens=cu).tolist()
    assert DiffTopK(k=3)(scores).sum(1).round().tolist() == [3.0, 3.0]
    with pytest.raises(ValueError, match="exactly one"):
        DiffTopK(0.2, k=3)
    with pytest.raises(ValueError, match="budget"):
        DiffTopK(1.2)


@pytest.mark.parametrize("op_backend", ["cpu", "reference", "triton"])
def test_backward_takes_only_the_forwards_row_state(op_backend):
    """Every backend of the raw backward refuses a row_state of another width or dtype."""
    from vsops.ops import difftopk as ops

    if op_backend not in ops.backward.backends():
        pytest.skip(f"no {op_backend} op here")
    scores = torch.randn(2, 5)
    backward = ops.backward.op(op_backend)
    _, state = ops.forward(scores, torch.tensor([1, 2]), None, backend="reference")
    assert state.shape == (2, reference.ROW_STATE_WIDTH)
    with pytest.raises(ValueError, match="row_state"):
        backward(torch.ones_like(scores), scores, state[:, :3].contiguous(), None)
    with pytest.raises(TypeError, match="row_state"):
        backward(torch.ones_like(scores), scores, state.double(), None)
