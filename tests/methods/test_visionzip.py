"""vsops.methods.visionzip against a plain re-implementation of the published VisionZip
(dvlab-research/VisionZip's dominant + contextual tokens, one image at a time), batched over
segments, at the budget's edges, with ties; and the errors of its arguments."""
import pytest
import torch

import vsops
from vsops.methods import VisionAttention, VisionZipMethod, merge_rows, visionzip
from vsops.methods.visionzip import contextual_counts


def published_visionzip(x, received, keys, dominant_num, contextual_num):
    """The published algorithm on one image without its CLS token, as its code does it (the
    batch dimension of 1 kept): returns the kept token indices and their embeddings, the
    dominant tokens first (in index order), then the contextual ones."""
    n = x.shape[0]
    topk = received.unsqueeze(0).topk(dominant_num, dim=1).indices
    mask = torch.ones(1, n, dtype=torch.bool).scatter_(1, topk, False)
    dominant_index = (~mask[0]).nonzero().squeeze(1)
    dominant = x[dominant_index].unsqueeze(0)
    remaining_index = mask[0].nonzero().squeeze(1)
    hidden_filtered = x[remaining_index].unsqueeze(0)
    metric_filtered = keys[remaining_index].unsqueeze(0)
    metric_normalized = metric_filtered / metric_filtered.norm(dim=-1, keepdim=True)
    step = max(1, metric_normalized.shape[1] // contextual_num)
    target_indices = torch.arange(0, metric_normalized.shape[1], step)[:contextual_num]
    target_tokens = metric_normalized[:, target_indices, :]
    merge = ~torch.isin(torch.arange(metric_normalized.shape[1]), target_indices)
    tokens_to_merge = metric_normalized[:, merge, :]
    similarity = torch.bmm(tokens_to_merge, target_tokens.transpose(1, 2))
    assign_one_hot = torch.zeros(1, tokens_to_merge.shape[1], contextual_num, dtype=x.dtype)
    assign_one_hot.scatter_(2, similarity.argmax(dim=2).unsqueeze(-1), 1)
    counts = assign_one_hot.sum(dim=1).clamp(min=1).unsqueeze(-1)
    aggregated = torch.bmm(assign_one_hot.transpose(1, 2), hidden_filtered[:, merge, :]) / counts
    contextual = hidden_filtered[:, target_indices, :] + aggregated
    index = torch.cat([dominant_index, remaining_index[target_indices]])
    return index, torch.cat([dominant, contextual], dim=1)[0]


def tokens(n, d=8, dk=5, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).to(dtype)
    received = torch.rand(n, generator=g)  # distinct: the published top-k has no tie rule
    keys = torch.randn(n, dk, generator=g)
    return x, received, keys


def assert_matches_published(chosen, x, received, keys, k, ratio):
    n = x.shape[0]
    contextual = int(contextual_counts(torch.tensor([n]), torch.tensor([k]), ratio))
    index, rows = published_visionzip(x.float(), received, keys, k - contextual, contextual) if contextual else (
        received.topk(k).indices, x[received.topk(k).indices].float())
    assert sorted(chosen.keep.nonzero().squeeze(1).tolist()) == sorted(index.tolist())
    torch.testing.assert_close(chosen.embeds[index], rows.to(x.dtype))


@pytest.mark.parametrize("n, budget, ratio", [(64, 0.25, 0.05), (97, 0.1, 0.05), (40, 0.5, 0.2), (30, 1.0, 0.1),
                                              (50, 0.2, 0.0), (33, 0.3, 0.25), (20, 0.01, 0.05)])
def test_one_image_equals_the_published_algorithm(n, budget, ratio):
    x, received, keys = tokens(n, seed=n)
    k = vsops.budget_to_k(n, budget)
    chosen = visionzip(x, k, received, keys, contextual_ratio=ratio)
    assert int(chosen.keep.sum()) == k
    assert_matches_published(chosen, x, received, keys, k, ratio)
    # Tokens kept as they are keep their embeddings; dropped rows are left as they were.
    untouched = ~chosen.keep | torch.isin(torch.arange(n), received.topk(k - int(contextual_counts(
        torch.tensor([n]), torch.tensor([k]), ratio))).indices)
    torch.testing.assert_close(chosen.embeds[untouched], x[untouched])


def test_the_budget_rule():
    n, k = torch.tensor([100, 100, 100, 7, 5]), torch.tensor([20, 5, 1, 7, 0])
    # floor(0.05 n) contextual tokens, at least one dominant, none of nothing.
    assert contextual_counts(n, k, 0.05).tolist() == [5, 4, 0, 0, 0]
    assert contextual_counts(n, k, 0.5).tolist() == [19, 4, 0, 3, 0]


def test_packed_segments_equal_each_segment_alone():
    lengths, ks = [40, 1, 0, 25, 9], [10, 1, 0, 25, 2]
    x, received, keys = tokens(sum(lengths), seed=7)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    chosen = visionzip(x, ks, received, keys, cu_seqlens=cu, contextual_ratio=0.1)
    for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = visionzip(x[start:end], ks[s], received[start:end], keys[start:end], contextual_ratio=0.1)
        assert torch.equal(chosen.keep[start:end], alone.keep)
        torch.testing.assert_close(chosen.embeds[start:end], alone.embeds)


def test_merged_into_merges_any_rows_as_the_embeddings():
    lengths, ks = [40, 0, 25], [10, 0, 7]
    x, received, keys = tokens(sum(lengths), seed=8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    chosen = visionzip(x, ks, received, keys, cu_seqlens=cu, contextual_ratio=0.1)
    into = chosen.merged_into
    assert into.dtype == torch.int64 and into.shape == (x.shape[0],)
    # Dropped tokens join kept ones of their own segment; nothing joins a dominant token.
    sources = (into >= 0).nonzero().squeeze(1)
    assert sources.numel() > 0 and not chosen.keep[sources].any() and chosen.keep[into[sources]].all()
    segment = torch.bucketize(torch.arange(x.shape[0]), cu[1:].long(), right=True)
    assert torch.equal(segment[sources], segment[into[sources]])
    torch.testing.assert_close(merge_rows(x, into), chosen.embeds, rtol=0, atol=0)
    # The assignment reads the attention and keys only: other rows (e.g. a model's deepstack
    # features, here [N, 2, 3] in float64) merge as VisionZip would merge them as embeddings.
    other = torch.randn(x.shape[0], 2, 3, dtype=torch.float64)
    as_embeds = visionzip(other.flatten(1), ks, received, keys, cu_seqlens=cu, contextual_ratio=0.1).embeds
    torch.testing.assert_close(merge_rows(other, into), as_embeds.view_as(other))
    torch.testing.assert_close(merge_rows(other[:, 0, 0], into), as_embeds[:, 0])
    nothing = torch.full_like(into, -1)
    assert torch.equal(merge_rows(other, nothing), other)


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    x, _, keys = tokens(12)
    received = torch.tensor([1.0, 3, 3, 0, 3, 2, 2, 0, 0, float("nan"), 0, 0])
    chosen = visionzip(x, 4, received, keys, contextual_ratio=0.0)
    assert chosen.keep.nonzero().squeeze(1).tolist() == [1, 2, 4, 5]
    # Two targets with the same key: a token joins the first.
    keys = torch.ones(12, 5)
    chosen = visionzip(x, 3, torch.arange(12.0), keys, contextual_ratio=0.2)
    # dominant: 11; remaining 0..10, targets at stride 5: 0 and 5; all others join target 0.
    assert chosen.keep.nonzero().squeeze(1).tolist() == [0, 5, 11]
    others = [i for i in range(11) if i not in (0, 5)]
    torch.testing.assert_close(chosen.embeds[0], x[0] + x[others].mean(0))
    torch.testing.assert_close(chosen.embeds[5], x[5])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_precision_tokens_merge_in_float32(dtype):
    x, received, keys = tokens(60, dtype=dtype, seed=2)
    chosen = visionzip(x, 12, received, keys)
    assert chosen.embeds.dtype == dtype
    assert_matches_published(chosen, x, received, keys, 12, 0.05)


def test_a_zero_key_joins_the_first_target():
    x, received, keys = tokens(20, seed=3)
    keys[[i for i in range(20) if i % 2]] = 0
    chosen = visionzip(x, 4, received, keys, contextual_ratio=0.1)
    assert torch.isfinite(chosen.embeds).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, r, k: visionzip(x, 3, r[:-1], k), TypeError, "received must be"),
        (lambda x, r, k: visionzip(x, 3, r, k[:, 0]), TypeError, "keys must be"),
        (lambda x, r, k: visionzip(x, 30, r, k), ValueError, "k must be in"),
        (lambda x, r, k: visionzip(x, 3, r, k, contextual_ratio=1.0), ValueError, "contextual_ratio"),
        (lambda x, r, k: visionzip(x, 3, r, k, contextual_ratio="0.1"), TypeError, "contextual_ratio"),
        (lambda x, r, k: VisionZipMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32)),
         ValueError, "needs the vision tower's attention"),
        (lambda x, r, k: VisionZipMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32),
                                                  vision=VisionAttention(r[:5], k)), ValueError, "vision.received"),
    ],
)
def test_bad_arguments(call, error, match):
    x, received, keys = tokens(10)
    with pytest.raises(error, match=match):
        call(x, received, keys)
