"""LIS scoring: every backend against Eq. 2 materialised in float64 (values and gradients),
the three kernel passes against the reference, opcheck, torch.compile and the error paths."""
import pytest
import torch

import vsops
from vsops import reference
from vsops.lis import lis_score
from vsops.ops import lis as ops

D, PROJ = 40, 24


def _weights(dtype=torch.float32, device="cpu", seed=0, bias=True, hidden=D, proj=PROJ):
    g = torch.Generator().manual_seed(seed)
    qw, kw = (torch.randn(proj, hidden, generator=g) * hidden**-0.5 for _ in range(2))
    qb, kb = (torch.randn(proj, generator=g) if bias else None for _ in range(2))
    return tuple(None if t is None else t.to(device=device, dtype=dtype) for t in (qw, qb, kw, kb))


def _packed(lengths, dtype=torch.float32, device="cpu", seed=1, hidden=D):
    g = torch.Generator().manual_seed(seed)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    # An offset common to all tokens, as real features have, makes the mean matter.
    x = torch.randn(int(cu[-1]), hidden, generator=g) + 0.5
    return x.to(device=device, dtype=dtype), cu.to(device)


def _padded(b, n, dtype=torch.float32, device="cpu", seed=2, hidden=D):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, n, hidden, generator=g) + 0.5).to(device=device, dtype=dtype)


def _assert_relative(actual, expected, rtol):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    scale = expected.abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * max(scale, 1e-30), f"max error {err:.3g} vs scale {scale:.3g}"


def _dense_grads(x, weights, cu, grad):
    leaves = [t.detach().double().cpu().requires_grad_(True) for t in (x, *weights) if t is not None]
    it = iter(leaves)
    args = [next(it) if t is not None else None for t in (x, *weights)]
    reference.lis_score_dense(*args, None if cu is None else cu.cpu()).backward(grad.double().cpu())
    return [t.grad for t in leaves]


LAYOUTS = {
    "padded": lambda dtype, device: (_padded(3, 17, dtype, device), None),
    "ragged": lambda dtype, device: _packed([5, 1, 33, 2, 12], dtype, device),
    "size1": lambda dtype, device: _packed([1, 1, 1], dtype, device),
    # More segments than the CPU weight-side kernels take (16): the library GEMM then serves them.
    "many": lambda dtype, device: _packed([1 + (7 * i) % 13 for i in range(20)], dtype, device),
    # One segment: the GEMVs with the weights then run through the backend's own passes.
    "single": lambda dtype, device: (_padded(1, 29, dtype, device), None),
}


# --- lis_score against Eq. 2 -------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_matches_dense_eq2_values_and_gradients(backend, layout, bias):
    _, device = backend
    x, cu = LAYOUTS[layout](torch.float32, device)
    weights = _weights(device=device, bias=bias)
    leaves = [t.clone().requires_grad_(True) if t is not None else None for t in (x, *weights)]
    scores = lis_score(*leaves, cu_seqlens=cu)
    assert scores.dtype == torch.float32 and scores.shape == x.shape[:-1]
    _assert_relative(scores, reference.lis_score_dense(x, *weights, None if cu is None else cu.cpu()), 1e-4)

    grad = torch.randn(scores.shape, generator=torch.Generator().manual_seed(3)).to(device)
    scores.backward(grad)
    expected = _dense_grads(x, weights, cu, grad)
    actual = [t.grad for t in leaves if t is not None]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        _assert_relative(a, e, 1e-4)


def test_long_segment_float32_accuracy(backend):
    name, device = backend
    n = 512 if name == "triton" and device.type == "cpu" else 4096
    x, cu = _packed([n], device=device, hidden=64)
    weights = _weights(device=device, hidden=64, proj=32)
    expected = reference.lis_score_dense(x.cpu(), *(w.cpu() for w in weights), cu.cpu())
    _assert_relative(lis_score(x, *weights, cu_seqlens=cu), expected, 1e-4)


