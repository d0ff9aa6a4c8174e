"""torch.ops.vsops.attention_received on every backend that has it, against the reference on the
same inputs (and the reference against a materialized softmax): ragged segments, empty and
size-1 segments, CLS-style one-query segments, every float dtype; opcheck, torch.compile and
the argument checks of the kernels and of the public function."""
import pytest
import torch

from vsops import backends, reference
from vsops.ops import attention_received as ops

BACKENDS = [b for b in ops.received.implemented() if backends.available()[b]]
INTERPRETED = not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-6, torch.float16: 2e-6}


def device_for(backend):
    return DEVICE if backend in ("triton", "cuda") else torch.device("cpu")


def cu(lengths):
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)


def qk(q_lengths, k_lengths, heads=3, d=16, dtype=torch.float32, seed=0, spread=2.0):
    g = torch.Generator().manual_seed(seed)
    q = (spread * torch.randn(sum(q_lengths), heads, d, generator=g, dtype=torch.float64)).to(dtype)
    k = torch.randn(sum(k_lengths), heads, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, cu(q_lengths), cu(k_lengths)


def materialized(q, k, cq, ck, scale):
    """The definition, with each segment's attention formed whole (float64)."""
    out = torch.zeros(k.shape[0], dtype=torch.float64)
    for s in range(cq.numel() - 1):
        qs, ks = q[cq[s]:cq[s + 1]].double(), k[ck[s]:ck[s + 1]].double()
        if qs.shape[0] and ks.shape[0]:
            p = torch.einsum("ihd,jhd->hij", qs, ks).mul(scale).softmax(-1)
            out[ck[s]:ck[s + 1]] = p.mean((0, 1))
    return out


def test_the_kernels_are_registered():
    assert {"cpu", "triton", "reference"} <= set(ops.received.backends())
    assert ("cuda" in ops.received.implemented()) == backends.available()["cuda"]
    for name in ops.received.op_names():
        assert hasattr(torch.ops.vsops, name), name


def test_the_reference_is_the_definition():
    q, k, cq, ck = qk([5, 0, 9, 1], [7, 3, 0, 1], dtype=torch.float64)
    got = reference.attention_received(q, k, cq, ck, 0.4)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, materialized(q, k, cq, ck, 0.4), rtol=0, atol=1e-14)
    # Keys of a segment with queries sum to 1; without queries, 0.
    assert got[7:10].abs().sum() == 0
    torch.testing.assert_close(got[:7].sum(), torch.tensor(1.0, dtype=torch.float64))


