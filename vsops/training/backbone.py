"""Fitting a small backbone to a task with every visual token, before its scorer is trained
(the synthetic task has no pretrained model to start from)."""
from __future__ import annotations

import math

import torch
from torch import nn

from vsops.training.data import collate_for_model
from vsops.training.objective import next_token_cross_entropy
from vsops.training.progress import progress_bar

__all__ = ["fit_backbone"]


def fit_backbone(
    model: nn.Module, dataset, *, steps: int, batch_size: int = 32, lr: float = 1.5e-3, progress: bool = True,
    first_index: int = 0, freeze_vision: bool = False,
) -> list[float]:
    """Trains the parameters of an unpatched ``model`` on ``dataset[first_index:]`` (answer
    tokens' cross-entropy, all visual tokens, AdamW with cosine decay), in place: all of them, or
    with ``freeze_vision`` all but the vision tower's (``model.model.visual``, merger included),
    which stays as it is.

    Returns the loss of each step.
    """
    if getattr(model, "visionselector", None) is not None:
        raise ValueError("fit the backbone before patching it: a patched model in training mode scales its tokens")
    device = next(model.parameters()).device
    if freeze_vision:
        model.model.visual.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    bar = progress_bar(progress, steps, "backbone")
    model.train()
    losses = []
    for step in range(steps):
        first = first_index + step * batch_size
        batch = collate_for_model([dataset[first + i] for i in range(batch_size)], model.config)
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        logits = model(**batch, use_cache=False).logits
        loss = next_token_cross_entropy(logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix({"loss": f"{loss.item():.3g}"})
    bar.close()
    model.eval()
    return losses
