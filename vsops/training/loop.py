"""The reference training loop: the scorer of a patched model learns end to end through the
soft top-k while the backbone stays frozen (Sections 3.4 and 4.2 of the paper).

Per optimizer step the loop takes ``batch_size`` examples, the same ones for any number of
processes: process r of W takes its contiguous share, in micro-batches of
``micro_batch_size``. Each micro-batch's loss is its share of the step's sums,

    (Σ CE over its answer tokens) / (answer tokens in the step)
        + λ_t · (Σ BCE over its visual tokens) / (visual tokens in the step),

so the gradient is that of Eq. 9 over the whole step whatever the split into processes and
micro-batches (the counts are summed across processes once per step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time

import torch
from torch import nn

from vsops.budget import check_budget
from vsops.training.checkpoint import latest_checkpoint, load_training_state, save_scorer, save_training_state
from vsops.training.data import collate_for_model
from vsops.training.distributed import Topology, all_reduce_sum
from vsops.training.engine import make_engine
from vsops.training.objective import composite_loss, mask_statistics, next_token_cross_entropy
from vsops.training.progress import progress_bar
from vsops.training.schedule import constraint_weight, cosine_with_warmup

__all__ = ["TrainConfig", "train", "resolve_precision", "SampleOrder"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train` (defaults: the paper's, Section 4.2, except the
    batch size).

    Attributes:
        steps: optimizer steps.
        batch_size: examples per optimizer step, over all processes.
        micro_batch_size: examples per forward pass in each process (default: the process's
            whole share, ``batch_size / world``); the rest is gradient accumulation.
        budget: the retention budget trained at.
        lr, weight_decay: AdamW's.
        warmup_ratio: share of the steps with linear learning-rate warm-up before cosine decay.
        lambda_start, lambda_end: ``λ_t``'s linear ramp.
        max_grad_norm: gradient clipping (None: none).
        precision: ``auto`` (bf16 autocast on CUDA devices that support it, else fp16 with
            loss scaling; fp32 on CPU), ``fp32``, ``bf16`` or ``fp16``.
        save_every: checkpoint every this many steps (0: only at the end).
        log_every: progress-bar and log-file period in steps.
        seed: the order of a finite dataset's examples.
    """

    steps: int = 1000
    batch_size: int = 256
    micro_batch_size: int | None = None
    budget: float = 0.2
    lr: float = 5e-5
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lambda_start: float = 0.1
    lambda_end: float = 2.0
    max_grad_norm: float | None = 1.0
    precision: str = "auto"
    save_every: int = 0
    log_every: int = 10
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.micro_batch_size is not None and (not isinstance(self.micro_batch_size, int) or self.micro_batch_size < 1):
            raise ValueError(f"micro_batch_size must be a positive int or None, got {self.micro_batch_size!r}")
        if not isinstance(self.save_every, int) or self.save_every < 0:
            raise ValueError(f"save_every must be an int >= 0, got {self.save_every!r}")
        check_budget(self.budget)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if min(self.lambda_start, self.lambda_end) < 0:
            raise ValueError(f"lambda_start and lambda_end must be >= 0, got {self.lambda_start}, {self.lambda_end}")

    def split(self, world: int) -> tuple[int, int]:
        """``(micro_batch_size, accumulation steps)`` for ``world`` processes."""
        if self.batch_size % world:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by the {world} processes")
        share = self.batch_size // world
        micro = self.micro_batch_size or share
        if share % micro:
            raise ValueError(
                f"each process's {share} examples per step are not divisible into micro-batches of {micro}"
            )
        return micro, share // micro


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device`` (None: no autocast, fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type != "cuda":
            return None  # CPU autocast is slower than fp32 on most CPUs
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 needs a CUDA device (loss scaling); use bf16 on CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


class SampleOrder:
    """Which example is the ``position``-th seen in training: an infinite dataset (no
    ``__len__``) in index order, a finite one in a fresh permutation per epoch (from
    ``seed`` and the epoch, so resumed and distributed runs agree)."""

    def __init__(self, dataset, seed: int):
        self.length = len(dataset) if hasattr(dataset, "__len__") else None
        if self.length == 0:
            raise ValueError("the dataset is empty")
        self.seed = seed
        self._epoch, self._perm = None, None

    def __call__(self, position: int) -> int:
        if self.length is None:
            return position
        epoch = position // self.length
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.length, generator=g).tolist()
        return self._perm[position % self.length]


def _trainable_scorer(model: nn.Module) -> nn.Module:
    selector = getattr(model, "visionselector", None)
    if selector is None:
        raise ValueError("model carries no VisionSelector: patch it first (e.g. apply_visionselector_to_qwen2_5_vl)")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in selector.scorer.parameters():
        p.requires_grad_(True)
    return selector.scorer


