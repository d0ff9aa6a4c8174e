"""Drop-in fidelity, for every registered model (tests/model_setups.py): where a call prunes
nothing (budget 1.0) the patched model is the unpatched model, output for output and bit for
bit, however transformers calls it; below 1.0 every calling convention it supports gives what
the contract suite's oracles give, and the others are refused by name.

CI runs this file under the newest transformers of the range and the 4.57 line (LLaVA-OV-1.5).
"""
import copy
import inspect

import pytest
import torch

pytest.importorskip("transformers")

import vsops.integrations  # noqa: E402
from vsops.integrations import apply_visionselector, conventions, revert_visionselector  # noqa: E402

from model_setups import SETUPS  # noqa: E402

PROMPTS = [[3, ("image", 8, 8), 4], [2, ("image", 4, 8), 5], [9]]


def patched(model, budget, **settings):
    out = copy.deepcopy(model)
    apply_visionselector(out, budget=budget, **settings)
    g = torch.Generator().manual_seed(3)  # a scorer with a clear ranking (the published init near-ties)
    for p in out.model.visual.importance_scorer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return out


def cache_tensors(cache) -> list[torch.Tensor]:
    """Every tensor a cache holds, layer by layer (keys, values, recurrent states)."""
    out = []
    for layer in getattr(cache, "layers", []):
        out += [v for _, v in sorted(vars(layer).items()) if isinstance(v, torch.Tensor)]
    return out


def assert_same(actual, expected, path="output"):
    """The same output, bit for bit: class, keys, every tensor (caches by their contents)."""
    assert type(actual) is type(expected), (path, type(actual), type(expected))
    if isinstance(expected, torch.Tensor):
        assert actual.shape == expected.shape, (path, actual.shape, expected.shape)
        assert torch.equal(actual, expected), path
    elif isinstance(expected, (tuple, list)):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{path}[{i}]")
    elif hasattr(expected, "keys"):
        assert list(actual.keys()) == list(expected.keys()), (path, list(actual.keys()), list(expected.keys()))
        for key in expected.keys():
            assert_same(actual[key], expected[key], f"{path}.{key}")
    elif hasattr(expected, "get_seq_length"):
        assert actual.get_seq_length() == expected.get_seq_length(), path
        assert_same(cache_tensors(actual), cache_tensors(expected), f"{path} (cache)")
    else:
        assert actual == expected, path


def takes(model, name) -> bool:
    """Whether ``model``'s forward accepts the keyword ``name`` (LLaVA-OV-1.5's remote code names
    each of its keywords and takes no others)."""
    parameters = inspect.signature(type(model).forward).parameters
    return name in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def both(model, pmodel, **call):
    with torch.no_grad():
        return model(**copy.deepcopy(call)), pmodel(**copy.deepcopy(call))


# -- budget 1.0: the unpatched model ---------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_budget_one_is_the_unpatched_model_padded_on_either_side(setup, padding_side):
    model = setup.make_model("eager")
    pmodel = patched(model, 1.0)
    batch = setup.make_batch(PROMPTS, padding_side=padding_side)
    expected, actual = both(model, pmodel, **batch, output_hidden_states=True, output_attentions=True)
    assert_same(actual, expected)
    if takes(model, "logits_to_keep"):
        expected, actual = both(model, pmodel, **batch, logits_to_keep=1)
        assert_same(actual, expected)


def test_budget_one_is_the_unpatched_model_on_inputs_embeds(setup):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(batch.pop("input_ids"))
    expected, actual = both(model, patched(model, 1.0), **batch, inputs_embeds=embeds)
    assert_same(actual, expected)


def test_budget_one_is_the_unpatched_model_with_labels_and_the_trainers_loss_keywords(setup):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    pmodel = patched(model, 1.0)
    for extra in ({}, {"shift_labels": shift}, {"num_items_in_batch": torch.tensor(7)}, {"return_dict": False}):
        if not all(takes(model, k) for k in extra):
            continue
        expected, actual = both(model, pmodel, **batch, labels=labels, **extra)
        assert_same(actual, expected)


