"""`vsops bench --op vllm` runs and reports fewer prompt tokens for a pruned row (its timings are
for docs/benchmarks.md, not checked here)."""
import io

import pytest

pytest.importorskip("vllm")

from vsops.benchmarks import vllm as bench  # noqa: E402


def test_the_table_has_the_unpruned_row_and_each_pruned_one(monkeypatch):
    monkeypatch.setattr(bench, "REQUESTS", 2)
    monkeypatch.setattr(bench, "NEW_TOKENS", 2)
    out = io.StringIO()
    rows = bench.summary(file=out, methods=("norm",), budgets=(0.5,))
    assert [(r.method, r.budget) for r in rows] == [("unpruned", 1.0), ("norm", 0.5)]
    assert rows[1].prompt_tokens < rows[0].prompt_tokens
    assert "| norm | 0.5 |" in out.getvalue()
