"""The reading of generate's 4-D static-cache masks (vsops.integrations.static_cache): the
key padding read back from masks as transformers makes them, and refused for any other mask."""
import inspect

import pytest
import torch

pytest.importorskip("transformers")

from transformers import masking_utils  # noqa: E402
from transformers.cache_utils import StaticCache  # noqa: E402

from vsops.integrations.static_cache import prefill_padding  # noqa: E402
from vsops.integrations.testing import tiny_qwen_vl_config  # noqa: E402

PADDING = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]])


def transformers_mask(implementation: str, slots: int):
    """What generate hands a forward at the prefill of a static cache of ``slots``."""
    config = tiny_qwen_vl_config("qwen2_5_vl").get_text_config()
    config._attn_implementation = implementation
    b, length = PADDING.shape
    cache = StaticCache(config=config, max_cache_len=slots)
    embeds = torch.empty(b, length, 0)
    make = masking_utils.create_masks_for_generate
    names = set(inspect.signature(make).parameters)  # the keywords differ between 4.x and 5.x
    names -= {"past_key_values"} if "cache" in names else set()
    return make(
        **{name: value for name, value in dict(
            config=config, inputs_embeds=embeds, input_embeds=embeds, attention_mask=PADDING, cache=cache,
            past_key_values=cache, cache_position=torch.arange(length), position_ids=torch.arange(length).expand(b, -1),
        ).items() if name in names})


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_the_padding_is_read_back_from_transformers_masks(implementation):
    mask = transformers_mask(implementation, slots=11)
    assert torch.equal(prefill_padding(mask, PADDING.shape[1]), PADDING)
    per_type = mask if isinstance(mask, dict) else {"full_attention": mask}
    assert torch.equal(prefill_padding({**per_type, "linear_attention": PADDING}, 7), PADDING)


def test_masks_other_than_causal_padding_are_refused():
    length = PADDING.shape[1]
    causal = torch.ones(length, 9, dtype=torch.bool).tril()
    mask = causal & torch.nn.functional.pad(PADDING.bool(), (0, 2))[:, None, None, :]
    assert torch.equal(prefill_padding(mask, length), PADDING)
    window = mask & ~torch.ones(length, 9, dtype=torch.bool).tril(-3)
    bidirectional = mask.clone()
    bidirectional[:, :, 2, 3] = True
    beyond = mask.clone()
    beyond[:, :, -1, 8] = True  # a slot past the call's tokens
    for other in (window, bidirectional, beyond, {"full": mask, "sliding": window}, {"full": mask, "other": mask.flip(0)}):
        assert prefill_padding(other, length) is None
    assert prefill_padding(mask, length - 1) is None  # another call's mask