@pytest.mark.parametrize("layout", ["many", "ragged", "single"])
def test_float16_weights_near_their_range_do_not_overflow(backend, layout):
    """Weights up to 3e4 (float16's max is 65504): the products with the weights pass
    float16's range although every input and the float32 scores are finite; no path may
    round them to inf (the library GEMM past 16 segments did)."""
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter runs float32 only")
    x, cu = LAYOUTS[layout](torch.float16, device)
    g = torch.Generator().manual_seed(4)
    qw, kw = ((torch.rand(PROJ, D, generator=g) * 2 - 1) * 3e4 for _ in range(2))
    weights = tuple(t.to(device, torch.float16) for t in (qw, torch.zeros(PROJ), kw, torch.zeros(PROJ)))
    scores = lis_score(x, *weights, cu_seqlens=cu)
    expected = reference.lis_score_dense(x.cpu(), *(w.cpu() for w in weights), None if cu is None else cu.cpu())
    assert torch.isfinite(scores).all()
    _assert_relative(scores, expected, 4e-3)


@pytest.mark.parametrize("layout", ["ragged", "single"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(backend, dtype, layout):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("the Triton interpreter runs float32 only")
    x, cu = LAYOUTS[layout](dtype, device)
    weights = _weights(dtype=dtype, device=device)
    scores = lis_score(x, *weights, cu_seqlens=cu)
    assert scores.dtype == torch.float32
    # The inputs as given (already rounded) in float64; the GEMVs run in the weights' dtype.
    expected = reference.lis_score_dense(x.cpu(), *(w.cpu() for w in weights), None if cu is None else cu.cpu())
    _assert_relative(scores, expected, 2e-2 if dtype == torch.bfloat16 else 4e-3)
    leaves = [t.clone().requires_grad_(True) for t in (x, *weights)]
    lis_score(*leaves, cu_seqlens=cu).sum().backward()
    expected_grads = _dense_grads(x, weights, cu, torch.ones(x.shape[:-1]))
    for leaf, e in zip(leaves, expected_grads):
        assert leaf.grad.dtype == dtype
        _assert_relative(leaf.grad, e, 3e-2)


@pytest.mark.parametrize("layout", ["ragged", "single"])
def test_autocast_region_leaves_the_precision_to_the_op(backend, layout):
    # Mixed-precision training calls the scorer inside autocast: the op's own matmuls must
    # not be downcast (the kernels take float32 u), and the result is that of plain fp32.
    name, device = backend
    x, cu = LAYOUTS[layout](torch.float32, device)
    weights = _weights(device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, *weights)]
    plain = [t.clone().requires_grad_(True) for t in (x, *weights)]
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        scores = lis_score(*leaves, cu_seqlens=cu)
    scores.sum().backward()
    expected = lis_score(*plain, cu_seqlens=cu)
    expected.sum().backward()
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected)
    for leaf, p in zip(leaves, plain):
        torch.testing.assert_close(leaf.grad, p.grad)


def test_gradcheck_float64(backend):
    name, device = backend
    if name == "triton":
        pytest.skip("Triton serves float16/bfloat16/float32")
    for layout in LAYOUTS:
        x, cu = LAYOUTS[layout](torch.float64, device)
        leaves = [t.requires_grad_(True) for t in (x, *_weights(torch.float64, device))]
        assert torch.autograd.gradcheck(lambda *a: lis_score(*a, cu_seqlens=cu), leaves)
        assert lis_score(*leaves, cu_seqlens=cu).dtype == torch.float64


def test_gradcheck_reference_backend(monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "reference")
    x, cu = LAYOUTS["ragged"](torch.float64, "cpu")
    leaves = [t.requires_grad_(True) for t in (x, *_weights(torch.float64))]
    assert torch.autograd.gradcheck(lambda *a: lis_score(*a, cu_seqlens=cu), leaves)


def test_packed_equals_padded(backend):
    _, device = backend
    x = _padded(4, 9, device=device)
    weights = _weights(device=device)
    cu = torch.arange(0, 37, 9, dtype=torch.int32, device=device)
    padded = lis_score(x, *weights)
    packed = lis_score(x.reshape(-1, D), *weights, cu_seqlens=cu)
    torch.testing.assert_close(packed.view(4, 9), padded, rtol=1e-5, atol=1e-6)


