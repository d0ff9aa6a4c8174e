"""VisionSelector inside Qwen2.5-VL: tiny random models from configs, against the unpatched model.

CI runs this file under the current transformers 5.x and the last 4.x line (4.57).
"""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel  # noqa: E402

import vsops  # noqa: E402
from vsops.integrations import (  # noqa: E402
    apply_visionselector_to_qwen2_5_vl,
    is_visionselector_applied,
    register_reference_varlen_attention,
    revert_visionselector,
)
from vsops.integrations.tiny_models import TOKENS, qwen2_5_vl_batch, tiny_qwen2_5_vl_config  # noqa: E402

# Sample 0: text, an image (16 tokens), text. Sample 1: text, an image (8), a video (2 frames of
# 8 tokens), text. Sample 2: text only. Left padding.
PROMPTS = [
    [3, ("image", 8, 8), 4],
    [2, ("image", 4, 8), ("video", 4, 4, 4), 5],
    [9],
]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# Pruning changes which sample is longest: sample 0 loses 12 of its 25 tokens, sample 1 (7 of
# padding) 3 of its 18, so the pruned cache's padding differs from the caller's mask.
GENERATE_PROMPTS = [[3, ("image", 8, 8), 4], [10, ("image", 4, 4), 2]]
SCORER_KEYS = {f"{p}.{w}" for p in ("q_proj", "k_proj") for w in ("weight", "bias")}


def make_model(attn="sdpa", seed=0, **config):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(attn_implementation=attn, **config))
    return model.eval()


def make_batch(prompts=PROMPTS, seed=1):
    return qwen2_5_vl_batch(prompts, seed=seed)


def randomize_scorer(model, seed=3):
    """Published init is std 1e-4: scores that near-tie. Larger weights give a clear ranking."""
    g = torch.Generator().manual_seed(seed)
    for p in model.model.visual.importance_scorer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))


def patched(model, **settings):
    patched_model = copy.deepcopy(model)
    apply_visionselector_to_qwen2_5_vl(patched_model, **settings)
    randomize_scorer(patched_model)
    return patched_model


def capture_language_model_inputs(model, batch):
    """inputs_embeds and 3-D positions the unpatched model hands its language model."""
    seen = {}

    def hook(module, args, kwargs):
        seen.update(embeds=kwargs["inputs_embeds"], positions=kwargs["position_ids"])

    handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(**batch, use_cache=False)
    handle.remove()
    positions = seen["positions"]
    if positions is None:
        b, length = batch["input_ids"].shape
        positions = torch.arange(length).expand(3, b, length)
    return seen["embeds"], positions[-3:]


