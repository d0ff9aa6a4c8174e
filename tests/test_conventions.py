"""transformers' call conventions (vsops.integrations.conventions) against the installed
transformers: one row per transformers line vsops was checked on, each name checked against the
signatures of every registered model's forwards, and the selector refusing what it cannot read.

A new transformers line fails here first, by name, instead of decoding wrong.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers.cache_utils import DynamicCache  # noqa: E402

from vsops.integrations import adapter_for, apply_visionselector, conventions  # noqa: E402
from vsops.integrations.testing import qwen_vl_batch, tiny_qwen_vl_config  # noqa: E402

from model_setups import SETUPS, TRANSFORMERS_VERSION  # noqa: E402

# What each transformers line calls things, read off its Qwen-VL models: the cache keyword of
# every forward, whether the models take cache_position, whether the multimodal model takes
# precomputed vision features (generate's mm_encoder_outputs).
LINES = {
    (4, 57): {"cache": "past_key_values", "cache_position": True, "encoder_outputs": False},
    (5, 23): {"cache": "past_key_values", "cache_position": False, "encoder_outputs": True},
    (5, 24): {"cache": "cache", "cache_position": False, "encoder_outputs": True},
    (5, 25): {"cache": "cache", "cache_position": False, "encoder_outputs": True},
}
LINE = LINES.get(TRANSFORMERS_VERSION)
# LLaVA-OneVision-1.5's remote code keeps the conventions of the 4.57 line it was written for.
REMOTE_CODE = {"llava_ov_1_5": LINES[(4, 57)]}


def test_the_installed_transformers_is_a_line_vsops_was_checked_on():
    assert LINE is not None, (
        f"transformers {transformers.__version__} is not a line vsops' conventions were checked on "
        f"({sorted(LINES)}): read its models' forward signatures, update vsops.integrations.conventions "
        "and add its row to LINES"
    )


def _modules(setup):
    top = setup.make_model()
    inner = top.model
    return {"top": top, "inner": inner, "language model": adapter_for(setup.name).language_model(inner)}


@pytest.mark.parametrize("setup", SETUPS, ids=[s.name for s in SETUPS])
def test_every_forward_takes_the_names_the_runtime_reads(setup):
    if setup.skip:
        pytest.skip(setup.skip)
    line = REMOTE_CODE.get(setup.name, LINE)
    if line is None:
        pytest.skip("not a checked transformers line (see the test above)")
    modules = _modules(setup)
    for where, module in modules.items():
        caches = [k for k in conventions.CACHE_KEYWORDS if conventions.takes(module, k)]
        assert caches == [line["cache"]], (where, caches)
        assert conventions.takes(module, conventions.CACHE_POSITION) == line["cache_position"], where
        for name in (conventions.ATTENTION_MASK, conventions.POSITION_IDS, conventions.INPUTS_EMBEDS):
            assert conventions.takes(module, name), (where, name)
        # The cache a pruned prefill makes goes where the module reads it.
        assert list(conventions.with_cache({}, None, module)) == [line["cache"]]
    assert conventions.takes(modules["top"], conventions.LABELS)
    assert conventions.takes(modules["language model"], conventions.USE_CACHE)
    assert conventions.takes(modules["inner"], conventions.INPUT_IDS)
    assert conventions.takes(modules["inner"], conventions.ENCODER_OUTPUTS) == line["encoder_outputs"]


def test_cache_of_reads_every_name_and_refuses_what_it_cannot_read():
    cache = DynamicCache()
    for name in conventions.CACHE_KEYWORDS:
        assert conventions.cache_of({name: cache, "use_cache": True}) is cache
    assert conventions.cache_of({"cache": None, "past_key_values": cache}) is cache
    assert conventions.cache_of({"cache": cache, "past_key_values": cache}) is cache
    assert conventions.cache_of({"attention_mask": torch.ones(1, 2)}) is None
    with pytest.raises(ValueError, match="two different caches"):
        conventions.cache_of({"cache": cache, "past_key_values": DynamicCache()})
    with pytest.raises(ValueError, match="'kv_cache', a keyword VisionSelector does not know"):
        conventions.cache_of({"kv_cache": cache})
    with pytest.raises(TypeError, match="must be a transformers Cache"):
        conventions.cache_length(((torch.zeros(1, 1, 3, 2),) * 2,))
    assert conventions.cache_length(None) == 0


def test_with_cache_keeps_the_callers_keyword():
    cache = DynamicCache()
    assert conventions.with_cache({"past_key_values": None, "a": 1}, cache, None) == {"a": 1, "past_key_values": cache}
    assert conventions.with_cache({"cache": None}, cache, None) == {"cache": cache}


def test_keywords_binds_positional_arguments_by_the_forward_signature():
    model = _qwen()
    ids, mask = torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long)
    assert conventions.keywords(model, (ids, mask), {"use_cache": False}) == {
        "input_ids": ids, "attention_mask": mask, "use_cache": False}
    with pytest.raises(TypeError, match="'input_ids' both by position and by keyword"):
        conventions.keywords(model, (ids,), {"input_ids": ids})
    with pytest.raises(TypeError, match="positional arguments"):
        conventions.keywords(model, (None,) * 100, {})


def _qwen():
    model_cls = adapter_for("qwen2_5_vl").classes()[1]
    torch.manual_seed(0)
    return model_cls(tiny_qwen_vl_config("qwen2_5_vl")).eval()


def _pruned_prefill():
    model = _qwen()
    apply_visionselector(model, budget=0.25)
    batch = qwen_vl_batch([[3, ("image", 8, 8), 4]], "qwen2_5_vl")
    with torch.no_grad():
        out = model(**batch)
    return model, batch, out


def test_a_cache_under_an_unknown_keyword_is_refused():
    model, batch, out = _pruned_prefill()
    with pytest.raises(ValueError, match="does not know"), torch.no_grad():
        model(input_ids=batch["input_ids"][:, -1:], my_cache=out.past_key_values)


def test_a_language_model_called_without_the_models_cache_is_refused():
    # A multimodal model that hands its language model the cache under a name the selector
    # does not read (here: drops it) must not decode as if no cache were pruned.
    model, batch, out = _pruned_prefill()
    language_model = model.model.language_model

    def drop_cache(module, args, kwargs):
        return args, {k: v for k, v in kwargs.items() if k not in conventions.CACHE_KEYWORDS}

    handle = language_model.register_forward_pre_hook(drop_cache, with_kwargs=True, prepend=True)
    mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    step = dict(input_ids=batch["input_ids"][:, -1:], attention_mask=mask,
                position_ids=torch.zeros(3, 1, 1, dtype=torch.long))
    try:
        with pytest.raises(ValueError, match="not called with the cache the multimodal model was given"), \
                torch.no_grad():
            model(**step, past_key_values=copy.deepcopy(out.past_key_values))
    finally:
        handle.remove()
    with torch.no_grad():
        model(**step, past_key_values=copy.deepcopy(out.past_key_values))


def test_a_step_that_would_count_positions_from_the_pruned_cache_is_refused():
    model, batch, out = _pruned_prefill()
    mask = torch.cat([batch["attention_mask"], torch.ones(1, 1, dtype=torch.long)], 1)
    step = dict(input_ids=batch["input_ids"][:, -1:], attention_mask=mask, past_key_values=out.past_key_values)
    if conventions.takes(model.model, conventions.CACHE_POSITION):
        # 4.x: the selector gives the model cache_position in the unpruned sequence.
        with torch.no_grad():
            model(**step)
        return
    with pytest.raises(ValueError, match="needs position_ids"), torch.no_grad():
        model(**step)
