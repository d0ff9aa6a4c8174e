"""How gradients become updates: one process, DDP, or DeepSpeed, behind one interface, so the
training loop is the same on a laptop and on a cluster.

An engine owns the trainable parameters' optimizer, the learning-rate schedule and, for fp16,
the gradient scaler. The loop calls, per micro-batch, ``forward`` under ``accumulating`` (True
for all but the last micro-batch of a step) and ``backward``; then ``step`` once per step.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from vsops.training.distributed import Topology

__all__ = ["LocalEngine", "DDPEngine", "make_engine"]


class LocalEngine:
    """One process: AdamW, a ``LambdaLR`` schedule, optional fp16 loss scaling, gradient
    clipping."""

    def __init__(self, model: nn.Module, parameters: list[nn.Parameter], *, lr: float, weight_decay: float,
                 schedule, max_grad_norm: float | None, fp16: bool):
        self.model = model
        self.parameters = parameters
        self.optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.scaler = torch.amp.GradScaler(enabled=fp16)
        self.max_grad_norm = max_grad_norm

    def forward(self, **inputs):
        return self.model(**inputs)

    def accumulating(self, accumulating: bool):
        """Context for one micro-batch's forward and backward; ``accumulating`` is True when
        more micro-batches of the same step follow."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self) -> float:
        """One optimizer step; returns the gradient norm before clipping."""
        self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.max_grad_norm or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def gathered(self):
        """Context in which the trainable parameters are whole on every process (for saving
        and loading them; ZeRO-3 partitions them). Every process must enter it."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


class DDPEngine(LocalEngine):
    """``torch.nn.parallel.DistributedDataParallel`` over the process group: gradients of the
    trainable parameters are averaged across processes; the frozen backbone is only
    broadcast from rank 0 once, when wrapped."""

    def __init__(self, model: nn.Module, parameters, *, topology: Topology, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model,
            device_ids=[topology.device.index] if topology.device.type == "cuda" else None,
            broadcast_buffers=False,  # the frozen backbone's buffers never change
            # a micro-batch without visual tokens leaves the scorer out of the graph
            find_unused_parameters=True,
        )
        super().__init__(ddp, parameters, **kwargs)

    def accumulating(self, accumulating: bool):
        return self.model.no_sync() if accumulating else contextlib.nullcontext()


def make_engine(model: nn.Module, parameters: list[nn.Parameter], *, topology: Topology, micro_batch_size: int,
                accumulation: int, deepspeed_config: str | dict | None = None, **kwargs):
    """The engine for this run: DeepSpeed when given a config, DDP under ``torchrun``, else
    one process. ``micro_batch_size`` and ``accumulation``: the loop's split of a step in each
    process. ``kwargs``: ``lr``, ``weight_decay``, ``schedule`` (step -> multiplier),
    ``max_grad_norm``, ``fp16``."""
    if deepspeed_config is not None:
        from vsops.training.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, parameters, topology=topology, config=deepspeed_config,
                               micro_batch_size=micro_batch_size, accumulation=accumulation, **kwargs)
    if topology.distributed:
        return DDPEngine(model, parameters, topology=topology, **kwargs)
    return LocalEngine(model, parameters, **kwargs)
