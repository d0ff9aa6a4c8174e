"""DeepSpeedEngine: its config resolution against the loop's settings; with DeepSpeed
installed, ZeRO 1-3 give LocalEngine's updates in one process and under torchrun with two,
its state resumes exactly with another number of processes, and a patched Qwen2.5-VL trains
through it with the shipped configs.

DeepSpeed runs in subprocesses, this file being their script: it keeps a process group and
global state for the life of a process. The first DeepSpeed run on a machine compiles its
CPU shared-memory op (0.5-1.5 min on 2 cores; cached under ~/.cache/torch_extensions).
"""
import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from vsops.training.deepspeed_engine import resolve_deepspeed_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "vsops", "training", "configs")
STAGES = (1, 2, 3)
BATCH, STEPS, MICRO = 8, 3, 2
ENGINE = dict(lr=0.05, weight_decay=0.1, max_grad_norm=0.5, fp16=False)


def template(name, **zero):
    with open(os.path.join(CONFIGS, name)) as f:
        config = json.load(f)
    config["zero_optimization"].update(zero)
    return config


def test_config_gets_the_loops_split_and_clipping():
    for name, stage in (("zero2.json", 2), ("zero3.json", 3)):
        config = resolve_deepspeed_config(os.path.join(CONFIGS, name), micro_batch_size=2, accumulation=4, world=8,
                                          max_grad_norm=None, fp16=False)
        assert config["zero_optimization"]["stage"] == stage and config["bf16"]["enabled"] is True
        assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"],
                config["train_batch_size"], config["gradient_clipping"]) == (2, 4, 64, 0.0)
        assert config["fp16"]["enabled"] is False
    given = {"zero_optimization": {"stage": 1}, "gradient_accumulation_steps": 4}
    assert resolve_deepspeed_config(given, micro_batch_size=1, accumulation=4, world=1, max_grad_norm=1.0,
                                    fp16=False)["gradient_clipping"] == 1.0
    assert "train_batch_size" not in given  # the caller's dict is left alone


@pytest.mark.parametrize("config, match", [
    ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "'optimizer' section"),
    ({"zero_optimization": {"stage": 2}, "scheduler": {"type": "WarmupLR"}}, "'scheduler' section"),
    ({"bf16": {"enabled": True}}, "ZeRO stage 0"),
    ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 8}, "gradient_accumulation_steps=8"),
    ({"zero_optimization": {"stage": 2}, "gradient_clipping": 1.0}, "gradient_clipping=1.0"),
    ({"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}, "fp16.enabled=True"),
    ({"zero_optimization": {"stage": 2}, "bf16": {"enabled": "auto"}}, "bf16.enabled='auto'"),
])
def test_config_contradicting_the_loop_is_refused(config, match):
    with pytest.raises(ValueError, match=match):
        resolve_deepspeed_config(config, micro_batch_size=2, accumulation=4, world=1, max_grad_norm=0.5, fp16=False)


