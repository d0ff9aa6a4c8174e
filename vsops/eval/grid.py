"""``vsops eval``: a grid of task x method x budget through lmms-eval, one directory per cell,
resumable, summarized.

Each cell ``<task>__<model>__<method>__<budget>/`` holds ``config.json`` (what ran),
``samples.jsonl`` (lmms-eval's per-sample log: the answer, its score, the visual tokens before
and after selection) and, written last, ``metrics.json`` (the task's metrics and the means of
the per-sample records); a cell with ``metrics.json`` is complete and skipped by a later run. The
summary (:func:`write_summary`) has one row per method x budget: each task's metrics, the mean
accuracy relative to budget 1.0, the kept visual tokens and the prefill time.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

from vsops.budget import check_budget

__all__ = ["Cell", "cells", "run_grid", "read_cells", "write_summary"]

METRICS_FILE, SAMPLES_FILE, CONFIG_FILE = "metrics.json", "samples.jsonl", "config.json"


@dataclasses.dataclass(frozen=True)
class Cell:
    task: str
    model: str  # the model directory
    method: str
    budget: float

    @property
    def name(self) -> str:
        return f"{self.task}__{Path(self.model).name}__{self.method}__{self.budget:g}"


def cells(model: str, tasks: list[str], methods: list[str], budgets: list[float]) -> list[Cell]:
    """The grid, checked: every method registered, every budget in (0, 1], at least one of
    each. Budget 1.0 (the unpatched model) is one cell per task whatever the method: it runs
    under the first method."""
    from vsops.methods import method_class

    for name, values in (("tasks", tasks), ("methods", methods), ("budgets", budgets)):
        if not values:
            raise ValueError(f"{name} must name at least one")
    for method in methods:
        method_class(method)
    budgets = [check_budget(b, "budgets") for b in budgets]
    grid = []
    for task in tasks:
        for method in methods:
            grid += [Cell(task, model, method, b) for b in budgets if b < 1.0]
        if 1.0 in budgets:
            grid.append(Cell(task, model, methods[0], 1.0))
    return grid


def run_grid(model: str, tasks: list[str], methods: list[str], budgets: list[float], output_dir, *,
             limit: int | None = None, batch_size: int = 8, scope: str = "sample", progress: bool = True,
             model_args: dict | None = None, dry_run: bool = False) -> list:
    """Runs every cell of the grid not complete in ``output_dir`` (the model loaded once, its
    method and budget set per cell, ``model_args`` passed to
    :class:`~vsops.eval.model.VsopsModel`) and writes the summary; returns every cell's metrics.
    With ``dry_run``, checks the tasks, methods and budgets and returns the cells to run,
    loading no model."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager
    from tqdm.auto import tqdm

    from vsops.eval.manifest import add_tasks

    output = Path(output_dir)
    grid = cells(model, tasks, methods, budgets)
    add_tasks()
    manager = TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lmms-eval tasks {unknown} (vsops ships vsops_synthetic and "
                         "vsops_synthetic_marked; `lmms-eval tasks` lists the others)")
    todo = [cell for cell in grid if not (output / cell.name / METRICS_FILE).is_file()]
    if dry_run:
        return todo
    lm = None
    for cell in tqdm(todo, desc="vsops eval (cells)", disable=not progress):
        if lm is None:
            from vsops.eval.model import VsopsModel

            lm = VsopsModel(model, method=cell.method, budget=cell.budget, scope=scope, batch_size=batch_size,
                            **(model_args or {}))
        lm.select(cell.method, cell.budget)
        results = simple_evaluate(model=lm, tasks=[cell.task], limit=limit, batch_size=batch_size, log_samples=True,
                                  task_manager=manager)
        if results is None:
            raise RuntimeError(f"lmms-eval returned no results for {cell.name}")
        _write_cell(output / cell.name, cell, results, limit, batch_size, scope)
    found = read_cells(output, grid)
    write_summary(output, found)
    return found


