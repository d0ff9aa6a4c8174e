"""vsops.methods.holov against a plain re-implementation of the published HoloV (obananas/HoloV's
chunk scores, allocation and per-chunk top attention, one image at a time), its fill to exactly
k, batched over segments, with ties; and the errors of its arguments."""
import pytest
import torch

import vsops
from vsops.methods import HoloVMethod, VisionAttention, holov, make_method
from vsops.methods.holov import chunk_counts


def published_chunks(n, k, num_patches=None):
    """The published chunks: index lists of n // c tokens, the first n % c one more, with
    c = int(1024 / 576 * n / k) (the Qwen2.5-VL code) unless given (LLaVA-1.5: 16)."""
    c = num_patches or max(1, int(((1024 / 576) * n) / k))
    size, extra = divmod(n, c)
    chunks, start = [], 0
    for p in range(c):
        m = size + (1 if p < extra else 0)
        if m > 0:
            chunks.append(list(range(start, start + m)))
        start += m
    return chunks


def published_allocation(x, received, chunks, k):
    """The published chunk weights and allocations (before any clamp to the chunk size)."""
    scores = []
    for idx in chunks:
        a = received[idx]
        if len(idx) <= 1:
            scores.append(a.mean())
            continue
        f = x[idx] / (x[idx].norm(dim=1, keepdim=True) + 1e-6)
        s = (f @ f.T) * (1 - torch.eye(len(idx), dtype=f.dtype))
        mean = s.sum(1) / (len(idx) - 1)
        var = ((s - mean[:, None]) ** 2).sum(1) / (len(idx) - 1)
        scaled = a * 1e3
        var_scaled = var * (scaled.abs().mean() / (var.abs().mean() + 1e-6))
        scores.append((scaled + 0.09 * var_scaled).mean())
    scores = torch.stack(scores).double()
    weights = scores / (scores.sum() + 1e-6)
    allocated = (weights * k).floor().long()
    remaining = k - int(allocated.sum())
    if remaining > 0:
        for c in torch.topk(weights, min(remaining, len(weights))).indices.tolist():
            allocated[c] += 1
    return weights, allocated


def published_holov(x, received, k, num_patches=None):
    """The published HoloV's kept token indices on one image: fewer than k where a chunk's
    allocation exceeds its size (the published code pads those with zeros)."""
    chunks = published_chunks(x.shape[0], k, num_patches)
    _, allocated = published_allocation(x, received, chunks, k)
    kept = []
    for idx, alloc in zip(chunks, allocated.tolist()):
        if alloc >= len(idx):
            kept += idx
        elif alloc > 0:
            kept += [idx[i] for i in torch.topk(received[idx], alloc).indices.tolist()]
    return sorted(kept)


def filled_holov(x, received, k, num_patches=None):
    """The published allocation, clamped to the chunk sizes, then the shortfall handed out one
    token per chunk with room per round, in decreasing weight (ties to the lower chunk)."""
    chunks = published_chunks(x.shape[0], k, num_patches)
    weights, allocated = published_allocation(x, received, chunks, k)
    allocated = [min(a, len(idx)) for a, idx in zip(allocated.tolist(), chunks)]
    by_weight = sorted(range(len(chunks)), key=lambda c: (-float(weights[c]), c))
    while sum(allocated) < k:
        room = [c for c in by_weight if allocated[c] < len(chunks[c])]
        for c in room[: k - sum(allocated)]:
            allocated[c] += 1
    kept = []
    for idx, alloc in zip(chunks, allocated):
        ranked = sorted(idx, key=lambda i: (-float(received[i]), i))
        kept += ranked[:alloc]
    return sorted(kept)


