"""Training the VisionSelector scorer end to end with the backbone frozen (paper Sections 3.4,
4.2): the λ_t curriculum, the composite loss, a loop that runs in one process, under
``torchrun`` (DDP) or DeepSpeed, checkpoints with the published scorer keys, a synthetic task
on which selection decides the answer, and evaluation of every selection method
(:mod:`vsops.methods`).

The command-line entry point is ``vsops train`` (:mod:`vsops.training.run`). Needs
``transformers`` and ``safetensors`` (the ``train`` extra).
"""
from vsops.training.checkpoint import load_scorer, save_scorer
from vsops.training.data import Example, collate
from vsops.training.distributed import Topology, init_topology
from vsops.training.loop import TrainConfig, train
from vsops.training.objective import composite_loss, mask_statistics
from vsops.training.schedule import constraint_weight, cosine_with_warmup
from vsops.training.synthetic import SyntheticTask

__all__ = [
    "TrainConfig",
    "train",
    "constraint_weight",
    "cosine_with_warmup",
    "composite_loss",
    "mask_statistics",
    "Example",
    "collate",
    "Topology",
    "init_topology",
    "save_scorer",
    "load_scorer",
    "SyntheticTask",
]