def _write_cell(directory: Path, cell: Cell, results: dict, limit, batch_size, scope) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    config = {**dataclasses.asdict(cell), "limit": limit, "batch_size": batch_size, "scope": scope,
              "lmms_eval": results.get("config", {}).get("model_args")}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=1))
    samples = results.get("samples", {}).get(cell.task, [])
    with open(directory / SAMPLES_FILE, "w") as f:
        for sample in samples:
            f.write(json.dumps({k: v for k, v in sample.items() if k not in ("doc", "arguments")}, default=str) + "\n")
    metrics = {key.split(",")[0]: value for key, value in results["results"][cell.task].items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    records = [s["vsops"] for s in samples if isinstance(s.get("vsops"), dict)]
    means = {key: sum(r[key] for r in records) / len(records) for key in ("visual_tokens", "kept_visual_tokens",
                                                                           "prefill_ms")
             if records and all(r.get(key) is not None for r in records)}
    (directory / METRICS_FILE).write_text(json.dumps({**dataclasses.asdict(cell), "metrics": metrics, **means,
                                                      "samples": len(samples)}, indent=1))


def read_cells(output_dir, grid: list[Cell]) -> list[dict]:
    """The ``metrics.json`` of each complete cell of ``grid``."""
    out = []
    for cell in grid:
        path = Path(output_dir) / cell.name / METRICS_FILE
        if path.is_file():
            out.append(json.loads(path.read_text()))
    return out


def write_summary(output_dir, found: list[dict]) -> list[dict]:
    """``summary.csv`` and ``summary.md``: one row per method x budget, a column per task
    metric, the mean over tasks of each metric relative to budget 1.0's, the kept visual tokens
    and the prefill ms (means over the row's cells); ``accuracy.png`` (each task's first metric
    against the budget, a line per method) and ``accuracy_prefill.png`` (against the prefill
    time) where matplotlib is installed. Returns the rows."""
    output = Path(output_dir)
    full = {(c["task"], metric): value for c in found if c["budget"] == 1.0 for metric, value in c["metrics"].items()}
    columns = sorted({(c["task"], metric) for c in found for metric in c["metrics"]})
    rows = []
    for method, budget in sorted({(c["method"] if c["budget"] < 1.0 else "unpatched", c["budget"]) for c in found},
                                 key=lambda mb: (mb[0] != "unpatched", mb[0], -mb[1])):
        mine = [c for c in found if c["budget"] == budget and (budget == 1.0 or c["method"] == method)]
        row = {"method": method, "budget": budget}
        relative = []
        for task, metric in columns:
            values = [c["metrics"][metric] for c in mine if c["task"] == task and metric in c["metrics"]]
            row[f"{task}/{metric}"] = values[0] if values else None
            if values and full.get((task, metric)):
                relative.append(values[0] / full[(task, metric)])
        row["relative_to_budget_1"] = sum(relative) / len(relative) if relative else None
        for key in ("kept_visual_tokens", "prefill_ms"):
            values = [c[key] for c in mine if c.get(key) is not None]
            row[key] = sum(values) / len(values) if values else None
        rows.append(row)
    output.mkdir(parents=True, exist_ok=True)
    if rows:
        with open(output / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        header = list(rows[0])
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(_cell_text(row[key]) for key in header) + " |" for row in rows]
        (output / "summary.md").write_text("\n".join(lines) + "\n")
        _plot(output, found, columns)
    return rows


def _cell_text(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(output: Path, found: list[dict], columns) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    tasks = sorted({task for task, _ in columns})
    _plot_against(plt, output / "accuracy.png", found, columns, tasks, lambda c: c["budget"],
                  "budget (fraction of visual tokens kept)")
    _plot_against(plt, output / "accuracy_prefill.png", found, columns, tasks, lambda c: c.get("prefill_ms"),
                  "prefill ms (mean per batch)")


def _plot_against(plt, path: Path, found: list[dict], columns, tasks, x_of, xlabel: str) -> None:
    """Each task's first metric against ``x_of(cell)`` (cells where it is None left out), a
    line per method through its budgets and the unpatched model's cell."""
    figure, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False, layout="constrained")
    for ax, task in zip(axes[0], tasks):
        metric = next(metric for t, metric in columns if t == task)
        mine = [c for c in found if c["task"] == task and x_of(c) is not None]
        full = [(x_of(c), c["metrics"].get(metric)) for c in mine if c["budget"] == 1.0]
        for method in sorted({c["method"] for c in found if c["budget"] < 1.0 and x_of(c) is not None}):
            points = sorted([(x_of(c), c["metrics"].get(metric)) for c in mine
                             if c["method"] == method and c["budget"] < 1.0] + full)
            ax.plot([x for x, _ in points], [v for _, v in points], marker="o", label=method)
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.legend(fontsize=8)
    figure.savefig(path, dpi=100)
    plt.close(figure)
