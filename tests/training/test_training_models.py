"""`vsops train --data ... --model DIR` on tiny model directories of every model family it is
tested with (LLaVA-OneVision-1.5: remote code; Qwen3-VL: deepstack features; Qwen3.5: linear
attention), each with its tokenizer and image processor saved beside it: the scorer trains, the
loss goes down, and torchrun with 2 processes equals 1 process. LLaVA-OV-1.5 runs on
transformers 4.57 (the model's code line), Qwen3-VL on 4.57 and 5.x, Qwen3.5 on 5.x."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from model_setups import SETUPS  # noqa: E402
from test_training_jsonl import SPECIAL, TOK  # noqa: E402

from vsops.training.jsonl import export_synthetic  # noqa: E402
from vsops.training.synthetic import SyntheticTask  # noqa: E402

KEYS = {f"visual.importance_scorer.{p}_proj.{w}" for p in "qk" for w in ("weight", "bias")}
MODELS = ["llava_ov_1_5", "qwen3_vl", "qwen3_5"]


def _image_processor(temporal_patch_size):
    """A Qwen2-VL image processor of the tiny models' layout: patch 4, merge 2."""
    import transformers

    image_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return image_class(
        patch_size=4, merge_size=2, temporal_patch_size=temporal_patch_size, min_pixels=64, max_pixels=64 * 64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )


def _llava_dir(root, ids):
    """LLaVA-OV-1.5's remote code beside a tiny config with the test tokenizer's vocabulary;
    RICE's layout takes one frame per temporal step."""
    from vsops.integrations.testing import llava_ov_1_5_model_dir

    model_dir = llava_ov_1_5_model_dir(root / "tiny_llava_ov_1_5", vocab_size=len(TOK))
    config = json.loads((model_dir / "config.json").read_text())
    for section in (config, config["text_config"]):
        section["image_token_id"], section["video_token_id"] = ids["<|image_pad|>"], ids["<|video_pad|>"]
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    _image_processor(temporal_patch_size=1).save_pretrained(model_dir)
    return model_dir


def _qwen_dir(model_type, root, ids):
    from vsops.integrations import adapter_for
    from vsops.integrations.testing import tiny_qwen_vl_config

    config = tiny_qwen_vl_config(model_type, vocab_size=len(TOK))
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    torch.manual_seed(0)
    model_dir = root / model_type
    adapter_for(model_type).classes()[1](config).save_pretrained(model_dir)
    _image_processor(temporal_patch_size=2).save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="module", params=MODELS)
def model_and_data(request, tmp_path_factory):
    """A tiny model directory of the param's family whose vocabulary is the test tokenizer's,
    with its image processor and tokenizer, and 8 synthetic boards as JSONL."""
    setup = next(s for s in SETUPS if s.name == request.param)
    if setup.skip:
        pytest.skip(setup.skip)
    root = tmp_path_factory.mktemp(f"{setup.name}-train")
    ids = dict(zip(SPECIAL, TOK.convert_tokens_to_ids(SPECIAL)))
    model_dir = _llava_dir(root, ids) if setup.name == "llava_ov_1_5" else _qwen_dir(setup.name, root, ids)
    TOK.save_pretrained(model_dir)
    data = export_synthetic(SyntheticTask(grid=4), root / "data", count=8)
    return model_dir, data


def _train(model_dir, data, output_dir, *launcher, extra=()):
    args = [*launcher, "train", "--data", str(data), "--model", str(model_dir), "--trust-remote-code",
            "--batch-size", "4", "--micro-batch-size", "1", "--lr", "3e-2", "--warmup-ratio", "0",
            "--lambda-start", "1", "--lambda-end", "1", "--log-every", "1", "--no-progress",
            "--output-dir", str(output_dir), *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    from safetensors.torch import load_file

    log = [json.loads(line) for line in open(output_dir / "train_log.jsonl")]
    return load_file(str(output_dir / "scorer.safetensors")), log


def test_vsops_train_lowers_the_loss(model_and_data, tmp_path):
    model_dir, data = model_and_data
    scorer, log = _train(model_dir, data, tmp_path / "run", sys.executable, "-m", "vsops.cli",
                         extra=("--steps", "12", "--batch-size", "8", "--micro-batch-size", "4"))
    assert set(scorer) == KEYS
    # Every step sees the same 8 boards, so the loss is a function of the scorer alone.
    losses = [record["loss"] for record in log]
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3]), losses


def test_torchrun_two_processes_equal_one_process(model_and_data, tmp_path):
    model_dir, data = model_and_data
    one, _ = _train(model_dir, data, tmp_path / "one", sys.executable, "-m", "vsops.cli", extra=("--steps", "2"))
    two, _ = _train(model_dir, data, tmp_path / "two", sys.executable, "-m", "torch.distributed.run",
                    "--nproc_per_node", "2", "--standalone", "-m", "vsops.cli", extra=("--steps", "2"))
    for name in KEYS:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    other, _ = _train(model_dir, data, tmp_path / "other", sys.executable, "-m", "vsops.cli",
                      extra=("--steps", "2", "--seed", "1"))
    assert any(not torch.allclose(other[name], one[name], rtol=1e-5, atol=1e-7) for name in KEYS)
