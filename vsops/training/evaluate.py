"""Held-out evaluation of a patched model at several budgets, with each selection method."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from vsops.integrations.outputs import kept_mask
from vsops.training.data import Example, collate_for_model

__all__ = ["compared_methods", "answer_metrics", "answer_accuracy", "answer_tables", "pruned_loss", "loss_table"]


@contextlib.contextmanager
def _evaluating(model: nn.Module, budget: float):
    """Eval mode (hard selection, unkept tokens dropped) at ``budget``; the mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with model.visionselector.using(budget=budget):
            yield
    finally:
        model.train(was_training)


def compared_methods(model: nn.Module, budgets) -> list[str]:
    """The registered methods an evaluation at ``budgets`` compares by default: every
    vision-stage one, and those inside the language model that can keep each of ``budgets`` in
    the patched ``model``'s language model (PyramidDrop cannot go below the share of its layers
    before its first drop), where the installed transformers runs them."""
    from vsops.integrations.layer_drops import unavailable_reason
    from vsops.methods import available, make_method

    if unavailable_reason():
        return available("vision")
    layers = model.config.get_text_config().num_hidden_layers
    inside = [name for name in available("language")
              if all(make_method(name).reaches(budget, layers) for budget in budgets)]
    return available("vision") + inside


def _per_method(model: nn.Module, budgets, methods):
    """Yields ``(method name, budget)`` with the model selecting by that method (default:
    :func:`compared_methods`), its random state restarted at every budget."""
    for method in compared_methods(model, budgets) if methods is None else methods:
        for budget in budgets:
            with model.visionselector.using(method=method) as selector:
                chosen = selector.method
                chosen.reset()
                yield chosen.name, budget


@torch.no_grad()
def answer_metrics(
    model: nn.Module, examples: list[Example], answer_tokens: list[int], *, budget: float, needles: list[int] | None = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """How the patched ``model`` answers ``examples`` from their prompts when it keeps
    ``budget`` of the visual tokens (hard top-k, eval mode: the unkept tokens are dropped).

    Args:
        answer_tokens: the token ids an answer can be; the prediction is the likeliest of them.
        needles: optionally, per example, the prompt position of the token the answer depends
            on (e.g. :meth:`SyntheticTask.target_position`).

    Returns:
        ``accuracy``: share of examples whose first answer token is predicted; with
        ``needles``, also ``needle_kept``: share of examples whose needle survived the selection.
    """
    device = next(model.parameters()).device
    candidates = torch.tensor(answer_tokens, device=device)
    correct = kept = 0
    with _evaluating(model, budget):
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate_for_model(chunk, model.config, prompt_only=True)
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch, use_cache=False)
            logits = out.logits[:, -1, candidates]
            target = torch.tensor([int(e.input_ids[e.prompt_length]) for e in chunk], device=device)
            correct += int((candidates[logits.argmax(-1)] == target).sum())
            if needles is not None:
                width = batch["input_ids"].shape[1]
                keep = kept_mask(out, batch.get("attention_mask"), batch["input_ids"].shape)
                for row, (e, needle) in enumerate(zip(chunk, needles[start : start + batch_size])):
                    # prompts are padded on the left
                    kept += int(keep[row, width - e.prompt_length + needle])
    metrics = {"accuracy": correct / len(examples)}
    if needles is not None:
        metrics["needle_kept"] = kept / len(examples)
    return metrics


def answer_accuracy(model: nn.Module, examples: list[Example], answer_tokens: list[int], *, budget: float,
                    batch_size: int = 64) -> float:
    """The ``accuracy`` of :func:`answer_metrics`."""
    return answer_metrics(model, examples, answer_tokens, budget=budget, batch_size=batch_size)["accuracy"]


def answer_tables(
    model: nn.Module, examples: list[Example], answer_tokens: list[int], *, budgets=(0.1, 0.2, 0.3, 1.0),
    methods=None, needles: list[int] | None = None, batch_size: int = 64, progress=None,
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`answer_metrics` at each budget with each selection method (names or
    :class:`~vsops.methods.SelectionMethod` instances; default: :func:`compared_methods`, the
    model's learned scorer as ``"visionselector"``):
    ``{"accuracy": {"visionselector": {"0.1": ..., ...}, "divprune": {...}}, "needle_kept": ...}``;
    ``progress`` (a tqdm bar) advances by one per method and budget."""
    tables: dict = {}
    for name, budget in _per_method(model, budgets, methods):
        metrics = answer_metrics(model, examples, answer_tokens, budget=budget, needles=needles, batch_size=batch_size)
        for metric, value in metrics.items():
            tables.setdefault(metric, {}).setdefault(name, {})[str(budget)] = value
        if progress is not None:
            progress.update(1)
    return tables


@torch.no_grad()
def pruned_loss(model: nn.Module, examples: list[Example], *, budget: float, batch_size: int = 8) -> float:
    """Mean cross-entropy of the answer tokens of ``examples`` when the patched ``model`` sees
    ``budget`` of the visual tokens (eval mode: the labels of the kept tokens, see the
    integration), weighted by answer tokens."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with _evaluating(model, budget):
        for start in range(0, len(examples), batch_size):
            batch = collate_for_model(examples[start : start + batch_size], model.config)
            batch = {k: v.to(device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            total += float(model(**batch, use_cache=False).loss) * n
            count += n
    return total / max(count, 1)


def loss_table(model: nn.Module, examples: list[Example], *, budgets=(0.1, 0.2, 0.3, 1.0),
               methods=None) -> dict[str, dict[str, float]]:
    """Like :func:`answer_tables`, with :func:`pruned_loss` (for data without a fixed answer set)."""
    table: dict = {}
    for name, budget in _per_method(model, budgets, methods):
        table.setdefault(name, {})[str(budget)] = pruned_loss(model, examples, budget=budget)
    return table
