"""The integration contract, for every registered model (tests/model_setups.py): tiny random
models from configs, against the unpatched model.

budget 1.0 = unpatched; pruned logits = the unpatched language model fed by hand with the kept
tokens at their original positions; padded batch generate = each sample alone; a decode step on
the pruned cache = a fresh prefill; packed = padded; apply/revert restore the model; the scorer
loads through from_pretrained in every published key layout.

CI runs this file under the current transformers 5.x and the last 4.x line (4.57); LLaVA-OV-1.5
runs on 4.57 only.
"""
import copy
import functools
import inspect
import math
import types

import pytest
import torch

pytest.importorskip("transformers")

import vsops  # noqa: E402
import vsops.methods  # noqa: E402
from vsops.integrations import (  # noqa: E402
    apply_visionselector,
    from_pretrained,
    is_visionselector_applied,
    register_reference_varlen_attention,
    revert_visionselector,
)
from vsops.integrations.conventions import CACHE_KEYWORDS, takes  # noqa: E402
from vsops.integrations.outputs import router_balance_loss, routes_experts  # noqa: E402
from vsops.integrations.testing import TOKENS  # noqa: E402

from model_setups import SETUPS  # noqa: E402
from vision_oracle import vision_attention_by_hand  # noqa: E402

# Sample 0: text, an image (16 tokens), text. Sample 1: text, an image (8), a video (2 frames of
# 8 tokens), text. Sample 2: text only. Left padding.
PROMPTS = [
    [3, ("image", 8, 8), 4],
    [2, ("image", 4, 8), ("video", 4, 4, 4), 5],
    [9],
]
SCORER_KEYS = {f"{p}.{w}" for p in ("q_proj", "k_proj") for w in ("weight", "bias")}


def scorer_of(model):
    return model.model.visual.importance_scorer


def randomize_scorer(model, seed=3):
    """Published init is std 1e-4: scores that near-tie. Larger weights give a clear ranking."""
    g = torch.Generator().manual_seed(seed)
    for p in scorer_of(model).parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))


def patched(model, **settings):
    patched_model = copy.deepcopy(model)
    apply_visionselector(patched_model, **settings)
    randomize_scorer(patched_model)
    return patched_model


def cache_keywords(model):
    """Every keyword the installed transformers lets a caller pass the KV cache under."""
    return ["past_key_values", *(["cache"] if takes(model, "cache") else [])]


def called_positionally(model, kwargs):
    """``model(**kwargs)`` with its leading arguments, up to and including the cache, passed by
    position in the order of its forward's signature."""
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    last = max(names.index(k) for k in CACHE_KEYWORDS if k in names)
    rest = {k: v for k, v in kwargs.items() if k not in names[: last + 1] and k not in CACHE_KEYWORDS}
    cache = next(kwargs[k] for k in CACHE_KEYWORDS if kwargs.get(k) is not None)
    args = [cache if name in CACHE_KEYWORDS else kwargs.get(name) for name in names[: last + 1]]
    return model(*args, **rest)


def visual_mask(batch):
    return (batch["input_ids"] == TOKENS["image"]) | (batch["input_ids"] == TOKENS["video"])


def capture_language_model_inputs(model, batch, rows):
    """inputs_embeds, rope positions ``[rows, B, L]`` and the other per-token inputs its adapter
    declares (Qwen3-VL's deepstack features), as the unpatched model hands them its language model."""
    seen = {}
    names = vsops.integrations.adapter_for(model.config.model_type).token_inputs

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs.get("position_ids"))
        seen["extra"] = {name: kwargs[name] for name in names if kwargs.get(name) is not None}

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    positions = seen["positions"]
    b, length = batch["input_ids"].shape
    if positions is None:
        positions = torch.arange(length).expand(rows, b, length)
    elif positions.dim() == 2:
        positions = positions.unsqueeze(0)
    return seen["embeds"], positions[-rows:].expand(rows, b, length), seen["extra"]


