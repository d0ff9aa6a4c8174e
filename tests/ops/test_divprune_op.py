"""torch.ops.vsops.divprune_keep on every backend that has it, against the reference on the same
inputs: ragged segments, empty and size-1 segments, k at 0 and n, ties, zero and NaN tokens,
every float dtype; opcheck, torch.compile and the C++ argument checks."""
import pytest
import torch

from vsops import backends, reference
from vsops.ops import divprune as ops

BACKENDS = [b for b in ops.keep.implemented() if backends.available()[b]]
# The Triton interpreter (CI has no GPU) runs numpy per program: small inputs only there.
INTERPRETED = not torch.cuda.is_available()
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_for(backend):
    return DEVICE if backend in ("triton", "cuda") else torch.device("cpu")


def packed(lengths, d=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), d, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    return x, cu


def test_the_kernels_are_registered():
    assert {"cpu", "triton", "reference"} <= set(ops.keep.backends())
    assert ("cuda" in ops.keep.implemented()) == backends.available()["cuda"]
    for name in ops.keep.op_names():
        assert hasattr(torch.ops.vsops, name), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_the_reference_on_ragged_segments(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton serves fp16/bf16/fp32")
    lengths = [1, 0, 37, 5, 300, 2]
    x, cu = packed(lengths, dtype=dtype)
    k = torch.tensor([1, 0, 9, 5, 31, 1])
    device = device_for(backend)
    got = ops.keep.op(backend)(x.to(device), k.to(device), cu.to(device)).cpu()
    expected = reference.divprune_keep(x, k, cu)
    assert got.dtype == torch.bool and torch.equal(got, expected)
    assert [int(part.sum()) for part in torch.split(got, lengths)] == k.tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_zero_and_nan_tokens(backend):
    ties = torch.eye(4).repeat_interleave(2, dim=0)  # pairs of identical tokens
    x = torch.cat([ties, torch.zeros(2, 4), torch.randn(6, 4, generator=torch.Generator().manual_seed(1))])
    x[-1, 0] = float("nan")
    cu = torch.tensor([0, 8, 16], dtype=torch.int32)
    k = torch.tensor([4, 5])
    device = device_for(backend)
    got = ops.keep.op(backend)(x.to(device), k.to(device), cu.to(device)).cpu()
    assert torch.equal(got, reference.divprune_keep(x, k, cu))
    assert got[:8].tolist() == [True, False] * 4 and not got[-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, d", [(3000, 40), (4200, 8)], ids=["similarities-kept", "one-product-per-pick"])
def test_large_segment(backend, n, d):
    if backend == "triton" and INTERPRETED:
        pytest.skip("too slow for the Triton interpreter")
    assert reference.divprune_keeps_similarity(n, d) == (n == 3000)
    x, cu = packed([n], d=d, seed=4)
    k = torch.tensor([n // 10])
    assert torch.equal(ops.keep.op(backend)(x, k, cu), reference.divprune_keep(x, k, cu))


def test_opcheck_and_compile():
    x, cu = packed([7, 0, 12])
    k = torch.tensor([3, 0, 12])
    for backend in BACKENDS:
        if backend == "triton" and INTERPRETED:
            continue  # the interpreter is too slow for opcheck's repeats
        device = device_for(backend)
        torch.library.opcheck(ops.keep.op(backend), (x.to(device), k.to(device), cu.to(device)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, k, cu: ops.keep(x, k, cu, backend="cpu"), fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, k, cu), reference.divprune_keep(x, k, cu))


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((torch.arange(6).view(3, 2), torch.tensor([1]), torch.tensor([0, 3], dtype=torch.int32)), TypeError, "x must be"),
        ((torch.randn(3, 2), torch.tensor([4]), torch.tensor([0, 3], dtype=torch.int32)), ValueError, "k must not exceed"),
        ((torch.randn(3, 2), torch.tensor([1, 1]), torch.tensor([0, 3], dtype=torch.int32)), ValueError, "k must be"),
        ((torch.randn(3, 2), torch.tensor([1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32)), TypeError,
         "k must be int64"),
        ((torch.randn(3, 2), torch.tensor([1]), torch.tensor([0, 2], dtype=torch.int32)), ValueError, "cu_seqlens"),
        ((torch.randn(3), torch.tensor([1]), torch.tensor([0, 3], dtype=torch.int32)), ValueError, "x must be"),
    ],
)
def test_the_kernel_refuses_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        torch.ops.vsops.divprune_keep(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_across_tiles_go_to_the_lower_index(backend):
    # Token 0 is the first pick (its nearest neighbour is the farthest); tokens 10 and 150,
    # in different sweep tiles of the Triton kernel, are both at distance 2 from it.
    g = torch.Generator().manual_seed(5)
    x = torch.zeros(300, 3)
    x[:, 1] = 1.0
    x[:, 2] = 0.01 * torch.randn(300, generator=g)
    x[0] = torch.tensor([1.0, 0.0, 0.0])
    x[10] = x[150] = torch.tensor([-1.0, 0.0, 0.0])
    cu = torch.tensor([0, 300], dtype=torch.int32)
    k = torch.tensor([2])
    device = device_for(backend)
    got = ops.keep.op(backend)(x.to(device), k.to(device), cu.to(device)).cpu()
    assert got.nonzero().squeeze(1).tolist() == [0, 10]


@pytest.mark.parametrize(
    "k, cu, error, match",
    [
        (torch.tensor([4]), torch.tensor([0, 3], dtype=torch.int32), ValueError, "k must be in"),
        (torch.tensor([1], dtype=torch.int32), torch.tensor([0, 3], dtype=torch.int32), TypeError, "int64"),
        (torch.tensor([1]), torch.tensor([0, 2], dtype=torch.int32), ValueError, "cu_seqlens"),
        (torch.tensor([1, 1]), torch.tensor([0, 3], dtype=torch.int32), ValueError, "one entry per segment"),
    ],
)
def test_the_python_backends_get_the_same_checks(k, cu, error, match, monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "reference")  # else the compiled op's own checks answer
    with pytest.raises(error, match=match):
        ops.divprune_keep(torch.randn(3, 2), k, cu)
