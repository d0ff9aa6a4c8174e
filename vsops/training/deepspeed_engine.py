"""The training loop's step through DeepSpeed ZeRO (stages 1-3): the interface of
:class:`vsops.training.engine.LocalEngine`, and its updates.

Launch with either launcher; both set ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``, whose
process group :func:`vsops.training.distributed.init_topology` joins before the engine is
made (``--no_local_rank``: otherwise the DeepSpeed launcher appends ``--local_rank=N`` to the
command)::

    deepspeed --no_local_rank --num_gpus 8 -m vsops.cli train --deepspeed vsops/training/configs/zero2.json ...
    torchrun --nproc_per_node 8 -m vsops.cli train --deepspeed vsops/training/configs/zero2.json ...

or ``train(..., topology=init_topology(), deepspeed_config=path_or_dict)``. One process
without a launcher works too: the engine makes a one-process group.

The loop, not the config, sets the batch split, clipping, optimizer and schedule: the engine
fills ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
``train_batch_size`` and ``gradient_clipping`` (``"auto"`` or absent in the config; another
value must agree) and steps a ``torch.optim.AdamW`` under the loop's ``LambdaLR``, so a config
with an ``optimizer`` or ``scheduler`` section is refused. ``fp16.enabled`` must agree with
the loop's precision (DeepSpeed's fp16 scales the loss itself). With ``bf16.enabled``
DeepSpeed casts the whole model to bf16 and keeps the scorer's fp32 master weights and Adam
moments in the ZeRO optimizer. ZeRO stage 0 is refused: that is data parallelism, the DDP
engine's job.

Gradients: ``backward`` gets the loop's loss, already the micro-batch's share of the step
times the world size (data parallelism averages). ZeRO averages like DDP; the engine turns
off DeepSpeed's division by ``gradient_accumulation_steps`` and marks the accumulation
boundary itself (the last micro-batch), so one :meth:`step` is one optimizer update.

Stages: only the scorer trains (12.85M parameters for Qwen2.5-VL-7B), so ZeRO-2 saves at most
~200 MB per GPU (its fp32 weights, moments and gradients) while the frozen bf16 backbone
(~16 GB) stays whole on every GPU. ZeRO-3 partitions the backbone too (``deepspeed.initialize``
converts every parameter) and gathers each layer's weights in every forward and backward.
The shipped configs size their buckets for hidden size 3584 as transformers' ``"auto"`` would
(hidden², 0.9 hidden², 10 hidden). The model is loaded whole in each process before it is
partitioned, without ``deepspeed.zero.Init``: a 7B model fits one GPU. For one that does not,
create ``transformers.integrations.HfDeepSpeedConfig(resolved_config)`` and keep it alive
before ``from_pretrained``, so that transformers loads it partitioned (not exercised here).

Checkpoints: :meth:`state_dict` gathers the scorer's fp32 master weights, Adam moments and
the schedule, whole, so it is collective (every process must call it) and its result does not
depend on the number of processes; every process calls :meth:`load_state_dict`. Under ZeRO-3
the scorer's module parameters are partitioned: read or write them (e.g. to save
``scorer.safetensors``) inside :meth:`gathered`, entered by every process.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os

import torch
import torch.distributed as dist
from torch import nn

from vsops.training.distributed import Topology

__all__ = ["DeepSpeedEngine", "resolve_deepspeed_config"]

_ADAM_STATES = ("exp_avg", "exp_avg_sq")


def resolve_deepspeed_config(config: str | dict, *, micro_batch_size: int, accumulation: int, world: int,
                             max_grad_norm: float | None, fp16: bool) -> dict:
    """The DeepSpeed config ``config`` (a JSON path or a dict, left unchanged) with the
    loop's batch split and clipping filled in; raises ValueError where it contradicts the
    loop."""
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    config = copy.deepcopy(config)
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"the DeepSpeed config has a {section!r} section: the training loop sets AdamW and its "
                             "learning-rate schedule itself (TrainConfig.lr, weight_decay, warmup_ratio)")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ValueError(f"ZeRO stage {stage}: use 1, 2 or 3 (without ZeRO, run torchrun without --deepspeed: DDP)")
    loop = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world,
        "gradient_clipping": float(max_grad_norm or 0.0),  # DeepSpeed's 0: no clipping (its default is 1.0)
    }
    for key, value in loop.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"the DeepSpeed config sets {key}={config[key]!r} but the training loop uses {value!r}")
        config[key] = value
    half = config.setdefault("fp16", {})
    if half.get("enabled", "auto") == "auto":
        half["enabled"] = fp16
    elif bool(half["enabled"]) != fp16:
        raise ValueError(f"the DeepSpeed config has fp16.enabled={half['enabled']} but the training loop's "
                         f"precision is {'fp16' if fp16 else 'not fp16'}")
    if config.get("bf16", {}).get("enabled") == "auto":
        raise ValueError("bf16.enabled='auto' in the DeepSpeed config: set true or false")
    return config


class DeepSpeedEngine:
    """``deepspeed.initialize`` over ``model`` with only ``parameters`` (the scorer's) trained
    by AdamW under the ``schedule`` multiplier; the interface of ``LocalEngine``.

    Args:
        config: a DeepSpeed config, JSON path or dict (see :func:`resolve_deepspeed_config`).
        micro_batch_size, accumulation: the loop's per-process split of a step
            (``TrainConfig.split``): DeepSpeed's batch bookkeeping and, with CPU offload, its
            gradient accumulation depend on them.
    """

    def __init__(self, model: nn.Module, parameters: list[nn.Parameter], *, topology: Topology, config: str | dict,
                 lr: float, weight_decay: float, schedule, max_grad_norm: float | None, fp16: bool,
                 micro_batch_size: int, accumulation: int):
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != topology.device.type:
            raise ValueError(f"DeepSpeed runs on {get_accelerator().device_name()!r} but this process is on "
                             f"{topology.device}")
        config = resolve_deepspeed_config(config, micro_batch_size=micro_batch_size, accumulation=accumulation,
                                          world=topology.world, max_grad_norm=max_grad_norm, fp16=fp16)
        if not dist.is_initialized():
            # One process without a launcher: DeepSpeed would look for MPI instead.
            os.environ.setdefault("LOCAL_RANK", "0")
            dist.init_process_group("nccl" if topology.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        self.parameters = parameters
        self.accumulation = accumulation
        self.adam = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=parameters, optimizer=self.adam, config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, schedule),
        )
        self.model = self.engine
        self._micro_batches = 0

    def forward(self, **inputs):
        return self.engine(**inputs)

    def accumulating(self, accumulating: bool):
        """Marks whether more micro-batches of this step follow; DeepSpeed needs it before the
        forward."""
        self.engine.set_gradient_accumulation_boundary(not accumulating)
        self._micro_batches += 1
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # The loop's loss is already the micro-batch's share of the step: no division by
        # gradient_accumulation_steps.
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """One optimizer step; returns the gradient norm before clipping (inf after an fp16
        overflow, whose update DeepSpeed skips)."""
        if self._micro_batches != self.accumulation:
            raise RuntimeError(f"{self._micro_batches} micro-batches in this step, the engine was made for "
                               f"{self.accumulation}")
        self._micro_batches = 0
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    @property
    def lr(self) -> float:
        return self.adam.param_groups[0]["lr"]

    def gathered(self):
        """Context in which every process sees the scorer's whole parameters (ZeRO-3
        partitions them; other stages: nothing to do). Every process must enter it; what
        process 0 writes to them is kept."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.parameters, modifier_rank=0)

    def state_dict(self) -> dict:
        """The scorer's fp32 master weights and Adam moments, whole, the schedule and the loss
        scale. Collective: every process must call it."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        return {
            "fp32": [safe_get_full_fp32_param(p).cpu() for p in self.parameters],
            **{k: [safe_get_full_optimizer_state(p, k).cpu() for p in self.parameters] for k in _ADAM_STATES},
            "adam_step": float(next(iter(self.adam.state.values()))["step"]),
            "scheduler": self.scheduler.state_dict(),
            "global_steps": self.engine.global_steps,
            "loss_scale": dict(vars(scaler)) if (scaler := self._loss_scaler()) else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores a :meth:`state_dict` (made with any number of processes), on every
        process."""
        # Adam's state is made at the first step; make it now, for the flat fp32 partitions
        # Adam steps (ZeRO-3 hands them to it only while stepping), link each parameter to its
        # slice of it (ZeRO-1/2), then overwrite it.
        flats = getattr(self.engine.optimizer, "fp32_partitioned_groups_flat", None) or [
            flat for group in self.adam.param_groups for flat in group["params"]]
        for flat in flats:
            self.adam.state.setdefault(flat, {k: torch.zeros_like(flat) for k in _ADAM_STATES})
        for adam_state in self.adam.state.values():
            adam_state["step"] = torch.tensor(state["adam_step"])
        link = getattr(self.engine.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:
            link()
        device = self.engine.device
        with self.gathered():
            for i, p in enumerate(self.parameters):
                for k in (None, *_ADAM_STATES):
                    _set_full_hp(p, state[k or "fp32"][i].to(device), k)
                p.data.copy_(state["fp32"][i])  # the low-precision copy the forward uses
        self.scheduler.load_state_dict(state["scheduler"])
        for group, lr in zip(self.adam.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr
        self.engine.global_steps = state["global_steps"]
        if state["loss_scale"] is not None:
            vars(self._loss_scaler()).update(state["loss_scale"])

    def _loss_scaler(self):
        """The ZeRO optimizer's loss scaler: fp16's dynamic scale, a constant otherwise."""
        return getattr(self.engine.optimizer, "loss_scaler", None)


def _set_full_hp(param: nn.Parameter, value: torch.Tensor, key: str | None) -> None:
    """DeepSpeed's ``safe_set_full_fp32_param`` (key None) or ``safe_set_full_optimizer_state``,
    except under ZeRO-3, whose full setters take the wrong slice of a parameter that does not
    split evenly over the processes (DeepSpeed 0.19.8): there each process sets its own padded
    partition."""
    from deepspeed import utils

    if not hasattr(param, "ds_id"):
        if key is None:
            utils.safe_set_full_fp32_param(param, value)
        else:
            utils.safe_set_full_optimizer_state(param, value, key)
        return
    size = param.ds_tensor.numel()
    local = value.flatten()[dist.get_rank(param.ds_process_group) * size:][:size]
    local = torch.nn.functional.pad(local, (0, size - local.numel()))
    if key is None:
        utils.safe_set_local_fp32_param(param, local)
    else:
        utils.safe_set_local_optimizer_state(param, local, key)
