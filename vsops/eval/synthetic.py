"""The demo's synthetic task (:class:`vsops.training.synthetic.SyntheticTask`) in words, as an
evaluation task sees it: a question in text, the board as an image, the answer a colour name.

A model directory made by ``vsops train --task synthetic`` (the demo's shipped model) has no
tokenizer or image processor: :class:`SyntheticModelInputs` stands in for them, turning the
question's words and the board back into the token ids and patches the model was trained on,
and its answer token into the colour's name, so that the evaluation's answers are the demo's.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

__all__ = ["COLOUR_NAMES", "QUESTIONS", "HELD_OUT_ROWS", "is_synthetic_model", "rows", "task_of",
           "SyntheticModelInputs"]

# The answer words, in colour order (the task's palette: red, green, blue, yellow, magenta,
# cyan, white, orange).
COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange")
QUESTIONS = ("What colour is target A?", "What colour is target B?")
HELD_OUT_ROWS = 1024  # the demo's held-out boards


def is_synthetic_model(model_dir) -> bool:
    """Whether ``model_dir`` was made by ``vsops train --task synthetic`` (a backbone, a scorer
    and the run's ``metrics.json`` with its task)."""
    path = Path(model_dir)
    return (path / "backbone").is_dir() and (path / "scorer.safetensors").is_file() and (path / "metrics.json").is_file()


def task_of(model_dir=None):
    """The :class:`~vsops.training.synthetic.SyntheticTask` ``model_dir`` was trained on (the
    shipped demo model's by default)."""
    from vsops.demo.model import SHIPPED

    return _task_of(str(Path(SHIPPED if model_dir is None else model_dir).resolve()))


@functools.lru_cache(maxsize=None)
def _task_of(model_dir: str):
    # Once per directory: a task caches its glyphs, which every board is drawn from.
    from vsops.demo.model import shipped_metrics
    from vsops.training.synthetic import SyntheticTask

    return SyntheticTask(**shipped_metrics(Path(model_dir))["task"])


def rows(task, count: int = HELD_OUT_ROWS) -> list[dict]:
    """The evaluation's rows: the held-out example ``index`` of ``task``, its question and its
    answer's colour name, for the first ``count`` held-out examples (those the demo scores)."""
    from vsops.training.run import HELD_OUT_INDEX

    out = []
    for index in range(HELD_OUT_INDEX, HELD_OUT_INDEX + count):
        _, asked, colour, _ = task.image(index)
        out.append({"index": index, "question": QUESTIONS[asked], "answer": COLOUR_NAMES[colour]})
    return out


class SyntheticModelInputs:
    """The tokenizer and image processor of a synthetic-task model: ``(question, board)`` to
    model inputs as :meth:`SyntheticTask.example` lays them out, and the answer tokens' logits
    to a colour name.

    Args:
        task: the model's :class:`~vsops.training.synthetic.SyntheticTask`.
        config: the model's config (its padding id and extra per-token inputs).
    """

    def __init__(self, task, config):
        self.task, self.config = task, config

    def batch(self, questions: list[str], boards: list[torch.Tensor]) -> dict:
        """Left-padded model inputs of the prompts; ``boards``: float32 ``[3, H, W]`` images
        (:meth:`SyntheticTask.image`). A question the task does not ask is a ValueError."""
        from vsops.integrations.testing import TOKENS
        from vsops.training.data import Example, collate_for_model
        from vsops.training.synthetic import MERGE, QUESTION_TOKENS, patchify

        examples = []
        for question, board in zip(questions, boards):
            text = question.strip()
            if text not in QUESTIONS[: self.task.questions]:
                raise ValueError(f"the synthetic task asks {list(QUESTIONS[: self.task.questions])}, got {question!r}")
            prompt = ([TOKENS["bos"], TOKENS["vision_start"]] + [TOKENS["image"]] * self.task.visual_tokens
                      + [TOKENS["vision_end"], QUESTION_TOKENS[QUESTIONS.index(text)]])
            ids = torch.tensor(prompt)
            examples.append(Example(ids, torch.full_like(ids, -100), patchify(torch.as_tensor(board, dtype=torch.float32)),
                                    torch.tensor([[1, self.task.grid * MERGE, self.task.grid * MERGE]]), len(prompt)))
        return collate_for_model(examples, self.config, prompt_only=True)

    def answers(self, logits: torch.Tensor) -> list[str]:
        """The colour names of the likeliest answer tokens, from the last position's logits
        ``[B, V]`` (as the demo scores an answer)."""
        tokens = list(self.task.answer_tokens)
        picked = logits[:, tokens].argmax(-1).tolist()
        return [COLOUR_NAMES[i] for i in picked]
