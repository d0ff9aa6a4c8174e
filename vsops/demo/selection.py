"""What each method keeps on a few held-out boards of the synthetic task: per board, the image,
the learned scorer's scores and, per method and budget, the kept cells and the answer."""
from __future__ import annotations

import dataclasses

import torch

from vsops.integrations.outputs import kept_mask
from vsops.training.data import collate_for_model

__all__ = ["Board", "board_selections", "merged_tokens"]


@dataclasses.dataclass
class Board:
    """One board. ``image``: float32 ``[3, H, W]`` in [0, 1]; ``scores``: float32
    ``[grid, grid]`` (the learned scorer's); ``target``: the asked target's cell ``(row, col)``;
    ``keep[method][budget]``: bool ``[grid, grid]``; ``correct[method][budget]``: the answer."""

    index: int
    image: torch.Tensor
    scores: torch.Tensor
    target: tuple[int, int]
    keep: dict
    correct: dict


def merged_tokens(tower, pixel_values: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The visual tokens the language model would receive, ``[n, D]``: the vision tower's
    output (a tensor in transformers 4, ``pooler_output`` in 5)."""
    out = tower(pixel_values, grid_thw=grid)
    return getattr(out, "pooler_output", out)


@torch.no_grad()
def board_selections(model, task, indices, budgets, methods, progress=None) -> list[Board]:
    """:class:`Board` for each example index of ``task``, with the patched ``model``."""
    from vsops.integrations.testing import TOKENS

    boards = []
    answers = torch.tensor(task.answer_tokens)
    for index in indices:
        example = task[index]
        batch = collate_for_model([example], model.config, prompt_only=True)
        batch.pop("labels", None)
        visual = batch["input_ids"][0] == TOKENS["image"]
        x = merged_tokens(model.model.visual, batch["pixel_values"], batch["image_grid_thw"]).float()
        cu = torch.tensor([0, x.shape[0]], dtype=torch.int32)
        scores = model.visionselector.scorer(x, cu).view(task.grid, task.grid)
        pixels, _, colour, cell = task.image(index)
        keep, correct = {}, {}
        for method in methods:
            for budget in budgets:
                with model.visionselector.using(method=method, budget=budget) as selector:
                    selector.method.reset()
                    out = model(**batch, use_cache=False)
                kept = kept_mask(out, batch.get("attention_mask"), batch["input_ids"].shape)[0][visual]
                keep.setdefault(method, {})[budget] = kept.view(task.grid, task.grid)
                predicted = int(out.logits[0, -1, answers].argmax())
                correct.setdefault(method, {})[budget] = predicted == colour
            if progress is not None:
                progress.update(1)
        image = (pixels / 1.75).clamp(0, 1)
        boards.append(Board(index, image, scores, divmod(cell, task.grid), keep, correct))
    return boards
