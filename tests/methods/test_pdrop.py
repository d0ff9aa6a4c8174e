"""PyramidDrop's plain functions (vsops.methods.pdrop): one drop against the published
last-instruction-token ranking, and the ratio rule that keeps the budget on average."""
import pytest
import torch

from vsops.methods import pdrop, pdrop_layers, pdrop_ratio


def published_keep(query, key, start, length, k):
    """The published drop: the last token's softmax attention (mean over heads) over the image
    span, top-k."""
    q, keys = query[-1].double(), key.double().repeat_interleave(query.shape[1] // key.shape[1], 1)
    attention = (torch.einsum("hd,jhd->hj", q, keys) / query.shape[-1] ** 0.5).softmax(-1).mean(0)
    keep = torch.ones(query.shape[0], dtype=torch.bool)
    keep[start:start + length] = False
    keep[attention[start:start + length].topk(k).indices + start] = True
    return keep


def test_one_drop_keeps_what_the_published_code_keeps():
    g = torch.Generator().manual_seed(0)
    query, key = torch.randn(40, 4, 16, generator=g), torch.randn(40, 2, 16, generator=g)
    visual = torch.zeros(40, dtype=torch.bool)
    visual[4:30] = True
    for k in (1, 13, 26):
        assert torch.equal(pdrop(query, key, visual, k), published_keep(query, key, 4, 26, k))


@pytest.mark.parametrize("budget", [0.3, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("num_layers", [32, 28, 6])
def test_the_ratio_keeps_the_budget_on_average_over_the_layers(budget, num_layers):
    layers = pdrop_layers(num_layers)
    if budget <= layers[0] / num_layers:
        with pytest.raises(ValueError, match="budget must exceed"):
            pdrop_ratio(budget, num_layers)
        return
    ratio = pdrop_ratio(budget, num_layers)
    kept, fraction = [], 1.0
    for layer in range(num_layers):
        if layer in layers:
            fraction *= ratio
        kept.append(fraction)
    assert sum(kept) / num_layers == pytest.approx(budget, abs=1e-9)


def test_the_published_layers_scale_with_depth_and_bad_settings_are_refused():
    assert pdrop_layers(32) == (8, 16, 24)
    assert pdrop_layers(28) == (7, 14, 21)
    assert pdrop_layers(2) == (1,)
    with pytest.raises(ValueError, match="budget must exceed 0.25"):
        pdrop_ratio(0.2, 32)
    with pytest.raises(ValueError, match="drop_layers"):
        pdrop_layers(8, [4, 2])
    with pytest.raises(ValueError, match="drop_layers"):
        pdrop_layers(8, [8])
    with pytest.raises(ValueError, match="num_layers"):
        pdrop_layers(1)