def test_segments_are_independent(backend):
    _, device = backend
    x, cu = _packed([7, 3, 11], device=device)
    weights = _weights(device=device)
    whole = lis_score(x, *weights, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        one = lis_score(x[a:b].unsqueeze(0), *weights)[0]
        torch.testing.assert_close(whole[a:b], one, rtol=1e-5, atol=1e-6)


def test_weights_only_gradient_skips_input(backend):
    """A frozen backbone: only the scorer's weights need gradients."""
    _, device = backend
    x, cu = LAYOUTS["ragged"](torch.float32, device)
    weights = [w.clone().requires_grad_(True) for w in _weights(device=device)]
    lis_score(x, *weights, cu_seqlens=cu).square().sum().backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)


def test_backward_memory_is_per_segment():
    """No saved activation has the N x d (or N x N) shape of Q, K or their product."""
    n = 64
    x = _padded(2, n).requires_grad_(True)
    weights = [w.requires_grad_(True) for w in _weights()]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        lis_score(x, *weights)
    assert saved, "the hook saw nothing: the test would pass vacuously"
    inputs = {x.shape} | {w.shape for w in weights}
    per_segment = [shape for shape in saved if shape not in inputs]
    assert per_segment, "only inputs were saved: the hook missed the activations"
    for shape in per_segment:
        assert shape[0] == 2 and shape.numel() <= 2 * max(D, PROJ), f"saved a {tuple(shape)} activation"


# --- the three kernel passes against the reference -----------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["padded", "ragged_with_empty"])
def test_kernel_passes_match_reference(backend, dtype, layout):
    name, device = backend
    if name == "triton" and (dtype != torch.float32 and device.type == "cpu" or dtype == torch.float64):
        pytest.skip("Triton: float16/bfloat16/float32, and float32 only under the interpreter")
    if layout == "padded":
        x, cu = _padded(3, 5, dtype, device, hidden=37), None
        s, tokens = 3, (3, 5)
    else:
        x, cu = _packed([4, 0, 1, 130, 3], dtype, device, hidden=37)
        s, tokens = 5, (x.shape[0],)
    acc = reference.state_dtype_for(dtype)
    g = torch.Generator().manual_seed(4)
    weight = torch.randn(tokens, generator=g).to(device=device, dtype=acc)
    u, w = (torch.randn(s, 37, generator=g).to(device=device, dtype=acc) for _ in range(2))
    c = torch.randn(s, generator=g).to(device=device, dtype=acc)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=2e-5)
    for token_weight in (None, weight):
        out = ops.segment_sum.op(name)(x, token_weight, cu)
        assert out.dtype == acc and out.shape == (s, 37)
        torch.testing.assert_close(out, reference.lis_segment_sum(x, token_weight, cu), **tol)
    out = ops.segment_dot.op(name)(x, u, c, cu)
    assert out.dtype == acc and out.shape == tokens
    torch.testing.assert_close(out, reference.lis_segment_dot(x, u, c, cu), **tol)
    out = ops.input_grad.op(name)(weight, u, w, cu, dtype)
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, reference.lis_input_grad(weight, u, w, cu, dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_vectors", [2, 3, 5, 9])
def test_weight_product_matches_reference(dtype, num_vectors):
    """The CPU GEMVs of several segments: register tiles of 4 rows x 4 vectors with every
    remainder (21 rows, 2-9 vectors), column chunks and blocks with a ragged end (1,030
    columns), and the same bits on 1 and 2 threads."""
    if "cpu" not in ops.weight_product.backends():
        pytest.skip("vsops._C not built")
    acc = reference.state_dtype_for(dtype)
    g = torch.Generator().manual_seed(num_vectors)
    weight = torch.randn(21, 1030, generator=g).to(dtype)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    threads = torch.get_num_threads()
    for transpose, width in ((True, 1030), (False, 21)):
        vectors = torch.randn(num_vectors, width, generator=g).to(acc)
        expected = reference.lis_weight_product(vectors, weight, transpose)
        out = ops.weight_product.op("cpu")(vectors, weight, transpose)
        assert out.dtype == acc and out.shape == expected.shape
        torch.testing.assert_close(out, expected, **tol)
        try:
            torch.set_num_threads(1)
            assert torch.equal(ops.weight_product.op("cpu")(vectors, weight, transpose), out)
        finally:
            torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_vectors", [1, 3, 8])
@pytest.mark.parametrize("size", [(21, 1030), (2048, 2052)])
def test_weight_grad_matches_reference(dtype, num_vectors, size):
    """The weight gradients on CPU: tiles of 4 rows and their remainder (21 rows), column
    chunks with a ragged end, and outputs past 16 MiB (2048 x 2052 in float32 and float64),
    written with streaming stores; float32 rows start at every 16-byte offset of a line."""
    if "cpu" not in ops.weight_grad.backends():
        pytest.skip("vsops._C not built")
    acc = reference.state_dtype_for(dtype)
    g = torch.Generator().manual_seed(num_vectors)
    left = torch.randn(num_vectors, size[0], generator=g).to(acc)
    right = torch.randn(num_vectors, size[1], generator=g).to(acc)
    out = ops.weight_grad.op("cpu")(left, right, dtype)
    assert out.dtype == dtype and out.shape == size
    # float32 sums rounded once to the output dtype: within half a unit in the last place of
    # it (2^-8 for bfloat16, 2^-11 for float16), plus the float32 sum's own error.
    rtol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    expected = reference.lis_weight_grad(left, right, torch.float64)
    torch.testing.assert_close(out.double(), expected, rtol=rtol * 1.01, atol=1e-5 if dtype != torch.float64 else 1e-12)


def test_weight_product_and_grad_opcheck_and_errors():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 11, generator=g)
    for name in ops.weight_product.backends():
        for vectors, transpose in ((torch.randn(3, 11, generator=g), True), (torch.randn(3, 6, generator=g), False)):
            torch.library.opcheck(ops.weight_product.op(name), (vectors, weight, transpose))
        for dtype in (torch.float32, torch.bfloat16):
            left, right = torch.randn(3, 6, generator=g), torch.randn(3, 11, generator=g)
            torch.library.opcheck(ops.weight_grad.op(name), (left, right, dtype))
    if "cpu" not in ops.weight_product.backends():
        return
    with pytest.raises(ValueError, match="right must have shape"):
        torch.ops.vsops.lis_weight_grad(torch.randn(3, 6), torch.randn(2, 11), torch.float32)
    with pytest.raises(TypeError, match="left must be Double"):
        torch.ops.vsops.lis_weight_grad(torch.randn(3, 6), torch.randn(3, 11).double(), torch.float64)
    with pytest.raises(ValueError, match="vectors must have shape"):
        torch.ops.vsops.lis_weight_product(torch.randn(3, 6), weight, True)
    with pytest.raises(TypeError, match="vectors must be Float"):
        torch.ops.vsops.lis_weight_product(torch.randn(3, 11, dtype=torch.float64), weight, True)
    with pytest.raises(ValueError, match="weight must be a contiguous"):
        torch.ops.vsops.lis_weight_product(torch.randn(3, 6), weight.T, True)


