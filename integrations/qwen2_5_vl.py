"""VisionSelector inside Hugging Face's Qwen2.5-VL (transformers 4.52+ and 5.x).

    from vsops.integrations import apply_visionselector_to_qwen2_5_vl
    apply_visionselector_to_qwen2_5_vl(budget=0.2)            # classes: models created later
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(...)
    apply_visionselector_to_qwen2_5_vl(model, budget=0.2)     # or one instance
    model.visionselector.budget = 0.1                         # any time; or per call:
    model(**inputs, visionselector_budget=0.3)

The scorer lives at ``visual.importance_scorer`` of the vision tower, so the published
checkpoints' keys load unchanged. The patch is a set of forward hooks on the model: the
multimodal model tells the selector which tokens are visual, and the language model's inputs
go through :meth:`VisionSelector.language_model_inputs` (see :mod:`.selector`).
"""
from __future__ import annotations

import dataclasses
import inspect

import torch
from torch import nn

from vsops.integrations.selector import Selection, VisionSelector
from vsops.scorer import LearnableImportanceScorer
from vsops.varlen import select_and_pad

__all__ = ["apply_visionselector_to_qwen2_5_vl", "revert_visionselector", "is_visionselector_applied", "mm_token_type_ids"]

BUDGET_KEYWORD = "visionselector_budget"
_class_patch: dict = {}


def _classes():
    try:
        import transformers
        from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling
    except ImportError as e:  # pragma: no cover - exercised only without transformers
        raise ImportError("the Qwen2.5-VL integration needs transformers >= 4.52") from e
    from packaging.version import Version

    # 4.52 split the model into Qwen2_5_VLModel(visual, language_model), which the hooks target.
    if Version(transformers.__version__).release < (4, 52):
        raise ImportError(f"the Qwen2.5-VL integration needs transformers >= 4.52 (found {transformers.__version__})")
    return modeling.Qwen2_5_VLModel, modeling.Qwen2_5_VLForConditionalGeneration


def apply_visionselector_to_qwen2_5_vl(
    model: nn.Module | None = None,
    *,
    budget: float = 0.2,
    scope: str = "sample",
    proj_dim: int | None = None,
    packed: bool | None = None,
) -> VisionSelector | None:
    """Puts VisionSelector into Qwen2.5-VL.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` or ``Qwen2_5_VLModel`` to patch, or
            None to patch the transformers classes so that every model created afterwards
            (``from_pretrained`` included) carries the selector.
        budget: fraction of visual tokens kept, in (0, 1].
        scope: ``"sample"`` (one budget over all visual tokens of a sample, as the published
            checkpoints were trained) or ``"image"`` (one per image or video).
        proj_dim: the scorer's projection size (default: hidden size // 2, as published).
        packed: see :class:`VisionSelector`.

    Returns:
        The model's :class:`VisionSelector` (also ``model.visionselector``), or None for the
        class patch. Applying again to a patched model updates its settings.

    In eval mode the language model sees the kept tokens only (padded, or packed for varlen
    attention without a cache) at their original 3-D rope positions; in training mode every
    token stays and the visual ones are scaled by the soft mask, and the output carries
    ``constraint_loss``. Outputs carry ``visionselector`` (a :class:`Selection`).
    """
    inner_cls, top_cls = _classes()
    settings = dict(budget=budget, scope=scope, proj_dim=proj_dim, packed=packed)
    VisionSelector(None, budget=budget, scope=scope, packed=packed)  # validates the settings now
    if model is None:
        _patch_classes(inner_cls, top_cls, settings)
        return None
    if isinstance(model, top_cls):
        selector = _attach_inner(model.model, settings)
        _attach_top(model, selector)
        return selector
    if isinstance(model, inner_cls):
        return _attach_inner(model, settings)
    raise TypeError(
        f"model must be a Qwen2_5_VLForConditionalGeneration or Qwen2_5_VLModel, got {type(model).__name__}"
    )


def mm_token_type_ids(input_ids: torch.Tensor, image_token_id: int, video_token_id: int | None = None):
    """The ``mm_token_type_ids`` (int32 ``[B, L]``: 1 at image, 2 at video placeholders, 0
    elsewhere) for ``input_ids`` where the installed transformers' Qwen2.5-VL takes them
    (5.x); None where it does not (4.x)."""
    inner_cls, _ = _classes()
    if "mm_token_type_ids" not in inspect.signature(inner_cls.forward).parameters:
        return None
    kinds = torch.zeros_like(input_ids, dtype=torch.int32)
    kinds[input_ids == image_token_id] = 1
    if video_token_id is not None:
        kinds[input_ids == video_token_id] = 2
    return kinds


