"""Methods that drop visual tokens inside the language model (FastV, PyramidDrop, DART), in every
model of the contract suite: the pruned logits equal the language model run layer by layer by
hand with the published selection (attention weights materialized, eager); padded batches equal
each sample alone; a decode step on the mixed cache equals a fresh prefill with the same drops;
sdpa equals eager; the vision stage and an in-LM stage combine."""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

import vsops  # noqa: E402
import vsops.methods  # noqa: E402
from vsops.integrations import apply_visionselector  # noqa: E402
from vsops.integrations.testing import TOKENS  # noqa: E402
from vsops.methods import DARTMethod, FastVMethod, PDropMethod, Stages  # noqa: E402

from model_setups import SETUPS, TRANSFORMERS_VERSION  # noqa: E402
from test_integration_contracts import capture_language_model_inputs, extend, randomize_scorer, visual_mask  # noqa: E402

BEFORE_5 = TRANSFORMERS_VERSION is not None and TRANSFORMERS_VERSION < (5, 0)

LAYERS = 6
PROMPTS = [[3, ("image", 8, 8), 4, ("image", 4, 8), 2], [5, ("image", 8, 4), 6]]
LINEAR_FIRST = ("qwen3_5", "qwen3_5_moe")  # layers alternate linear attention and full attention


@pytest.fixture(params=[s for s in SETUPS if s.name != "llava_ov_1_5"], ids=lambda s: s.name)
def setup(request):
    if request.param.skip:
        pytest.skip(request.param.skip)
    if BEFORE_5:
        pytest.skip("drops inside the language model need transformers >= 5")
    return request.param


@pytest.mark.skipif(not BEFORE_5, reason="transformers 4.x only")
def test_transformers_4_refuses_drops_inside_the_language_model():
    setup = SETUPS[0]
    pmodel = patched(setup.make_model("sdpa", 0, layers=LAYERS), method="fastv", budget=0.3)
    with pytest.raises(ValueError, match="'fastv' method: drops inside the language model need transformers >= 5"):
        with torch.no_grad():
            pmodel(**setup.make_batch(PROMPTS))


def make_model(setup, attn="sdpa"):
    return setup.make_model(attn, 0, layers=LAYERS)


def methods_for(setup):
    """Each method with drop layers after a softmax-attention layer of the model."""
    pdrop_layers = (2, 4) if setup.name in LINEAR_FIRST else None
    return {"fastv": FastVMethod(2), "fastv_last": FastVMethod(2, rows="last"), "pdrop": PDropMethod(pdrop_layers),
            "dart": DARTMethod(2, image_pivots=2, text_pivots=2)}


def patched(model, **settings):
    out = copy.deepcopy(model)
    apply_visionselector(out, **settings)
    randomize_scorer(out)
    return out