def test_input_grad_past_the_cache():
    """dx of 16 MiB and more is written with streaming stores: 4,100 rows of 1,030 float32
    (4,120 bytes, so rows start at every 8-byte offset of a line) in two segments."""
    if "cpu" not in ops.input_grad.backends():
        pytest.skip("vsops._C not built")
    g = torch.Generator().manual_seed(9)
    cu = torch.tensor([0, 1500, 4100], dtype=torch.int32)
    grad = torch.randn(4100, generator=g)
    u, w = torch.randn(2, 1030, generator=g), torch.randn(2, 1030, generator=g)
    out = ops.input_grad.op("cpu")(grad, u, w, cu, torch.float32)
    assert out.numel() * 4 >= 16 << 20
    torch.testing.assert_close(out, reference.lis_input_grad(grad, u, w, cu, torch.float32), rtol=1e-6, atol=1e-6)


def test_kernel_passes_registered():
    for operator in (ops.segment_sum, ops.segment_dot, ops.input_grad):
        for op_name in operator.op_names():
            assert hasattr(torch.ops.vsops, op_name), op_name
        assert {"reference", "triton"} <= set(operator.backends())


def _opcheck_samples(dtype, device):
    acc = reference.state_dtype_for(dtype)
    xp, cu = _packed([3, 1, 6], dtype, device, hidden=9)
    x3 = _padded(2, 4, dtype, device, hidden=9)
    for x, c, s, tokens in ((xp, cu, 3, (10,)), (x3, None, 2, (2, 4))):
        g = torch.randn(tokens, dtype=acc, device=device)
        u = torch.randn(s, 9, dtype=acc, device=device)
        yield ops.segment_sum, (x, None, c)
        yield ops.segment_sum, (x, g, c)
        yield ops.segment_dot, (x, u, torch.randn(s, dtype=acc, device=device), c)
        yield ops.input_grad, (g, u, torch.randn(s, 9, dtype=acc, device=device), c, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(backend, dtype):
    name, device = backend
    if name == "triton" and (dtype == torch.float64 or device.type == "cpu"):
        pytest.skip("Triton serves fp16/bf16/fp32; the interpreter is too slow for opcheck's repeats")
    for operator, args in _opcheck_samples(dtype, device):
        torch.library.opcheck(operator.op(name), args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_reference(dtype):
    for operator, args in _opcheck_samples(dtype, "cpu"):
        torch.library.opcheck(operator.op("reference"), args)


# --- torch.compile -----------------------------------------------------------------------------


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend, compiler):
    name, device = backend
    if name == "triton" and device.type == "cpu":
        pytest.skip("compiling for the Triton interpreter is not supported")
    torch._dynamo.reset()
    x, cu = LAYOUTS["ragged"](torch.float32, device)
    scorer = vsops.LearnableImportanceScorer(D, PROJ, init_std=0.1).to(device)

    def step(x, cu):
        return scorer(x, cu).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    xc = x.clone().requires_grad_(True)
    out = compiled(xc, cu)
    out.backward()
    compiled_grads = [xc.grad] + [p.grad.clone() for p in scorer.parameters()]
    scorer.zero_grad()
    xe = x.clone().requires_grad_(True)
    expected = step(xe, cu)
    expected.backward()
    torch.testing.assert_close(out, expected)
    for a, e in zip(compiled_grads, [xe.grad] + [p.grad for p in scorer.parameters()]):
        torch.testing.assert_close(a, e)


# --- the module ------------------------------------------------------------------------------


def test_scorer_state_dict_matches_published_layout():
    scorer = vsops.LearnableImportanceScorer(3584)
    assert list(scorer.state_dict()) == ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias"]
    assert scorer.q_proj.weight.shape == (1792, 3584)
    assert sum(p.numel() for p in scorer.parameters()) == 12_848_640  # 12.85M, as published
    assert 0.5e-4 < scorer.q_proj.weight.std().item() < 2e-4
    assert scorer.k_proj.bias.abs().max().item() == 0


def test_scorer_loads_published_weights_and_scores_through_lis():
    published = {
        "q_proj.weight": torch.randn(PROJ, D),
        "q_proj.bias": torch.randn(PROJ),
        "k_proj.weight": torch.randn(PROJ, D),
        "k_proj.bias": torch.randn(PROJ),
    }
    scorer = vsops.LearnableImportanceScorer(D, PROJ)
    scorer.load_state_dict(published)  # strict: exactly the published keys
    x, cu = _packed([4, 9])
    expected = reference.lis_score_dense(x, published["q_proj.weight"], published["q_proj.bias"],
                                         published["k_proj.weight"], published["k_proj.bias"], cu)
    _assert_relative(scorer(x, cu), expected, 1e-4)
    _assert_relative(scorer(x[:4].unsqueeze(0))[0], expected[:4], 1e-4)


def test_scorer_without_bias_and_arguments():
    scorer = vsops.LearnableImportanceScorer(10, 4, bias=False)
    assert list(scorer.state_dict()) == ["q_proj.weight", "k_proj.weight"]
    assert scorer(torch.randn(2, 3, 10)).shape == (2, 3)
    for bad in (dict(hidden_size=0), dict(hidden_size=8, proj_dim=0), dict(hidden_size=8, init_std=-1.0)):
        with pytest.raises(ValueError):
            vsops.LearnableImportanceScorer(**bad)


# --- errors ----------------------------------------------------------------------------------


def _call(x=None, weights=None, cu=None):
    x = _padded(2, 3) if x is None else x
    return lis_score(x, *(weights or _weights()), cu_seqlens=cu)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: _call(x=_padded(2, 3).to(torch.int32)), TypeError, "x must be a floating-point"),
        (lambda: _call(x=torch.randn(3, D)), ValueError, r"x must be \[B, N, D\]"),
        (lambda: _call(x=torch.randn(2, 0, D)), ValueError, "N = 0"),
        (lambda: _call(x=_padded(2, 3, hidden=D + 1)), ValueError, "D = x.shape"),
        (lambda: _call(weights=_weights(proj=PROJ)[:2] + _weights(proj=PROJ + 1)[2:]), ValueError, "same projection size"),
        (lambda: _call(weights=(_weights()[0], torch.randn(PROJ + 1), *_weights()[2:])), ValueError, "q_bias must be"),
        (lambda: _call(weights=_weights(dtype=torch.float64)), TypeError, "q_weight must have the dtype of x"),
        (lambda: _call(weights=(*_weights()[:3], torch.randn(PROJ, dtype=torch.float64))), TypeError, "k_bias"),
        (lambda: _call(weights=(_weights()[0].to("meta"), *_weights()[1:])), ValueError, "q_weight is on meta"),
        (lambda: _call(weights=(torch.randn(PROJ, D, 1), *_weights()[1:])), ValueError, "q_weight must be 2-D"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([0, 5])), TypeError, "int32"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([[0, 5]], dtype=torch.int32)), ValueError, r"1-D \[S \+ 1\]"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([0, 2, 2, 5], dtype=torch.int32)), ValueError, "empty segment"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([0, 4], dtype=torch.int32)), ValueError, "end at"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([1, 5], dtype=torch.int32)), ValueError, "start at 0"),
        (lambda: _call(x=torch.randn(5, D), cu=torch.tensor([0, 4, 3, 5], dtype=torch.int32)), ValueError, "non-decreasing"),
        (lambda: _call(x=_padded(1, 5), cu=torch.tensor([0, 5], dtype=torch.int32)), ValueError, r"packed \[total, D\]"),
    ],
)
def test_bad_input_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_compiled_kernels_check_their_inputs():
    """Direct torch.ops calls, past the Python checks, still raise instead of reading out of bounds."""
    if "cpu" not in ops.segment_sum.backends():
        pytest.skip("vsops._C not built")
    x, cu = _packed([3, 4])
    with pytest.raises(ValueError, match="end at"):
        torch.ops.vsops.lis_segment_sum(x, None, torch.tensor([0, 3, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="u must have shape"):
        torch.ops.vsops.lis_segment_dot(x, torch.randn(3, D), torch.randn(2), cu)
    with pytest.raises(TypeError, match="token_weight must be Float"):
        torch.ops.vsops.lis_segment_sum(x, torch.randn(7, dtype=torch.float64), cu)
    with pytest.raises(ValueError, match="w must have shape"):
        torch.ops.vsops.lis_input_grad(torch.randn(7), torch.randn(2, D), torch.randn(2, D + 1), cu, torch.float32)


def test_outputs_no_machine_can_hold_are_refused():
    """Zero-size operands with huge dimensions ask for outputs past 2^48 bytes: a ValueError
    naming the operands from every backend, not an allocation failing inside the kernel."""
    huge = 1 << 40
    for name in ops.weight_grad.backends():
        with pytest.raises(ValueError, match=r"left and right asks for a tensor of shape .1099511627776, 1099511627776."):
            ops.weight_grad.op(name)(torch.zeros(0, huge), torch.zeros(0, huge), torch.float32)
        with pytest.raises(ValueError, match="vectors and weight"):
            ops.weight_product.op(name)(torch.zeros(huge, 0), torch.zeros(huge, 0), True)
        # Empty outputs are fine, however large the other dimension.
        assert ops.weight_grad.op(name)(torch.zeros(0, huge), torch.zeros(0, 0), torch.float32).shape == (huge, 0)
    if "cpu" not in ops.segment_sum.backends():
        return
    with pytest.raises(ValueError, match="x's tokens"):
        torch.ops.vsops.lis_segment_dot(torch.zeros(16, 1 << 44, 0), torch.zeros(16, 0), torch.zeros(16), None)
    with pytest.raises(ValueError, match="x's segments and width"):
        torch.ops.vsops.lis_segment_sum(torch.zeros(1 << 4, 0, 1 << 44), None, None)
    with pytest.raises(ValueError, match="grad's tokens and u's width"):
        # 2^24 tokens of width 2^23: 2^49 bytes of output from 128 MiB of operands.
        u = torch.zeros(1, 1 << 23)
        torch.ops.vsops.lis_input_grad(torch.zeros(1, 1 << 24), u, u, None, torch.float32)
