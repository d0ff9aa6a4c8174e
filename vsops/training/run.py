"""``vsops train``: a whole run, from a backbone to ``scorer.safetensors`` and ``metrics.json``.

    vsops train --task synthetic --budget 0.2 --steps 300 --output-dir runs/synthetic
    torchrun --nproc_per_node 2 -m vsops.cli train --task synthetic ...        # DDP (gloo on CPU)
    vsops train --data train.jsonl --eval-data val.jsonl --model /path/to/Qwen2.5-VL-7B-Instruct \\
        --budget 0.2 --steps 2900 --batch-size 256 --micro-batch-size 16 --lr 5e-5 --output-dir runs/7b

A synthetic task (``--task synthetic``, or its marked variant ``synthetic-marked``: see
:data:`~vsops.training.synthetic.NAMED_TASKS`) first fits a tiny Qwen2.5-VL on the task with
every visual token (saved in ``output-dir/backbone`` and reused by later runs into the same
directory), freezes it, then trains the scorer and evaluates the held-out accuracy at budgets
0.1, 0.2, 0.3 and 1.0 for the trained scorer and for every training-free method of
:mod:`vsops.methods` (``--eval-methods``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from vsops.training.loop import PRECISIONS, TrainConfig, train
from vsops.training.synthetic import NAMED_TASKS

__all__ = ["add_arguments", "run", "SYNTHETIC_DEFAULTS"]

EVAL_BUDGETS = (0.1, 0.2, 0.3, 1.0)
# Held-out synthetic examples come from indices no training step reaches.
HELD_OUT_INDEX, BACKBONE_INDEX = 10**9, 5 * 10**8

# The synthetic run's settings where they differ from the paper's (TrainConfig's defaults):
# a 4k-parameter scorer on a tiny backbone learns at a larger rate, from smaller batches.
SYNTHETIC_DEFAULTS = dict(steps=300, batch_size=32, lr=3e-3, warmup_ratio=0.03)
BACKBONE_STEPS, BACKBONE_BATCH, BACKBONE_LR = 1000, 32, 1e-3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--task", choices=sorted(NAMED_TASKS), help="train on a built-in synthetic task")
    data.add_argument("--data", metavar="FILE.jsonl", help="training conversations (Cambrian/LLaVA JSONL)")
    parser.add_argument("--eval-data", metavar="FILE.jsonl", help="held-out conversations (with --data)")
    parser.add_argument("--image-root", help="directory the JSONL image paths are relative to")
    parser.add_argument("--model", help="checkpoint directory of a supported model, e.g. Qwen2.5-VL or LLaVA-OneVision-1.5 "
                        "(with --data; the synthetic task builds its own Qwen2.5-VL)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow --model's own code to run (LLaVA-OneVision-1.5 ships as remote code)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--budget", type=float, default=0.2, help="retention budget trained at (default 0.2)")
    parser.add_argument("--steps", type=int, help="optimizer steps of the scorer")
    parser.add_argument("--batch-size", type=int, help="examples per optimizer step, over all processes")
    parser.add_argument("--micro-batch-size", type=int, help="examples per forward pass per process")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-ratio", type=float)
    parser.add_argument("--lambda-start", type=float, default=0.1)
    parser.add_argument("--lambda-end", type=float, default=2.0)
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--save-every", type=int, default=0, help="checkpoint period in steps (0: at the end only)")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--resume", nargs="?", const="auto", help="a checkpoint directory, or the newest in output-dir")
    parser.add_argument("--deepspeed", metavar="CONFIG.json", help="run the step through DeepSpeed with this config")
    parser.add_argument("--backbone-steps", type=int, default=BACKBONE_STEPS, help="synthetic: steps fitting the backbone")
    parser.add_argument("--backbone-lr", type=float, default=BACKBONE_LR, help="synthetic: the backbone's peak learning rate")
    parser.add_argument("--eval-examples", type=int, default=1024, help="synthetic: held-out examples (0: no evaluation)")
    parser.add_argument("--eval-methods", type=_method_list, metavar="NAME,NAME",
                        help="selection methods the evaluation compares (default: every registered one)")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _method_list(text: str) -> list[str]:
    """``--eval-methods``: comma-separated registered names."""
    from vsops.methods import method_class

    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give at least one method name")
    for name in names:
        try:
            method_class(name)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return names


def _train_config(args, defaults: dict) -> TrainConfig:
    chosen = {
        "steps": args.steps, "batch_size": args.batch_size, "micro_batch_size": args.micro_batch_size,
        "lr": args.lr, "warmup_ratio": args.warmup_ratio,
    }
    values = {**defaults, **{k: v for k, v in chosen.items() if v is not None}}
    return TrainConfig(
        **values, budget=args.budget, weight_decay=args.weight_decay, lambda_start=args.lambda_start,
        lambda_end=args.lambda_end, precision=args.precision, save_every=args.save_every,
        log_every=args.log_every, seed=args.seed,
    )


def run(args) -> dict:
    """Runs ``vsops train`` with parsed ``args``; returns the metrics (written by the main
    process to ``output-dir/metrics.json``)."""
    from vsops.training.distributed import init_topology

    if args.task is None and args.model is None:
        raise ValueError("--data needs --model, the checkpoint whose scorer is trained")
    topology = init_topology(args.device)
    began = time.perf_counter()
    if args.task is not None:
        metrics = _run_synthetic(args, topology)
    else:
        metrics = _run_jsonl(args, topology)
    metrics["seconds"]["total"] = time.perf_counter() - began
    if topology.is_main:
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def _run_synthetic(args, topology) -> dict:
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    from vsops.integrations.testing import tiny_qwen2_5_vl_config
    from vsops.training.evaluate import answer_tables

    named = NAMED_TASKS[args.task]
    task = named.task(args.seed)
    config = _train_config(args, SYNTHETIC_DEFAULTS)
    seconds = {}
    backbone_dir = os.path.join(args.output_dir, "backbone")
    fitted = {}
    if topology.is_main and not os.path.isfile(os.path.join(backbone_dir, "config.json")):
        from vsops.training.backbone import fit_backbone

        torch.manual_seed(args.seed)
        model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
        start = time.perf_counter()
        fitted = {"steps": args.backbone_steps, "lr": args.backbone_lr,
                  "vision_tower": "as initialized" if named.freeze_vision else "fitted"}
        if args.backbone_steps:  # 0: a random backbone (tests of the loop's mechanics)
            losses = fit_backbone(model, task, steps=args.backbone_steps, batch_size=BACKBONE_BATCH, lr=args.backbone_lr,
                                  progress=not args.no_progress, first_index=BACKBONE_INDEX,
                                  freeze_vision=named.freeze_vision)
            fitted["final_loss"] = sum(losses[-20:]) / len(losses[-20:])
        seconds["backbone"] = time.perf_counter() - start
        model.save_pretrained(backbone_dir)
    _barrier(topology)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(backbone_dir).to(topology.device)
    apply_visionselector_to_qwen2_5_vl(model, budget=config.budget)
    torch.manual_seed(args.seed)
    model.visionselector.scorer.reset_parameters()

    start = time.perf_counter()
    history = train(model, task, config, args.output_dir, topology=topology, resume=args.resume,
                    deepspeed_config=args.deepspeed, progress=not args.no_progress)
    seconds["scorer"] = time.perf_counter() - start
    metrics = {"task": dataclasses.asdict(task), "config": dataclasses.asdict(config), "backbone": fitted,
               "train": history[-1] if history else {}, "seconds": seconds}
    if args.eval_examples and _zero_stage(args.deepspeed) == 3:
        # every forward of a ZeRO-3 model needs all processes; evaluation runs on one
        metrics["accuracy"] = "not evaluated under ZeRO-3: load scorer.safetensors into the backbone in one process"
    elif topology.is_main and args.eval_examples:
        start = time.perf_counter()
        indices = range(HELD_OUT_INDEX, HELD_OUT_INDEX + args.eval_examples)
        # accuracy, and how often the asked target survived the selection (target_kept)
        tables = answer_tables(model, [task[i] for i in indices], list(task.answer_tokens), budgets=EVAL_BUDGETS,
                               methods=args.eval_methods, needles=[task.target_position(i) for i in indices])
        metrics["accuracy"], metrics["target_kept"] = tables["accuracy"], tables["needle_kept"]
        metrics["eval_examples"] = args.eval_examples
        seconds["evaluation"] = time.perf_counter() - start
    return metrics


def _run_jsonl(args, topology) -> dict:
    from types import SimpleNamespace

    from transformers import AutoImageProcessor, AutoTokenizer

    from vsops.integrations import from_pretrained
    from vsops.integrations.loading import read_scorer_weights
    from vsops.training.evaluate import loss_table
    from vsops.training.jsonl import JsonlDataset

    config = _train_config(args, {})
    # The tokenizer and image processor are all the data needs (the full processor would
    # also load a video processor, which needs torchvision).
    remote = dict(trust_remote_code=args.trust_remote_code)
    processor = SimpleNamespace(
        tokenizer=AutoTokenizer.from_pretrained(args.model, **remote),
        image_processor=AutoImageProcessor.from_pretrained(args.model, **remote),
    )
    dataset = JsonlDataset(args.data, processor, image_root=args.image_root)
    dtype = torch.bfloat16 if topology.device.type == "cuda" else torch.float32
    had_scorer = bool(read_scorer_weights(args.model))
    model = from_pretrained(args.model, budget=config.budget, allow_missing_scorer=True, torch_dtype=dtype, **remote)
    model.to(topology.device)
    model.visionselector.scorer.float()
    if not had_scorer:
        torch.manual_seed(args.seed)
        model.visionselector.scorer.reset_parameters()
    start = time.perf_counter()
    history = train(model, dataset, config, args.output_dir, topology=topology, resume=args.resume,
                    deepspeed_config=args.deepspeed, progress=not args.no_progress)
    metrics = {"data": args.data, "model": args.model, "config": dataclasses.asdict(config),
               "train": history[-1] if history else {}, "seconds": {"scorer": time.perf_counter() - start}}
    if args.eval_data and _zero_stage(args.deepspeed) == 3:
        metrics["eval_loss"] = "not evaluated under ZeRO-3: load scorer.safetensors into the model in one process"
    elif args.eval_data and topology.is_main:
        held_out = JsonlDataset(args.eval_data, processor, image_root=args.image_root)
        metrics["eval_loss"] = loss_table(model, [held_out[i] for i in range(len(held_out))], budgets=EVAL_BUDGETS,
                                          methods=args.eval_methods)
    return metrics


def _zero_stage(deepspeed_config: str | None) -> int | None:
    if deepspeed_config is None:
        return None
    with open(deepspeed_config) as f:
        return json.load(f).get("zero_optimization", {}).get("stage", 0)


def _barrier(topology) -> None:
    if topology.distributed:
        torch.distributed.barrier()
