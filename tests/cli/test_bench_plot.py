"""Benchmark tables as PNGs: the markdown tables ``vsops bench`` prints and pytest-benchmark's
JSON, through the module and the command (bad input exits 2 naming the option)."""
import json
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")

from vsops import benchmarks  # noqa: E402
from vsops.benchmarks.plot import markdown_tables, plot_table, pytest_benchmark_table  # noqa: E402

PRINTED = """Selection methods, one image
| method | N = 1024 | share |
|---|---|---|
| visionselector | 2.21 | 0.01% |
| divprune | 21.92 | 1.4x |

Second table
| N | k | name |
|---|---|---|
| 1024 | 102 | a |
"""


def test_markdown_tables_are_parsed_with_their_titles():
    tables = markdown_tables(PRINTED)
    assert [t.title for t in tables] == ["Selection methods, one image", "Second table"]
    assert tables[0].header == ["method", "N = 1024", "share"]
    assert tables[0].rows == [["visionselector", "2.21", "0.01%"], ["divprune", "21.92", "1.4x"]]


def test_a_table_becomes_a_png_with_one_panel_per_numeric_column(tmp_path):
    path = tmp_path / "t.png"
    assert plot_table(markdown_tables(PRINTED)[0], path)
    image = PIL.open(path)
    assert image.format == "PNG" and image.size[0] > 400
    low, high = image.convert("L").getextrema()
    assert high - low > 100
    words = markdown_tables("T\n| a | b |\n|---|---|\n| x | y |\n")[0]
    assert not plot_table(words, tmp_path / "none.png") and not (tmp_path / "none.png").exists()


def pytest_json(path):
    path.write_text(json.dumps({"benchmarks": [
        {"name": "test_x[1024]", "stats": {"median": 0.002}, "extra_info": {"speedup": 3.5, "note": "text"}},
        {"name": "test_x[4096]", "stats": {"median": 0.010}, "extra_info": {"speedup": 5.0}},
    ]}))
    return path


def test_pytest_benchmark_json_is_a_table(tmp_path):
    table = pytest_benchmark_table(pytest_json(tmp_path / "b.json"))
    assert table.header == ["benchmark", "median ms", "speedup"]
    assert table.rows == [["test_x[1024]", "2", "3.5"], ["test_x[4096]", "10", "5.0"]]


def run_cli(*argv):
    return subprocess.run([sys.executable, "-m", "vsops.cli", "bench", *argv], capture_output=True, text=True)


def test_the_command_plots_a_json_file(tmp_path):
    done = run_cli("--plot", str(tmp_path / "plots"), "--from-json", str(pytest_json(tmp_path / "b.json")))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "plots" / "pytest-benchmark-1.png").exists()


@pytest.mark.parametrize("argv, option", [(["--from-json", "x.json"], "--from-json"),
                                          (["--plot", "p", "--from-json", "missing.json"], "--from-json"),
                                          (["--op", "nothing"], "--op")])
def test_bad_plot_options_exit_2(argv, option, tmp_path):
    done = run_cli(*argv)
    assert done.returncode == 2 and option in done.stderr


def test_every_op_is_a_module_with_a_command_summary():
    for op in benchmarks.OPS:
        assert callable(benchmarks.module(op).cli_summary)
    with pytest.raises(ValueError, match="unknown benchmark"):
        benchmarks.module("nothing")