def tokens(n, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    received = torch.rand(n, generator=g) * 2  # distinct: the published top-k has no tie rule
    return x, received


def kept(mask):
    return mask.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("n, budget, chunks", [(576, 64 / 576, None), (576, 0.25, None), (400, 0.1, None),
                                               (97, 0.3, None), (576, 64 / 576, 16), (200, 0.2, 7),
                                               (64, 0.5, None), (64, 0.95, None)])
def test_one_image_equals_the_published_algorithm(n, budget, chunks):
    x, received = tokens(n, seed=n)
    k = vsops.budget_to_k(n, budget)
    expected = published_holov(x, received, k, chunks)
    assert len(expected) == k  # no chunk overflows: the published count is k
    assert kept(holov(x, k, received, chunks=chunks)) == expected


def test_the_chunk_count_is_the_published_rule():
    n = torch.tensor([576, 576, 576, 10, 10, 5, 0, 7])
    k = torch.tensor([64, 192, 576, 1, 2, 0, 0, 7])
    assert chunk_counts(n, k).tolist() == [16, 5, 1, 10, 8, 1, 0, 1]  # at most n; 1 for k = 0
    assert chunk_counts(n, k, 16).tolist() == [16, 16, 16, 10, 10, 1, 0, 7]
    for size in range(1, 300, 7):
        for keep in range(1, size + 1, 5):
            assert int(chunk_counts(torch.tensor([size]), torch.tensor([keep]))) == min(
                size, len(published_chunks(size, keep)))


@pytest.mark.parametrize("seed", range(4))
def test_an_overflowing_chunk_is_filled_round_robin_by_weight(seed):
    # Chunk 1 of 4 holds most of the attention: its allocation exceeds its 10 tokens.
    x, received = tokens(40, seed=seed)
    received[10:20] += 50
    received[30:40] += 5
    expected = filled_holov(x, received, 24, num_patches=4)
    assert len(published_holov(x, received, 24, num_patches=4)) < 24  # the published count falls short
    keep = holov(x, 24, received, chunks=4)
    assert kept(keep) == expected and len(expected) == 24
    assert keep[10:20].all()


def test_the_similarity_variance_weighs_in_the_chunk_score():
    # Two chunks of 20: mutually orthogonal tokens (similarity variance 0, score = attention)
    # with 2% more attention, then random tokens (score about 1.09 times their attention). The
    # variance term hands the remainder token to the second chunk.
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.eye(24)[:20], torch.randn(20, 24, generator=g)])
    base = 1 + torch.randperm(20, generator=g).float() / 100
    received = torch.cat([base * 1.02, base.flip(0)])
    expected = published_holov(x, received, 21, num_patches=2)
    assert len(expected) == 21 and sum(i >= 20 for i in expected) == 11
    assert kept(holov(x, 21, received, chunks=2)) == expected


def test_a_one_token_chunk_scores_on_the_scale_of_the_others():
    # n = 10, k = 2: 8 chunks of sizes 2, 2, 1, ..., 1. Token 9 alone in its chunk holds most of
    # the attention; the published score (raw attention, unscaled) gives its chunk nothing.
    x, received = tokens(10, seed=1)
    received[9] = 20.0
    assert 9 not in published_holov(x, received, 2)
    assert holov(x, 2, received)[9]


def test_exactly_k_per_segment_and_segments_equal_each_segment_alone():
    g = torch.Generator().manual_seed(5)
    lengths = [0, 1, 5, 37, 100, 64, 13]
    x, received = tokens(sum(lengths), seed=5)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for trial in range(6):
        ks = [0 if n == 0 else int(torch.randint(0, n + 1, (1,), generator=g)) for n in lengths]
        ks[3], ks[4], ks[5] = [0, 1, 37][trial % 3], 100 if trial % 2 else 1, trial % 2 * 64
        keep = holov(x, ks, received, cu_seqlens=cu)
        assert keep.dtype == torch.bool and keep.shape == (x.shape[0],)
        for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            assert int(keep[start:end].sum()) == ks[s]
            assert torch.equal(keep[start:end], holov(x[start:end], ks[s], received[start:end]))
    chunks = [int(c) for c in chunk_counts(torch.tensor(lengths), torch.tensor(ks))]
    assert max(chunks) > 1  # the chunk scores are read


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    x, _ = tokens(8)
    received = torch.tensor([1.0, 3, 3, float("nan"), 3, 2, 2, 0])
    assert kept(holov(x, 4, received, chunks=1)) == [1, 2, 4, 5]
    assert kept(holov(x, 7, received, chunks=1)) == [0, 1, 2, 4, 5, 6, 7]
    # Equal chunk weights (identical tokens, equal attention): the remainder goes to the lower
    # chunks, and within a chunk the lower index wins.
    same = torch.ones(12, 4)
    assert kept(holov(same, 2, torch.ones(12), chunks=4)) == [0, 3]
    # NaN attention adds nothing to its chunk's score.
    received = torch.ones(12)
    received[:3] = float("nan")
    assert kept(holov(same, 1, received, chunks=4)) == [3]


