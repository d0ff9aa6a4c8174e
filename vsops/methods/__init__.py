"""Selection methods behind one protocol (kvpress's presses are the model): the learned
VisionSelector scorer and the training-free selectors it is compared against.

    import vsops.methods
    vsops.methods.available()                       # ['visionselector', 'divprune', ...]
    keep = vsops.methods.divprune(x, 64)            # x [N, D] -> bool [N], 64 True
    keep = vsops.methods.norm(x, k, cu_seqlens=cu)  # packed segments, one k each
    chosen = vsops.methods.visionzip(x, k, received, keys)  # .keep, .embeds (merged tokens)

In a model: ``apply_visionselector(model, method="divprune", budget=0.1)``, or
``model.visionselector.using(method="random")``.
"""
from vsops.methods.base import (
    check_selected,
    VISION_ATTENTION,
    VISUAL_TOKENS,
    ScoringMethod,
    Selected,
    SelectionMethod,
    VisionAttention,
    merge_rows,
)
from vsops.methods.divprune import DivPruneMethod, divprune
from vsops.methods.dart import dart
from vsops.methods.fastv import causal_attention_received, fastv
from vsops.methods.pdrop import pdrop, pdrop_layers, pdrop_ratio
from vsops.methods.layer import DARTMethod, FastVMethod, LayerMethod, LayerState, PDropMethod, Stages
from vsops.methods.registry import available, make_method, method_class, register_method
from vsops.methods.scoring import (
    MeanAttentionMethod,
    NormMethod,
    RandomMethod,
    VisionSelectorMethod,
    mean_attention,
    norm,
    random,
)
from vsops.methods.visionzip import VisionZipMethod, visionzip
from vsops.methods.holov import HoloVMethod, holov
from vsops.methods.prumerge import PruMergePlusMethod, prumerge_plus

__all__ = [
    "available",
    "make_method",
    "method_class",
    "register_method",
    "SelectionMethod",
    "ScoringMethod",
    "Selected",
    "merge_rows",
    "check_selected",
    "fastv",
    "causal_attention_received",
    "dart",
    "pdrop",
    "pdrop_layers",
    "pdrop_ratio",
    "LayerMethod",
    "LayerState",
    "FastVMethod",
    "PDropMethod",
    "DARTMethod",
    "Stages",
    "VisionAttention",
    "VISUAL_TOKENS",
    "VISION_ATTENTION",
    "VisionSelectorMethod",
    "RandomMethod",
    "NormMethod",
    "MeanAttentionMethod",
    "DivPruneMethod",
    "VisionZipMethod",
    "random",
    "norm",
    "mean_attention",
    "divprune",
    "visionzip",
    "HoloVMethod",
    "PruMergePlusMethod",
    "holov",
    "prumerge_plus",
]