def reference_keep(model, embeds, batch, budget):
    """Top-k of Eq. 2 computed with the N x N matrix, per sample, ties to the lower index."""
    scorer = model.model.visual.importance_scorer
    visual = (batch["input_ids"] == TOKENS["image"]) | (batch["input_ids"] == TOKENS["video"])
    keep = ~visual & batch["attention_mask"].bool()
    for b in range(visual.shape[0]):
        where = visual[b].nonzero().squeeze(1)
        if where.numel() == 0:
            continue
        x = embeds[b, where].double()
        q = x @ scorer.q_proj.weight.double().T + scorer.q_proj.bias.double()
        k = x @ scorer.k_proj.weight.double().T + scorer.k_proj.bias.double()
        scores = (q @ k.T / math.sqrt(q.shape[1])).mean(1)
        kept = vsops.budget_to_k(where.numel(), budget)
        order = sorted(range(where.numel()), key=lambda i: (-scores[i].item(), i))[:kept]
        keep[b, where[order]] = True
    return keep


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_budget_one_gives_the_unpatched_logits(attn):
    model = make_model(attn)
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits
        out = patched(model, budget=1.0)(**batch)
    real = batch["attention_mask"].bool()
    # Every token is kept; the caller's padding is dropped and re-added on the left.
    torch.testing.assert_close(out.visionselector.keep, real, rtol=0, atol=0)
    torch.testing.assert_close(out.logits[real], expected[real], rtol=0, atol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_pruned_logits_equal_the_language_model_fed_by_hand(attn):
    model = make_model(attn)
    batch = make_batch()
    budget = 0.25
    pmodel = patched(model, budget=budget)
    with torch.no_grad():
        out = pmodel(**batch)
    embeds, positions = capture_language_model_inputs(model, batch)
    keep = out.visionselector.keep
    torch.testing.assert_close(keep, reference_keep(pmodel, embeds, batch, budget), rtol=0, atol=0)
    real = batch["attention_mask"].bool()
    assert out.logits.shape[1] < batch["input_ids"].shape[1]
    for b in range(keep.shape[0]):
        chosen = keep[b] & real[b]
        with torch.no_grad():
            hidden = model.model.language_model(
                inputs_embeds=embeds[b, chosen][None], position_ids=positions[:, b, chosen][:, None], use_cache=False
            ).last_hidden_state
            by_hand = model.lm_head(hidden)[0]
        n = int(chosen.sum())
        torch.testing.assert_close(out.logits[b, -n:], by_hand, rtol=1e-5, atol=1e-5)


def test_scope_image_keeps_a_budget_per_image():
    model = make_model()
    batch = make_batch()
    out = patched(model, budget=0.25, scope="image")(**batch)
    keep, ids = out.visionselector.keep, batch["input_ids"]
    # Sample 1 holds an image of 8 tokens and a video of 8: 2 of each, not 4 of the union.
    assert int((keep[1] & (ids[1] == TOKENS["image"])).sum()) == 2
    assert int((keep[1] & (ids[1] == TOKENS["video"])).sum()) == 2
    assert int((keep[0] & (ids[0] == TOKENS["image"])).sum()) == 4


def test_greedy_generate_on_a_padded_batch_equals_each_sample_alone():
    model = patched(make_model(), budget=0.25)
    prompts = GENERATE_PROMPTS
    batch = make_batch(prompts)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=TOKENS["pad"], eos_token_id=None)
    together = model.generate(**batch, **kwargs)[:, -6:]
    assert model.visionselector.last is None or model.visionselector.last.keep is not None
    for i, prompt in enumerate(prompts):
        alone = model.generate(**make_batch([prompt], seed=1 + i), **kwargs)[:, -6:]
        torch.testing.assert_close(together[i : i + 1], alone, rtol=0, atol=0)


def test_generate_at_budget_one_equals_the_unpatched_model():
    model = make_model()
    batch = make_batch(PROMPTS[:2])
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


def test_a_decode_step_on_the_pruned_cache_equals_a_fresh_prefill():
    model = patched(make_model(), budget=0.25)
    batch = make_batch(GENERATE_PROMPTS)
    with torch.no_grad():
        prefill = model(**batch)
    cache, kept = prefill.past_key_values, prefill.logits.shape[1]
    assert cache.get_seq_length() == kept < batch["input_ids"].shape[1]
    token = prefill.logits[:, -1].argmax(-1, keepdim=True)
    longer = extend(batch, token)
    # The new token's 3-D position on the full sequence, passed as generate passes it
    # (transformers 5 does not infer it in a hand-written decode loop). rope_deltas counts from
    # the unpadded length in transformers 5 and from the padded one in 4.x.
    mask = longer["attention_mask"]
    index = mask.sum(1, keepdim=True) - 1 if TRANSFORMERS_5 else torch.full_like(token, mask.shape[1] - 1)
    position = index + model.model.rope_deltas
    step = {k: v for k, v in longer.items() if not k.startswith("pixel") and not k.endswith("grid_thw")}
    step.update(input_ids=token, past_key_values=cache, position_ids=position.unsqueeze(0).expand(3, -1, -1))
    with torch.no_grad():
        decoded = model(**step).logits[:, -1]
        fresh = model(**longer).logits[:, -1]
    assert cache.get_seq_length() == kept + 1
    torch.testing.assert_close(decoded, fresh, rtol=1e-5, atol=1e-5)