def test_budget_one_is_the_unpatched_model_on_a_padding_free_row(setup):
    # Two sequences in one row, positions restarting at 0 and no attention mask, as
    # DataCollatorWithFlattening makes them.
    model = setup.make_model()
    first, second = setup.make_batch(PROMPTS[:1]), setup.make_batch(PROMPTS[2:], seed=2)
    row = {k: torch.cat([first[k], second[k]], 1) for k in ("input_ids",) if k in first}
    row.update({k: v for k, v in first.items() if k.startswith("pixel") or k.endswith("grid_thw")})
    if "mm_token_type_ids" in first:
        row["mm_token_type_ids"] = torch.cat([first["mm_token_type_ids"], second["mm_token_type_ids"]], 1)
    positions = torch.cat([torch.arange(first["input_ids"].shape[1]), torch.arange(second["input_ids"].shape[1])])
    row["position_ids"] = positions.view(1, -1)
    pmodel = patched(model, 1.0)
    expected, actual = both(model, pmodel, **row, use_cache=False)
    assert_same(actual, expected)


def test_a_padding_free_row_prunes_each_sequence_as_alone(setup):
    unpatched = setup.make_model()
    model = patched(unpatched, 0.25)
    alone = [setup.make_batch([p], seed=1 + i) for i, p in enumerate(PROMPTS[:2])]
    positions = [full_positions(unpatched, batch) for batch in alone]
    row = {k: torch.cat([b[k] for b in alone], 1 if k in ("input_ids", "mm_token_type_ids") else 0)
           for k in alone[0] if k != "attention_mask"}
    adapter = vsops.integrations.adapter_for(setup.name)
    if adapter.position_rows != 3 or adapter.unpackable:
        # 1-D positions cannot both place the kept tokens and bound the sequences; Qwen3.5's
        # linear attention cannot keep packed sequences apart.
        row["position_ids"] = torch.cat([torch.arange(b["input_ids"].shape[1]) for b in alone]).view(1, -1)
        with pytest.raises(ValueError, match="padding-free"), torch.no_grad():
            model(**row, use_cache=False)
        return
    # Text positions restarting, then each sequence's own 3-D rope positions.
    text = torch.cat([torch.arange(b["input_ids"].shape[1]) for b in alone]).view(1, 1, -1)
    row["position_ids"] = torch.cat([text, torch.cat([p[-3:] for p in positions], -1)], 0)
    with torch.no_grad():
        out = model(**row, use_cache=False)
        singles = [model(**b, position_ids=p, use_cache=False) for b, p in zip(alone, positions)]
    counts = out.visionselector.cu_seqlens.diff().tolist()
    assert counts == [int(s.visionselector.keep.sum()) for s in singles]
    for part, single in zip(torch.split(out.logits[0], counts), singles):
        torch.testing.assert_close(part, single.logits[0], rtol=1e-5, atol=1e-5)
    # Training: each sequence's soft mask keeps its own budget, in the row's layout.
    model.train()
    with torch.no_grad():
        out = model(**row, use_cache=False)
        singles = [model(**b, position_ids=p, use_cache=False) for b, p in zip(alone, positions)]
    torch.testing.assert_close(out.visionselector.soft_mask[0], torch.cat([s.visionselector.soft_mask[0] for s in singles]),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.logits[0], torch.cat([s.logits[0] for s in singles]), rtol=1e-5, atol=1e-5)


def test_budget_one_generates_as_the_unpatched_model(setup):
    model = setup.make_model()
    pmodel = patched(model, 1.0)
    batch = setup.make_batch(setup.generate_prompts)
    settings = [dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_scores=True),
                dict(max_new_tokens=3, do_sample=False, num_beams=2)]
    for options in settings:
        with torch.no_grad():
            expected = model.generate(**batch, **options)
            actual = pmodel.generate(**batch, **options)
        assert_same(actual, expected)