def test_the_reference_tiles_query_rows(monkeypatch):
    monkeypatch.setattr(reference, "TILE_ELEMENTS", 50)
    q, k, cq, ck = qk([40], [9], dtype=torch.float64)
    torch.testing.assert_close(reference.attention_received(q, k, cq, ck, 0.25), materialized(q, k, cq, ck, 0.25))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_the_reference_on_ragged_segments(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton serves fp16/bf16/fp32")
    q, k, cq, ck = qk([1, 0, 37, 5, 70, 2, 3], [1, 4, 37, 0, 70, 1, 130], dtype=dtype)
    device = device_for(backend)
    got = ops.received.op(backend)(q.to(device), k.to(device), cq.to(device), ck.to(device), 0.3).cpu()
    expected = reference.attention_received(q, k, cq, ck, 0.3)
    assert got.dtype == expected.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-4 if dtype != torch.float64 else 1e-10, atol=TOLERANCE[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_query_per_segment_and_sharp_softmax(backend):
    # The CLS form: one query row per segment. Large logits: the softmax statistics must be
    # those of the whole row, not of one key block.
    q, k, cq, ck = qk([1, 1, 1], [3, 200, 65], heads=2, d=32, seed=3, spread=8.0)
    device = device_for(backend)
    got = ops.received.op(backend)(q.to(device), k.to(device), cq.to(device), ck.to(device), 1.0).cpu()
    torch.testing.assert_close(got.double(), materialized(q, k, cq, ck, 1.0), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_inputs(backend):
    device = device_for(backend)
    q, k, cq, ck = qk([0, 0], [0, 0])
    got = ops.received.op(backend)(q.to(device), k.to(device), cq.to(device), ck.to(device), 1.0)
    assert got.shape == (0,)
    q, k, cq, ck = qk([0], [6])
    assert ops.received.op(backend)(q.to(device), k.to(device), cq.to(device), ck.to(device), 1.0).abs().sum() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_segment(backend):
    if backend == "triton" and INTERPRETED:
        pytest.skip("too slow for the Triton interpreter")
    q, k, cq, ck = qk([1500], [1500], heads=2, d=40, seed=4)
    torch.testing.assert_close(ops.received.op(backend)(q, k, cq, ck, 0.2), reference.attention_received(q, k, cq, ck, 0.2),
                               rtol=1e-4, atol=1e-7)


def test_opcheck_and_compile():
    q, k, cq, ck = qk([7, 0, 12], [5, 2, 12])
    for backend in BACKENDS:
        if backend == "triton" and INTERPRETED:
            continue  # the interpreter is too slow for opcheck's repeats
        device = device_for(backend)
        torch.library.opcheck(ops.received.op(backend), (q.to(device), k.to(device), cq.to(device), ck.to(device), 0.5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: ops.received(*a, 0.5, backend="cpu"), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, cq, ck), reference.attention_received(q, k, cq, ck, 0.5))


def test_the_public_function_defaults():
    q, k, _, _ = qk([6], [6], d=9)
    expected = reference.attention_received(q, q, cu([6]), cu([6]), 9**-0.5)
    torch.testing.assert_close(ops.attention_received(q, q), expected)
    torch.testing.assert_close(ops.attention_received(q, q, None, cu([6])), expected)
    with pytest.raises(ValueError, match="cu_seqlens_k"):
        ops.attention_received(q, q, cu([6]))


KERNEL_CASES = [
    ((torch.arange(6.0).view(3, 2), torch.randn(3, 1, 2), cu([3]), cu([3]), 1.0), ValueError, "q must be"),
    ((torch.randn(3, 1, 2), torch.randn(3, 1, 2).double(), cu([3]), cu([3]), 1.0), TypeError, "one dtype"),
    ((torch.randn(3, 1, 2), torch.randn(3, 2, 2), cu([3]), cu([3]), 1.0), ValueError, "heads"),
    ((torch.randn(3, 1, 2), torch.randn(3, 1, 2), cu([2]), cu([3]), 1.0), ValueError, "cu_seqlens"),
    ((torch.randn(3, 1, 2), torch.randn(3, 1, 2), cu([3]), cu([1, 2]), 1.0), ValueError, "one entry per segment"),
    ((torch.randn(3, 1, 2), torch.randn(3, 1, 2), cu([3]).long(), cu([3]), 1.0), TypeError, "int32"),
    ((torch.randn(3, 1, 2), torch.randn(3, 1, 2), cu([3]), cu([3]), float("inf")), (TypeError, ValueError), "scale"),
]


@pytest.mark.parametrize("args, error, match", KERNEL_CASES)
def test_the_kernel_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.vsops.attention_received(*args)


@pytest.mark.parametrize("args, error, match", KERNEL_CASES)
def test_the_python_backends_get_the_same_checks(args, error, match, monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "reference")  # else the compiled op's own checks answer
    with pytest.raises(error, match=match):
        ops.attention_received(*args[:4], scale=args[4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k"])
def test_nan_stays_in_its_segment(backend, where):
    """A NaN in one segment's queries or keys makes that segment's keys NaN, no other's."""
    q, k, cq, ck = qk([4, 3], [5, 6])
    (q if where == "q" else k)[1, 0, 0] = float("nan")
    device = device_for(backend)
    got = ops.received.op(backend)(q.to(device), k.to(device), cq.to(device), ck.to(device), 0.25).cpu()
    assert got[:5].isnan().all() and got[5:].isfinite().all()
    torch.testing.assert_close(got[5:], materialized(q, k, cq, ck, 0.25)[5:].float(), rtol=0, atol=2e-6)