def test_packed_path_equals_padded_path():
    name = register_reference_varlen_attention()
    padded_model = patched(make_model("sdpa"), budget=0.25)
    packed_model = copy.deepcopy(padded_model)
    packed_model.set_attn_implementation(name)
    packed_model.visionselector.packed = True
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        padded = padded_model(**batch, labels=labels, use_cache=False)
        packed = packed_model(**batch, labels=labels, use_cache=False)
    selection = packed.visionselector
    assert selection.cu_seqlens is not None and packed.logits.shape[0] == 1
    counts = selection.cu_seqlens.diff().tolist()
    assert counts == [int(n) for n in (selection.keep.sum(1))]
    rows = torch.split(packed.logits[0], counts)
    for b, row in enumerate(rows):
        torch.testing.assert_close(row, padded.logits[b, -counts[b]:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)


def test_pruned_loss_uses_the_labels_of_the_kept_tokens():
    model = patched(make_model(), budget=0.25)
    batch = make_batch()
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


def test_soft_mask_gradients_reach_the_scorer_and_nothing_else():
    model = patched(make_model(), budget=0.25)
    model.train()
    for name, p in model.named_parameters():
        p.requires_grad_("importance_scorer" in name)
    batch = make_batch()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = model(**batch, labels=labels)
    assert out.logits.shape[:2] == batch["input_ids"].shape  # every token stays in training
    selection = out.visionselector
    visual = (batch["input_ids"] == TOKENS["image"]) | (batch["input_ids"] == TOKENS["video"])
    soft = selection.soft_mask
    assert torch.equal(soft[~visual], torch.ones_like(soft[~visual]))
    for b, n in enumerate(visual.sum(1).tolist()):
        torch.testing.assert_close(soft[b][visual[b]].sum().item(), float(vsops.budget_to_k(n, 0.25)) if n else 0.0, rtol=1e-4, atol=1e-4)
    (out.loss + 0.5 * out.constraint_loss).backward()
    for name, p in model.named_parameters():
        if "importance_scorer" in name:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_constraint_loss_is_bce_of_soft_against_hard():
    model = patched(make_model(), budget=0.25)
    model.train()
    out = model(**make_batch())
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
    expected = torch.nn.functional.binary_cross_entropy(soft.double(), hard.double()).float()
    torch.testing.assert_close(out.constraint_loss, expected, rtol=1e-4, atol=1e-5)


def test_text_only_batches_pass_through():
    model = make_model()
    batch = make_batch([[7], [4]])
    batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        expected = model(**batch).logits
        out = patched(model, budget=0.1)(**batch)
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=0)


def test_budget_per_call_and_on_the_model():
    model = patched(make_model(), budget=0.5)
    batch = make_batch(PROMPTS[:1])
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


def test_apply_and_revert_on_an_instance():
    model = make_model()
    batch = make_batch()
    with torch.no_grad():
        expected = model(**batch).logits
    keys_before = set(model.state_dict())
    selector = apply_visionselector_to_qwen2_5_vl(model, budget=0.25)
    assert is_visionselector_applied(model) and model.visionselector is selector
    assert {f"model.visual.importance_scorer.{k}" for k in SCORER_KEYS} == set(model.state_dict()) - keys_before
    with torch.no_grad():
        assert model(**batch).logits.shape[1] < expected.shape[1]  # the patch is active
    revert_visionselector(model)
    assert not is_visionselector_applied(model) and set(model.state_dict()) == keys_before
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not carry"):
        revert_visionselector(model)