def test_budget_one_generates_with_a_static_cache_as_the_unpatched_model(setup):
    model = setup.make_model()
    batch = setup.make_batch(setup.generate_prompts)
    options = dict(max_new_tokens=3, do_sample=False, cache_implementation="static")
    try:
        with torch.no_grad():
            expected = model.generate(**batch, **options)
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        pytest.skip(f"the unpatched model does not generate with a static cache here: {e}")
    pmodel = patched(model, 1.0)
    with torch.no_grad():
        assert_same(pmodel.generate(**batch, **options), expected)


def _static_or_refused(setup, model):
    """Skips where the unpatched model has no static cache; True where the patched one refuses
    one below budget 1.0 (a 4.x static cache, whose length is read from its first sample)."""
    try:
        with torch.no_grad():
            model.generate(**setup.make_batch(setup.generate_prompts), max_new_tokens=1, cache_implementation="static")
    except (ValueError, TypeError, NotImplementedError, RuntimeError) as e:
        pytest.skip(f"the unpatched model does not generate with a static cache here: {e}")
    return conventions.takes(model.model, conventions.CACHE_POSITION)


def test_a_static_cache_below_budget_one_generates_as_a_dynamic_cache(setup):
    model = setup.make_model()
    refused = _static_or_refused(setup, model)
    batch = setup.make_batch(setup.generate_prompts)  # one row left-padded: the masks matter
    pmodel = patched(model, 0.25)
    options = dict(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
    if refused:
        with pytest.raises(ValueError, match="static cache needs transformers >= 5"), torch.no_grad():
            pmodel.generate(**batch, **options, cache_implementation="static")
        return
    with torch.no_grad():
        dynamic = pmodel.generate(**batch, **options)
        static = pmodel.generate(**batch, **options, cache_implementation="static")
    assert torch.equal(static.sequences, dynamic.sequences)
    for a, b in zip(static.scores, dynamic.scores):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert pmodel.visionselector.last is None  # the last step pruned nothing; the prefill did:
    assert pmodel.visionselector.generate_masks.made, "generate did not make its masks through the patched model"


def test_compiled_decoding_on_a_static_cache_is_not_compiled_again_per_budget(setup):
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model = setup.make_model()
    refused = _static_or_refused(setup, model)
    if refused:
        pytest.skip("below budget 1.0 a 4.x static cache is refused (tested above)")
    batch = setup.make_batch(setup.generate_prompts)
    # The eager backend: dynamo's graphs and guards, which decide recompilation, without
    # inductor's code generation (minutes on this CPU).
    config = CompileConfig(backend="eager", mode=None)
    config._compile_all_devices = True  # generate compiles on GPUs only unless told
    options = dict(max_new_tokens=3, do_sample=False, cache_implementation="static", compile_config=config)
    pmodel = patched(model, 1.0)
    torch._dynamo.reset()
    with torch.no_grad():
        assert torch.equal(pmodel.generate(**batch, **options), model.generate(**batch, **options, disable_compile=True))
        compiled = dict(counters["frames"])
        assert compiled.get("ok"), "generate did not compile the decode step"
        for budget in (0.5, 0.25):
            pmodel.visionselector.budget = budget
            assert torch.equal(pmodel.generate(**batch, **options), pmodel.generate(**batch, max_new_tokens=3, do_sample=False))
            assert dict(counters["frames"]) == compiled, f"the decode step was compiled again for budget {budget}"


def test_a_4d_mask_below_budget_one_is_pruned_only_where_it_is_padding(setup):
    model = setup.make_model()
    pmodel = patched(model, 0.25)
    batch = setup.make_batch(setup.generate_prompts)
    mask = batch["attention_mask"].bool()
    length = mask.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    four_d = causal & mask[:, None, None, :]
    with torch.no_grad():
        expected = pmodel(**batch)
        if takes(pmodel, "cache_position"):
            # 4.x models and remote code take a 4-D mask only as their own (made for sdpa or
            # eager from cache_position): the 2-D reading is checked in test_static_cache.py.
            return
        actual = pmodel(**{**batch, "attention_mask": four_d})
    assert torch.equal(pmodel.visionselector.last.keep, expected.visionselector.keep)
    torch.testing.assert_close(actual.logits, expected.logits)
    windowed = four_d & ~torch.ones(length, length, dtype=torch.bool).tril(-3)  # a sliding window of 3
    with pytest.raises(ValueError, match="causal attention over padded keys"), torch.no_grad():
        pmodel(**{**batch, "attention_mask": windowed})


def test_budget_one_continues_a_cache_whose_mask_covers_the_cached_tokens(setup):
    # A second chat turn: new tokens on the cache of the first, the mask covering both.
    model = setup.make_model()
    pmodel = patched(model, 1.0)
    batch = setup.make_batch(PROMPTS[:1])
    turn = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected_first, actual_first = model(**batch), pmodel(**batch)
    step = dict(input_ids=turn, attention_mask=torch.ones(1, batch["input_ids"].shape[1] + 3, dtype=torch.long))
    position = setup.decode_positions(model, dict(batch, attention_mask=step["attention_mask"]), turn)
    if position is not None:
        step["position_ids"] = position + torch.arange(-2, 1).view(1, 1, 3)
    expected = model(**step, past_key_values=expected_first.past_key_values)
    actual = pmodel(**step, past_key_values=actual_first.past_key_values)
    assert_same(actual, expected)


def test_a_call_whose_segments_keep_every_token_is_the_unpatched_model(setup):
    # One visual token per image (as transformers' own model testers build them): any budget
    # keeps it, so nothing is pruned and the selector steps aside below 1.0 too.
    model = setup.make_model()
    batch = setup.make_batch([[3, ("image", 2, 2), 4], [2, ("image", 2, 2), 6]], padding_side="right")
    expected, actual = both(model, patched(model, 0.25), **batch)
    assert_same(actual, expected)


# -- below 1.0: every convention, or a clear error -------------------------------------------


def kept_logits(out):
    """Per sample, the logits of its kept tokens in order (the padding dropped)."""
    mask = out.visionselector.attention_mask.bool()
    return [out.logits[b][mask[b]] for b in range(mask.shape[0])]


def test_right_padding_stays_on_the_right(setup):
    model = patched(setup.make_model(), 0.25)
    with torch.no_grad():
        left = model(**setup.make_batch(PROMPTS))
        right = model(**setup.make_batch(PROMPTS, padding_side="right"))
    assert right.visionselector.padding_side == "right" and left.visionselector.padding_side == "left"
    mask = right.visionselector.attention_mask
    assert mask[:, 0].all() and not mask[:, -1].all()  # each row starts with its tokens
    for r, l in zip(kept_logits(right), kept_logits(left)):
        torch.testing.assert_close(r, l, rtol=1e-5, atol=1e-5)


def test_hidden_states_attentions_and_logits_to_keep_cover_the_kept_tokens(setup):
    model = patched(setup.make_model("eager"), 0.25)
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)
        width = out.logits.shape[1]
        assert width < batch["input_ids"].shape[1]
        assert all(h.shape[1] == width for h in out.hidden_states)
        assert all(a.shape[-1] == a.shape[-2] == width for a in out.attentions)
        if takes(model, "logits_to_keep"):
            last = model(**batch, logits_to_keep=1).logits
            torch.testing.assert_close(last[:, -1], out.logits[:, -1], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_with_pixels_select_as_input_ids_do(setup):
    unpatched = setup.make_model()
    model = patched(unpatched, 0.25)
    # The positions of the input_ids call for both (without input_ids the models cannot
    # compute their 3-D rope positions themselves).
    batch = with_full_positions(unpatched, setup.make_batch(PROMPTS))
    with torch.no_grad():
        by_ids = model(**batch)
        ids = batch.pop("input_ids")
        embeds = model.get_input_embeddings()(ids)
        if not torch.equal(unpatched(**batch, inputs_embeds=embeds).logits, unpatched(**batch, input_ids=ids).logits):
            pytest.skip("the unpatched model does not find the placeholders in inputs_embeds either")
        by_embeds = model(**batch, inputs_embeds=embeds)
    assert torch.equal(by_embeds.visionselector.keep, by_ids.visionselector.keep)
    torch.testing.assert_close(by_embeds.logits, by_ids.logits, rtol=0, atol=0)


def test_vision_features_handed_over_select_per_image_as_pixels_do(setup):
    """generate (5.x) may hand the multimodal model its images' features (mm_encoder_outputs)
    without their grids; scope="image" then reads each image's tokens from the features."""
    unpatched = setup.make_model()
    model = patched(unpatched, 0.25, scope="image")
    if not conventions.takes(model.model, conventions.ENCODER_OUTPUTS):  # named: 4.x's **kwargs ignore it
        pytest.skip("this model takes no precomputed vision features")
    batch = with_full_positions(unpatched, setup.make_batch(PROMPTS))
    with torch.no_grad():
        by_pixels = model(**batch)
        features = model.model.get_image_features(batch.pop("pixel_values"), batch.pop("image_grid_thw"),
                                                  return_dict=True)
        by_features = model(**batch, **{conventions.ENCODER_OUTPUTS: {"image": features}})
    assert torch.equal(by_features.visionselector.keep, by_pixels.visionselector.keep)
    torch.testing.assert_close(by_features.logits, by_pixels.logits)


def test_the_trainers_loss_keywords_on_the_pruned_tokens(setup):
    model = patched(setup.make_model(), 0.25)
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    shift = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)
    if not takes(model, "shift_labels"):
        pytest.skip(f"{type(model).__name__}.forward takes no loss keywords")
    with torch.no_grad():
        by_labels = model(**batch, labels=labels)
        by_shift = model(**batch, labels=labels, shift_labels=shift)
        seven = model(**batch, labels=labels, num_items_in_batch=torch.tensor(7))
        three = model(**batch, labels=labels, num_items_in_batch=torch.tensor(3))
        as_tuple = model(**batch, labels=labels, return_dict=False)
    torch.testing.assert_close(by_shift.loss, by_labels.loss, rtol=0, atol=0)
    # The summed loss over the kept targets, divided by the Trainer's count.
    torch.testing.assert_close(seven.loss * 7, three.loss * 3, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(seven.loss, three.loss)
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], by_labels.loss, rtol=0, atol=0)
    torch.testing.assert_close(as_tuple[1], by_labels.logits, rtol=0, atol=0)