class Tiny(nn.Module):
    """A frozen layer and a trainable head whose sizes do not split evenly over 2 processes
    (ZeRO pads the partitions)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(6, 6)
        self.scorer = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))

    def forward(self, x):
        return {"logits": self.scorer(torch.relu(self.backbone(x.to(self.backbone.weight.dtype))))}


def schedule(step):
    return min(1.0, (step + 1) / 2) * 0.5**step


def tiny_run(topology, stage=None, *, micro, steps=STEPS, start=0, state=None):
    """``steps`` optimizer steps from ``start`` (after loading ``state``) of the loop's
    pattern; LocalEngine when ``stage`` is None. Returns (engine, weights, norms, lrs)."""
    from vsops.training.engine import LocalEngine

    torch.manual_seed(0)
    model = Tiny()
    model.backbone.requires_grad_(False)
    parameters = list(model.scorer.parameters())
    share = BATCH // topology.world
    accumulation = share // micro
    if stage is None:
        engine = LocalEngine(model, parameters, schedule=schedule, **ENGINE)
    else:
        from vsops.training.deepspeed_engine import DeepSpeedEngine

        # ZeRO-3 partitions the weights and keeps the biases (<= 10 elements) whole
        config = {"zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10},
                  "bf16": {"enabled": False}}
        engine = DeepSpeedEngine(model, parameters, topology=topology, config=config, schedule=schedule,
                                 micro_batch_size=micro, accumulation=accumulation, **ENGINE)
    if state is not None:
        engine.load_state_dict(state)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(STEPS, BATCH, 6, generator=g), torch.randn(STEPS, BATCH, 3, generator=g)
    norms, lrs = [], []
    for step in range(start, start + steps):
        for m in range(accumulation):
            rows = slice(topology.rank * share + m * micro, topology.rank * share + (m + 1) * micro)
            with engine.accumulating(m < accumulation - 1):
                out = engine.forward(x=xs[step, rows])
                # the loop's scaling: a share of the step's sum, times the world size
                engine.backward(((out["logits"].float() - ys[step, rows]) ** 2).sum() / BATCH * topology.world)
        norms.append(engine.step())
        lrs.append(engine.lr)
    with engine.gathered() if stage is not None else contextlib.nullcontext():
        weights = [p.detach().float().clone() for p in parameters]
    return engine, weights, norms, lrs


def tiny_worker(out, resume_from=None):
    """Per stage: a straight run, the state after one step, and (``resume_from``, written by
    a run with another number of processes) the remaining steps from that state."""
    from vsops.training.distributed import init_topology

    topology = init_topology("cpu")
    results = {}
    for stage in STAGES:
        _, weights, norms, lrs = tiny_run(topology, stage, micro=MICRO)
        engine, *_ = tiny_run(topology, stage, micro=MICRO, steps=1)
        results[stage] = {"weights": weights, "norms": norms, "lrs": lrs, "state": engine.state_dict()}
        if resume_from is not None:
            state = torch.load(resume_from, weights_only=False)[stage]["state"]
            results[stage]["resumed"] = tiny_run(topology, stage, micro=MICRO, steps=STEPS - 1, start=1, state=state)[1]
    torch.save(results, os.path.join(out, f"rank{topology.rank}.pt"))


def qwen_worker(out):
    """Two steps of two micro-batches of a tiny patched Qwen2.5-VL, through LocalEngine and
    through DeepSpeed with the shipped configs (bf16 off for the comparison, then zero2.json
    as it is)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    from vsops.integrations.testing import tiny_qwen2_5_vl_config
    from vsops.training import SyntheticTask, Topology, collate
    from vsops.training.deepspeed_engine import DeepSpeedEngine
    from vsops.training.engine import LocalEngine

    def fp32(config):
        return {**config, "bf16": {"enabled": False}}

    task = SyntheticTask(grid=4)
    batches = [collate([task[4 * s + 2 * m + i] for i in range(2)], config=tiny_qwen2_5_vl_config())
               for s in range(2) for m in range(2)]
    results = {}
    for name, config in (("local", None), ("zero2", fp32(template("zero2.json"))),
                         ("zero3", fp32(template("zero3.json", stage3_param_persistence_threshold=0))),
                         ("zero2-bf16", template("zero2.json"))):
        torch.manual_seed(0)
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
        apply_visionselector_to_qwen2_5_vl(model, budget=0.25)
        model.requires_grad_(False)
        model.visionselector.scorer.requires_grad_(True)
        parameters = list(model.visionselector.scorer.parameters())
        model.train()
        results.setdefault("init", {k: v.clone() for k, v in model.visionselector.scorer.state_dict().items()})
        settings = dict(lr=1e-2, weight_decay=0.0, schedule=lambda step: 1.0, max_grad_norm=1.0, fp16=False)
        if config is None:
            engine, gathered = LocalEngine(model, parameters, **settings), contextlib.nullcontext()
        else:
            engine = DeepSpeedEngine(model, parameters, topology=Topology(), config=config, micro_batch_size=2,
                                     accumulation=2, **settings)
            gathered = engine.gathered()
        losses = []
        for m, batch in enumerate(batches):
            labels = batch["labels"]
            with engine.accumulating(m % 2 == 0):
                output = engine.forward(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False)
                ce = nn.functional.cross_entropy(output.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                 ignore_index=-100, reduction="sum") / 4  # 4 answers a step
                loss = ce + output.visionselector.constraint_loss.float() / 2
                engine.backward(loss)
            losses.append(float(loss.detach()))
            if m % 2:
                engine.step()
        with gathered:
            scorer = model.visionselector.scorer.state_dict()
            results[name] = {"scorer": {k: v.float().clone() for k, v in scorer.items()}, "losses": losses,
                             "dtype": scorer["k_proj.weight"].dtype}
    torch.save(results, os.path.join(out, "qwen.pt"))