def top_lower_index(scores, count):
    """The published ranking (torch.topk) with ties to the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(order[:count], dtype=torch.long)


def published_keep(method, weights, normed, keys, visual, segment, budget, num_layers):
    """One sequence's keep mask at a drop, as the published code computes it, from the layer's
    materialized eager attention ``weights [H, n, n]``."""
    keep = ~visual.clone()
    for s in range(int(segment.max()) + 1 if visual.any() else 0):
        where = ((segment == s) & visual).nonzero().squeeze(1)
        if isinstance(method, PDropMethod):
            ratio = vsops.methods.pdrop_ratio(budget, num_layers, method.layers)
            k = vsops.budget_to_k(where.numel(), ratio)
        else:
            k = vsops.budget_to_k(where.numel(), budget)
        if isinstance(method, DARTMethod):
            chosen = vsops.methods.dart(normed, keys, (segment == s) & visual, k, image_pivots=method.image_pivots,
                                        text_pivots=method.text_pivots)
            keep |= chosen & (segment == s)
            continue
        if isinstance(method, PDropMethod) or method.rows == "last":
            scores = weights.mean(0)[-1]
        else:
            scores = weights.mean(0).mean(0)
        keep[where[top_lower_index(scores[where], k)]] = True
    return keep


def run_by_hand(setup, model, inputs, b, chosen, *, method=None, budget=None, segment=None, fixed=None):
    """Sample ``b``'s tokens ``chosen [L]`` through the language model of the eager ``model``
    layer by layer, dropping before each of ``method``'s layers what :func:`published_keep`
    says (or, with ``fixed [L]``, keeping its tokens from the first drop on). ``inputs``: what
    the unpatched model hands its language model, and the visual mask. Returns the logits
    ``[n, V]`` and the caller positions of the tokens the last layer saw."""
    from transformers.cache_utils import DynamicCache
    from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

    embeds, positions, extra, visual = inputs
    lm = model.model.language_model
    config = lm.config
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(lm.layers))
    origin = chosen.nonzero().squeeze(1)
    hidden = embeds[b, origin][None]
    cos, sin = lm.rotary_emb(hidden, setup.lm_positions(positions[:, b, origin]))
    deep = extra.get("deepstack_visual_embeds")
    if deep is not None:
        # Each visual position's row among the batch's deepstack features (row-major).
        placed = extra["visual_pos_masks"]
        row_of = int(placed[:b].sum()) + placed[b].long().cumsum(0) - 1
    drops = method.drop_layers(len(lm.layers)) if method is not None else ()
    cache = DynamicCache(config=config)
    weights = {}
    with torch.no_grad():
        for index, layer in enumerate(lm.layers):
            if index in drops:
                if fixed is not None:
                    keep = fixed[origin]
                else:
                    keys = cache.layers[index - 1].keys[0].transpose(0, 1)
                    keep = published_keep(method, weights[index - 1][0], lm.norm(hidden)[0], keys, visual[b, origin],
                                          segment[origin], budget, len(lm.layers))
                hidden, cos, sin, origin = hidden[:, keep], cos[..., keep, :], sin[..., keep, :], origin[keep]
            ones = torch.ones(1, hidden.shape[1], dtype=torch.long)
            masks = {kind: LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind](
                config=config, inputs_embeds=hidden, attention_mask=ones, cache=None) for kind in set(types)}
            if index + 1 in drops and fixed is None:
                _, weights[index] = layer.self_attn(layer.input_layernorm(hidden), attention_mask=masks[types[index]],
                                                    position_embeddings=(cos, sin))
            hidden = layer(hidden, attention_mask=masks[types[index]], position_embeddings=(cos, sin),
                           position_ids=None, cache=cache, use_cache=True)
            if deep is not None and index < len(deep):
                present = placed[b, origin]
                hidden = hidden.clone()
                hidden[0, present] += deep[index][row_of[origin[present]]]
        logits = model.lm_head(lm.norm(hidden))[0]
    return logits, origin


def hand_logits(setup, model, batch, out, method, budget, scope="sample", vision_keep=None, fixed=None):
    """Checks ``out`` of the patched ``model`` on ``batch`` against :func:`run_by_hand` for each
    sample alone: its last tokens' logits and, without ``fixed``, its kept tokens.
    ``vision_keep [B, L]``: the tokens the vision stage handed the language model."""
    eager = make_model(setup, "eager")
    eager.load_state_dict(model.state_dict(), strict=False)
    embeds, positions, extra = capture_language_model_inputs(eager, batch, 3)
    inputs = embeds, positions, extra, visual_mask(batch)
    real = batch["attention_mask"].bool()
    segment = image_numbers(batch) if scope == "image" else torch.zeros_like(real, dtype=torch.long)
    for b in range(real.shape[0]):
        chosen = real[b] if vision_keep is None else vision_keep[b] & real[b]
        logits, origin = run_by_hand(setup, eager, inputs, b, chosen, method=method, budget=budget,
                                     segment=segment[b], fixed=None if fixed is None else fixed[b])
        if fixed is None:
            expected = torch.zeros_like(real[b])
            expected[origin] = True
            torch.testing.assert_close(out.visionselector.keep[b], expected, rtol=0, atol=0)
        n = min(out.logits.shape[1], logits.shape[0])  # a decode step's logits: the new tokens only
        torch.testing.assert_close(out.logits[b, -n:], logits[-n:], rtol=1e-4, atol=1e-4)


def image_numbers(batch):
    """int64 ``[B, L]``: each visual token's image, numbered from 0 within its sample."""
    from test_integration_contracts import item_runs

    out = torch.full(batch["input_ids"].shape, -1, dtype=torch.long)
    for b, runs in enumerate(item_runs(batch)):
        for i, run in enumerate(runs):
            out[b, run] = i
    return out


@pytest.mark.parametrize("name", ["fastv", "fastv_last", "pdrop", "dart"])
def test_logits_equal_the_layers_run_by_hand_with_the_published_selection(setup, name):
    model = make_model(setup)
    method = methods_for(setup)[name]
    batch = setup.make_batch(PROMPTS)
    budget = 0.6 if name == "pdrop" else 0.3
    pmodel = patched(model, method=method, budget=budget)
    with torch.no_grad():
        out = pmodel(**batch)
    selection = out.visionselector
    assert selection.kept_fraction is not None and selection.kept_fraction < 1
    assert selection.visual_counts == visual_mask(batch).sum(1).tolist()
    first = method.drop_layers(LAYERS)[0]
    assert selection.layer_tokens[:first] == [int(batch["attention_mask"].sum())] * first
    assert selection.layer_tokens[-1] == int(selection.attention_mask.sum()) < selection.layer_tokens[first - 1]
    hand_logits(setup, model, batch, out, method, budget)