def test_apply_and_revert_on_the_classes():
    apply_visionselector_to_qwen2_5_vl(budget=0.25)
    try:
        assert is_visionselector_applied()
        model = make_model()
        assert is_visionselector_applied(model) and model.visionselector.budget == 0.25
        assert is_visionselector_applied(model.model)
        with torch.no_grad():
            out = model(**make_batch())
        assert out.logits.shape[1] < make_batch()["input_ids"].shape[1]
        inner = Qwen2_5_VLModel(tiny_qwen2_5_vl_config())
        assert hasattr(inner.visual, "importance_scorer")
    finally:
        revert_visionselector()
    assert not is_visionselector_applied() and not is_visionselector_applied(make_model())


def test_published_checkpoint_keys_load(tmp_path):
    from safetensors.torch import save_file

    source = patched(make_model(), budget=0.2)
    state = source.state_dict()
    assert {k for k in state if "importance_scorer" in k} == {f"model.visual.importance_scorer.{k}" for k in SCORER_KEYS}

    def old_layout(key):
        """transformers 4.50 (the published checkpoints): visual.*, model.* for the language model."""
        if key.startswith("model.visual."):
            return key[len("model.") :]
        return "model." + key[len("model.language_model.") :] if key.startswith("model.language_model.") else key

    source.save_pretrained(tmp_path / "saved")
    for folder, rename in (("old", old_layout), ("current", lambda key: key)):
        (tmp_path / folder).mkdir()
        tensors = {rename(k): v.contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp_path / folder / "model.safetensors"), metadata={"format": "pt"})
        (tmp_path / folder / "config.json").write_text((tmp_path / "saved" / "config.json").read_text())
    expected = source.model.visual.importance_scorer.state_dict()
    apply_visionselector_to_qwen2_5_vl(budget=0.2)
    try:
        for folder in ("current", "old", "saved"):
            loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / folder)
            for k, v in loaded.model.visual.importance_scorer.state_dict().items():
                torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    finally:
        revert_visionselector()
    # load_state_dict reads the current keys unchanged, strictly.
    target = make_model(seed=5)
    apply_visionselector_to_qwen2_5_vl(target)
    target.load_state_dict(source.state_dict(), strict=True)
    for k, v in target.model.visual.importance_scorer.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)


def test_bad_input_gives_clear_errors():
    model = make_model()
    with pytest.raises(ValueError, match="budget"):
        apply_visionselector_to_qwen2_5_vl(model, budget=0.0)
    with pytest.raises(ValueError, match="scope"):
        apply_visionselector_to_qwen2_5_vl(model, scope="frame")
    with pytest.raises(TypeError, match="Qwen2_5_VLForConditionalGeneration"):
        apply_visionselector_to_qwen2_5_vl(torch.nn.Linear(2, 2))
    assert not is_visionselector_applied(model)
    apply_visionselector_to_qwen2_5_vl(model, budget=0.5)
    batch = make_batch(PROMPTS[:1])
    with pytest.raises(ValueError, match="visionselector_budget"):
        model(**batch, visionselector_budget=1.5)
    with pytest.raises(ValueError, match="budget"):
        model.visionselector.budget = -1
    embeds = model.model.get_input_embeddings()(batch["input_ids"])
    no_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    with pytest.raises(ValueError, match="input_ids"):
        model(**no_ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="packed=True"):
        model.visionselector.packed = True
        model(**batch, use_cache=False)


def test_outputs_survive_a_pytree_round_trip():
    # DistributedDataParallel and torch.compile rebuild outputs from their pytree: the
    # selection must be a field of the output class, not a loose key.
    import pickle

    from torch.utils import _pytree as pytree

    model = patched(make_model(), budget=0.25)
    for training in (False, True):
        model.train(training)
        out = model(**make_batch())
        leaves, spec = pytree.tree_flatten(out)
        rebuilt = pytree.tree_unflatten(leaves, spec)
        assert type(rebuilt) is type(out) and rebuilt.visionselector is out.visionselector
        assert (rebuilt.constraint_loss is not None) == training
        assert type(pickle.loads(pickle.dumps(out))) is type(out)
