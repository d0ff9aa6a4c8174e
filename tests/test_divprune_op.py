"""torch.ops.vsops.divprune_keep on every backend that has it, against the reference on the same
inputs: ragged segments, empty and size-1 segments, k at 0 and n, ties, zero and NaN tokens,
every float dtype; opcheck, torch.compile and the C++ argument checks."""
import pytest
import torch

from vsops import reference
from vsops.ops import divprune as ops

BACKENDS = [b for b in ops.keep.backends() if b != "triton"]


def packed(lengths, d=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(lengths), d, generator=g, dtype=torch.float64).to(dtype)
    cu = torch.tensor([0, *torch.tensor(lengths, dtype=torch.long).cumsum(0).tolist()], dtype=torch.int32)
    return x, cu


def test_the_compiled_kernel_is_registered():
    assert "cpu" in ops.keep.backends() and hasattr(torch.ops.vsops, "divprune_keep")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_equals_the_reference_on_ragged_segments(backend, dtype):
    lengths = [1, 0, 37, 5, 300, 2]
    x, cu = packed(lengths, dtype=dtype)
    k = torch.tensor([1, 0, 9, 5, 31, 1])
    got = ops.keep.op(backend)(x, k, cu)
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
    got = ops.keep.op(backend)(x, k, cu)
    assert torch.equal(got, reference.divprune_keep(x, k, cu))
    assert got[:8].tolist() == [True, False] * 4 and not got[-1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n, d", [(3000, 40), (4200, 8)], ids=["similarities-kept", "one-product-per-pick"])
def test_large_segment(backend, n, d):
    assert reference.divprune_keeps_similarity(n, d) == (n == 3000)
    x, cu = packed([n], d=d, seed=4)
    k = torch.tensor([n // 10])
    assert torch.equal(ops.keep.op(backend)(x, k, cu), reference.divprune_keep(x, k, cu))


def test_opcheck_and_compile():
    x, cu = packed([7, 0, 12])
    k = torch.tensor([3, 0, 12])
    for backend in BACKENDS:
        torch.library.opcheck(ops.keep.op(backend), (x, k, cu))
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
