"""The benchmark tables ``vsops bench`` prints and ``tests/bench/`` (pytest-benchmark) times: one
module per ``--op`` (:data:`OPS`), each with a ``summary`` that prints its tables and a
``cli_summary(args, dtype, by_name)`` the command calls; :mod:`.timing` holds the timing and
bandwidth helpers they share, :mod:`.plot` turns their tables (or pytest-benchmark's JSON) into
PNGs."""
from __future__ import annotations

import importlib

__all__ = ["OPS", "module"]

OPS = ("difftopk", "lis", "varlen", "methods", "prefill", "vllm")


def module(op: str):
    """The benchmark module of ``--op op``."""
    if op not in OPS:
        raise ValueError(f"unknown benchmark {op!r}; choose from {OPS}")
    return importlib.import_module(f"vsops.benchmarks.{op}")