def test_zero_attention_and_zero_tokens_still_keep_k():
    x, _ = tokens(30)
    keep = holov(x, 9, torch.zeros(30), chunks=5)
    assert kept(keep) == [0, 1, 6, 7, 12, 13, 18, 19, 24]  # equal weights: round-robin from chunk 0
    assert int(holov(torch.zeros(30, 4), 9, torch.rand(30)).sum()) == 9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes(dtype):
    x, _ = tokens(200, seed=9)
    # Distinct integers, exact in every dtype: no ties after the cast.
    received = torch.randperm(200, generator=torch.Generator().manual_seed(9)).float() + 1
    k = 30
    expected = published_holov(x.double(), received.double(), k)
    assert len(expected) == k
    assert kept(holov(x.to(dtype), k, received)) == expected
    assert kept(holov(x, k, received.to(dtype))) == expected


def test_the_method_reads_the_vision_tower_attention():
    x, received = tokens(50)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    k = torch.tensor([5, 9])
    method = make_method("holov", chunks=3)
    assert isinstance(method, HoloVMethod) and repr(method) == "HoloVMethod(chunks=3)"
    assert vsops.methods.VISION_ATTENTION in method.needs
    chosen = method.select(x, k, cu, vision=VisionAttention(received, torch.randn(50, 4)))
    assert chosen.embeds is None and chosen.merged_into is None
    assert torch.equal(chosen.keep, holov(x, k, received, cu_seqlens=cu, chunks=3))
    vsops.methods.check_selected(chosen, method, x, k, cu)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, r: holov(x.long(), 3, r), TypeError, "x must be"),
        (lambda x, r: holov(x[:, 0], 3, r), ValueError, "x must be"),
        (lambda x, r: holov(x, 3, r.long()), TypeError, "received must be"),
        (lambda x, r: holov(x, 3, r[:-1]), TypeError, "received must be"),
        (lambda x, r: holov(x, 3, r.unsqueeze(1)), TypeError, "received must be"),
        (lambda x, r: holov(x, 11, r), ValueError, "k must be in"),
        (lambda x, r: holov(x, -1, r), ValueError, "k must be in"),
        (lambda x, r: holov(x, 2.0, r), TypeError, "k must be"),
        (lambda x, r: holov(x, [1, 2], r), ValueError, "one entry per segment"),
        (lambda x, r: holov(x, 3, r, cu_seqlens=torch.tensor([0, 10])), TypeError, "cu_seqlens"),
        (lambda x, r: holov(x, 3, r, chunks=0), ValueError, "chunks"),
        (lambda x, r: holov(x, 3, r, chunks=2.0), TypeError, "chunks"),
        (lambda x, r: HoloVMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32)),
         ValueError, "needs the vision tower's attention"),
        (lambda x, r: HoloVMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32),
                                           vision=VisionAttention(r[:5], x)), ValueError, "vision.received"),
    ],
)
def test_bad_arguments(call, error, match):
    x, received = tokens(10)
    with pytest.raises(error, match=match):
        call(x, received)
