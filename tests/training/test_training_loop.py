"""The training loop: a short run lowers the loss, resume continues exactly, the saved scorer
loads through the integration, and torchrun with 2 processes equals 1 process."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: E402

from vsops.integrations import apply_visionselector_to_qwen2_5_vl  # noqa: E402
from vsops.integrations.testing import tiny_qwen2_5_vl_config  # noqa: E402
from vsops.training import SyntheticTask, TrainConfig, collate, load_scorer, train  # noqa: E402
from vsops.training.backbone import fit_backbone  # noqa: E402
from vsops.training.evaluate import answer_accuracy, answer_metrics  # noqa: E402
from vsops.training.checkpoint import latest_checkpoint  # noqa: E402

TASK = SyntheticTask(grid=4)  # 16 visual tokens, 2 of them targets
KEYS = {f"visual.importance_scorer.{p}_proj.{w}" for p in "qk" for w in ("weight", "bias")}


def patched_model(seed=0, weights=None):
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    if weights is not None:
        model.load_state_dict(weights)
    apply_visionselector_to_qwen2_5_vl(model, budget=0.25)
    return model


def scorer_state(model):
    return {k: v.clone() for k, v in model.visionselector.scorer.state_dict().items()}


@pytest.fixture(scope="module")
def fitted_backbone():
    """A tiny Qwen2.5-VL that answers TASK from all its visual tokens (about 15 s)."""
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    fit_backbone(model, TASK, steps=300, batch_size=32, lr=2e-3, progress=False, first_index=10**6)
    return model.state_dict()


def test_short_run_lowers_the_loss_and_learns_to_select(tmp_path, fitted_backbone):
    model = patched_model(weights=fitted_backbone)
    held_out = [TASK[10**9 + i] for i in range(256)]
    answers = list(TASK.answer_tokens)
    full = answer_accuracy(model, held_out, answers, budget=1.0)
    assert full > 0.9  # the backbone knows the task
    needles = [TASK.target_position(10**9 + i) for i in range(256)]
    assert all(int(e.input_ids[n]) == model.config.image_token_id for e, n in zip(held_out, needles))
    with model.visionselector.using(method="random"):
        random = answer_metrics(model, held_out, answers, budget=0.25, needles=needles)
    chance = random["accuracy"]
    assert 0.15 < random["needle_kept"] < 0.35  # 4 of 16 tokens
    assert answer_metrics(model, held_out, answers, budget=1.0, needles=needles)["needle_kept"] == 1.0
    # λ held at 1: the loss is then comparable from step to step
    config = TrainConfig(steps=80, batch_size=16, lr=3e-3, log_every=1, budget=0.25, lambda_start=1.0, lambda_end=1.0)
    history = train(model, TASK, config, str(tmp_path), progress=False)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < first - 0.2, (first, last)
    assert history[-1]["mask_entropy"] < 0.5 * history[0]["mask_entropy"]  # the selection sharpens
    assert history[-1]["overlap"] > 0.6 > history[0]["overlap"]
    trained = answer_metrics(model, held_out, answers, budget=0.25, needles=needles)
    assert trained["needle_kept"] > 0.8, trained
    assert trained["accuracy"] > chance + 0.3 and trained["accuracy"] > full - 0.2, (chance, trained, full)
    for p in model.parameters():  # the backbone stays frozen, the scorer is trained
        assert p.requires_grad == any(p is q for q in model.visionselector.scorer.parameters())
    logged = [json.loads(line) for line in open(tmp_path / "train_log.jsonl")]
    assert [r["step"] for r in logged] == list(range(1, 81))
    assert set(logged[0]) >= {"loss", "ce", "constraint", "lambda", "mask_mean", "mask_entropy", "overlap"}
    assert logged[0]["mask_mean"] == pytest.approx(0.25, abs=1e-4)  # k / n of every image


def test_lambda_ramps_over_the_run(tmp_path):
    history = train(patched_model(), TASK, TrainConfig(steps=5, batch_size=2, log_every=1, budget=0.25),
                    str(tmp_path), progress=False)
    assert [h["lambda"] for h in history] == pytest.approx([0.1, 0.575, 1.05, 1.525, 2.0])
    assert [h["loss"] for h in history] == pytest.approx([h["ce"] + h["lambda"] * h["constraint"] for h in history])


def test_resume_continues_exactly(tmp_path):
    config = TrainConfig(steps=4, batch_size=4, micro_batch_size=2, lr=1e-2, save_every=2, log_every=1, budget=0.25)
    straight = patched_model()
    train(straight, TASK, config, str(tmp_path / "straight"), progress=False)

    interrupted = tmp_path / "interrupted"
    train(patched_model(), TASK, config, str(interrupted), progress=False)
    # as if the run had stopped after step 2: only that checkpoint is left
    import shutil

    shutil.rmtree(interrupted / "checkpoints" / "step-0000004")
    os.remove(interrupted / "scorer.safetensors")
    assert latest_checkpoint(str(interrupted / "checkpoints")).endswith("step-0000002")
    resumed = patched_model()
    torch.manual_seed(1)
    resumed.visionselector.scorer.reset_parameters()  # everything must come from the checkpoint
    history = train(resumed, TASK, config, str(interrupted), resume="auto", progress=False)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for name, value in scorer_state(straight).items():
        torch.testing.assert_close(scorer_state(resumed)[name], value, rtol=0, atol=0)

    other = patched_model()
    before = scorer_state(other)
    with pytest.raises(ValueError, match="another configuration"):
        train(other, TASK, TrainConfig(steps=5, batch_size=4, lr=1e-2), str(interrupted),
              resume=str(interrupted / "checkpoints" / "step-0000002"), progress=False)
    for name, value in before.items():  # refused before anything was loaded
        torch.testing.assert_close(scorer_state(other)[name], value, rtol=0, atol=0)


def test_saved_scorer_has_the_published_keys_and_loads_through_the_integration(tmp_path):
    trained = patched_model()
    train(trained, TASK, TrainConfig(steps=3, batch_size=4, lr=1e-2, budget=0.25), str(tmp_path), progress=False)
    tensors = load_file(str(tmp_path / "scorer.safetensors"))
    assert set(tensors) == KEYS

    # 1. into a patched model's scorer
    fresh = patched_model(seed=1)
    load_scorer(str(tmp_path / "scorer.safetensors"), fresh.visionselector.scorer)
    for name, value in scorer_state(trained).items():
        torch.testing.assert_close(scorer_state(fresh)[name], value, rtol=0, atol=0)

    # 2. as the published checkpoints ship it: the scorer keys inside the model's safetensors,
    # read by from_pretrained of a class-patched Qwen2.5-VL
    backbone = tmp_path / "published"
    Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config()).save_pretrained(backbone)
    trained_backbone = {k: v for k, v in trained.state_dict().items() if "importance_scorer" not in k}
    weights = backbone / "model.safetensors"
    merged = {**load_file(str(weights)), **tensors}
    save_file(merged, str(weights), metadata={"format": "pt"})
    apply_visionselector_to_qwen2_5_vl(budget=0.25)
    try:
        loaded = Qwen2_5_VLForConditionalGeneration.from_pretrained(backbone)
    finally:
        from vsops.integrations import revert_visionselector

        revert_visionselector(None)
    for name, value in scorer_state(trained).items():
        torch.testing.assert_close(scorer_state(loaded)[name], value, rtol=0, atol=0)
    assert trained_backbone  # the trained model's backbone is untouched by training
    batch = collate([TASK[i] for i in range(4)], config=trained.config, prompt_only=True)
    trained.eval()
    loaded.load_state_dict(trained.state_dict())
    loaded.eval()
    assert torch.equal(trained(**batch).visionselector.keep, loaded(**batch).visionselector.keep)


def test_bf16_autocast_step_on_cpu(tmp_path):
    model = patched_model()
    history = train(model, TASK, TrainConfig(steps=2, batch_size=4, precision="bf16", log_every=1, budget=0.25),
                    str(tmp_path), progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert model.visionselector.scorer.q_proj.weight.dtype == torch.float32  # the master weights stay fp32


def _cli(output_dir, *launcher, extra=()):
    args = [*launcher, "train", "--task", "synthetic", "--steps", "3", "--batch-size", "8", "--micro-batch-size", "2",
            "--lr", "1e-2", "--backbone-steps", "0", "--eval-examples", "0", "--no-progress", "--output-dir",
            str(output_dir), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return load_file(str(output_dir / "scorer.safetensors"))


def test_torchrun_two_processes_equal_one_process(tmp_path):
    one = _cli(tmp_path / "one", sys.executable, "-m", "vsops.cli")
    two = _cli(tmp_path / "two", sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "vsops.cli")
    assert set(one) == KEYS
    for name in KEYS:
        assert not torch.equal(one[name], torch.zeros_like(one[name])) or "bias" in name
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-7)
    # the equivalence is not trivial: a different global batch gives other weights
    other = _cli(tmp_path / "other", sys.executable, "-m", "vsops.cli", extra=("--seed", "1"))
    assert any(not torch.allclose(other[name], one[name], rtol=1e-5, atol=1e-7) for name in KEYS)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--task", "synthetic", "--budget", "1.5"], "budget must be in"),
        (["--task", "synthetic", "--batch-size", "6", "--micro-batch-size", "4"], "micro-batches of 4"),
        (["--data", "x.jsonl"], "--data needs --model"),
        (["--task", "synthetic", "--eval-methods", "random,sparsevlm"], "unknown selection method 'sparsevlm'"),
    ],
)
def test_cli_reports_bad_settings(tmp_path, args, message):
    done = subprocess.run([sys.executable, "-m", "vsops.cli", "train", *args, "--backbone-steps", "0", "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