def test_images_in_a_later_turn_are_selected_as_in_one_prefill(setup):
    # Turn 1: text and an image; turn 2, on turn 1's pruned cache: text and another image. With a
    # budget per image, the cache then holds what one prefill of both turns keeps.
    if setup.name == "llava_ov_1_5":
        pytest.skip("LLaVA-OV-1.5's tower misreads the second image of a call "
                    "(tests/integrations/test_llava_ov_1_5_model.py): one prefill of both turns is no oracle for it")
    model = setup.make_model()
    pmodel = patched(model, 0.5, scope="image")
    whole = setup.make_batch([[3, ("image", 8, 8), 4, ("image", 4, 8), 5]])
    first = setup.make_batch([[3, ("image", 8, 8), 4]])
    cut = first["input_ids"].shape[1]
    assert torch.equal(whole["input_ids"][:, :cut], first["input_ids"])
    positions = full_positions(model, whole)
    turn = {k: v for k, v in whole.items() if not k.startswith("pixel") and not k.endswith("grid_thw")}
    turn["input_ids"] = whole["input_ids"][:, cut:]
    if "mm_token_type_ids" in whole:
        turn["mm_token_type_ids"] = whole["mm_token_type_ids"][:, cut:]
    grids = [k for k in whole if k.endswith("grid_thw")]
    first_items = {k: first[k] for k in grids}
    images = whole["image_grid_thw"].shape[0]
    turn["image_grid_thw"] = whole["image_grid_thw"][first["image_grid_thw"].shape[0]:images]
    patches = int(first["image_grid_thw"].prod(-1).sum())
    turn["pixel_values"] = whole["pixel_values"][patches:]
    if positions is not None:
        # The caller's positions: transformers 4.57 would place turn 2's image as text.
        turn["position_ids"] = positions[..., cut:]
    with torch.no_grad():
        fresh = pmodel(**whole)
        cache = pmodel(**{**first, **first_items}).past_key_values
        later = pmodel(**turn, past_key_values=cache)
    assert cache.get_seq_length() == int(fresh.visionselector.keep.sum())
    torch.testing.assert_close(later.logits[:, -1], fresh.logits[:, -1], rtol=1e-5, atol=1e-5)