def train(
    model: nn.Module,
    dataset,
    config: TrainConfig,
    output_dir: str,
    *,
    topology: Topology | None = None,
    resume: str | None = None,
    deepspeed_config: str | dict | None = None,
    progress: bool = True,
) -> list[dict]:
    """Trains the scorer of the patched ``model`` on ``dataset`` (``dataset[i]`` an
    :class:`~vsops.training.data.Example`; with ``__len__`` for a finite one).

    Writes ``output_dir/checkpoints/step-*`` every ``config.save_every`` steps and at the end,
    ``output_dir/scorer.safetensors`` (published key names) and ``output_dir/train_log.jsonl``.

    Args:
        model: a patched Qwen2.5-VL (or any model with ``visionselector`` whose training-mode
            output carries ``logits`` and ``constraint_loss``), on ``topology.device``. Its
            parameters are frozen, except the scorer's.
        topology: this process's place (:func:`vsops.training.distributed.init_topology`).
        resume: a checkpoint directory, or ``"auto"`` for the newest under ``output_dir``
            (none found: start fresh).
        deepspeed_config: a DeepSpeed config (path or dict): the step runs through DeepSpeed.
        progress: a progress bar on the main process.

    Returns:
        The logged history: one dict per ``log_every`` steps (step, loss, ce, constraint,
        lambda, lr, grad_norm, mask_mean, mask_entropy, overlap, seconds).
    """
    topology = topology or Topology()
    device = topology.device
    micro, accumulation = config.split(topology.world)
    scorer = _trainable_scorer(model)
    model.train()
    model.visionselector.budget = config.budget
    autocast_dtype = resolve_precision(config.precision, device)
    engine = make_engine(
        model, list(scorer.parameters()), topology=topology, deepspeed_config=deepspeed_config,
        micro_batch_size=micro, accumulation=accumulation, lr=config.lr, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        schedule=lambda step: cosine_with_warmup(min(step, config.steps), config.steps, config.warmup_ratio),
        fp16=autocast_dtype == torch.float16,
    )
    checkpoints = os.path.join(output_dir, "checkpoints")
    history: list[dict] = []
    start = 0
    if resume == "auto":
        resume = latest_checkpoint(checkpoints)
    if resume:
        state = load_training_state(resume, engine=engine, scorer=scorer, config=dataclasses.asdict(config))
        start, history = state["step"], state["history"]
    order = SampleOrder(dataset, config.seed)
    mm = model.config
    visual_ids = torch.tensor([mm.image_token_id, mm.video_token_id])

    bar = progress_bar(progress and topology.is_main, config.steps, "scorer", initial=start)
    log_path = os.path.join(output_dir, "train_log.jsonl")
    if topology.is_main:
        os.makedirs(output_dir, exist_ok=True)
    began = time.perf_counter()
    for step in range(start, config.steps):
        weight = constraint_weight(step, config.steps, config.lambda_start, config.lambda_end)
        first = step * config.batch_size + topology.rank * micro * accumulation
        batches = [
            collate_for_model([dataset[order(first + m * micro + i)] for i in range(micro)], mm)
            for m in range(accumulation)
        ]
        # The step's totals over every process: each micro-batch's sums are divided by them.
        counts = torch.tensor(
            [[int((b["labels"][:, 1:] != -100).sum()), int(torch.isin(b["input_ids"], visual_ids).sum())] for b in batches],
            dtype=torch.float64,
        ).sum(0)
        n_answer, n_visual = all_reduce_sum(counts.to(device), topology).tolist()
        sums = torch.zeros(2 + 3, dtype=torch.float64)  # ce, constraint, mask stats (x visual tokens)
        for m, batch in enumerate(batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch.pop("labels")
            with engine.accumulating(m < accumulation - 1):
                with _autocast(device, autocast_dtype):
                    out = engine.forward(**batch, use_cache=False)
                ce_sum = next_token_cross_entropy(out.logits, labels, reduction="sum")
                selection = out.get("visionselector")
                zero = ce_sum.new_zeros(())
                constraint_sum = zero
                if selection is not None and selection.constraint_loss is not None:
                    visual = selection.visual_mask
                    constraint_sum = selection.constraint_loss * visual.sum()
                    stats = mask_statistics(selection.soft_mask[visual], selection.hard_mask[visual])
                    sums[2:] += torch.tensor([stats["mask_mean"], stats["mask_entropy"], stats["overlap"]]) * float(visual.sum())
                loss = composite_loss(
                    ce_sum / max(n_answer, 1.0), constraint_sum / max(n_visual, 1.0), weight
                ) * topology.world  # DDP averages gradients over the processes
                engine.backward(loss)
            sums[0] += float(ce_sum.detach())
            sums[1] += float(constraint_sum.detach())
        grad_norm = engine.step()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            totals = all_reduce_sum(sums.to(device), topology).cpu()
            ce, constraint = totals[0].item() / max(n_answer, 1.0), totals[1].item() / max(n_visual, 1.0)
            record = {
                "step": done,
                "loss": ce + weight * constraint,
                "ce": ce,
                "constraint": constraint,
                "lambda": weight,
                "lr": engine.lr,
                "grad_norm": grad_norm,
                "mask_mean": totals[2].item() / max(n_visual, 1.0),
                "mask_entropy": totals[3].item() / max(n_visual, 1.0),
                "overlap": totals[4].item() / max(n_visual, 1.0),
                "seconds": time.perf_counter() - began,
            }
            history.append(record)
            if topology.is_main:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                bar.set_postfix({k: _short(v) for k, v in record.items() if k not in ("step", "seconds", "lr")})
        bar.update(1)
        if config.save_every and done % config.save_every == 0 or done == config.steps:
            save_training_state(checkpoints, step=done, engine=engine, scorer=scorer,
                                config=dataclasses.asdict(config), history=history, is_main=topology.is_main)
    bar.close()
    with engine.gathered():
        if topology.is_main:
            save_scorer(os.path.join(output_dir, "scorer.safetensors"), scorer,
                        metadata={"budget": config.budget, "steps": config.steps})
    model.eval()
    return history


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _short(value: float) -> str:
    return f"{value:.3g}" if math.isfinite(value) else str(value)