def item_runs(batch):
    """Per sample, the positions of each image's or video's placeholders in order (a Qwen3-VL
    video's frames are apart, each after its timestamp), from the grids: every tiny model
    merges 2 x 2 patches into a token."""
    ids = batch["input_ids"]
    sizes = {
        TOKENS[kind]: iter((batch[f"{kind}_grid_thw"].prod(-1) // 4).tolist() if f"{kind}_grid_thw" in batch else [])
        for kind in ("image", "video")
    }
    out = []
    for row in ids:
        where = ((row == TOKENS["image"]) | (row == TOKENS["video"])).nonzero().squeeze(1)
        runs, start = [], 0
        while start < where.numel():
            n = next(sizes[int(row[where[start]])])
            runs.append(where[start : start + n])
            start += n
        out.append(runs)
    return out


def reference_keep(model, embeds, batch, budget, scope="sample"):
    """Top-k of Eq. 2 computed with the N x N matrix, per sample (or per image or video),
    ties to the lower index."""
    scorer = scorer_of(model)
    visual = visual_mask(batch)
    keep = ~visual & batch["attention_mask"].bool()
    for b, items in enumerate(item_runs(batch)):
        if not items:
            continue
        for run in items if scope == "image" else [torch.cat(items)]:
            _keep_top(keep[b], run, embeds[b, run], scorer, budget)
    return keep


def _keep_top(keep, where, x, scorer, budget):
    """Sets ``keep`` at the top ``budget_to_k`` of the tokens ``where`` (embeddings ``x``)."""
    x = x.double()
    q = x @ scorer.q_proj.weight.double().T + scorer.q_proj.bias.double()
    k = x @ scorer.k_proj.weight.double().T + scorer.k_proj.bias.double()
    scores = (q @ k.T / math.sqrt(q.shape[1])).mean(1)
    kept = vsops.budget_to_k(where.numel(), budget)
    order = sorted(range(where.numel()), key=lambda i: (-scores[i].item(), i))[:kept]
    keep[where[order]] = True


def test_the_patch_is_active_and_named_by_the_model_type(setup):
    model = setup.make_model()
    selector = apply_visionselector(model, budget=0.25)
    assert is_visionselector_applied(model) and model.visionselector is selector
    assert selector.position_rows == vsops.integrations.adapter_for(model.config.model_type).position_rows
    assert vsops.integrations.adapter_for(setup.name) is vsops.integrations.adapter_for(model.config.model_type)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_one_gives_the_unpatched_logits(setup, attn):
    model = setup.make_model(attn)
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        expected = model(**batch)
        out = patched(model, budget=1.0)(**batch)
    # The selector steps aside: the unpatched output, its class and layout.
    assert type(out) is type(expected) and not hasattr(out, "visionselector")
    torch.testing.assert_close(out.logits, expected.logits, rtol=0, atol=0)


def kept_inputs(extra, keep, visual, b):
    """Sample ``b``'s per-token inputs ``extra`` reduced to its ``keep [L]`` by hand: a
    ``[B, L]`` tensor (Qwen3-VL's visual_pos_masks) to ``[1, kept]``; a list of tensors with one
    row per visual token of the batch in order (its deepstack features) to the kept ones'."""
    out = {}
    first = int(visual[:b].sum())
    rows = slice(first, first + int(visual[b].sum()))
    for name, value in extra.items():
        if isinstance(value, torch.Tensor) and value.shape[:2] == visual.shape:
            out[name] = value[b, keep][None]
        else:
            out[name] = [t[rows][keep[visual[b]]] for t in value]
    return out


def assert_pruned_logits_are_the_language_model_fed_by_hand(setup, model, batch, out, embeds, positions, extra):
    """``out.logits`` of each sample = the unpatched ``model``'s language model run on the
    kept tokens' ``embeds`` at their ``positions [R, B, L]``, with the kept tokens' share of
    its other per-token inputs ``extra``."""
    keep, real = out.visionselector.keep, batch["attention_mask"].bool()
    assert out.logits.shape[1] < batch["input_ids"].shape[1]
    for b in range(keep.shape[0]):
        chosen = keep[b] & real[b]
        hidden = language_model_by_hand(setup, model, batch, b, chosen, embeds, positions, extra).last_hidden_state
        with torch.no_grad():
            by_hand = model.lm_head(hidden)[0]
        torch.testing.assert_close(out.logits[b, -int(chosen.sum()):], by_hand, rtol=1e-5, atol=1e-5)


def language_model_by_hand(setup, model, batch, b, chosen, embeds, positions, extra, **options):
    """The unpatched ``model``'s language model's output for sample ``b`` fed with the tokens
    ``chosen [L]`` alone: their ``embeds``, ``positions [R, B, L]`` and share of ``extra``."""
    n = int(chosen.sum())
    with torch.no_grad():
        # With an attention mask: without one, transformers reads the gaps in the kept
        # tokens' positions as the starts of packed sequences.
        return model.model.language_model(
            inputs_embeds=embeds[b, chosen][None],
            position_ids=setup.lm_positions(positions[:, b, chosen]),
            attention_mask=torch.ones(1, n, dtype=torch.long),
            use_cache=False,
            **kept_inputs(extra, chosen, visual_mask(batch), b),
            **options,
        )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_logits_equal_the_language_model_fed_by_hand(setup, attn):
    model = setup.make_model(attn)
    batch = setup.make_batch(PROMPTS)
    budget = 0.25
    pmodel = patched(model, budget=budget)
    with torch.no_grad():
        out = pmodel(**batch)
    rows = pmodel.visionselector.position_rows
    embeds, positions, extra = capture_language_model_inputs(model, batch, rows)
    torch.testing.assert_close(out.visionselector.keep, reference_keep(pmodel, embeds, batch, budget), rtol=0, atol=0)
    assert_pruned_logits_are_the_language_model_fed_by_hand(setup, model, batch, out, embeds, positions, extra)


def visual_segments(batch, scope):
    """int32 offsets of the segments of the batch's packed visual tokens (row-major): one per
    sample with visual tokens, or one per image or video."""
    lengths = []
    for items in item_runs(batch):
        if scope == "image":
            lengths += [len(run) for run in items]
        elif items:
            lengths.append(sum(len(run) for run in items))
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


# VisionZip with more contextual tokens than its default 0.05, which gives the tiny images'
# 16 tokens none: 3 of the 4 kept tokens then merge the 12 dropped ones.
METHOD_SETTINGS = {"visionzip": {"contextual_ratio": 0.2}}


@pytest.mark.parametrize("scope", ["sample", "image"])
@pytest.mark.parametrize("method", [m for m in vsops.methods.available("vision") if m != "visionselector"])
def test_every_method_prunes_as_its_plain_function_selects(setup, method, scope):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    budget = 0.25
    settings = METHOD_SETTINGS.get(method, {})
    pmodel = patched(model, budget=budget, scope=scope, method=vsops.methods.make_method(method, **settings))
    assert pmodel.visionselector.method.name == method
    with torch.no_grad():
        out = pmodel(**batch)
    embeds, positions, extra = capture_language_model_inputs(model, batch, pmodel.visionselector.position_rows)
    visual = visual_mask(batch)
    cu = visual_segments(batch, scope)
    k = [vsops.budget_to_k(int(n), budget) for n in cu.diff()]
    expected = ~visual & batch["attention_mask"].bool()
    if vsops.methods.VISION_ATTENTION in vsops.methods.method_class(method).needs:
        received, keys = vision_attention_by_hand(setup, model, batch)
        function = getattr(vsops.methods, method)
        reads = dict(received=received, keys=keys)
        reads = {name: value for name, value in reads.items() if name in inspect.signature(function).parameters}
        plain = functools.partial(function, k=k, cu_seqlens=cu, **reads, **settings)
        chosen = plain(embeds[visual])
        if isinstance(chosen, torch.Tensor):  # a keep mask: the kept tokens keep their embeddings
            expected[visual] = chosen
        else:
            assert not settings or (chosen.merged_into >= 0).any()  # the merge is exercised
            expected[visual] = chosen.keep
            embeds = embeds.clone()
            embeds[visual] = chosen.embeds
            # Rows per visual token (Qwen3-VL's deepstack features) merge as the embeddings do:
            # the plain function run on them in place of the embeddings.
            extra = {name: value if torch.is_tensor(value) and value.shape[:2] == visual.shape else
                     [plain(t).embeds for t in value] for name, value in extra.items()}
    else:
        expected[visual] = getattr(vsops.methods, method)(embeds[visual], k, cu_seqlens=cu)
    torch.testing.assert_close(out.visionselector.keep, expected, rtol=0, atol=0)
    assert_pruned_logits_are_the_language_model_fed_by_hand(setup, model, batch, out, embeds, positions, extra)


def test_visionzip_generates_and_reads_the_tower_only_when_asked(setup, monkeypatch):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    pmodel = patched(model, budget=0.25, method="visionzip")
    with torch.no_grad():
        first = pmodel(**batch)
        again = pmodel(**batch)  # nothing of the first call's capture is left for the second
        generated = pmodel.generate(**batch, max_new_tokens=3, do_sample=False)
    torch.testing.assert_close(first.logits, again.logits, rtol=0, atol=0)
    # generate's prefill selects as a forward does (transformers 5 runs the tower before it)
    assert torch.equal(generated[:, batch["input_ids"].shape[1]], first.logits[:, -1].argmax(-1))
    import vsops.integrations.vision_attention as capture_module

    calls = []
    original = capture_module.attention_received
    monkeypatch.setattr(capture_module, "attention_received", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    with torch.no_grad():
        pmodel(**batch)
    assert calls  # the counter counts
    calls.clear()
    with torch.no_grad(), pmodel.visionselector.using(method="divprune"):
        pmodel(**batch)
    assert calls == []  # other methods cost the tower nothing
    with torch.no_grad():
        full = pmodel(**batch, visionselector_budget=1.0).logits
        torch.testing.assert_close(full, model(**batch).logits, rtol=0, atol=0)
    assert calls == []  # nor does budget 1.0, which asks no method
    # The reader of the tower is made when a method first needs it, not before.
    lazy = patched(model, budget=0.25)
    assert lazy.visionselector.vision_capture is None
    with torch.no_grad():
        lazy(**batch)
        assert lazy.visionselector.vision_capture is None
        lazy(**batch, visionselector_budget=1.0)
        lazy.visionselector.method = "visionzip"
        torch.testing.assert_close(lazy(**batch).logits, first.logits, rtol=0, atol=0)
    assert lazy.visionselector.vision_capture is not None


def test_a_method_may_replace_the_kept_tokens_embeddings(setup):
    class Halved(vsops.methods.SelectionMethod):
        """Keeps the first k tokens of each segment, at half their embedding."""

        name = "test_halved"

        def select(self, x, k, cu_seqlens):
            keep = torch.zeros(x.shape[0], dtype=torch.bool)
            for start, count in zip(cu_seqlens[:-1].tolist(), k.tolist()):
                keep[start : start + count] = True
            return vsops.methods.Selected(keep, embeds=x / 2)

    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    pmodel = patched(model, budget=0.25, method=Halved())
    with torch.no_grad():
        out = pmodel(**batch)
    embeds, positions, extra = capture_language_model_inputs(model, batch, pmodel.visionselector.position_rows)
    visual = visual_mask(batch)
    embeds = torch.where(visual.unsqueeze(-1), embeds / 2, embeds)
    assert_pruned_logits_are_the_language_model_fed_by_hand(setup, model, batch, out, embeds, positions, extra)


def test_a_method_keeping_the_wrong_count_is_refused(setup):
    class KeepsOne(vsops.methods.SelectionMethod):
        name = "test_keeps_one"

        def select(self, x, k, cu_seqlens):
            keep = torch.zeros(x.shape[0], dtype=torch.bool)
            keep[0] = True
            return vsops.methods.Selected(keep)

    model = patched(setup.make_model(), budget=0.25, method=KeepsOne())
    with pytest.raises(ValueError, match="'test_keeps_one' method kept"), torch.no_grad():
        model(**setup.make_batch(PROMPTS))


class MergesBadly(vsops.methods.SelectionMethod):
    """Keeps the first k tokens of each segment and says that the tokens merged as ``merge``
    (a function of the segment offsets and the token count) says."""

    name = "test_merges_badly"

    def __init__(self, merge):
        self.merge = merge

    def select(self, x, k, cu_seqlens):
        keep = torch.zeros(x.shape[0], dtype=torch.bool)
        for start, count in zip(cu_seqlens[:-1].tolist(), k.tolist()):
            keep[start : start + count] = True
        return vsops.methods.Selected(keep, merged_into=self.merge(cu_seqlens.tolist(), x.shape[0]))


def _into(pairs, total, dtype=torch.long):
    into = torch.full((total,), -1, dtype=dtype)
    for source, target in pairs:
        into[source] = target
    return into


@pytest.mark.parametrize("merge, match", [
    (lambda cu, n: _into([], n, torch.int32), "be int64"),
    (lambda cu, n: _into([], n - 1), "be int64"),
    (lambda cu, n: [-1] * n, "be int64"),
    (lambda cu, n: _into([(cu[1] - 1, cu[1] - 2)], n), "to kept tokens"),  # into a dropped token
    (lambda cu, n: _into([(0, 1)], n), "to kept tokens"),  # a kept token merged
    (lambda cu, n: _into([(cu[1] - 1, cu[1])], n), "own segment"),  # into the next segment
    (lambda cu, n: _into([(cu[1] - 1, n)], n), "own segment"),  # out of range
])
def test_a_method_merging_other_than_into_its_kept_tokens_is_refused(setup, merge, match):
    model = patched(setup.make_model(), budget=0.25, method=MergesBadly(merge))
    with pytest.raises(ValueError, match=f"'test_merges_badly' method's merged_into must .*{match}"), torch.no_grad():
        model(**setup.make_batch(PROMPTS))


def test_methods_switch_per_call_and_training_needs_the_learned_scorer(setup):
    model = patched(setup.make_model(), budget=0.25)
    batch = setup.make_batch(PROMPTS)
    selector = model.visionselector
    with torch.no_grad():
        learned = model(**batch).visionselector.keep
        with selector.using(method="divprune"):
            assert selector.method.name == "divprune"
            diverse = model(**batch).visionselector.keep
        assert selector.method.name == "visionselector"
        assert torch.equal(model(**batch).visionselector.keep, learned)
    assert not torch.equal(diverse, learned)
    model.train()
    with selector.using(method="norm"), pytest.raises(ValueError, match="'norm' method has no training mode"):
        model(**batch)
    with pytest.raises(ValueError, match="unknown selection method"):
        selector.method = "sparsevlm"


@pytest.mark.parametrize("prompts", [PROMPTS, [[2, ("video", 4, 4, 4), ("image", 4, 4), 5], [3, ("image", 8, 8), 4]]],
                         ids=["image-then-video", "video-then-image"])
def test_scope_image_keeps_a_budget_per_image(setup, prompts):
    model = setup.make_model()
    batch = setup.make_batch(prompts)
    pmodel = patched(model, budget=0.25, scope="image")
    with torch.no_grad():
        out = pmodel(**batch)
    keep, ids = out.visionselector.keep, batch["input_ids"]
    embeds, _, _ = capture_language_model_inputs(model, batch, pmodel.visionselector.position_rows)
    torch.testing.assert_close(keep, reference_keep(pmodel, embeds, batch, 0.25, scope="image"), rtol=0, atol=0)
    image, video = ids == TOKENS["image"], ids == TOKENS["video"]
    # A sample with an image of 8 tokens and a video of 8 keeps 2 of each, not 4 of the union.
    for b in range(len(prompts)):
        for mask in (image[b], video[b]):
            n = int(mask.sum())
            assert int((keep[b] & mask).sum()) == (vsops.budget_to_k(n, 0.25) if n else 0)
    assert out.visionselector.lengths == keep.sum(1).tolist()


def test_greedy_generate_on_a_padded_batch_equals_each_sample_alone(setup):
    model = patched(setup.make_model(), budget=0.25)
    prompts = setup.generate_prompts
    batch = setup.make_batch(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=TOKENS["pad"], eos_token_id=None)
    together = model.generate(**batch, **kwargs)[:, -6:]
    for i, prompt in enumerate(prompts):
        alone = model.generate(**setup.make_batch([prompt], seed=1 + i), **kwargs)[:, -6:]
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=0)


def test_generate_at_budget_one_equals_the_unpatched_model(setup):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS[:2])
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=TOKENS["pad"], eos_token_id=None)
    expected = model.generate(**batch, **kwargs)
    torch.testing.assert_close(patched(model, budget=1.0).generate(**batch, **kwargs), expected, rtol=0, atol=0)


