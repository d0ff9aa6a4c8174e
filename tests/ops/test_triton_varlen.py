"""The varlen pack/unpack Triton kernels (vsops/triton/varlen.py) against vsops.reference.

CI has no GPU: it runs this file with TRITON_INTERPRET=1 (CPU tensors). The kernels copy raw
integer words, so every dtype goes through the same code; the ``small_tiles`` cases shrink the
blocks so that small shapes cross every token block, count group and column tile boundary.
"""
import pytest
import torch

from triton_preamble import DEVICE  # first: it skips the module where Triton cannot run

from vsops import reference
from vsops import varlen as public
from vsops.ops import varlen as varlen_ops
from vsops.triton import varlen

B, L = 3, 41  # 123 tokens: not a multiple of any block
FILLS = (0, -100, 1.5)


def _keep(pattern, seed=0):
    n = B * L
    keep = torch.zeros(n, dtype=torch.bool)
    if pattern == "all":
        keep[:] = True
    elif pattern == "first":
        keep[0] = True
    elif pattern == "last":
        keep[-1] = True
    elif pattern == "ragged":
        # Runs of kept and dropped tokens of random lengths, then a whole sample dropped.
        g = torch.Generator().manual_seed(seed)
        keep = torch.rand(n, generator=g) < torch.rand(n // 8 + 1, generator=g).repeat_interleave(8)[:n]
        keep[L:2 * L] = False
    return keep.view(B, L).to(DEVICE)


def _rows(seed=1):
    """One tensor per word width: float32 rows of 148 bytes (int32 words), int64, bool (one
    byte), float16 of 10 bytes (int16 words), and float32 at an odd element offset (int32
    words, where its 16-byte rows alone would allow int64)."""
    g = torch.Generator().manual_seed(seed)
    n = B * L
    offset = torch.randn(n * 4 + 1, generator=g)[1:].view(n, 4)
    rows = [
        torch.randn(n, 37, generator=g),
        torch.randint(-2**40, 2**40, (n, 3), generator=g),
        torch.rand(n, 1, generator=g) < 0.5,
        torch.randn(n, 5, generator=g).half(),
        offset,
    ]
    return [r.to(DEVICE) for r in rows]


def _assert_equal(actual, expected):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(actual, expected)


@pytest.fixture
def small_tiles(monkeypatch):
    monkeypatch.setattr(varlen, "TOKEN_BLOCK", 4)
    monkeypatch.setattr(varlen, "WORD_BLOCK", 8)
    monkeypatch.setattr(varlen, "COUNT_GROUP", 2)
    monkeypatch.setattr(varlen, "SCATTER_BLOCK", 8)


def _check_pack_unpack(pattern):
    keep, rows = _keep(pattern), _rows()
    total = int(keep.sum())
    indices, packed = varlen.varlen_pack(keep, total, rows)
    ref_indices, ref_packed = reference.varlen_pack(keep, total, rows)
    _assert_equal(indices, ref_indices)
    for actual, expected in zip(packed, ref_packed):
        _assert_equal(actual, expected)
    for p in ref_packed:
        for fill in FILLS:
            _assert_equal(varlen.varlen_unpack(p, indices, B * L, fill),
                          reference.varlen_unpack(p, indices, B * L, fill))


@pytest.mark.parametrize("pattern", ["all", "none", "first", "last", "ragged"])
def test_pack_unpack(pattern):
    _check_pack_unpack(pattern)


@pytest.mark.parametrize("pattern", ["all", "ragged"])
def test_pack_unpack_small_tiles(small_tiles, pattern):
    _check_pack_unpack(pattern)


def test_pack_columns_wider_than_a_tile():
    # 600 float32 columns: int64 words, 300 of them over three column tiles.
    keep = _keep("ragged", seed=2)
    wide = torch.randn(B * L, 600).to(DEVICE)
    indices, (packed,) = varlen.varlen_pack(keep, int(keep.sum()), [wide])
    _assert_equal(packed, wide[reference.varlen_pack(keep, int(keep.sum()), [])[0]])
    _assert_equal(varlen.varlen_unpack(packed, indices, B * L, -1.0),
                  reference.varlen_unpack(packed, indices, B * L, -1.0))


def test_pack_without_rows_and_empty_columns():
    keep = _keep("ragged")
    total = int(keep.sum())
    no_columns = torch.empty(B * L, 0, device=DEVICE)
    indices, packed = varlen.varlen_pack(keep, total, [no_columns])
    _assert_equal(indices, reference.varlen_pack(keep, total, [])[0])
    assert packed[0].shape == (total, 0)
    _assert_equal(varlen.varlen_pack(keep, total, [])[0], indices)


def test_pack_writes_at_most_total_rows(small_tiles):
    # total below the kept count: the kernels cannot check it without a host sync, but must
    # keep the first ``total`` tokens and write nothing past them.
    keep, rows = _keep("ragged"), _rows()
    ref_indices, ref_packed = reference.varlen_pack(keep, int(keep.sum()), rows)
    total = ref_indices.numel() // 2
    indices, packed = varlen.varlen_pack(keep, total, rows)
    _assert_equal(indices, ref_indices[:total])
    for actual, expected in zip(packed, ref_packed):
        _assert_equal(actual, expected[:total])


def test_unpack_any_index_order(small_tiles):
    # unpack does not need pack's increasing indices; a permutation of a subset, with all
    # rows but one packed.
    g = torch.Generator().manual_seed(5)
    rows = 37
    indices = torch.randperm(rows, generator=g)[: rows - 1].to(DEVICE)
    for p in _rows()[:3]:
        p = p[: rows - 1].contiguous()
        for fill in FILLS:
            _assert_equal(varlen.varlen_unpack(p, indices, rows, fill),
                          reference.varlen_unpack(p, indices, rows, fill))


def test_unpack_skips_indices_out_of_range(small_tiles):
    # Unchecked on the device (a host sync): such rows are dropped, never written out of bounds.
    packed = torch.arange(12, dtype=torch.int64, device=DEVICE).view(4, 3)
    indices = torch.tensor([-1, 2, 9, 0], device=DEVICE)
    expected = torch.full((9, 3), -7, dtype=torch.int64, device=DEVICE)
    expected[[2, 0]] = packed[[1, 3]]
    _assert_equal(varlen.varlen_unpack(packed, indices, 9, -7), expected)


def test_unpack_without_packed_rows():
    empty = torch.empty(0, 3, dtype=torch.int64, device=DEVICE)
    out = varlen.varlen_unpack(empty, torch.empty(0, dtype=torch.long, device=DEVICE), 5, -100)
    _assert_equal(out, torch.full((5, 3), -100, dtype=torch.int64, device=DEVICE))


def test_bad_arguments_are_refused():
    keep = _keep("ragged")
    rows = [torch.randn(B * L, 4, device=DEVICE)]
    with pytest.raises(TypeError, match="keep must be bool"):
        varlen.varlen_pack(keep.to(torch.uint8), 1, rows)
    with pytest.raises(ValueError, match=r"rows\[0\] must be a contiguous"):
        varlen.varlen_pack(keep, 1, [rows[0].T.contiguous().T])
    with pytest.raises(ValueError, match="indices must be a contiguous"):
        varlen.varlen_unpack(rows[0], torch.arange(3, device=DEVICE), B * L, 0)
    with pytest.raises(ValueError, match="fewer than"):
        varlen.varlen_unpack(rows[0], torch.arange(B * L, device=DEVICE), 2, 0)


def _spy(monkeypatch, name):
    calls = []
    kernel = getattr(varlen, name)

    def spy(*args):
        calls.append(name)
        return kernel(*args)

    monkeypatch.setattr(varlen, name, spy)
    return calls


def test_registered_ops_and_public_api_reach_the_kernels(monkeypatch):
    monkeypatch.setenv("VSOPS_BACKEND", "triton")
    pack_calls = _spy(monkeypatch, "varlen_pack")
    unpack_calls = _spy(monkeypatch, "varlen_unpack")
    keep, rows = _keep("ragged"), _rows()[:2]
    total = int(keep.sum())
    ref_indices, ref_packed = reference.varlen_pack(keep, total, rows)

    indices, packed = torch.ops.vsops.varlen_pack_triton(keep, total, rows)
    _assert_equal(indices, ref_indices)
    _assert_equal(packed[1], ref_packed[1])
    _assert_equal(torch.ops.vsops.varlen_unpack_triton(packed[1], indices, B * L, -100),
                  reference.varlen_unpack(packed[1], indices, B * L, -100))
    assert (pack_calls, unpack_calls) == (["varlen_pack"], ["varlen_unpack"])

    # The public API with the backend forced, and the gradient of the pack (an unpack).
    embeds = torch.randn(B, L, 6, device=DEVICE, requires_grad=True)
    batch = public.select_and_pack(keep, embeds)
    _assert_equal(batch.tensors[0].detach(), embeds.detach().reshape(B * L, 6)[ref_indices])
    grad = torch.randn_like(batch.tensors[0])
    batch.tensors[0].backward(grad)
    expected = reference.varlen_unpack(grad, ref_indices, B * L, 0).view(B, L, 6)
    _assert_equal(embeds.grad, expected)
    assert (len(pack_calls), len(unpack_calls)) == (2, 2)
    assert varlen_ops.pack.op("triton") is torch.ops.vsops.varlen_pack_triton
