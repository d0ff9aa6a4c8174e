"""Benchmark tables as pictures: the markdown tables ``vsops bench`` prints, or a
pytest-benchmark JSON file (``--benchmark-json``), one PNG per table, one panel per numeric
column (matplotlib, Agg backend)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

__all__ = ["Table", "markdown_tables", "pytest_benchmark_table", "plot_table", "plot_tables"]

_NUMBER = re.compile(r"^[-+]?\d[\d,]*(\.\d+)?(e[-+]?\d+)?")


@dataclasses.dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]


def markdown_tables(text: str) -> list[Table]:
    """The ``| a | b |`` tables of ``text``, each titled by the last non-table line before it."""
    tables, title, current = [], "", None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if current is None:
                current = Table(title, cells, [])
                tables.append(current)
            elif not all(set(c) <= set("-: ") for c in cells):
                current.rows.append(cells)
        else:
            current = None
            if stripped:
                title = stripped
    return [t for t in tables if t.rows]


def pytest_benchmark_table(path) -> Table:
    """A pytest-benchmark JSON file as a table: each benchmark's median (ms) and its numeric
    ``extra_info`` (speedups, shares of a bound)."""
    data = json.loads(Path(path).read_text())
    benchmarks = data.get("benchmarks")
    if not isinstance(benchmarks, list) or not benchmarks:
        raise ValueError(f"{path} is not a pytest-benchmark JSON file with benchmarks")
    extras = sorted({k for b in benchmarks for k, v in b.get("extra_info", {}).items() if isinstance(v, (int, float))})
    rows = [[b["name"], f"{1e3 * b['stats']['median']:.4g}"] + [str(b.get("extra_info", {}).get(k, "")) for k in extras]
            for b in benchmarks]
    return Table(f"pytest-benchmark: {Path(path).name}", ["benchmark", "median ms", *extras], rows)


def _number(cell: str) -> float | None:
    match = _NUMBER.match(cell.replace("−", "-"))
    return float(match.group(0).replace(",", "")) if match else None


def plot_table(table: Table, path) -> bool:
    """Writes ``table`` as a PNG: one horizontal-bar panel per column whose cells are numbers
    (``12.3``, ``1.4x``, ``89%``), rows labelled by the other columns. False when no column is
    numeric (nothing written)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    numeric = [j for j in range(len(table.header))
               if all(_number(row[j]) is not None for row in table.rows if j < len(row) and row[j])
               and any(j < len(row) and row[j] for row in table.rows)]
    labels = [" ".join(row[j] for j in range(len(row)) if j not in numeric) for row in table.rows]
    if not numeric:
        return False
    columns = min(4, len(numeric))
    grid_rows = -(-len(numeric) // columns)
    height = max(2.5, 0.3 * len(labels) + 1.0)
    figure, axes = plt.subplots(grid_rows, columns, figsize=(3.4 * columns + 2.0, height * grid_rows), squeeze=False,
                                layout="constrained")
    panels = axes.reshape(-1)
    for n, (ax, j) in enumerate(zip(panels, numeric)):
        values = [(_number(row[j]) if j < len(row) and row[j] else 0.0) or 0.0 for row in table.rows]
        ax.barh(range(len(values)), values, color="tab:blue")
        ax.set_yticks(range(len(values)), labels if n % columns == 0 else [""] * len(values), fontsize=8)
        ax.invert_yaxis()
        ax.set_title(table.header[j], fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    for ax in panels[len(numeric):]:
        ax.axis("off")
    figure.suptitle(table.title[:120], fontsize=10)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def plot_tables(tables: list[Table], directory, prefix: str) -> list[Path]:
    """:func:`plot_table` for each table, as ``directory/prefix-<n>.png``; the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for n, table in enumerate(tables, 1):
        path = directory / f"{prefix}-{n}.png"
        if plot_table(table, path):
            written.append(path)
    return written
