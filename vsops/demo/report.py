"""The demo's written results: ``results.json`` (every number), ``report.md`` (the pictures
with the tables behind them and the machine they were made on) and the terminal summary."""
from __future__ import annotations

import json
import os
import platform
import sys

import torch

__all__ = ["machine", "write_results", "write_report", "summary"]


def machine() -> dict:
    import transformers

    import vsops

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "vsops": vsops.__version__,
        "vsops_info": vsops.info(file=None),
    }


def write_results(path, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)


def _percent(value) -> str:
    return f"{100 * value:.1f}%"


def _accuracy_table(task: dict, budgets: list[float]) -> list[str]:
    """One task's accuracy per method and budget (``results["tasks"][name]``), the target-kept
    rate in brackets."""
    budgets = budgets + [1.0]
    lines = ["| method | " + " | ".join(f"{b:.0%} kept" for b in budgets) + " |", "|" + "---|" * (1 + len(budgets))]
    for method, by_budget in task["accuracy"].items():
        kept = task["target_kept"][method]
        cells = [f"{_percent(by_budget[str(b)])} ({_percent(kept[str(b)])})" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def _inside_note(results) -> list[str]:
    """What the rows of methods inside the language model mean, when there are some."""
    from vsops.methods import available

    inside = [name for name in next(iter(results["tasks"].values()))["accuracy"] if name in available("language")]
    if not inside:
        return []
    left_out = sorted(set(available("language")) - set(inside))
    note = (f"{', '.join(inside)} drop tokens inside the language model, before its layer 1 of 2: layer 0 sees every "
            "token, and the share kept is the last layer's. Layer 0 has already carried what the question needs to "
            "the text, so these rows answer well with the target dropped: in a model this shallow they measure what "
            "layer 0 did more than the selection.")
    if left_out:
        note += (f" Left out: {', '.join(left_out)}, whose kept share averaged over the layers cannot go as low as "
                 f"{min(results['settings']['budgets']):.0%} in 2 layers.")
    return [note, ""]


def write_report(path, results: dict) -> None:
    from vsops.demo import TASK_FILES

    s = results["settings"]
    lines = [
        "# vsops demo",
        "",
        f"{len(results['tasks'])} synthetic tasks, {s['eval_examples']} held-out boards each, one visual token per "
        f"cell; models {_sources(results)}; made in {results['seconds']['total']:.0f} s. Answer accuracy per method "
        "and budget, and in brackets how often the asked target's token was kept.",
        "",
    ]
    for name, task in results["tasks"].items():
        files = TASK_FILES[name]
        grid = task["task"]["grid"]
        lines += [f"## {files.title} (`{name}`, {grid}x{grid} cells)", "", files.shows, "",
                  f"![selection]({files.selection})", "", f"![accuracy]({files.accuracy})", "",
                  *_accuracy_table(task, s["budgets"]), ""]
    lines += _inside_note(results)
    if "prefill" in results:
        p = results["prefill"]
        lines += ["## Prefill", "", "![prefill](prefill.png)", "",
                  f"Vision tower alone: {p['vision_ms']:.1f} ms.", "",
                  "| model | L -> L' | prefill ms | speedup | ideal L/L' | bound with the vision tower | selector ms |",
                  "|---|---|---|---|---|---|---|"]
        base, vision = p["rows"][0]["ms"], p["vision_ms"]
        for r in p["rows"]:
            name = "unpatched" if r["budget"] is None else f"budget {r['budget']}"
            bound = base / (vision + (base - vision) * r["kept"] / r["tokens"])
            lines.append(f"| {name} | {r['tokens']} -> {r['kept']} | {r['ms']:.1f} | {base / r['ms']:.2f}x | "
                         f"{r['tokens'] / r['kept']:.2f}x | {bound:.2f}x | {r['selector_ms']:.2f} |")
        lines += ["", "The vision tower sees every patch at every budget: the whole prefill's bound is "
                  "`T / (T_vision + (T - T_vision) L'/L)`.", ""]
    if "kernels" in results:
        lines += ["## Operators", "", "![kernels](kernels.png)", "",
                  "| operator | case | baseline | speedup | share of bound |", "|---|---|---|---|---|"]
        for r in results["kernels"]:
            lines.append(f"| {r['operator']} | {r['case']} | {r['baseline']} | {r['speedup']:.1f}x | "
                         f"{_percent(r['share'])} ({r['bound']}) |")
        lines += ["", "A memory share above 100% means the case's bytes stayed in cache, where they move faster "
                  "than the copy that measures the bandwidth; `vsops bench` has the full-size tables.", ""]
    m = results["machine"]
    lines += ["## Machine and settings", "", f"- {m['platform']}, {m['cpus']} CPUs, {m['torch_threads']} torch threads",
              f"- python {m['python']}, torch {m['torch']}, transformers {m['transformers']}, vsops {m['vsops']}",
              f"- settings: `{json.dumps(s)}`", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def _sources(results) -> str:
    return " and ".join(sorted({task["model"]["source"] for task in results["tasks"].values()}))


def summary(results: dict, output_dir, file=sys.stdout) -> None:
    from vsops.demo import TASK_FILES

    for name, task in results["tasks"].items():
        print(f"\n{TASK_FILES[name].title} (`{name}`): accuracy on held-out boards (target kept):", file=file)
        for line in _accuracy_table(task, results["settings"]["budgets"]):
            print("  " + line, file=file)
    if "prefill" in results:
        rows = results["prefill"]["rows"]
        speedups = ", ".join(f"{r['budget']:.0%}: {rows[0]['ms'] / r['ms']:.2f}x" for r in rows[2:])
        print(f"\nPrefill speedup by budget: {speedups}", file=file)
    print(f"\nPictures, report.md and results.json in {os.path.abspath(output_dir)}", file=file)
