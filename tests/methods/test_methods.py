"""The selection methods as plain functions on packed tokens, each against a plain re-implementation
of its published algorithm; the protocol and the registry."""
import pytest
import torch

import vsops.methods as methods
from vsops.benchmarks.methods import published_divprune
from vsops.methods import Selected, SelectionMethod, register_method


def as_mask(indices, n):
    mask = torch.zeros(n, dtype=torch.bool)
    mask[indices] = True
    return mask


@pytest.mark.parametrize("n, k", [(40, 1), (40, 7), (97, 20), (64, 63)])
def test_divprune_matches_the_published_algorithm(n, k):
    x = torch.randn(n, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(n + k))
    expected = as_mask(published_divprune(x, k), n)
    assert expected.sum() == k  # distinct picks on untied data
    assert torch.equal(methods.divprune(x, k), expected)
    # float32 tokens: the same selection on well-separated data
    assert torch.equal(methods.divprune(x.float(), k), expected)


def test_divprune_first_pick_is_the_token_farthest_from_its_nearest_neighbour():
    x = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [-1.0, 0.05], [-0.98, 0.0]])
    keep = methods.divprune(x, 1)
    assert keep.tolist() == [False, False, True, False, False]


def test_divprune_keeps_distinct_tokens_where_the_published_loop_repeats_one():
    # Four copies of one token among five others: once the distinct tokens are picked, every
    # min distance is ~0 and the published argmax can land on a token it already holds.
    base = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x = torch.cat([base[:1].repeat(4, 1), base[1:]])  # tokens 0-3 identical
    k = 8
    published = published_divprune(x, k)
    assert published.unique().numel() < k  # the published loop picks a token twice
    keep = methods.divprune(x, k)
    assert int(keep.sum()) == k


def test_divprune_ties_go_to_the_lower_index():
    x = torch.eye(4, dtype=torch.float64).repeat_interleave(2, dim=0)  # pairs of identical tokens
    keep = methods.divprune(x, 4)
    assert keep.tolist() == [True, False] * 4


def test_divprune_edges():
    x = torch.randn(5, 3)
    assert methods.divprune(x, 5).all() and not methods.divprune(x, 0).any()
    assert methods.divprune(x[:1], 1).tolist() == [True]  # the published topk(2) fails on one token
    zero = torch.cat([torch.zeros(1, 3), x])
    assert int(methods.divprune(zero, 3).sum()) == 3
    with_nan = x.clone()
    with_nan[2, 0] = float("nan")
    keep = methods.divprune(with_nan, 4)
    assert int(keep.sum()) == 4 and not keep[2]  # NaN distances rank last
    assert methods.divprune(torch.zeros(0, 3), 0).shape == (0,)


def test_divprune_never_forms_the_n_by_n_matrix():
    # 50,000 tokens: the n x n float32 distances alone would take 10 GB.
    x = torch.randn(50_000, 8, generator=torch.Generator().manual_seed(0))
    keep = methods.divprune(x, 5)
    assert int(keep.sum()) == 5


@pytest.mark.parametrize("name", ["divprune", "norm", "random", "mean_attention"])
def test_segments_equal_each_segment_alone(name):
    fn = getattr(methods, name)
    lengths, ks = [7, 1, 12, 0, 5], [3, 1, 4, 0, 5]
    x = torch.randn(sum(lengths), 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    together = fn(x, ks, cu_seqlens=cu)
    assert together.dtype == torch.bool and together.shape == (x.shape[0],)
    for s, (n, k) in enumerate(zip(lengths, ks)):
        part = together[cu[s] : cu[s + 1]]
        assert int(part.sum()) == k
        if name != "random":  # random draws one stream over the whole pack
            assert torch.equal(part, fn(x[cu[s] : cu[s + 1]], k))


def test_scoring_methods_match_their_definitions():
    x = torch.randn(30, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    k = 9

    def top(scores):
        return as_mask(sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k], len(scores))

    assert torch.equal(methods.norm(x, k), top(x.norm(dim=1)))
    assert torch.equal(methods.mean_attention(x, k), top(x @ x.mean(0)))
    expected = top(torch.rand(30, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(methods.random(x, k, seed=5), expected)
    assert torch.equal(methods.random(x, k, seed=5), methods.random(x, k, seed=5))
    assert not torch.equal(methods.random(x, k, seed=6), expected)


def test_plain_functions_reject_bad_input():
    x = torch.randn(6, 4)
    with pytest.raises(TypeError, match="x must be"):
        methods.norm(torch.arange(6), 2)
    with pytest.raises(ValueError, match="k must be in"):
        methods.divprune(x, 7)
    with pytest.raises(ValueError, match="one entry per segment"):
        methods.norm(x, [1, 2])
    with pytest.raises(TypeError, match="k must be"):
        methods.norm(x, 2.5)
    with pytest.raises(TypeError, match="cu_seqlens"):
        methods.norm(x, 2, cu_seqlens=torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        methods.norm(x, 2, cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_the_registry():
    assert methods.available()[0] == "visionselector"
    assert {"divprune", "norm", "random", "mean_attention"} <= set(methods.available())
    with pytest.raises(ValueError, match="unknown selection method 'sparsevlm'"):
        methods.make_method("sparsevlm")
    with pytest.raises(TypeError, match="SelectionMethod subclass"):
        register_method(int)

    @register_method
    class FirstTokens(SelectionMethod):
        name = "test_first_tokens"

        def select(self, x, k, cu_seqlens):
            keep = torch.zeros(x.shape[0], dtype=torch.bool)
            for start, count in zip(cu_seqlens[:-1].tolist(), k.tolist()):
                keep[start : start + count] = True
            return Selected(keep)

    try:
        assert "test_first_tokens" in methods.available()
        assert isinstance(methods.make_method("test_first_tokens"), FirstTokens)
    finally:
        from vsops.methods import registry

        registry._METHODS.pop("test_first_tokens")


def test_a_nan_score_ranks_as_minus_infinity_as_in_the_varlen_path():
    from vsops.varlen import select_visual_tokens

    class Fixed(methods.ScoringMethod):
        name = "test_fixed"

        def score(self, x, cu_seqlens):
            return torch.tensor([float("nan"), float("-inf"), 0.5, 0.2])

    cu = torch.tensor([0, 4], dtype=torch.int32)
    keep = Fixed().select(torch.zeros(4, 2), torch.tensor([3]), cu).keep
    assert keep.tolist() == [True, False, True, True]  # NaN ties -inf, the lower index wins
    varlen = select_visual_tokens(torch.tensor([[float("nan"), float("-inf"), 0.5, 0.2]]),
                                  torch.ones(1, 4, dtype=torch.bool), 0.75)
    assert varlen[0].tolist() == keep.tolist()
