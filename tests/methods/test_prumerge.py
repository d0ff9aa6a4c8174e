"""vsops.methods.prumerge_plus against a plain re-implementation of the published PruMerge+
selection (the Qwen2.5-VL port of the VisionSelector baselines: IQR outliers plus a uniform
grid, one image at a time) and of its neighbourhood merge as the protocol's partition; batched
over segments, with ties; and the errors of its arguments."""
import numpy as np
import pytest
import torch

import vsops
from vsops.methods import PruMergePlusMethod, VisionAttention, make_method, merge_rows, prumerge_plus
from vsops.methods.prumerge import outlier_counts


def published_selection(received, k):
    """The published kept indices on one image, in its order (outliers by decreasing attention,
    then the grid), with the outlier count taken exactly (published: max(int(n * (o / n)), 1))."""
    n = received.shape[0]
    a = received.float().numpy()
    q1, q3 = np.percentile(a, 25), np.percentile(a, 75)
    iqr_token = max(int((a > q3 + 1.5 * (q3 - q1)).sum()), 1)
    if k <= iqr_token:
        return torch.topk(received, k).indices.tolist()
    idx = torch.topk(received, iqr_token).indices.tolist()
    step = max(1, int(n / k))
    grid = [i for i in range(0, n, step) if i not in idx]
    return idx + grid[: k - iqr_token]


def joined(keys, kept, neighbours):
    """Each dropped token's kept token (or -1): the kept tokens whose `neighbours` most similar
    other tokens (by key cosine, ties to the lower index) hold it, the most similar of them."""
    unit = keys.double() / keys.double().norm(dim=1, keepdim=True)
    sim = (unit @ unit.T).tolist()
    n = keys.shape[0]
    hood = {i: sorted((j for j in range(n) if j != i), key=lambda j: (-sim[i][j], j))[:neighbours] for i in kept}
    into = []
    for j in range(n):
        owners = [i for i in sorted(kept) if j not in kept and j in hood[i]]
        into.append(max(owners, key=lambda i: (sim[i][j], -i)) if owners else -1)
    return torch.tensor(into)


def merged(x, into):
    out = x.double().clone()
    for i in into.unique().tolist():
        if i >= 0:
            out[i] += x.double()[into == i].mean(0)
    return out


