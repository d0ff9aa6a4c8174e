"""DART's plain function (vsops.methods.dart) against the published selection, re-implemented
plainly (one image, text after it, batch 1), with the pivot order and exact count stated in
its docstring."""
import pytest
import torch
import torch.nn.functional as F

from vsops.methods import dart


def published_keep(hidden, key, start, length, per_pivot, image_pivots=4, text_pivots=4):
    """The published get_retained_image_token: key L1 pivots, then per pivot the ``per_pivot``
    least cosine-similar image tokens not yet taken (pivots visited image first, then text,
    each in decreasing norm)."""
    flat = key.double().flatten(1)
    norm = flat.abs().sum(-1)
    image = list(range(start, start + length))
    query = list(range(start + length, key.shape[0]))
    image_pivot = (norm[start:start + length].topk(image_pivots).indices + start).tolist()
    text_pivot = (norm[start + length:].topk(text_pivots).indices + start + length).tolist()
    kept = set(image_pivot)
    valid = [i for i in image if i not in kept]
    for pivot in image_pivot + text_pivot:
        similarity = -F.cosine_similarity(hidden[pivot].double().unsqueeze(0), hidden[valid].double(), dim=-1)
        taken = [valid[i] for i in similarity.topk(per_pivot).indices.tolist()]
        kept.update(taken)
        valid = [i for i in valid if i not in taken]
    keep = torch.ones(key.shape[0], dtype=torch.bool)
    keep[start:start + length] = False
    keep[sorted(kept)] = True
    assert not set(query) & set(image)
    return keep


def inputs(length, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, 24, generator=g).to(dtype), torch.randn(length, 2, 8, generator=g).to(dtype)


@pytest.mark.parametrize("per_pivot", [0, 1, 3])
def test_one_image_keeps_what_the_published_code_keeps(per_pivot):
    hidden, key = inputs(50)
    visual = torch.zeros(50, dtype=torch.bool)
    visual[3:40] = True
    k = 4 + 8 * per_pivot
    keep = dart(hidden, key, visual, k)
    assert torch.equal(keep, published_keep(hidden, key, 3, 37, per_pivot))
    assert int(keep[visual].sum()) == k


def test_exactly_k_whatever_the_remainder_and_the_layout():
    hidden, key = inputs(40)
    visual = torch.zeros(40, dtype=torch.bool)
    visual[2:12] = visual[15:33] = True  # two images, text between and after
    for k in range(0, 29):
        keep = dart(hidden, key, visual, k)
        assert keep[~visual].all() and int(keep[visual].sum()) == k, k
    # Fewer pivots than asked (3 text tokens after the image) and no text after it.
    only_image = visual.clone()
    only_image[33:] = True
    assert int(dart(hidden, key, only_image, 9)[only_image].sum()) == 9


def test_ties_go_to_the_lower_index_and_edge_sizes():
    hidden = torch.ones(6, 4)  # every token equally similar to every pivot
    key = torch.ones(6, 1, 2)  # equal norms
    visual = torch.tensor([False, True, True, True, True, False])
    assert torch.equal(dart(hidden, key, visual, 2, image_pivots=1, text_pivots=1),
                       torch.tensor([True, True, True, False, False, True]))
    assert dart(hidden, key, torch.zeros(6, dtype=torch.bool), 0).all()
    assert not dart(hidden, key, visual, 0)[visual].any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_select_as_float32_on_the_same_values(dtype):
    hidden, key = inputs(30, dtype=dtype)
    visual = torch.zeros(30, dtype=torch.bool)
    visual[1:25] = True
    assert torch.equal(dart(hidden, key, visual, 12), dart(hidden.float(), key.float(), visual, 12))


@pytest.mark.parametrize("call, match", [
    (lambda h, k, v: dart(h, k, v, 99), "k must be in"),
    (lambda h, k, v: dart(h, k, v.long(), 1), "visual must be a bool"),
    (lambda h, k, v: dart(h, k[:-1], v, 1), "same L"),
    (lambda h, k, v: dart(h.long(), k, v, 1), "hidden must be a floating"),
    (lambda h, k, v: dart(h, k, v, 1, image_pivots=-1), "image_pivots"),
])
def test_bad_input_is_refused_by_name(call, match):
    hidden, key = inputs(10)
    with pytest.raises((ValueError, TypeError), match=match):
        call(hidden, key, torch.ones(10, dtype=torch.bool))