def is_visionselector_applied(model: nn.Module | None = None) -> bool:
    """Whether ``model`` (or, with None, the transformers classes) carries the selector."""
    if model is None:
        return bool(_class_patch)
    return isinstance(getattr(model, "visionselector", None), VisionSelector)


def revert_visionselector(model: nn.Module | None = None) -> None:
    """Undoes :func:`apply_visionselector_to_qwen2_5_vl`: removes the hooks, the scorer and
    ``model.visionselector`` from ``model``, or, with None, restores the transformers classes
    (models already created keep their patch)."""
    if model is None:
        for cls, init in _class_patch.items():
            cls.__init__ = init
        _class_patch.clear()
        return
    selector = getattr(model, "visionselector", None)
    if not isinstance(selector, VisionSelector):
        raise ValueError(f"{type(model).__name__} does not carry a VisionSelector")
    for handle in selector.hooks:
        handle.remove()
    selector.hooks.clear()
    inner = model.model if hasattr(model, "lm_head") else model
    del inner.visual.importance_scorer
    for module in (model, inner, inner.language_model):
        module.__dict__.pop("visionselector", None)


def _patch_classes(inner_cls, top_cls, settings) -> None:
    revert_visionselector(None)
    inner_init, top_init = inner_cls.__init__, top_cls.__init__

    def patched_inner_init(self, config, *args, **kwargs):
        inner_init(self, config, *args, **kwargs)
        _attach_inner(self, settings)

    def patched_top_init(self, config, *args, **kwargs):
        top_init(self, config, *args, **kwargs)
        _attach_top(self, self.model.visionselector)

    _class_patch[inner_cls], _class_patch[top_cls] = inner_init, top_init
    inner_cls.__init__, top_cls.__init__ = patched_inner_init, patched_top_init


def _attach_inner(inner: nn.Module, settings) -> VisionSelector:
    visual = inner.visual
    scorer = getattr(visual, "importance_scorer", None)
    proj_dim = settings["proj_dim"]
    if scorer is None:
        reference = visual.merger.mlp[-1].weight
        scorer = LearnableImportanceScorer(
            visual.config.out_hidden_size, proj_dim, device=reference.device, dtype=reference.dtype
        )
        visual.importance_scorer = scorer
    elif proj_dim is not None and scorer.proj_dim != proj_dim:
        raise ValueError(f"the model's scorer has proj_dim {scorer.proj_dim}, not {proj_dim}")
    selector = getattr(inner, "visionselector", None)
    if isinstance(selector, VisionSelector):
        selector.budget, selector.scope, selector.packed = settings["budget"], settings["scope"], settings["packed"]
        return selector
    selector = VisionSelector(scorer, budget=settings["budget"], scope=settings["scope"], packed=settings["packed"])
    selector.hooks = [
        inner.register_forward_pre_hook(_inner_pre_hook, with_kwargs=True),
        inner.register_forward_hook(_inner_post_hook),
        inner.language_model.register_forward_pre_hook(_language_model_pre_hook, with_kwargs=True),
    ]
    # Plain attributes, not submodules; the hooks find the selector through their module, so
    # that a deep copy of the model gets hooks bound to its own copy of the selector.
    inner.__dict__["visionselector"] = selector
    inner.language_model.__dict__["visionselector"] = selector
    return selector


def _attach_top(model: nn.Module, selector: VisionSelector) -> None:
    if model.__dict__.get("visionselector") is selector:
        return
    selector.hooks += [
        model.register_forward_pre_hook(_top_pre_hook, with_kwargs=True),
        model.register_forward_hook(_top_post_hook),
    ]
    model.__dict__["visionselector"] = selector


def _image_ids(inner, input_ids, image_grid_thw, video_grid_thw) -> torch.Tensor:
    """A distinct id per image and video at its placeholder tokens, -1 elsewhere: images and
    videos fill their placeholders in row-major order, as the model scatters them."""
    ids = torch.full_like(input_ids, -1)
    merge = inner.visual.spatial_merge_size
    offset = 0
    for name, token, grid in (
        ("image", inner.config.image_token_id, image_grid_thw),
        ("video", inner.config.video_token_id, video_grid_thw),
    ):
        where = input_ids == token
        if grid is None:
            continue
        per_item = grid.prod(-1) // merge**2
        item = torch.repeat_interleave(torch.arange(len(per_item), device=input_ids.device) + offset, per_item.to(input_ids.device))
        if item.numel() != int(where.sum()):
            raise ValueError(f"{name}_grid_thw describes {item.numel()} tokens but input_ids has {int(where.sum())}")
        ids[where] = item
        offset += len(per_item)
    return ids