def test_scope_image_keeps_a_budget_per_image(setup):
    model = make_model(setup)
    batch = setup.make_batch(PROMPTS)
    method = FastVMethod(2)
    pmodel = patched(model, method=method, budget=0.3, scope="image")
    with torch.no_grad():
        out = pmodel(**batch)
    numbers = image_numbers(batch)
    for b in range(numbers.shape[0]):
        for i in range(int(numbers[b].max()) + 1):
            image = numbers[b] == i
            assert int((out.visionselector.keep[b] & image).sum()) == vsops.budget_to_k(int(image.sum()), 0.3)
    hand_logits(setup, model, batch, out, method, 0.3, scope="image")


def test_a_drop_before_layer_one_follows_the_deepstack_features(setup):
    model = make_model(setup)
    batch = setup.make_batch(PROMPTS)
    method = FastVMethod(1)
    pmodel = patched(model, method=method, budget=0.3)
    if setup.name in LINEAR_FIRST:
        with pytest.raises(ValueError, match="linear_attention layer"), torch.no_grad():
            pmodel(**batch)
        return
    with torch.no_grad():
        out = pmodel(**batch)
    hand_logits(setup, model, batch, out, method, 0.3)


@pytest.mark.parametrize("name", ["fastv", "dart"])
def test_a_decode_step_on_the_mixed_cache_equals_a_fresh_prefill_with_the_same_drops(setup, name):
    model = make_model(setup)
    method = methods_for(setup)[name]
    pmodel = patched(model, method=method, budget=0.3)
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        prefill = pmodel(**batch)
    cache = prefill.cache
    kept = prefill.visionselector.keep
    lm_layers = pmodel.model.language_model.layers
    assert cache.layers[0].get_seq_length() == batch["input_ids"].shape[1]
    assert cache.layers[len(lm_layers) - 1].get_seq_length() == prefill.logits.shape[1]
    token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    longer = extend(batch, token)
    step = {k: v for k, v in longer.items() if not k.startswith("pixel") and not k.endswith("grid_thw")}
    step.update(input_ids=token, cache=copy.deepcopy(cache))
    position = setup.decode_positions(pmodel, longer, token)
    if position is not None:
        step["position_ids"] = position
    with torch.no_grad():
        decoded = pmodel(**step)
    fixed = torch.cat([kept, torch.ones_like(token, dtype=torch.bool)], 1)
    hand_logits(setup, model, longer, decoded, method, 0.3, fixed=fixed)


@pytest.mark.parametrize("name", ["fastv", "pdrop"])
def test_greedy_generate_on_a_padded_batch_equals_each_sample_alone(setup, name):
    model = patched(make_model(setup), method=methods_for(setup)[name], budget=0.6 if name == "pdrop" else 0.3)
    prompts = setup.generate_prompts
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=TOKENS["pad"], eos_token_id=None)
    together = model.generate(**setup.make_batch(prompts), **kwargs)[:, -5:]
    for i, prompt in enumerate(prompts):
        alone = model.generate(**setup.make_batch([prompt], seed=1 + i), **kwargs)[:, -5:]
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=0)


def test_sdpa_equals_eager(setup):
    batch = setup.make_batch(PROMPTS)
    outs = []
    for attn in ("sdpa", "eager"):
        pmodel = patched(make_model(setup, attn), method="fastv", budget=0.3)
        with torch.no_grad():
            outs.append(pmodel(**batch))
    torch.testing.assert_close(outs[0].visionselector.keep, outs[1].visionselector.keep, rtol=0, atol=0)
    real = outs[0].visionselector.attention_mask.bool()  # padding's logits are whatever each kernel leaves
    torch.testing.assert_close(outs[0].logits[real], outs[1].logits[real], rtol=1e-4, atol=1e-4)


def test_a_vision_stage_then_an_in_lm_stage(setup):
    model = make_model(setup)
    batch = setup.make_batch(PROMPTS)
    vision_only = patched(model, method="visionselector", budget=0.5)
    both = patched(model, method=Stages("visionselector", 0.5, FastVMethod(2)), budget=0.5)
    with torch.no_grad():
        first = vision_only(**batch)
        out = both(**batch)
    selection = out.visionselector
    handed = first.visionselector.keep
    visual = visual_mask(batch)
    for b in range(visual.shape[0]):
        after_vision = int((handed[b] & visual[b]).sum())
        assert after_vision == vsops.budget_to_k(int(visual[b].sum()), 0.5)
        assert selection.kept_visual[b] == vsops.budget_to_k(after_vision, 0.5)
    assert selection.kept_fraction == sum(selection.kept_visual) / int(visual.sum())
    assert not bool((selection.keep & ~handed).any())
    hand_logits(setup, model, batch, out, FastVMethod(2), 0.5, vision_keep=handed)