def launch(tmp_path, *args, world=1):
    """This file as a script: one plain process (no launcher) or ``world`` under torchrun."""
    # --standalone picks a free port; "--master_port 0" leaves the workers dialling port 0
    launcher = [sys.executable] if world == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([*launcher, __file__, str(tmp_path), *args], capture_output=True, text=True, env=env,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]


@pytest.fixture
def deepspeed_installed():
    pytest.importorskip("deepspeed")


def test_zero_stages_match_the_local_engine_and_resume_across_world_sizes(tmp_path, deepspeed_installed):
    from vsops.training.distributed import Topology

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    launch(one, "tiny")
    launch(two, "tiny", str(one / "rank0.pt"), world=2)  # resumes from the one-process states
    launch(one, "tiny", str(two / "rank0.pt"))  # and the other way round
    _, local, local_norms, local_lrs = tiny_run(Topology(), micro=BATCH)
    untrained = tiny_run(Topology(), micro=BATCH, steps=0)[1]
    assert all((a - b).abs().max() > 1e-2 for a, b in zip(local, untrained))
    for path in (one / "rank0.pt", two / "rank0.pt", two / "rank1.pt"):
        results = torch.load(path, weights_only=False)
        for stage in STAGES:
            got = results[stage]
            for key in ("weights", "resumed"):
                for a, b in zip(got[key], local):
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"{path.name} stage {stage} {key}")
            assert got["norms"] == pytest.approx(local_norms, rel=1e-5)
            assert got["lrs"] == pytest.approx(local_lrs, rel=1e-12)


def test_patched_qwen2_5_vl_trains_through_the_shipped_configs(tmp_path, deepspeed_installed):
    pytest.importorskip("transformers")
    launch(tmp_path, "qwen")
    results = torch.load(tmp_path / "qwen.pt", weights_only=False)
    local = results["local"]
    for name in ("zero2", "zero3"):
        assert results[name]["losses"] == pytest.approx(local["losses"], rel=1e-5)
        for key, value in local["scorer"].items():
            # q_proj's bias shifts all scores of an image alike: its gradient is rounding
            # noise, which Adam turns into steps
            atol = 1e-4 if key == "q_proj.bias" else 1e-6
            torch.testing.assert_close(results[name]["scorer"][key], value, rtol=1e-4, atol=atol, msg=f"{name} {key}")
    bf16 = results["zero2-bf16"]  # zero2.json as shipped: DeepSpeed runs the model in bf16
    assert bf16["dtype"] == torch.bfloat16
    assert bf16["losses"] == pytest.approx(local["losses"], rel=1e-2)
    assert (bf16["scorer"]["k_proj.weight"] - results["init"]["k_proj.weight"]).abs().max() > 5e-3


if __name__ == "__main__":
    out, kind, *rest = sys.argv[1:]
    tiny_worker(out, *rest) if kind == "tiny" else qwen_worker(out)