def _inner_pre_hook(inner, args, kwargs):
    selector: VisionSelector = inner.visionselector
    budget = kwargs.pop(BUDGET_KEYWORD, None)
    if budget is None:
        budget = selector.__dict__.pop("_pending_budget", None)
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    has_visual = any(
        kwargs.get(name) is not None for name in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")
    )
    if not has_visual:
        selector.begin_call(None, None, None)
        return args, kwargs
    if input_ids is None:
        raise ValueError("VisionSelector finds the visual tokens in input_ids: pass input_ids, not inputs_embeds")
    config = inner.config
    attention_mask = kwargs.get("attention_mask")
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        raise ValueError("VisionSelector needs a 2-D attention_mask [B, L] (or None)")
    visual = (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
    if attention_mask is not None:
        visual &= attention_mask.bool()
    image_ids = None
    if selector.scope == "image":
        image_ids = _image_ids(inner, input_ids, kwargs.get("image_grid_thw"), kwargs.get("video_grid_thw"))
    selector.begin_call(visual, image_ids, attention_mask, budget=budget, training=inner.training)
    return args, kwargs


def _inner_post_hook(inner, args, output):
    return _attach(output, inner.visionselector.end_call())


def _language_model_pre_hook(language_model, args, kwargs):
    if args:
        raise TypeError("the VisionSelector patch expects the language model to be called with keywords")
    return args, language_model.visionselector.language_model_inputs(kwargs, language_model.config)


def _top_pre_hook(model, args, kwargs):
    selector: VisionSelector = model.visionselector
    budget = kwargs.pop(BUDGET_KEYWORD, None)
    if budget is not None:
        selector.__dict__["_pending_budget"] = budget
    labels = kwargs.get("labels")
    # Pruned logits no longer line up with the labels: the loss is computed after the forward
    # on the labels of the kept tokens.
    if labels is not None and not model.training:
        if kwargs.get("return_dict") is False:
            raise ValueError("with labels in eval mode the VisionSelector patch needs return_dict=True")
        selector.__dict__["_pending_labels"] = kwargs.pop("labels")
    return args, kwargs


def _top_post_hook(model, args, output):
    selector: VisionSelector = model.visionselector
    selection = selector.last
    labels = selector.__dict__.pop("_pending_labels", None)
    if labels is not None and hasattr(output, "logits"):
        loss = _causal_lm_loss(model, output.logits, labels, selection)
        output = type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
    return _attach(output, selection)


def _attach(output, selection: Selection | None):
    """``output`` as an instance of its class extended with the fields ``visionselector`` and
    ``constraint_loss``: a plain extra key would not survive the output's pytree round trip
    (DistributedDataParallel and torch.compile rebuild outputs from their class's fields)."""
    if selection is None or not hasattr(output, "keys"):
        return output
    return _output_class(type(output))(
        **output, visionselector=selection, constraint_loss=selection.constraint_loss
    )


def _output_class(cls):
    if "visionselector" in getattr(cls, "__dataclass_fields__", {}):
        return cls
    name = cls.__name__ + "WithVisionSelector"
    extended = globals().get(name)
    if extended is None:
        extended = dataclasses.make_dataclass(
            name,
            [("visionselector", Selection | None, None), ("constraint_loss", torch.Tensor | None, None)],
            bases=(cls,),
            namespace={"__module__": __name__},
        )
        globals()[name] = extended  # importable by name, so outputs pickle
    return extended


def _causal_lm_loss(model, logits, labels, selection: Selection | None) -> torch.Tensor:
    vocab = model.config.text_config.vocab_size
    if selection is None or selection.keep is None:
        return model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
    # Each kept token predicts the next kept token of its own sample: never across a sample
    # boundary (packed) nor from a padding slot (padded).
    if selection.cu_seqlens is None:
        padded = select_and_pad(selection.keep, labels, pad_values=-100, counts=selection.lengths)
        kept, real = padded.tensors[0], padded.attention_mask.bool()
        shift = torch.cat([kept[:, 1:], kept.new_full((kept.shape[0], 1), -100)], dim=1).masked_fill(~real, -100)
    else:
        kept = labels[selection.keep]
        shift = torch.cat([kept[1:], kept.new_full((1,), -100)])
        shift[selection.cu_seqlens[1:].long() - 1] = -100
        shift = shift.unsqueeze(0)
    return model.loss_function(logits=logits, labels=None, shift_labels=shift, vocab_size=vocab)
