"""Qwen3-VL beyond the contract suite (tests/integrations/test_integration_contracts.py runs
every contract on it and on Qwen3-VL-MoE, the deepstack features included): a checkpoint whose
deepstack mergers do not fit its config is refused before the load.

CI runs this file under the current transformers 5.x and the last 4.x line (4.57).
"""
import json

import pytest
import torch

pytest.importorskip("transformers")

from vsops.integrations import adapter_for, apply_visionselector, from_pretrained  # noqa: E402
from vsops.integrations.testing import tiny_qwen_vl_config  # noqa: E402

try:
    MODEL = adapter_for("qwen3_vl").classes()[1]
except ImportError as e:  # transformers before 4.57
    pytest.skip(str(e), allow_module_level=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen3_vl")
    torch.manual_seed(0)
    model = MODEL(tiny_qwen_vl_config("qwen3_vl"))
    assert model.config.vision_config.deepstack_visual_indexes == [0, 1]
    apply_visionselector(model)
    model.save_pretrained(directory)
    return directory


def rewrite(directory, tmp_path, *, indexes=None, drop=None):
    """A copy of the checkpoint with the config's deepstack layers ``indexes``, or without the
    tensors of deepstack merger ``drop``."""
    from safetensors.torch import load_file, save_file

    config = json.loads((directory / "config.json").read_text())
    if indexes is not None:
        config["vision_config"]["deepstack_visual_indexes"] = indexes
    (tmp_path / "config.json").write_text(json.dumps(config))
    state = load_file(str(directory / "model.safetensors"))
    prefix = f"model.visual.deepstack_merger_list.{drop}."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    return tmp_path


def test_the_checkpoint_loads(checkpoint):
    assert from_pretrained(checkpoint).config.vision_config.deepstack_visual_indexes == [0, 1]


@pytest.mark.parametrize("change, message", [
    (dict(indexes=[0]), r"has 2 deepstack mergers .*\[0, 1\].* lists 1 layers \[0\]"),
    (dict(indexes=[0, 1, 1]), r"has 2 deepstack mergers .* lists 3 layers \[0, 1, 1\]"),
    (dict(drop=1), r"has 1 deepstack mergers .*\[0\].* lists 2 layers \[0, 1\]"),
    (dict(drop=0), r"has 1 deepstack mergers .*\[1\].* lists 2 layers \[0, 1\]"),
], ids=["fewer layers", "more layers", "last merger missing", "first merger missing"])
def test_a_deepstack_count_that_does_not_fit_the_config_is_refused(checkpoint, tmp_path, change, message):
    broken = rewrite(checkpoint, tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        from_pretrained(broken)
