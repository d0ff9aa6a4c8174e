"""FastV's plain function (vsops.methods.fastv) against the published selection, re-implemented
plainly: the eager causal attention of one layer, mean over heads and query rows, top-k of the
image span."""
import sys

import pytest
import torch

from vsops.methods import causal_attention_received, fastv

fastv_module = sys.modules["vsops.methods.fastv"]  # the package's name `fastv` is the function


def published_scores(query, key, rows="all"):
    """The published computation: the whole [H, L, L] causal attention, averaged."""
    q, k = query.double(), key.double().repeat_interleave(query.shape[1] // key.shape[1], 1)
    logits = torch.einsum("ihd,jhd->hij", q, k) / query.shape[-1] ** 0.5
    causal = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool).tril()
    attention = logits.masked_fill(~causal, float("-inf")).softmax(-1).mean(0)  # mean over heads
    return attention[-1] if rows == "last" else attention.mean(0)


def published_keep(query, key, start, length, ratio_k, rows="all"):
    """FastV's LLaVA patch: one image of ``length`` tokens from ``start``; top-k of its span."""
    scores = published_scores(query, key, rows)
    keep = torch.ones(query.shape[0], dtype=torch.bool)
    keep[start:start + length] = False
    keep[scores[start:start + length].topk(ratio_k).indices + start] = True
    return keep


def qk(length, heads=4, kv_heads=2, dim=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(length, heads, dim, generator=g).to(dtype), torch.randn(length, kv_heads, dim, generator=g).to(dtype))


@pytest.mark.parametrize("rows", ["all", "last"])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (6, 1)])
def test_one_image_keeps_what_the_published_code_keeps(rows, heads, kv_heads):
    query, key = qk(37, heads, kv_heads)
    visual = torch.zeros(37, dtype=torch.bool)
    visual[5:29] = True
    for k in (0, 1, 7, 24):
        assert torch.equal(fastv(query, key, visual, k, rows=rows), published_keep(query, key, 5, 24, k, rows))
    torch.testing.assert_close(causal_attention_received(query.double(), key.double(), rows=rows),
                               published_scores(query, key, rows))


def test_scores_in_tiles_equal_the_whole(monkeypatch):
    query, key = qk(29)
    whole = causal_attention_received(query, key)
    monkeypatch.setattr(fastv_module, "TILE_ELEMENTS", 4 * 29 * 3)  # three query rows per tile
    torch.testing.assert_close(causal_attention_received(query, key), whole)
    assert whole.sum().item() == pytest.approx(1.0, abs=1e-5)  # each row's attention sums to 1


def test_text_between_images_is_kept_and_only_visual_tokens_ranked():
    query, key = qk(30)
    visual = torch.zeros(30, dtype=torch.bool)
    visual[2:10] = visual[14:26] = True  # two images, text between
    keep = fastv(query, key, visual, 5)
    assert keep[~visual].all() and int(keep[visual].sum()) == 5
    scores = published_scores(query, key)
    assert torch.equal(keep[visual], torch.zeros(20, dtype=torch.bool).index_fill_(0, scores[visual].topk(5).indices, True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_scored_in_float32(dtype):
    query, key = qk(21, dtype=dtype)
    expected = published_scores(query.float(), key.float()).float()
    torch.testing.assert_close(causal_attention_received(query, key), expected, rtol=1e-5, atol=1e-6)


def test_ties_go_to_the_lower_index_and_edge_sizes():
    # Zero keys: the last row attends every position equally, so all visual tokens tie.
    query, key = torch.randn(9, 2, 8), torch.zeros(9, 2, 8)
    visual = torch.tensor([False, True, True, True, True, False, True, True, False])
    keep = fastv(query, key, visual, 2, rows="last")
    assert torch.equal(keep, ~visual | (torch.arange(9) < 3))
    assert fastv(query, key, torch.zeros(9, dtype=torch.bool), 0).all()  # no visual token
    assert fastv(query[:1], key[:1], torch.tensor([True]), 1).all()  # one token
    assert not fastv(query, key, visual, 0)[visual].any()
    assert causal_attention_received(query[:0], key[:0]).shape == (0,)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: fastv(q, k, v, 99), "k must be in"),
    (lambda q, k, v: fastv(q, k, v.long(), 1), "visual must be a bool"),
    (lambda q, k, v: fastv(q, k.repeat(1, 2, 1)[:, :3], v, 1), "multiple"),
    (lambda q, k, v: fastv(q, k[:-1], v, 1), "key must be"),
    (lambda q, k, v: fastv(q, k.double(), v, 1), "dtype"),
    (lambda q, k, v: fastv(q, k, v, 1, rows="first"), "rows"),
    (lambda q, k, v: fastv(q[0], k, v, 1), r"\[L, H, d\]"),
])
def test_bad_input_is_refused_by_name(call, match):
    query, key = qk(10, heads=4, kv_heads=2)
    with pytest.raises((ValueError, TypeError), match=match):
        call(query, key, torch.ones(10, dtype=torch.bool))
