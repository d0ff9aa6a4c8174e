"""What lmms-eval loads from the ``lmms_eval.models`` entry point: the ``vsops`` model, and
vsops' tasks added to every lmms-eval task manager (lmms-eval has no entry point for tasks, so
``--tasks vsops_synthetic`` works without ``--include_path``)."""
from __future__ import annotations

import warnings

from vsops.eval import TASKS_DIR

__all__ = ["manifests", "add_tasks"]


def manifests():
    """The ``vsops`` model's manifest. An exception here would make lmms-eval drop every
    plugin's models, so a failure to add the tasks is a warning."""
    from lmms_eval.models.registry_v2 import ModelManifest

    try:
        add_tasks()
    except Exception as error:  # noqa: BLE001 - see the docstring
        warnings.warn(f"vsops could not add its lmms-eval tasks ({error}); pass --include_path {TASKS_DIR}")
    return [ModelManifest(model_id="vsops", simple_class_path="vsops.eval.model.VsopsModel")]


def add_tasks() -> None:
    """Makes every lmms-eval ``TaskManager`` also read :data:`~vsops.eval.TASKS_DIR`."""
    from lmms_eval.tasks import TaskManager

    initialize = TaskManager.initialize_tasks
    if getattr(initialize, "adds_vsops_tasks", False):
        return

    def initialize_tasks(self, include_path=None, include_defaults=True):
        paths = [] if include_path is None else [include_path] if isinstance(include_path, str) else list(include_path)
        if str(TASKS_DIR) not in map(str, paths):
            paths.append(str(TASKS_DIR))
        return initialize(self, include_path=paths, include_defaults=include_defaults)

    initialize_tasks.adds_vsops_tasks = True
    TaskManager.initialize_tasks = initialize_tasks
