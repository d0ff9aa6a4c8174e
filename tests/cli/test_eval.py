"""Evaluation through lmms-eval (vsops.eval): lmms-eval's own CLI runs the ``vsops`` model on
``vsops_synthetic`` with the shipped demo model; ``vsops eval`` runs a grid whose accuracies are
the demo's on the same boards (both synthetic variants, each with its shipped model), resumes without running a complete cell again, and summarizes
its cells; bad arguments are clear errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("lmms_eval")

from vsops.budget import budget_to_k  # noqa: E402
from vsops.demo.model import SHIPPED, SHIPPED_MODELS  # noqa: E402
from vsops.eval import grid  # noqa: E402
from vsops.eval.synthetic import rows, task_of  # noqa: E402

OFFLINE = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
LIMIT = 32
# Each shipped synthetic model with the lmms-eval task of its variant.
SYNTHETIC_TASKS = {"synthetic": "vsops_synthetic", "synthetic-marked": "vsops_synthetic_marked"}


def test_lmms_eval_runs_the_vsops_model_on_the_synthetic_task(tmp_path):
    args = [sys.executable, "-m", "lmms_eval", "--model", "vsops", "--model_args",
            f"pretrained={SHIPPED},method=visionselector,budget=0.1", "--tasks", "vsops_synthetic", "--limit", "8",
            "--batch_size", "4", "--output_path", str(tmp_path), "--log_samples"]
    done = subprocess.run(args, env=OFFLINE, capture_output=True, text=True, timeout=600)
    # lmms-eval exits 0 even when the evaluation fails: the files say whether it ran.
    results = list(tmp_path.rglob("*_results.json"))
    assert done.returncode == 0 and results, done.stdout[-2000:] + done.stderr[-4000:]
    metrics = json.loads(results[0].read_text())["results"]["vsops_synthetic"]
    samples = [json.loads(line) for line in next(tmp_path.rglob("*_samples_vsops_synthetic.jsonl")).open()]
    assert len(samples) == 8 and metrics["accuracy,none"] == sum(s["accuracy"] for s in samples) / 8
    for sample in samples:
        assert sample["vsops"]["visual_tokens"] == 36
        assert sample["vsops"]["kept_visual_tokens"] == budget_to_k(36, 0.1)
        assert sample["vsops"]["prefill_ms"] > 0


@pytest.fixture(scope="module", params=sorted(SYNTHETIC_TASKS))
def first_grid(request, tmp_path_factory):
    """``(output, cells, variant)`` of a grid on one variant's task with its shipped model."""
    output = tmp_path_factory.mktemp("grid")
    found = grid.run_grid(str(SHIPPED_MODELS[request.param]), [SYNTHETIC_TASKS[request.param]],
                          ["visionselector", "divprune"], [0.1, 1.0], output, limit=LIMIT, batch_size=16, progress=False)
    return output, found, request.param


def test_the_grid_gives_the_demos_accuracy_on_the_same_boards(first_grid):
    from vsops.demo.model import load
    from vsops.training.evaluate import answer_metrics
    from vsops.training.run import HELD_OUT_INDEX

    output, found, variant = first_grid
    assert sorted(c["method"] + str(c["budget"]) for c in found) == ["divprune0.1", "visionselector0.1",
                                                                     "visionselector1.0"]
    task, model = task_of(SHIPPED_MODELS[variant]), load(SHIPPED_MODELS[variant])
    examples = [task[HELD_OUT_INDEX + i] for i in range(LIMIT)]
    for cell in found:
        with model.visionselector.using(method=cell["method"]):
            demo = answer_metrics(model, examples, list(task.answer_tokens), budget=cell["budget"])
        assert cell["metrics"]["accuracy"] == demo["accuracy"], cell
        assert cell["samples"] == LIMIT
        assert cell["kept_visual_tokens"] == (36 if cell["budget"] == 1.0 else budget_to_k(36, cell["budget"]))
        directory = output / grid.Cell(cell["task"], str(SHIPPED_MODELS[variant]), cell["method"], cell["budget"]).name
        assert json.loads((directory / grid.CONFIG_FILE).read_text())["limit"] == LIMIT
        assert sum(1 for _ in (directory / grid.SAMPLES_FILE).open()) == LIMIT


