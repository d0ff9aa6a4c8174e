"""``vsops demo``: what VisionSelector is for, in pictures and numbers, in minutes on a CPU.

On the synthetic task shipped with the package, with the tiny Qwen2.5-VL and scorer trained on it
(``vsops/demo/model``, or trained again with ``retrain=True``): which tokens every method keeps on
a few held-out boards (``selection.png``), the accuracy each keeps against the budget
(``accuracy.png``), the prefill the pruning saves (``prefill.png``, the prefill benchmark's model)
and the operators against PyTorch and their bounds (``kernels.png``, a short benchmark run);
``report.md`` and ``results.json`` hold the tables, the machine and the settings.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

__all__ = ["run_demo", "DEFAULT_BUDGETS"]

DEFAULT_BUDGETS = (0.1, 0.2, 0.3)


def run_demo(output_dir="vsops-demo", *, budgets=DEFAULT_BUDGETS, retrain: bool = False, boards: int = 3,
             examples: int = 1024, timing: bool = True, progress: bool = True) -> dict:
    """Writes the demo's files to ``output_dir``; returns ``results.json``'s content.

    Args:
        budgets: fractions of visual tokens kept, each in (0, 1); 1.0 is added as the reference.
        retrain: train the backbone and scorer from scratch (about 90 s on 2 cores) instead of
            loading the shipped ones.
        boards: held-out boards drawn in ``selection.png``.
        examples: held-out examples the accuracy is measured on.
        timing: run the prefill and operator benchmarks (``prefill.png``, ``kernels.png``).
        progress: progress bars on stderr.
    """
    from tqdm.auto import tqdm

    from vsops.demo import measure, plots, report
    from vsops.demo.model import SHIPPED, load, retrain as retrain_model, shipped_metrics
    from vsops.demo.selection import board_selections
    from vsops.training.evaluate import answer_tables, compared_methods
    from vsops.training.run import HELD_OUT_INDEX
    from vsops.training.synthetic import SyntheticTask

    began = time.perf_counter()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    budgets = sorted(float(b) for b in budgets)
    seconds = {}
    start = time.perf_counter()
    model_dir = retrain_model(output / "model", progress=progress) if retrain else SHIPPED
    model = load(model_dir)
    seconds["model"] = time.perf_counter() - start
    task = SyntheticTask(**shipped_metrics(SHIPPED)["task"])
    methods = compared_methods(model, budgets)

    start = time.perf_counter()
    indices = range(HELD_OUT_INDEX, HELD_OUT_INDEX + examples)
    with tqdm(total=len(methods) * (len(budgets) + 1), desc="accuracy (method x budget)",
              disable=not progress) as bar:
        tables = answer_tables(model, [task[i] for i in indices], list(task.answer_tokens), budgets=budgets + [1.0],
                               methods=methods, needles=[task.target_position(i) for i in indices], progress=bar)
    seconds["accuracy"] = time.perf_counter() - start

    start = time.perf_counter()
    with tqdm(total=boards * len(methods), desc="selection", disable=not progress) as bar:
        drawn = board_selections(model, task, range(HELD_OUT_INDEX, HELD_OUT_INDEX + boards), budgets, methods, bar)
    plots.save(plots.selection_figure(drawn, methods, budgets), output / "selection.png")
    plots.save(plots.accuracy_figure(tables["accuracy"], tables["needle_kept"], budgets + [1.0]),
               output / "accuracy.png")
    seconds["selection"] = time.perf_counter() - start

    results = {
        "settings": {"budgets": budgets, "boards": boards, "eval_examples": examples, "grid": task.grid,
                     "retrain": retrain, "timing": timing, "task": dataclasses.asdict(task)},
        "model": {"source": "retrained" if retrain else "shipped", "directory": str(model_dir),
                  "shipped_accuracy": shipped_metrics(SHIPPED)["accuracy"]},
        "accuracy": tables["accuracy"],
        "target_kept": tables["needle_kept"],
        "boards": [{"index": b.index, "target": b.target,
                    "correct": {m: {str(k): v for k, v in by.items()} for m, by in b.correct.items()}} for b in drawn],
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