def tokens(n, d=8, dk=6, seed=0, outliers=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    received = torch.rand(n, generator=g)  # distinct: the published top-k has no tie rule
    received[torch.randperm(n, generator=g)[:outliers]] += 2 + torch.rand(outliers, generator=g)
    keys = torch.randn(n, dk, generator=g)
    return x, received, keys


def kept(mask):
    return mask.nonzero().squeeze(1).tolist()


@pytest.mark.parametrize("n, budget, outliers", [(576, 64 / 576, 20), (576, 0.25, 5), (100, 0.1, 0), (97, 0.3, 12),
                                                 (64, 0.05, 10), (40, 1.0, 3), (30, 0.5, 1), (200, 0.02, 0)])
def test_one_image_equals_the_published_selection(n, budget, outliers):
    x, received, keys = tokens(n, seed=n, outliers=outliers)
    k = vsops.budget_to_k(n, budget)
    chosen = prumerge_plus(x, k, received, keys)
    assert kept(chosen.keep) == sorted(published_selection(received, k))
    # Outliers found when planted (a token above Q3 + 1.5 IQR); the top one otherwise.
    assert int(outlier_counts(received, torch.tensor([0, n], dtype=torch.int32))) >= outliers


@pytest.mark.parametrize("n, k, neighbours", [(60, 10, 32), (60, 10, 2), (30, 29, 32), (80, 3, 5), (12, 1, 32)])
def test_the_merge_equals_its_definition(n, k, neighbours):
    x, received, keys = tokens(n, seed=k)
    chosen = prumerge_plus(x, k, received, keys, neighbours=neighbours)
    into = joined(keys, set(kept(chosen.keep)), neighbours)
    assert torch.equal(chosen.merged_into, into)
    torch.testing.assert_close(chosen.embeds[chosen.keep], merged(x, into)[chosen.keep].float())
    torch.testing.assert_close(chosen.embeds, merge_rows(x, chosen.merged_into), rtol=0, atol=0)
    if neighbours == 2:
        assert (into[~chosen.keep] == -1).any()  # outside every neighbourhood: merged nowhere


def test_the_outliers_are_numpys_iqr_rule_on_heavy_tails():
    g = torch.Generator().manual_seed(11)
    lengths = [7, 1, 0, 50, 13, 200, 4]
    received = torch.empty(sum(lengths)).exponential_(generator=g) ** 2  # many values near the bound
    received[60] = float("nan")
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    expected = []
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        a = received[start:end].double().numpy()
        a = a[~np.isnan(a)]
        q1, q3 = (np.percentile(a, 25), np.percentile(a, 75)) if a.size else (0.0, 0.0)
        expected.append(int((a > q3 + 1.5 * (q3 - q1)).sum()))
    assert outlier_counts(received, cu).tolist() == expected
    assert sum(expected) > 10
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        n = end - start
        if n and not torch.isnan(received[start:end]).any():
            k = max(1, n // 3)
            keep = prumerge_plus(torch.randn(n, 4), k, received[start:end], torch.randn(n, 3)).keep
            assert kept(keep) == sorted(published_selection(received[start:end], k))


def test_every_outlier_counts_where_the_published_float_rounding_loses_one():
    # 49 tokens with 2 outliers: the published max(int(49 * (2 / 49)), 1) takes only the top one,
    # and its grid (stride 49 // 5 = 9) misses token 30.
    received = torch.linspace(0.1, 0.9, 49)
    received[[10, 30]] = torch.tensor([5.0, 4.0])
    assert int(49 * (2 / 49)) == 1
    cu = torch.tensor([0, 49], dtype=torch.int32)
    assert outlier_counts(received, cu).tolist() == [2]
    keep = prumerge_plus(torch.randn(49, 4), 5, received, torch.randn(49, 3)).keep
    assert kept(keep) == [0, 9, 10, 18, 30]


def test_exactly_k_per_segment_and_segments_equal_each_segment_alone():
    g = torch.Generator().manual_seed(5)
    lengths = [0, 1, 5, 37, 100, 64, 13]
    x, received, keys = tokens(sum(lengths), seed=5, outliers=8)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    for trial in range(6):
        ks = [0 if n == 0 else int(torch.randint(0, n + 1, (1,), generator=g)) for n in lengths]
        ks[3], ks[4], ks[5] = [0, 1, 37][trial % 3], 100 if trial % 2 else 1, trial % 2 * 64
        chosen = prumerge_plus(x, ks, received, keys, cu_seqlens=cu)
        assert chosen.keep.dtype == torch.bool and chosen.keep.shape == (x.shape[0],)
        vsops.methods.check_selected(chosen, PruMergePlusMethod(), x, torch.tensor(ks), cu)
        for s, (start, end) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
            assert int(chosen.keep[start:end].sum()) == ks[s]
            alone = prumerge_plus(x[start:end], ks[s], received[start:end], keys[start:end])
            assert torch.equal(chosen.keep[start:end], alone.keep)
            into = chosen.merged_into[start:end]
            assert torch.equal(torch.where(into >= 0, into - start, -1), alone.merged_into)
            torch.testing.assert_close(chosen.embeds[start:end], alone.embeds, rtol=0, atol=0)


def test_ties_go_to_the_lower_index_and_nan_ranks_last():
    x = torch.randn(10, 4)
    # Equal attention: no outlier (IQR 0), the first token, then the grid at stride 3.
    assert kept(prumerge_plus(x, 3, torch.ones(10), torch.randn(10, 3)).keep) == [0, 3, 6]
    received = torch.tensor([1.0, 3, 3, 0, 3, 2, 2, 0, 0, float("nan")])
    assert outlier_counts(received, torch.tensor([0, 10], dtype=torch.int32)).tolist() == [0]
    assert kept(prumerge_plus(x, 1, received, torch.randn(10, 3)).keep) == [1]
    received = torch.tensor([float("nan"), 0.1, 0.2, 0.3, 0.2, 9.0, 0.1, 0.3, 0.2, 0.1])
    assert outlier_counts(received, torch.tensor([0, 10], dtype=torch.int32)).tolist() == [1]
    assert kept(prumerge_plus(x, 2, received, torch.randn(10, 3)).keep) == [0, 5]  # the grid, not NaN's rank
    assert kept(prumerge_plus(x, 9, received, torch.randn(10, 3)).keep) == list(range(9))
    # The quartiles are those of the values that are not NaN (1, 2, 3, 4, 100: Q1 2, Q3 4).
    received = torch.tensor([float("nan")] * 5 + [1.0, 2, 3, 4, 100])
    assert outlier_counts(received, torch.tensor([0, 10], dtype=torch.int32)).tolist() == [1]
    # Identical keys: every dropped token is as similar to each kept one and joins the first.
    chosen = prumerge_plus(x, 3, torch.ones(10), torch.ones(10, 3))
    assert chosen.merged_into.tolist() == [-1, 0, 0, -1, 0, 0, -1, 0, 0, 0]
    # A token with a NaN key joins no kept token.
    keys = torch.randn(10, 3)
    keys[4] = float("nan")
    chosen = prumerge_plus(x, 3, torch.ones(10), keys)
    assert chosen.merged_into[4] == -1 and torch.isfinite(chosen.embeds).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_float_dtypes(dtype):
    x, received, keys = tokens(120, seed=4, outliers=6)
    reference = prumerge_plus(x.double(), 15, received, keys)
    chosen = prumerge_plus(x.to(dtype), 15, received, keys)
    assert torch.equal(chosen.keep, reference.keep) and torch.equal(chosen.merged_into, reference.merged_into)
    assert chosen.embeds.dtype == dtype
    torch.testing.assert_close(chosen.embeds, merge_rows(x.to(dtype), chosen.merged_into), rtol=0, atol=0)
    # Attention and keys in any float dtype: distinct integers, exact in every dtype.
    exact = torch.randperm(120, generator=torch.Generator().manual_seed(4)).float()
    exact[[3, 50]] += 400
    plain = prumerge_plus(x, 15, exact, keys)
    assert kept(plain.keep) == sorted(published_selection(exact, 15))
    assert torch.equal(prumerge_plus(x, 15, exact.to(dtype), keys.to(dtype)).keep, plain.keep)


def test_the_method_reads_the_vision_tower_attention():
    x, received, keys = tokens(50)
    cu = torch.tensor([0, 20, 50], dtype=torch.int32)
    k = torch.tensor([5, 9])
    method = make_method("prumerge_plus", neighbours=4)
    assert isinstance(method, PruMergePlusMethod) and repr(method) == "PruMergePlusMethod(neighbours=4)"
    assert vsops.methods.VISION_ATTENTION in method.needs
    chosen = method.select(x, k, cu, vision=VisionAttention(received, keys))
    expected = prumerge_plus(x, k, received, keys, cu_seqlens=cu, neighbours=4)
    assert torch.equal(chosen.keep, expected.keep) and torch.equal(chosen.merged_into, expected.merged_into)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, r, k: prumerge_plus(x.long(), 3, r, k), TypeError, "x must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r.long(), k), TypeError, "received must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r[:-1], k), TypeError, "received must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r.unsqueeze(1), k), TypeError, "received must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r, k[:, 0]), TypeError, "keys must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r, k.long()), TypeError, "keys must be"),
        (lambda x, r, k: prumerge_plus(x, 3, r, k[:-1]), TypeError, "keys must be"),
        (lambda x, r, k: prumerge_plus(x, 11, r, k), ValueError, "k must be in"),
        (lambda x, r, k: prumerge_plus(x, [1, 2], r, k), ValueError, "one entry per segment"),
        (lambda x, r, k: prumerge_plus(x, 3, r, k, neighbours=0), ValueError, "neighbours"),
        (lambda x, r, k: prumerge_plus(x, 3, r, k, neighbours=True), TypeError, "neighbours"),
        (lambda x, r, k: PruMergePlusMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32)),
         ValueError, "needs the vision tower's attention"),
        (lambda x, r, k: PruMergePlusMethod().select(x, torch.tensor([3]), torch.tensor([0, 10], dtype=torch.int32),
                                                     vision=VisionAttention(r, k[:5])), ValueError, "vision.received"),
    ],
)
def test_bad_arguments(call, error, match):
    x, received, keys = tokens(10)
    with pytest.raises(error, match=match):
        call(x, received, keys)