def test_what_cannot_be_done_is_refused(setup):
    model = make_model(setup)
    batch = setup.make_batch(PROMPTS)
    pmodel = patched(model, method="fastv", budget=0.3)
    with pytest.raises(ValueError, match="no training mode|not in training mode"):
        pmodel.train()(**batch)
    pmodel.eval()
    with pytest.raises(ValueError, match="packed=True"), torch.no_grad():
        pmodel.visionselector.packed = True
        pmodel(**batch, use_cache=False)
    pmodel.visionselector.packed = None
    with pytest.raises(ValueError, match="below the language model's 6 layers"), torch.no_grad():
        pmodel.visionselector.method = FastVMethod(6)
        pmodel(**batch)
    from transformers import StaticCache

    pmodel.visionselector.method = "fastv"
    with pytest.raises(ValueError, match="static"), torch.no_grad():
        pmodel(**batch, cache=StaticCache(config=pmodel.config, max_cache_len=128))
    with pytest.raises(TypeError, match="inside the language model"):
        FastVMethod().select(torch.zeros(3, 4), torch.tensor([1]), torch.tensor([0, 3], dtype=torch.int32))
    with pytest.raises(ValueError, match="language must be"):
        Stages("visionselector", 0.5, "divprune")
    with pytest.raises(ValueError, match="vision must be"):
        Stages("fastv", 0.5, "fastv")
    with pytest.raises(ValueError, match="rows"):
        FastVMethod(rows="first")
    with pytest.raises(ValueError, match="layer must be >= 1"):
        FastVMethod(0)


def test_a_method_keeping_text_out_is_refused(setup):
    class DropsText(FastVMethod):
        def keep(self, state, k):
            return torch.zeros_like(state.visual)

    pmodel = patched(make_model(setup), method=DropsText(), budget=0.3)
    with pytest.raises(ValueError, match="keep every non-visual token"), torch.no_grad():
        pmodel(**setup.make_batch(PROMPTS))


def test_revert_removes_the_layer_hooks(setup):
    from vsops.integrations import revert_visionselector

    model = make_model(setup)
    pmodel = patched(model, method="fastv", budget=0.3)
    batch = setup.make_batch(PROMPTS)
    with torch.no_grad():
        pmodel(**batch)
    revert_visionselector(pmodel)
    lm = pmodel.model.language_model
    assert all(not layer._forward_pre_hooks and not layer._forward_hooks for layer in lm.layers)
    assert "_deepstack_process" not in vars(lm) and all("visionselector" not in vars(layer) for layer in lm.layers)
    with torch.no_grad():
        torch.testing.assert_close(pmodel(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_packed_drops_equal_padded_drops(setup):
    from vsops.integrations import register_reference_varlen_attention

    name = register_reference_varlen_attention()
    batch = setup.make_batch(PROMPTS)
    padded_model = patched(make_model(setup), method=Stages("visionselector", 0.5, FastVMethod(2)), budget=0.5)
    packed_model = copy.deepcopy(padded_model)
    packed_model.set_attn_implementation(name)
    packed_model.visionselector.packed = True
    with torch.no_grad():
        padded = padded_model(**batch, use_cache=False)
        if packed_model.visionselector.unpackable:
            with pytest.raises(ValueError, match="packed=True is not possible on this model"):
                packed_model(**batch, use_cache=False)
            return
        packed = packed_model(**batch, use_cache=False)
    selection = packed.visionselector
    assert selection.cu_seqlens is not None and packed.logits.shape[0] == 1
    torch.testing.assert_close(selection.keep, padded.visionselector.keep, rtol=0, atol=0)
    assert selection.kept_visual == padded.visionselector.kept_visual
    counts = selection.cu_seqlens.diff().tolist()
    for b, rows in enumerate(torch.split(packed.logits[0], counts)):
        torch.testing.assert_close(rows, padded.logits[b, -counts[b]:], rtol=1e-4, atol=1e-4)


def test_labels_give_the_loss_of_the_tokens_the_last_layer_saw(setup):
    pmodel = patched(make_model(setup), method="fastv", budget=0.3)
    batch = setup.make_batch(PROMPTS)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        out = pmodel(**batch, labels=labels, use_cache=False)
    keep = out.visionselector.keep
    assert int(keep.sum()) < int(batch["attention_mask"].sum())
    losses, targets = [], []
    for b in range(keep.shape[0]):
        n, kept = int(keep[b].sum()), labels[b, keep[b]]
        losses.append(torch.nn.functional.cross_entropy(out.logits[b, -n:-1], kept[1:], reduction="none"))
        targets.append(kept[1:])
    expected = torch.cat(losses)[torch.cat(targets) != -100].mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
