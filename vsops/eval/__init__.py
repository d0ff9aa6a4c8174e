"""Evaluation through lmms-eval: the ``vsops`` model (:mod:`vsops.eval.model`), the
``vsops_synthetic`` and ``vsops_synthetic_marked`` tasks (the demo's boards,
:mod:`vsops.eval.synthetic`) and ``vsops eval``,
a grid of method x budget x task (:mod:`vsops.eval.grid`).

Importing this package imports neither lmms-eval nor transformers.
"""
from pathlib import Path

__all__ = ["TASKS_DIR"]

TASKS_DIR = Path(__file__).parent / "tasks"  # lmms-eval task YAMLs shipped with vsops
