"""``vsops demo``: what VisionSelector is for, in pictures and numbers, in minutes on a CPU.

On the two synthetic tasks shipped with the package (:mod:`vsops.training.synthetic`: distinct
targets, where the cells a question needs are also the most distinctive, and marked targets,
where they are not), with the tiny Qwen2.5-VL and scorer trained on each (``vsops/demo/model``
and ``model_marked``, or trained again with ``retrain=True``): which tokens every method keeps
on a few held-out boards (``selection.png``, ``selection_marked.png``), the accuracy each keeps
against the budget (``accuracy.png``, ``accuracy_marked.png``), the prefill the pruning saves (``prefill.png``, the prefill benchmark's model)
and the operators against PyTorch and their bounds (``kernels.png``, a short benchmark run);
``report.md`` and ``results.json`` hold the tables, the machine and the settings.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

__all__ = ["run_demo", "DEFAULT_BUDGETS", "TASK_FILES", "TaskFiles"]

DEFAULT_BUDGETS = (0.1, 0.2, 0.3)


@dataclasses.dataclass(frozen=True)
class TaskFiles:
    """Where one synthetic task's pictures go in the demo's output, and what they show."""

    title: str
    shows: str  # what the task shows, for the report
    selection: str
    accuracy: str


TASK_FILES = {
    "synthetic": TaskFiles(
        "Distinct targets", "The cells a question needs are also the most distinctive on the board, so methods that "
        "keep diverse tokens find them without knowing what matters.", "selection.png", "accuracy.png"),
    "synthetic-marked": TaskFiles(
        "Marked targets", "Every cell holds a different glyph and the targets share a small mark no distractor has "
        "whole: no more distinctive than the rest, they are found only by knowing what matters, as a trained scorer "
        "can learn to.", "selection_marked.png", "accuracy_marked.png"),
}


def run_demo(output_dir="vsops-demo", *, budgets=DEFAULT_BUDGETS, retrain: bool = False, boards: int = 3,
             examples: int = 1024, timing: bool = True, progress: bool = True) -> dict:
    """Writes the demo's files to ``output_dir``; returns ``results.json``'s content.

    Args:
        budgets: fractions of visual tokens kept, each in (0, 1); 1.0 is added as the reference.
        retrain: train each task's backbone and scorer from scratch (a few minutes on 2 cores)
            instead of loading the shipped ones.
        boards: held-out boards of each task drawn in its selection picture.
        examples: held-out examples the accuracy is measured on.
        timing: run the prefill and operator benchmarks (``prefill.png``, ``kernels.png``).
        progress: progress bars on stderr.
    """
    from tqdm.auto import tqdm

    from vsops.demo import measure, plots, report
    from vsops.demo.model import SHIPPED_MODELS, load, retrain as retrain_model, shipped_metrics
    from vsops.demo.selection import board_selections
    from vsops.training.evaluate import answer_tables, compared_methods
    from vsops.training.run import HELD_OUT_INDEX
    from vsops.training.synthetic import SyntheticTask

    began = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    budgets = sorted(float(b) for b in budgets)
    seconds = {"model": 0.0, "accuracy": 0.0, "selection": 0.0}
    start = time.perf_counter()
    # A retrained model goes where the shipped one lies in the package, under output_dir.
    models = {name: retrain_model(output / shipped.name, task=name, progress=progress) if retrain else shipped
              for name, shipped in SHIPPED_MODELS.items()}
    loaded = {name: load(directory) for name, directory in models.items()}
    seconds["model"] = time.perf_counter() - start
    methods = compared_methods(next(iter(loaded.values())), budgets)

    results = {
        "settings": {"budgets": budgets, "boards": boards, "eval_examples": examples, "retrain": retrain,
                     "timing": timing},
        "tasks": {},
    }
    indices = range(HELD_OUT_INDEX, HELD_OUT_INDEX + examples)
    with tqdm(total=len(models) * len(methods) * (len(budgets) + 1), desc="accuracy (task x method x budget)",
              disable=not progress) as accuracy_bar, \
            tqdm(total=len(models) * boards * len(methods), desc="selection (task x board x method)",
                 disable=not progress) as selection_bar:
        for name, model in loaded.items():
            task = SyntheticTask(**shipped_metrics(models[name])["task"])
            start = time.perf_counter()
            tables = answer_tables(model, [task[i] for i in indices], list(task.answer_tokens),
                                   budgets=budgets + [1.0], methods=methods,
                                   needles=[task.target_position(i) for i in indices], progress=accuracy_bar)
            seconds["accuracy"] += time.perf_counter() - start

            start = time.perf_counter()
            drawn = board_selections(model, task, range(HELD_OUT_INDEX, HELD_OUT_INDEX + boards), budgets, methods,
                                     selection_bar)
            plots.save(plots.selection_figure(drawn, methods, budgets, TASK_FILES[name].title),
                       output / TASK_FILES[name].selection)
            plots.save(plots.accuracy_figure(tables["accuracy"], tables["needle_kept"], budgets + [1.0],
                                             TASK_FILES[name].title), output / TASK_FILES[name].accuracy)
            seconds["selection"] += time.perf_counter() - start
            results["tasks"][name] = {
                "task": dataclasses.asdict(task),
                "model": {"source": "retrained" if retrain else "shipped", "directory": str(models[name]),
                          "shipped_accuracy": shipped_metrics(SHIPPED_MODELS[name])["accuracy"]},
                "accuracy": tables["accuracy"],
                "target_kept": tables["needle_kept"],
                "boards": [{"index": b.index, "target": b.target,
                            "correct": {m: {str(k): v for k, v in by.items()} for m, by in b.correct.items()}}
                           for b in drawn],
            }
    if timing:
        start = time.perf_counter()
        with tqdm(total=measure.PREFILL_ROWS, desc="prefill (rows)", disable=not progress) as bar:
            rows, vision_ms = measure.prefill_rows(progress=bar)
        plots.save(plots.prefill_figure(rows, vision_ms), output / "prefill.png")
        results["prefill"] = {"vision_ms": vision_ms, "rows": [dataclasses.asdict(r) for r in rows]}
        seconds["prefill"] = time.perf_counter() - start
        start = time.perf_counter()
        with tqdm(total=len(measure.KERNELS), desc="operators", disable=not progress) as bar:
            kernels = measure.kernel_rows(progress=bar)
        plots.save(plots.kernels_figure(kernels), output / "kernels.png")
        results["kernels"] = [dataclasses.asdict(r) for r in kernels]
        seconds["kernels"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - began
    results["seconds"] = seconds
    results["machine"] = report.machine()
    report.write_results(output / "results.json", results)
    report.write_report(output / "report.md", results)
    return results