def test_the_summary_holds_each_cells_metrics(first_grid):
    output, found, variant = first_grid
    column = f"{SYNTHETIC_TASKS[variant]}/accuracy"
    lines = (output / "summary.csv").read_text().splitlines()
    header, rows_ = lines[0].split(","), [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    assert header[:3] == ["method", "budget", column]
    full = next(c for c in found if c["budget"] == 1.0)["metrics"]["accuracy"]
    for cell in found:
        method = "unpatched" if cell["budget"] == 1.0 else cell["method"]
        row = next(r for r in rows_ if r["method"] == method and float(r["budget"]) == cell["budget"])
        assert float(row[column]) == cell["metrics"]["accuracy"]
        assert float(row["relative_to_budget_1"]) == pytest.approx(cell["metrics"]["accuracy"] / full)
    for picture in ("accuracy.png", "accuracy_prefill.png"):
        assert (output / picture).stat().st_size > 1000
    assert (output / "summary.md").is_file()


def test_a_second_run_skips_the_complete_cells(first_grid, monkeypatch):
    import lmms_eval.evaluator

    output, found, variant = first_grid

    def fail(**kwargs):
        raise AssertionError("a complete cell ran again")

    monkeypatch.setattr(lmms_eval.evaluator, "simple_evaluate", fail)
    again = grid.run_grid(str(SHIPPED_MODELS[variant]), [SYNTHETIC_TASKS[variant]], ["visionselector", "divprune"],
                          [0.1, 1.0], output, limit=LIMIT, batch_size=16, progress=False)
    assert again == found


def test_bad_arguments_are_clear_errors(tmp_path):
    from vsops.eval.model import VsopsModel

    with pytest.raises(ValueError, match="unknown lmms-eval tasks \\['no_such_task'\\]"):
        grid.run_grid(str(SHIPPED), ["no_such_task"], ["random"], [0.5], tmp_path, limit=2, progress=False)
    with pytest.raises(ValueError, match="unknown selection method 'sparsevlm'"):
        grid.cells(str(SHIPPED), ["vsops_synthetic"], ["sparsevlm"], [0.5])
    with pytest.raises(ValueError, match="budgets"):
        grid.cells(str(SHIPPED), ["vsops_synthetic"], ["random"], [1.5])
    with pytest.raises(ValueError, match="unknown vsops model_args \\['colour'\\]"):
        VsopsModel(str(SHIPPED), colour="red")
    with pytest.raises(ValueError, match="pretrained must be a model directory"):
        VsopsModel(str(tmp_path / "missing"))
    cli = [sys.executable, "-m", "vsops.cli", "eval", "--model", str(SHIPPED), "--tasks", "vsops_synthetic",
           "--output-dir", str(tmp_path)]
    for extra, message in ((["--budgets", "0,0.5"], "--budgets"), (["--methods", "sparsevlm"], "--methods"),
                           (["--tasks", "no_such_task"], "unknown lmms-eval tasks")):
        done = subprocess.run(cli + extra, env=OFFLINE, capture_output=True, text=True, timeout=600)
        assert done.returncode == 2 and message in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("variant, data", [("synthetic", "test.jsonl"), ("synthetic-marked", "test_marked.jsonl")])
def test_the_shipped_rows_are_the_demos_held_out_boards(variant, data):
    shipped = Path(grid.__file__).parent / "tasks" / "vsops_synthetic" / "data" / data
    assert [json.loads(line) for line in shipped.open()] == rows(task_of(SHIPPED_MODELS[variant]))


def test_the_documented_commands_dry_run(tmp_path, capsys):
    import inspect
    import shlex

    from vsops.cli import main
    from vsops.eval.model import VsopsModel

    text = (Path(__file__).parents[2] / "docs" / "eval.md").read_text()
    grids = [shlex.split(line) for line in text.splitlines() if line.startswith("vsops eval ")]
    assert len(grids) == 4
    for argv in grids:
        argv = argv[1:]
        argv[argv.index("--output-dir") + 1] = str(tmp_path / "grid")
        assert main(argv + ["--dry-run", "--no-progress"]) == 0
        listed = capsys.readouterr().out.split()
        values = {name: argv[argv.index(name) + 1].split(",") for name in ("--tasks", "--methods", "--budgets")}
        pruned = [b for b in values["--budgets"] if float(b) < 1]
        assert len(listed) == len(values["--tasks"]) * (len(values["--methods"]) * len(pruned) + 1)
    known = set(inspect.signature(VsopsModel).parameters)
    for line in text.splitlines():
        if line.startswith("lmms-eval --"):
            args = shlex.split(line)
            keys = {pair.split("=")[0] for pair in args[args.index("--model_args") + 1].split(",")}
            assert args[args.index("--model") + 1] == "vsops" and keys <= known, keys - known