def with_full_positions(model, batch) -> dict:
    """``batch`` with the rope positions the unpatched ``model`` would compute for it, where it
    hands its language model any."""
    positions = full_positions(model, batch)
    return batch if positions is None else {**batch, "position_ids": positions}


def full_positions(model, batch):
    """The rope positions the unpatched model hands its language model for ``batch``."""
    seen = {}

    def hook(module, args, kwargs):
        seen["positions"] = kwargs.get("position_ids")

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    return seen["positions"]


def test_placeholders_under_padding_keep_their_rows(setup):
    # An image placeholder the attention mask hides: the unpatched model still builds its
    # features (and Qwen3-VL its deepstack rows); the patched one drops it with the padding.
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS[:2])
    positions = full_positions(model, batch)  # the positions of the batch before the mask hides them
    if positions is not None:
        batch["position_ids"] = positions
    image = (batch["input_ids"][0] == 100).nonzero()[:2, 0]
    batch["attention_mask"][0, image] = 0
    try:
        with torch.no_grad():
            model(**batch)
    except (RuntimeError, ValueError, IndexError) as e:
        with pytest.raises(type(e)), torch.no_grad():
            patched(model, 1.0)(**batch)
        pytest.skip(f"the unpatched model refuses such a batch too: {e}")
    expected, actual = both(model, patched(model, 1.0), **batch)
    assert_same(actual, expected)
    with torch.no_grad():
        out = patched(model, 0.25)(**batch)
    assert not out.visionselector.keep[0, image].any() and torch.isfinite(out.logits).all()


