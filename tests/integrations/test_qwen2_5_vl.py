"""Qwen2.5-VL beyond the contract suite (tests/integrations/test_integration_contracts.py runs
every contract on it, the class patch included): the published checkpoints' key layout read by
transformers' own from_pretrained.

CI runs this file under the current transformers 5.x and the last 4.x line (4.57).
"""
import pytest
import torch

pytest.importorskip("transformers")

from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from vsops.integrations import apply_visionselector_to_qwen2_5_vl, revert_visionselector  # noqa: E402
from vsops.integrations.testing import qwen2_5_vl_batch, tiny_qwen2_5_vl_config  # noqa: E402

PROMPTS = [
    [3, ("image", 8, 8), 4],
    [2, ("image", 4, 8), ("video", 4, 4, 4), 5],
    [9],
]
SCORER_KEYS = {f"{p}.{w}" for p in ("q_proj", "k_proj") for w in ("weight", "bias")}


def make_model(seed=0):
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config()).eval()


def make_batch(prompts=PROMPTS, seed=1):
    return qwen2_5_vl_batch(prompts, seed=seed)


def patched(model, **settings):
    import copy

    patched_model = copy.deepcopy(model)
    apply_visionselector_to_qwen2_5_vl(patched_model, **settings)
    g = torch.Generator().manual_seed(3)
    for p in patched_model.model.visual.importance_scorer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g))
    return patched_model


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