def extend(batch, token):
    """The batch with one more text token per sample."""
    out = dict(batch, input_ids=torch.cat([batch["input_ids"], token], 1))
    out["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
    if "mm_token_type_ids" in batch:
        out["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], torch.zeros_like(token, dtype=torch.int32)], 1)
    return out


def test_a_decode_step_on_the_pruned_cache_equals_a_fresh_prefill(setup):
    model = patched(setup.make_model(), budget=0.25)
    batch = setup.make_batch(setup.generate_prompts)
    with torch.no_grad():
        prefill = model(**batch)
    cache, kept = prefill.past_key_values, prefill.logits.shape[1]
    assert cache.get_seq_length() == kept < batch["input_ids"].shape[1]
    token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    longer = extend(batch, token)
    step = {k: v for k, v in longer.items() if not k.startswith("pixel") and not k.endswith("grid_thw")}
    step.update(input_ids=token, past_key_values=cache)
    position = setup.decode_positions(model, longer, token)
    if position is not None:
        step["position_ids"] = position
    reused = copy.deepcopy(cache)  # prompt reuse: a copy of the pruned cache decodes as well
    pristine = copy.deepcopy(cache)
    with torch.no_grad():
        decoded = model(**step).logits[:, -1]
        fresh = model(**longer).logits[:, -1]
        model(**setup.make_batch(PROMPTS), use_cache=False)  # other forwards in between
        decoded_on_copy = model(**dict(step, past_key_values=reused)).logits[:, -1]
        step.pop("past_key_values")
        # The cache under every name transformers takes it by, and by position.
        by_name = {k: model(**step, **{k: copy.deepcopy(pristine)}).logits[:, -1] for k in cache_keywords(model)}
        by_position = called_positionally(model, dict(step, past_key_values=copy.deepcopy(pristine))).logits[:, -1]
        step["past_key_values"] = reused
    assert cache.get_seq_length() == kept + 1
    torch.testing.assert_close(decoded, fresh, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decoded_on_copy, fresh, rtol=1e-5, atol=1e-5)
    for logits in (*by_name.values(), by_position):
        torch.testing.assert_close(logits, fresh, rtol=1e-5, atol=1e-5)
    # a step that counts in the pruned cache's coordinates is refused, not misplaced
    with pytest.raises(ValueError, match="unpruned sequence"), torch.no_grad():
        model(**dict(step, past_key_values=copy.deepcopy(pristine), cache_position=torch.tensor([kept])))


def test_packed_path_equals_padded_path(setup):
    name = register_reference_varlen_attention()
    padded_model = patched(setup.make_model("sdpa"), budget=0.25)
    packed_model = copy.deepcopy(padded_model)
    packed_model.set_attn_implementation(name)
    packed_model.visionselector.packed = True
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    # An MoE model's balance loss too: over the packed tokens, with no padding to leave out.
    if routes_experts(padded_model):
        batch["output_router_logits"] = True
    with torch.no_grad():
        padded = padded_model(**batch, labels=labels, use_cache=False)
        if vsops.integrations.adapter_for(setup.name).unpackable:
            # A language model that cannot keep packed sequences apart gets the padded layout.
            with pytest.raises(ValueError, match="packed=True is not possible on this model: .*re-padded"):
                packed_model(**batch, labels=labels, use_cache=False)
            packed_model.visionselector.packed = None
            out = packed_model(**batch, labels=labels, use_cache=False)
            assert out.visionselector.cu_seqlens is None
            torch.testing.assert_close(out.logits, padded.logits, rtol=1e-5, atol=1e-5)
            return
        packed = packed_model(**batch, labels=labels, use_cache=False)
    selection = packed.visionselector
    assert selection.cu_seqlens is not None and packed.logits.shape[0] == 1
    counts = selection.cu_seqlens.diff().tolist()
    assert counts == [int(n) for n in (selection.keep.sum(1))]
    rows = torch.split(packed.logits[0], counts)
    for b, row in enumerate(rows):
        torch.testing.assert_close(row, padded.logits[b, -counts[b]:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    if routes_experts(padded_model):
        torch.testing.assert_close(packed.aux_loss, padded.aux_loss, rtol=1e-5, atol=1e-6)


def test_pruned_loss_uses_the_labels_of_the_kept_tokens(setup):
    model = patched(setup.make_model(), budget=0.25)
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = model(**batch, labels=labels, use_cache=False)
    keep = out.visionselector.keep
    losses = []
    for b in range(keep.shape[0]):
        n = int(keep[b].sum())
        kept = labels[b, keep[b]]
        losses.append(torch.nn.functional.cross_entropy(out.logits[b, -n:-1], kept[1:], reduction="none"))
    expected = torch.cat(losses)[torch.cat([labels[b, keep[b]][1:] for b in range(keep.shape[0])]) != -100].mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_a_moe_balance_loss_covers_the_tokens_the_language_model_saw(setup):
    model = setup.make_model()
    if not routes_experts(model):
        pytest.skip("not a mixture-of-experts model")
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pmodel = patched(model, budget=0.25)
    with torch.no_grad():
        unpatched = model(**batch, labels=labels, output_router_logits=True)
        whole = pmodel(**batch, labels=labels, output_router_logits=True, visionselector_budget=1.0)
        out = pmodel(**batch, labels=labels, output_router_logits=True)
        without = pmodel(**batch, labels=labels)
    torch.testing.assert_close(whole.aux_loss, unpatched.aux_loss, rtol=1e-5, atol=1e-6)
    # The balance over the kept tokens: each sample's routers fed by hand, no padding.
    embeds, positions, extra = capture_language_model_inputs(model, batch, pmodel.visionselector.position_rows)
    keep, real = out.visionselector.keep, batch["attention_mask"].bool()
    per_sample = [language_model_by_hand(setup, model, batch, b, keep[b] & real[b], embeds, positions, extra,
                                         output_router_logits=True).router_logits for b in range(keep.shape[0])]
    layers = tuple(torch.cat(parts) for parts in zip(*per_sample))
    assert without.aux_loss is None
    torch.testing.assert_close(out.aux_loss, router_balance_loss(model, layers, None), rtol=1e-5, atol=1e-6)
    coefficient = model.config.get_text_config().router_aux_loss_coef
    torch.testing.assert_close(out.loss, without.loss + coefficient * out.aux_loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        as_tuple = pmodel(**batch, labels=labels, output_router_logits=True, return_dict=False)
    # transformers' tuple: the loss first, the balance loss among the rest.
    assert isinstance(as_tuple, tuple)
    torch.testing.assert_close(as_tuple[0], out.loss, rtol=0, atol=0)
    assert any(isinstance(t, torch.Tensor) and t.dim() == 0 and torch.equal(t, out.aux_loss) for t in as_tuple[1:])


def test_soft_mask_gradients_reach_the_scorer_and_nothing_else(setup):
    model = patched(setup.make_model(), budget=0.25)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("importance_scorer" in name)
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape  # every token stays in training
    selection = out.visionselector
    visual = visual_mask(batch)
    soft = selection.soft_mask
    assert torch.equal(soft[~visual], torch.ones_like(soft[~visual]))
    for b, n in enumerate(visual.sum(1).tolist()):
        expected = float(vsops.budget_to_k(n, 0.25)) if n else 0.0
        torch.testing.assert_close(soft[b][visual[b]].sum().item(), expected, rtol=1e-4, atol=1e-4)
    (out.loss + 0.5 * out.constraint_loss).backward()
    for name, p in model.named_parameters():
        if "importance_scorer" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_training_scales_each_visual_token_and_its_rows_by_the_soft_mask(setup):
    """Every token reaches the language model, each visual one scaled by its soft-mask factor,
    and so is each row of the inputs with one row per visual token (Qwen3-VL's deepstack
    features: a softly dropped token must not keep its whole deepstack share, which inference
    removes)."""
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    embeds, _, extra = capture_language_model_inputs(model, batch, 1)
    adapter = vsops.integrations.adapter_for(setup.name)
    assert set(extra) == set(adapter.token_inputs)  # what the adapter declares, the model hands over
    pmodel = patched(model, budget=0.25)
    pmodel.train()
    seen = {}
    pmodel.model.language_model.register_forward_pre_hook(lambda m, args, kwargs: seen.update(kwargs), with_kwargs=True)
    with torch.no_grad():
        soft = pmodel(**batch).visionselector.soft_mask
    visual = visual_mask(batch)
    assert 0 < soft[visual].min() < soft[visual].max() < 1
    torch.testing.assert_close(seen["inputs_embeds"], embeds * soft.unsqueeze(-1), rtol=0, atol=0)
    for name, value in extra.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(seen[name], value, rtol=0, atol=0)
        else:
            for got, rows in zip(seen[name], value, strict=True):
                torch.testing.assert_close(got, rows * soft[visual].unsqueeze(-1), rtol=0, atol=0)


def test_constraint_loss_is_bce_of_soft_against_hard(setup):
    model = patched(setup.make_model(), budget=0.25)
    model.train()
    out = model(**setup.make_batch(PROMPTS))
    selection = out.visionselector
    visual = selection.soft_mask != 1
    soft = selection.soft_mask[visual]
    hard = torch.zeros_like(soft)
    # the hard mask is the top k of each sample's soft mask (the soft mask is monotone in the score)
    start = 0
    for b in range(visual.shape[0]):
        n = int(visual[b].sum())
        if n:
            top = soft[start : start + n].topk(vsops.budget_to_k(n, 0.25)).indices
            hard[start + top] = 1
        start += n
    assert torch.equal(selection.hard_mask[visual], hard.bool())
    expected = torch.nn.functional.binary_cross_entropy(soft.double(), hard.double()).float()
    torch.testing.assert_close(out.constraint_loss, expected, rtol=1e-4, atol=1e-5)


def test_text_only_batches_pass_through(setup):
    model = setup.make_model()
    batch = setup.make_batch([[7], [4]])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**batch).logits
        out = patched(model, budget=0.1)(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


def test_a_failed_call_leaves_nothing_for_the_next(setup):
    model = patched(setup.make_model(), budget=0.25)
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with pytest.raises(ValueError, match="visionselector_budget"), torch.no_grad():
        model(**batch, labels=labels, visionselector_budget=1.5)
    with torch.no_grad():
        out = model(**batch)
    assert out.loss is None and out.logits.shape[1] == model(**batch).logits.shape[1]


def test_budget_per_call_and_on_the_model(setup):
    model = patched(setup.make_model(), budget=0.5)
    batch = setup.make_batch(PROMPTS[:1])
    with torch.no_grad():
        by_model = model(**batch).logits.shape[1]
        by_call = model(**batch, visionselector_budget=0.25).logits.shape[1]
        model.visionselector.budget = 0.25
        by_setting = model(**batch).logits.shape[1]
        model.visionselector.budget = 0.5
        with model.visionselector.using(budget=0.25):
            by_context = model(**batch).logits.shape[1]
    length = batch["input_ids"].shape[1]
    assert (by_model, by_call, by_setting, by_context) == (length - 8, length - 12, length - 12, length - 12)
    assert model.visionselector.budget == 0.5


def hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_apply_and_revert_on_an_instance(setup):
    model = setup.make_model()
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        expected = model(**batch).logits
    keys_before = set(model.state_dict())
    selector = apply_visionselector(model, budget=0.25)
    assert is_visionselector_applied(model) and model.visionselector is selector
    assert {f"model.visual.importance_scorer.{k}" for k in SCORER_KEYS} == set(model.state_dict()) - keys_before
    with torch.no_grad():
        assert model(**batch).logits.shape[1] < expected.shape[1]  # the patch is active
    revert_visionselector(model)
    assert not is_visionselector_applied(model) and set(model.state_dict()) == keys_before
    assert hook_count(model) == 0  # the vision-attention hooks too
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not carry"):
        revert_visionselector(model)
    # reverting through the multimodal model reverts the generation model around it
    apply_visionselector(model, budget=0.25)
    revert_visionselector(model.model)
    assert not is_visionselector_applied(model) and set(model.state_dict()) == keys_before
    revert_visionselector(model)  # what is left is cleared, without an error
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)


def test_the_named_entry_point_and_the_class_patch(setup):
    adapter = vsops.integrations.adapter_for(setup.name)
    entry_point = getattr(vsops.integrations, f"apply_visionselector_to_{setup.name}")
    top_name, inner_name = adapter.class_names()
    with pytest.raises(TypeError, match=top_name):
        entry_point(torch.nn.Linear(2, 2))
    inner = setup.make_model().model
    assert entry_point(inner) is inner.visionselector  # the multimodal model alone
    if adapter.remote_code:
        with pytest.raises(ValueError, match="remote code"):
            entry_point(None)
        return
    batch = setup.make_batch(PROMPTS)
    for patch in (lambda: entry_point(budget=0.3), lambda: apply_visionselector(model_type=setup.name, budget=0.3)):
        patch()
        try:
            assert is_visionselector_applied()
            model = setup.make_model()
            assert is_visionselector_applied(model) and model.visionselector.budget == 0.3
            with torch.no_grad():
                assert model(**batch).logits.shape[1] < batch["input_ids"].shape[1]
            assert hasattr(adapter.classes()[0](model.config).visual, "importance_scorer")  # the multimodal class too
        finally:
            revert_visionselector()
        assert not is_visionselector_applied() and not is_visionselector_applied(setup.make_model())


def test_bad_input_gives_clear_errors(setup):
    model = setup.make_model()
    with pytest.raises(ValueError, match="budget"):
        apply_visionselector(model, budget=0.0)
    with pytest.raises(ValueError, match="scope"):
        apply_visionselector(model, scope="frame")
    with pytest.raises(TypeError, match="transformers model"):
        apply_visionselector(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="does not match"):
        apply_visionselector(model, model_type=[s.name for s in SETUPS if s.name != setup.name][0])
    assert not is_visionselector_applied(model)
    apply_visionselector(model, budget=0.5)
    batch = setup.make_batch(PROMPTS[:1])
    with pytest.raises(ValueError, match="visionselector_budget"):
        model(**batch, visionselector_budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        model.visionselector.budget = -1
    with pytest.raises(ValueError, match="packed=True"):
        model.visionselector.packed = True
        model(**batch, use_cache=False)


def test_outputs_survive_a_pytree_round_trip(setup):
    # DistributedDataParallel and torch.compile rebuild outputs from their pytree: the
    # selection must be a field of the output class, not a loose key.
    import pickle

    from torch.utils import _pytree as pytree

    model = patched(setup.make_model(), budget=0.25)
    for training in (False, True):
        model.train(training)
        out = model(**setup.make_batch(PROMPTS))
        leaves, spec = pytree.tree_flatten(out)
        rebuilt = pytree.tree_unflatten(leaves, spec)
        assert type(rebuilt) is type(out) and rebuilt.visionselector is out.visionselector
        assert (rebuilt.constraint_loss is not None) == training
        assert type(pickle.loads(pickle.dumps(out))) is type(out)


# -- from_pretrained ---------------------------------------------------------------------------


def save_checkpoint(model, directory, *, prefix="model.visual.importance_scorer.", shards=1, scorer=True):
    """``model``'s weights as safetensors in ``directory`` beside its config (and remote code),
    the scorer under ``prefix``; ``shards`` > 1 writes a sharded index."""
    import json

    from safetensors.torch import save_file

    model.save_pretrained(directory)  # config.json and, for remote code, the code files
    for name in list(directory.glob("*.safetensors")) + list(directory.glob("*.index.json")):
        name.unlink()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "importance_scorer" not in k}
    if scorer:
        state.update({prefix + k: v.contiguous() for k, v in scorer_of(model).state_dict().items()})
    keys = sorted(state)
    if shards == 1:
        save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i in range(shards):
        part = {k: state[k] for k in keys[i::shards]}
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize(
    "prefix, shards",
    [("model.visual.importance_scorer.", 1), ("visual.importance_scorer.", 1), ("model.visual.importance_scorer.", 3)],
    ids=["model.visual", "visual", "sharded"],
)
def test_from_pretrained_loads_the_scorer_in_every_published_layout(setup, tmp_path, prefix, shards):
    source = patched(setup.make_model(), budget=0.2)
    save_checkpoint(source, tmp_path, prefix=prefix, shards=shards)
    model = from_pretrained(tmp_path, budget=0.25, scope="image", trust_remote_code=True)
    assert model.visionselector.budget == 0.25 and model.visionselector.scope == "image"
    expected = scorer_of(source).state_dict()
    for k, v in scorer_of(model).state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    batch = setup.make_batch(PROMPTS)
    source.visionselector.scope = "image"
    source.visionselector.budget = 0.25
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).visionselector.keep, source(**batch).visionselector.keep)


def test_from_pretrained_without_a_scorer(setup, tmp_path):
    save_checkpoint(setup.make_model(), tmp_path, scorer=False)
    with pytest.raises(ValueError, match="allow_missing_scorer"):
        from_pretrained(tmp_path, trust_remote_code=True)
    # a training-free method needs no scorer
    assert from_pretrained(tmp_path, method="divprune", trust_remote_code=True).visionselector.method.name == "divprune"
    model = from_pretrained(tmp_path, allow_missing_scorer=True, trust_remote_code=True)
    weight = scorer_of(model).q_proj.weight
    # the published init (std 1e-4), not the model's initializer_range (0.02)
    assert 0.5e-4 < weight.std().item() < 2e-4 and torch.all(scorer_of(model).q_proj.bias == 0)


def test_from_pretrained_refuses_a_scorer_of_other_shapes(setup, tmp_path):
    source = setup.make_model()
    apply_visionselector(source, proj_dim=8)
    save_checkpoint(source, tmp_path)
    assert scorer_of(from_pretrained(tmp_path, trust_remote_code=True)).proj_dim == 8  # the checkpoint's size
    hidden = scorer_of(source).hidden_size
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    state["model.visual.importance_scorer.q_proj.weight"] = torch.zeros(8, hidden + 1)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="q_proj.weight"):
        from_pretrained(tmp_path, trust_remote_code=True)
    state["model.visual.importance_scorer.q_proj.weight"] = torch.zeros(8, hidden)
    state["model.visual.importance_scorer.k_proj.weight"] = torch.zeros(9, hidden)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="k_proj.weight"):
        from_pretrained(tmp_path, trust_remote_code=True)