def test_beam_search_on_a_pruned_cache_equals_each_sample_alone(setup):
    model = patched(setup.make_model(), 0.25)
    prompts = setup.generate_prompts
    batch = setup.make_batch(prompts)
    options = dict(max_new_tokens=3, do_sample=False, num_beams=2)
    with torch.no_grad():
        together = model.generate(**batch, **options)[:, batch["input_ids"].shape[1]:]
        for b in range(len(prompts)):
            alone = setup.make_batch([prompts[b]], seed=1 + b)
            assert torch.equal(together[b], model.generate(**alone, **options)[0, alone["input_ids"].shape[1]:]), b


def test_assisted_decoding_on_a_pruned_cache_equals_plain_greedy(setup):
    # The assistant (other weights) proposes tokens the model rejects: the pruned cache must
    # drop them as an unpruned one would (transformers 5.x), or the step must be refused.
    model = patched(setup.make_model(), 0.25)
    assistant = setup.make_model(seed=5)
    batch = setup.make_batch(setup.generate_prompts[:1])
    options = dict(max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        plain = model.generate(**batch, **options)
        proposed = assistant.generate(**batch, **options)
        assert not torch.equal(proposed, plain)  # some proposals are rejected
        if conventions.takes(model.model, conventions.CACHE_POSITION):
            # transformers 4.x crops the cache to a length in the caller's coordinates, which
            # would leave a rejected token in a pruned cache: the next step is refused.
            with pytest.raises(ValueError, match="cache_position starts at"):
                model.generate(**batch, **options, assistant_model=assistant)
            return
        assisted = model.generate(**batch, **options, assistant_model=assistant)
    assert torch.equal(assisted, plain)


# -- the machinery ------------------------------------------------------------------------------


QWEN = [s for s in SETUPS if s.name.startswith("qwen") and not s.skip]


@pytest.mark.skipif(not any(s.name == "qwen2_5_vl" for s in QWEN), reason="Qwen2.5-VL is not available")
def test_a_tower_shallower_than_its_full_attention_indexes_builds():
    from vsops.integrations import adapter_for
    from vsops.integrations.testing import qwen_vl_batch, tiny_qwen_vl_config

    config = tiny_qwen_vl_config("qwen2_5_vl")
    config.vision_config.fullatt_block_indexes = [7, 15, 23, 31]  # transformers' default
    model = adapter_for("qwen2_5_vl").classes()[1](config).eval()
    pmodel = patched(model, 0.25)
    batch = qwen_vl_batch(PROMPTS, "qwen2_5_vl")
    with torch.no_grad():
        pmodel(**batch)  # the default method never reads the tower's attention
    pmodel.visionselector.method = "visionzip"
    with pytest.raises(ValueError, match="fullatt_block_indexes"), torch.no_grad():
        pmodel(**batch)


def test_class_patches_of_two_families_coexist_and_init_the_scorer_as_published(tmp_path):
    if len(QWEN) < 2:
        pytest.skip("needs two Qwen-VL families")
    from vsops.integrations import adapter_for
    from vsops.integrations.testing import tiny_qwen_vl_config

    names = [QWEN[0].name, next(s.name for s in QWEN if s.name != QWEN[0].name and "moe" not in s.name)]
    for name in names:
        model = adapter_for(name).classes()[1](tiny_qwen_vl_config(name))
        model.save_pretrained(tmp_path / name)  # a checkpoint without a scorer
    try:
        for name in names:
            apply_visionselector(model_type=name, budget=0.3)
        for name in names:
            loaded = adapter_for(name).classes()[1].from_pretrained(tmp_path / name)
            assert loaded.visionselector.budget == 0.3
            scorer = loaded.model.visual.importance_scorer
            for proj in (scorer.q_proj, scorer.k_proj):
                # normal with std 1e-4 (not the config's initializer_range of 0.02), zero biases
                assert 0 < proj.weight.abs().max() < 1e-3 and proj.weight.std() < 2e-4, name
                assert not proj.bias.any(), name
    finally:
        revert_visionselector(None)


def test_gradient_checkpointing_trains_as_without_it(setup):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    grads = []
    for checkpointing in (False, True):
        pmodel = patched(model, 0.25)
        pmodel.train()
        if checkpointing:
            pmodel.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            assert pmodel.model.language_model.gradient_checkpointing
        for name, p in pmodel.named_parameters():
            p.requires_grad_("importance_scorer" in name)
        out = pmodel(**batch, labels=labels)
        (out.loss + 0.5 * out.constraint_loss).backward()
        grads.append([p.grad for name, p in pmodel.named_parameters() if "importance_scorer" in name])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain)


def test_a_compiled_forward_prunes_as_the_eager_one(setup):
    pmodel = patched(setup.make_model(), 0.25)
    batch = setup.make_batch(PROMPTS)
    torch._dynamo.reset()
    compiled = torch.compile(pmodel, backend="eager")
    with torch.no_grad():
        expected = pmodel(**batch)
        actual = compiled(**batch)
    assert torch.equal(actual.visionselector.keep, expected.visionselector.keep)
    torch.testing.assert_close(actual.logits, expected.logits)
