"""The demo's models: per synthetic task, the tiny Qwen2.5-VL backbone and trained scorer
shipped with the package (made by ``vsops train --task NAME`` with its defaults, in
``vsops/demo/model/`` and ``vsops/demo/model_marked/``), or the same trained again from scratch."""
from __future__ import annotations

import argparse
import json
from pathlib import Path


__all__ = ["SHIPPED", "SHIPPED_MODELS", "load", "retrain", "shipped_metrics"]

# Each named task of ``vsops train`` (vsops.training.synthetic.NAMED_TASKS) with its shipped model.
SHIPPED_MODELS = {"synthetic": Path(__file__).parent / "model", "synthetic-marked": Path(__file__).parent / "model_marked"}
SHIPPED = SHIPPED_MODELS["synthetic"]


def shipped_metrics(model_dir: Path = SHIPPED) -> dict:
    """The ``metrics.json`` of the training run that made ``model_dir``."""
    return json.loads((Path(model_dir) / "metrics.json").read_text())


def load(model_dir: Path = SHIPPED, device="cpu"):
    """The backbone of ``model_dir`` patched with VisionSelector and its trained scorer, in eval
    mode."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    from vsops.integrations.testing import tiny_qwen2_5_vl_config
    from vsops.training.checkpoint import load_scorer

    # The config from the code that made the backbone, not the saved file: transformers 4.x
    # cannot read the rope settings 5.x writes.
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(Path(model_dir) / "backbone",
                                                               config=tiny_qwen2_5_vl_config()).to(device)
    apply_visionselector_to_qwen2_5_vl(model)
    load_scorer(str(Path(model_dir) / "scorer.safetensors"), model.visionselector.scorer)
    return model.eval()


def retrain(output_dir: Path, *, task: str = "synthetic", progress: bool = True) -> Path:
    """Trains the backbone and the scorer from scratch into ``output_dir`` with the code and
    defaults of ``vsops train --task TASK`` (its own evaluation left to the demo); returns the
    directory, laid out as :data:`SHIPPED`."""
    from vsops.training.run import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--task", task, "--output-dir", str(output_dir), "--eval-examples", "0", "--device", "cpu"]
    run(parser.parse_args(argv + ([] if progress else ["--no-progress"])))
    return Path(output_dir)