def test_registry_errors_name_what_is_wrong(tmp_path):
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    from vsops.integrations import adapter_for, apply_visionselector_to_llava_ov_1_5

    with pytest.raises(ValueError, match="no VisionSelector adapter for model_type 'llama'") as error:
        adapter_for("llama")
    supported = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "llavaonevision1_5"}
    assert set(vsops.integrations.registered_model_types()) == supported
    assert all(repr(name) in str(error.value) for name in supported)  # the message lists them
    # a model of a family without an adapter (Qwen2.5-Omni, for one)
    unsupported = torch.nn.Module()
    unsupported.config = types.SimpleNamespace(model_type="qwen2_5_omni")
    with pytest.raises(ValueError, match=r"model_type 'qwen2_5_omni'; supported model_types: \['llavaonevision1_5', "):
        apply_visionselector(unsupported)
    with pytest.raises(ValueError, match="model_type"):
        apply_visionselector(model_type="llama")
    with pytest.raises(ValueError, match="give the model to patch, or model_type"):
        apply_visionselector()
    # a model no adapter knows
    llama = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=32))
    with pytest.raises(ValueError, match="'llama'"):
        apply_visionselector(llama)
    # remote code has no classes to patch before loading
    with pytest.raises(ValueError, match="remote code"):
        apply_visionselector(model_type="llavaonevision1_5")
    with pytest.raises(ValueError, match="from_pretrained"):
        apply_visionselector_to_llava_ov_1_5(None)
    with pytest.raises(ValueError, match="method"):
        from_pretrained(tmp_path, method="sparsevlm")
    with pytest.raises(TypeError, match="method must be"):
        from_pretrained(tmp_path, method=5)
    with pytest.raises(ValueError, match="budget"):
        from_pretrained(tmp_path, budget=2.0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'"):
        from_pretrained(tmp_path)
