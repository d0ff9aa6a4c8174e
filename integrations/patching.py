"""Putting the VisionSelector runtime into a model through its adapter: forward hooks, the
scorer attribute, class patches, revert; the same for every registered model.

The multimodal model's pre-hook tells the selector which tokens are visual (from the adapter's
placeholders and grids); the language model's pre-hook routes its inputs through
:meth:`~vsops.integrations.runtime.VisionSelector.language_model_inputs`; the
conditional-generation model's hooks move the loss onto the kept tokens and add the
``visionselector`` and ``constraint_loss`` output fields (:mod:`.outputs`).
"""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn

from vsops.budget import check_budget
from vsops.integrations import conventions
from vsops.integrations.adapter import ModelAdapter, adapter_for
from vsops.integrations.outputs import attach_selection, causal_lm_loss, replaced, router_balance_loss, routes_experts
from vsops.integrations.runtime import VisionSelector
from vsops.integrations.layer_drops import PrefillDrops, register_capture
from vsops.integrations.layer_drops import unavailable_reason as layer_drops_unavailable
from vsops.integrations.static_cache import GenerateMasks, prefill_padding
from vsops.integrations.vision_attention import VisionAttentionCapture
from vsops.methods import VISION_ATTENTION
from vsops.scorer import LearnableImportanceScorer

__all__ = ["apply_visionselector", "revert_visionselector", "is_visionselector_applied", "image_ids", "named_entry_point"]

BUDGET_KEYWORD = "visionselector_budget"
SCORER_ATTRIBUTE = "importance_scorer"  # on the vision tower: the published checkpoints' key
_class_patch: dict = {}

# The hooks run eagerly inside a compiled forward (torch.compile of the model, or generate's
# compiled decode step): what they read (the selector's budget, the cache's record, host
# counts) would otherwise become guards, and each budget or prompt a recompilation.
_opaque_to_compile = torch.compiler.disable


def apply_visionselector(
    model: nn.Module | None = None,
    *,
    model_type: str | None = None,
    budget: float = 0.2,
    scope: str = "sample",
    proj_dim: int | None = None,
    packed: bool | None = None,
    method=None,
) -> VisionSelector | None:
    """Puts VisionSelector into ``model``, whichever registered model family it is.

    Args:
        model: a conditional-generation model (e.g. ``Qwen2_5_VLForConditionalGeneration``) or
            its multimodal model (``model.model``) to patch; or None to patch the transformers
            classes of ``model_type`` so that every model created afterwards carries the
            selector (not possible for remote code, whose classes come with the checkpoint).
        model_type: with ``model=None``, the ``config.model_type`` (or adapter name) whose
            classes to patch; with a model, if given, it must match the model's.
        budget: fraction of visual tokens kept, in (0, 1].
        scope: ``"sample"`` (one budget over all visual tokens of a sample, as the published
            checkpoints were trained) or ``"image"`` (one per image or video).
        proj_dim: the scorer's projection size (default: hidden size // 2, as published).
        packed: see :class:`~vsops.integrations.runtime.VisionSelector`.
        method: the selection method, a name of :func:`vsops.methods.available` or a
            :class:`~vsops.methods.SelectionMethod`; None: the learned scorer
            (``"visionselector"``). The scorer is attached whichever method selects, so that
            the model's keys stay those of the checkpoints.

    Returns:
        The model's :class:`~vsops.integrations.runtime.VisionSelector` (also
        ``model.visionselector``), or None for the class patch. Applying again to a patched
        model updates its settings.

    In eval mode the language model sees the kept tokens only (padded, or packed for varlen
    attention without a cache) at their original rope positions; in training mode every token
    stays and the visual ones are scaled by the soft mask, and the output carries
    ``constraint_loss``. Outputs carry ``visionselector`` (a
    :class:`~vsops.integrations.runtime.Selection`).
    """
    settings = Settings(budget=budget, scope=scope, proj_dim=proj_dim, packed=packed, method=method)
    if model is None:
        if model_type is None:
            raise ValueError("give the model to patch, or model_type to patch its classes")
        adapter = adapter_for(model_type)
        _patch_classes(adapter, settings)
        return None
    adapter = _adapter_of(model, model_type)
    return attach(adapter, model, settings)


def named_entry_point(adapter: ModelAdapter, doc: str):
    """``apply_visionselector_to_<adapter.name>`` (Liger-Kernel's convention): the arguments of
    :func:`apply_visionselector`, for this adapter's models only (a TypeError naming its classes
    for any other module), or with None for its transformers classes. ``doc`` is its docstring."""

    def entry_point(
        model: nn.Module | None = None,
        *,
        budget: float = 0.2,
        scope: str = "sample",
        proj_dim: int | None = None,
        packed: bool | None = None,
        method=None,
    ) -> VisionSelector | None:
        if model is not None:
            adapter.split(model)
        return apply_visionselector(model, model_type=adapter.name, budget=budget, scope=scope, proj_dim=proj_dim,
                                    packed=packed, method=method)

    entry_point.__name__ = entry_point.__qualname__ = f"apply_visionselector_to_{adapter.name}"
    entry_point.__module__ = type(adapter).__module__
    entry_point.__doc__ = doc
    return entry_point


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`apply_visionselector` sets on a model (or on every model a class patch
    builds), checked when made: a bad value is refused before any model is touched."""

    budget: float = 0.2
    scope: str = "sample"
    proj_dim: int | None = None
    packed: bool | None = None
    method: object = None

    def __post_init__(self):
        self.update(VisionSelector(None))  # the selector's own checks

    def update(self, selector: VisionSelector) -> VisionSelector:
        """``selector`` with these settings (all but ``proj_dim``, the scorer's)."""
        selector.budget, selector.scope, selector.packed = self.budget, self.scope, self.packed
        selector.method = self.method
        return selector


def attach(adapter: ModelAdapter, model: nn.Module, settings: Settings) -> VisionSelector:
    """:func:`apply_visionselector` on an instance whose adapter is known."""
    top, inner = adapter.split(model)
    selector = _attach_inner(adapter, inner, settings)
    if top is not None:
        _attach_top(top, selector)
    return selector


def is_visionselector_applied(model: nn.Module | None = None) -> bool:
    """Whether ``model`` (or, with None, any transformers class) carries the selector."""
    if model is None:
        return bool(_class_patch)
    selector = getattr(model, "visionselector", None)
    # A selector without hooks was reverted through the multimodal model inside this one.
    return isinstance(selector, VisionSelector) and bool(selector.hooks)


def revert_visionselector(model: nn.Module | None = None) -> None:
    """Undoes :func:`apply_visionselector`: removes the hooks, the scorer and
    ``model.visionselector`` from ``model``, or, with None, restores every patched
    transformers class (models already created keep their patch)."""
    if model is None:
        for cls, init in _class_patch.items():
            cls.__init__ = init
        _class_patch.clear()
        return
    selector = getattr(model, "visionselector", None)
    if not isinstance(selector, VisionSelector):
        raise ValueError(f"{type(model).__name__} does not carry a VisionSelector")
    adapter = _adapter_of(model, None)
    if not selector.hooks:
        # Reverted already, through the multimodal model inside this one: only the attribute is left.
        model.__dict__.pop("visionselector", None)
        return
    for handle in selector.hooks:
        handle.remove()
    selector.hooks.clear()
    top, inner = adapter.split(model)
    tower = adapter.vision_tower(inner)
    if hasattr(tower, SCORER_ATTRIBUTE):
        delattr(tower, SCORER_ATTRIBUTE)
    _weights_owner(tower, inner).__dict__.pop("_init_weights", None)
    language_model = adapter.language_model(inner)
    for module in (top, inner, language_model, *language_model.layers):
        if module is not None:
            module.__dict__.pop("visionselector", None)
            module.__dict__.pop(conventions.MASK_MAKER, None)
    language_model.__dict__.pop(_DEEPSTACK, None)
    selector.generate_masks = None
    selector.layer_hooks = False


def placeholder_kinds(adapter: ModelAdapter, inner: nn.Module, kwargs: dict) -> torch.Tensor | None:
    """int64 ``[B, L]``: the kind of visual placeholder of each token of the call (its index in
    ``adapter.placeholders``), -1 for text; found in ``input_ids``, or, as transformers finds
    them, in ``inputs_embeds`` where a row equals the placeholder token's embedding. None when
    the call passes neither."""
    input_ids = kwargs.get(conventions.INPUT_IDS)
    embeds = kwargs.get(conventions.INPUTS_EMBEDS)
    tokens = [token for token, _ in adapter.placeholders(inner.config).values()]
    if input_ids is not None:
        kinds = torch.full_like(input_ids, -1, dtype=torch.long)
        for index, token in enumerate(tokens):
            kinds[input_ids == token] = index
        return kinds
    if embeds is None:
        return None
    table = inner.get_input_embeddings()
    kinds = torch.full(embeds.shape[:2], -1, dtype=torch.long, device=embeds.device)
    for index, token in enumerate(tokens):
        row = table(torch.tensor(token, device=table.weight.device)).to(embeds.device, embeds.dtype)
        kinds[(embeds == row).all(-1)] = index
    return kinds


def image_ids(adapter: ModelAdapter, inner: nn.Module, kinds: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, int]:
    """The image or video of each visual token, numbered over the batch in order of appearance
    (int64 ``[B, L]``, -1 elsewhere), and the number of images and videos; ``kinds`` from
    :func:`placeholder_kinds`.

    Each kind's features fill its placeholders in row-major order, as the models scatter them.
    An item's placeholders may be split by text (Qwen3-VL writes a timestamp before each video
    frame) but not by another item's.
    """
    ids = torch.full_like(kinds, -1)
    offset = 0
    for index, (kind, (_, grid_name)) in enumerate(adapter.placeholders(inner.config).items()):
        per_item = _tokens_per_item(adapter, inner, kind, kwargs.get(grid_name), kwargs)
        if per_item is None:
            continue
        per_item = per_item.to(kinds.device)
        where = kinds == index
        item = torch.repeat_interleave(torch.arange(len(per_item), device=kinds.device) + offset, per_item)
        if item.numel() != int(where.sum()):
            raise ValueError(f"{grid_name} describes {item.numel()} {kind} tokens but the call has {int(where.sum())}")
        ids[where] = item
        offset += len(per_item)
    # Renumbered in order of appearance: a new item starts where the id changes along the
    # visual tokens.
    flat = ids.reshape(-1)
    visual = flat >= 0
    along = flat[visual]
    starts = torch.cat([along.new_ones(min(1, along.numel()), dtype=torch.bool), along[1:] != along[:-1]])
    runs = int(starts.sum())
    if runs != offset:
        raise ValueError(
            f"the {offset} images and videos of the grids fill {runs} runs of placeholder tokens: each image or "
            "video's placeholders must come together, not interleaved with another's"
        )
    out = torch.full_like(flat, -1)
    out[visual] = torch.cumsum(starts, 0) - 1
    return out.view_as(ids), offset


def _tokens_per_item(adapter: ModelAdapter, inner: nn.Module, kind: str, grid, kwargs) -> torch.Tensor | None:
    """The visual tokens of each image (or video) of ``kind``, int64 ``[n]``: from its grids, or,
    where generate hands over the vision features instead (``mm_encoder_outputs``, one pooled
    tensor per item, without the grids), from those; None when the call has neither."""
    if grid is not None:
        return adapter.tokens_per_item(inner, grid)
    features = (kwargs.get(conventions.ENCODER_OUTPUTS) or {}).get(kind)
    if features is None:
        return None
    return torch.tensor([len(item) for item in features.pooler_output], dtype=torch.long)


def _adapter_of(model: nn.Module, model_type: str | None) -> ModelAdapter:
    config = getattr(model, "config", None)
    found = getattr(config, "model_type", None)
    if not isinstance(model, nn.Module) or found is None:
        raise TypeError(f"model must be a transformers model with a config, got {type(model).__name__}")
    adapter = adapter_for(found)
    if model_type is not None and adapter is not adapter_for(model_type):
        raise ValueError(f"model_type {model_type!r} does not match the model's {found!r}")
    return adapter


def _patch_classes(adapter: ModelAdapter, settings: Settings) -> None:
    inner_cls, top_cls = adapter.classes()
    # A second patch of the same classes replaces the first; other families' patches stay.
    for cls in (inner_cls, top_cls):
        if cls in _class_patch:
            cls.__init__ = _class_patch.pop(cls)
    inner_init, top_init = inner_cls.__init__, top_cls.__init__

    def patched_inner_init(self, config, *args, **kwargs):
        inner_init(self, config, *args, **kwargs)
        _attach_inner(adapter, self, settings)

    def patched_top_init(self, config, *args, **kwargs):
        top_init(self, config, *args, **kwargs)
        _attach_top(self, self.model.visionselector)

    _class_patch[inner_cls], _class_patch[top_cls] = inner_init, top_init
    inner_cls.__init__, top_cls.__init__ = patched_inner_init, patched_top_init


def _attach_inner(adapter: ModelAdapter, inner: nn.Module, settings: Settings) -> VisionSelector:
    tower = adapter.vision_tower(inner)
    scorer = getattr(tower, SCORER_ATTRIBUTE, None)
    proj_dim = settings.proj_dim
    if scorer is None:
        reference = next(reversed(list(adapter.merger(inner).parameters())))
        scorer = LearnableImportanceScorer(
            adapter.scorer_size(inner), proj_dim, device=reference.device, dtype=reference.dtype
        )
        setattr(tower, SCORER_ATTRIBUTE, scorer)
    elif proj_dim is not None and scorer.proj_dim != proj_dim:
        raise ValueError(f"the model's scorer has proj_dim {scorer.proj_dim}, not {proj_dim}")
    selector = getattr(inner, "visionselector", None)
    if isinstance(selector, VisionSelector):
        return settings.update(selector)
    selector = settings.update(VisionSelector(
        scorer,
        position_rows=adapter.position_rows,
        token_inputs=adapter.token_inputs,
        unpackable=adapter.unpackable,
    ))
    language_model = adapter.language_model(inner)
    selector.hooks = [
        inner.register_forward_pre_hook(functools.partial(_inner_pre_hook, adapter), with_kwargs=True),
        inner.register_forward_hook(_inner_post_hook),
        language_model.register_forward_pre_hook(_language_model_pre_hook, with_kwargs=True),
    ]
    owner = _weights_owner(tower, inner)
    owner.__dict__["_init_weights"] = _PublishedScorerInit(owner, tower)
    # Plain attributes, not submodules; the hooks find the selector through their module, so
    # that a deep copy of the model gets hooks bound to its own copy of the selector.
    inner.__dict__["visionselector"] = selector
    language_model.__dict__["visionselector"] = selector
    return selector


def _weights_owner(tower: nn.Module, inner: nn.Module) -> nn.Module:
    """The model whose ``_init_weights`` transformers calls on the scorer: the vision tower
    where it is a model of its own, else the multimodal model."""
    return tower if hasattr(tower, "_init_weights") else inner


class _PublishedScorerInit:
    """``owner._init_weights`` that gives the scorer the published init (normal, std
    ``init_std``; zero biases), so that transformers' own loading paths (a checkpoint without a
    scorer, meta-device initialisation) give it rather than the model's ``initializer_range``.
    transformers initialises a module's children before the module: the scorer's projections
    are left to the scorer. An object with attributes, not a closure, so that a deep copy of
    the model initialises its own scorer."""

    def __init__(self, owner: nn.Module, tower: nn.Module):
        self.owner, self.tower = owner, tower

    def __call__(self, module: nn.Module) -> None:
        scorer = getattr(self.tower, SCORER_ATTRIBUTE, None)
        if isinstance(module, LearnableImportanceScorer):
            module.reset_parameters()
        elif scorer is None or (module is not scorer.q_proj and module is not scorer.k_proj):
            type(self.owner)._init_weights(self.owner, module)


def _attach_top(model: nn.Module, selector: VisionSelector) -> None:
    if model.__dict__.get("visionselector") is selector:
        return
    selector.hooks += [
        model.register_forward_pre_hook(_top_pre_hook, with_kwargs=True),
        model.register_forward_hook(_top_post_hook),
    ]
    model.__dict__["visionselector"] = selector
    # Found by generate before the class's own: its static-cache masks follow a pruned cache.
    selector.generate_masks = model.__dict__[conventions.MASK_MAKER] = GenerateMasks(model, selector)


def _vision_capture(adapter: ModelAdapter, inner: nn.Module, selector: VisionSelector) -> VisionAttentionCapture:
    """The selector's reader of the vision tower's attention, made (and its hooks registered) the
    first time a method needs it, so that a model whose methods never read the tower is not
    touched by it."""
    if selector.vision_capture is None:
        selector.vision_capture = VisionAttentionCapture(adapter, adapter.vision_tower(inner), selector)
        selector.hooks += selector.vision_capture.hooks
    return selector.vision_capture


@_opaque_to_compile
def _inner_pre_hook(adapter: ModelAdapter, inner, args, kwargs):
    selector: VisionSelector = inner.visionselector
    kwargs = conventions.keywords(inner, args, kwargs)
    state = selector.call_state
    if state is not None and state.balance_loss:
        kwargs[conventions.OUTPUT_ROUTER_LOGITS] = True  # the top model's balance loss is computed after it
    budget = kwargs.pop(BUDGET_KEYWORD, None)
    budget = check_budget(budget, BUDGET_KEYWORD) if budget is not None else (
        state.budget if state is not None else selector.budget)
    cache = conventions.cache_of(kwargs)
    if selector.continues_pruned_cache(cache):
        _decode_positions(inner, selector, cache, kwargs)
    if budget == 1.0 or not any(kwargs.get(name) is not None for name in adapter.visual_inputs):
        # Nothing to select: the model runs as it would unpatched (and follows a pruned cache).
        selector.begin_call(None, None, None, cache=cache, budget=budget)
        return (), kwargs
    kinds = placeholder_kinds(adapter, inner, kwargs)
    if kinds is None:
        raise ValueError("VisionSelector finds the visual tokens in input_ids or inputs_embeds: pass one of them")
    attention_mask = kwargs.get(conventions.ATTENTION_MASK)
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2):
        # A static cache's prefill: generate made the 4-D mask of the whole prompt.
        padding = None
        if not conventions.cache_length(cache):
            padding = prefill_padding(attention_mask, kinds.shape[1])
        if padding is None:
            raise ValueError(
                "below budget 1.0 VisionSelector prunes a 4-D attention_mask only at a prefill, and only when it is "
                "causal attention over padded keys (as generate makes it for a static cache); pass the 2-D "
                "attention_mask [B, L], or budget 1.0"
            )
        kwargs[conventions.ATTENTION_MASK] = attention_mask = padding
    if getattr(cache, "is_compileable", False) and conventions.takes(inner, conventions.CACHE_POSITION):
        raise ValueError(
            "below budget 1.0 a static cache needs transformers >= 5: a 4.x static cache counts its tokens from the "
            "first sample's filled slots, which a pruned prompt leaves apart; use a dynamic cache, or budget 1.0"
        )
    positions = kwargs.get(conventions.POSITION_IDS)
    sequences = None
    if attention_mask is None and positions is not None:
        sequences = _padding_free_sequences(adapter, positions, cache)
    if attention_mask is not None:
        # A call on a cache may pass the mask of the whole sequence; its last columns are this call's.
        attention_mask = attention_mask[:, -kinds.shape[1]:]
    placeholders = kinds >= 0
    visual = placeholders if attention_mask is None else placeholders & attention_mask.bool()
    ids, items = None, 0
    if selector.scope == "image":
        ids, items = image_ids(adapter, inner, kinds, kwargs)
    if selector.layer_method is not None:
        _layer_hooks(adapter, inner, selector)
    reads_tower = VISION_ATTENTION in selector.method.needs
    if reads_tower:
        capture = _vision_capture(adapter, inner, selector)
    selector.begin_call(visual, ids, attention_mask, items=items, budget=budget, training=inner.training,
                        kinds=kinds if reads_tower else None, cache=cache, placeholders=placeholders,
                        sequences=sequences)
    grids = [grid for _, grid in adapter.placeholders(inner.config).values()]
    if reads_tower and capture.wanted(inner) and any(kwargs.get(grid) is not None for grid in grids):
        capture.clear()  # the tower runs inside this forward
    return (), kwargs


def _padding_free_sequences(adapter: ModelAdapter, positions: torch.Tensor, cache) -> torch.Tensor | None:
    """For a padding-free row (several sequences in one row, their ``position_ids`` starting
    again, no attention mask, as ``DataCollatorWithFlattening`` makes them): int64 ``[1, L]``,
    the sequence of each token; None for a row of one sequence. Text positions (``[B, L]``, or
    the first of 4 rows) rise by one token at a time, so a sequence starts where they do not; 3-D
    rope rows (the first, temporal, stays put over an image) where they fall."""
    if positions.dim() == 2 or positions.shape[0] == 4:
        first = positions if positions.dim() == 2 else positions[0]
        starts = first[:, 1:] <= first[:, :-1]
    else:
        first = positions[0]
        starts = first[:, 1:] < first[:, :-1]
    if not bool(starts.any()):
        return None
    problem = ""
    if first.shape[0] != 1:
        problem = f"the batch has {first.shape[0]} rows (padding-free batches have one)"
    elif adapter.position_rows != 3:
        problem = "its language model takes 1-D positions, which cannot both place the kept tokens and bound the sequences"
    elif adapter.unpackable:
        problem = adapter.unpackable
    elif conventions.cache_length(cache):
        problem = "the call continues a cache"
    if problem:
        raise ValueError(f"position_ids start again within a row (a padding-free batch), which below budget 1.0 "
                         f"VisionSelector cannot prune here: {problem}")
    return torch.cat([starts.new_zeros(1, 1), starts], 1).long().cumsum(1)


def _decode_positions(inner, selector: VisionSelector, cache, kwargs) -> None:
    """A step on a pruned cache must place its tokens in the caller's (unpruned) sequence. A
    model that takes ``cache_position`` (transformers 4.x, remote code) gets it from the
    unpruned length when the caller left it out (it would count it from the pruned cache). A
    model that counts positions from the cache's length when not given ``position_ids``
    (transformers 5.x) would misplace the tokens: such a step is refused."""
    if kwargs.get(conventions.CACHE_POSITION) is not None:
        return
    new = conventions.new_token_count(kwargs)
    if new is None:
        return
    if conventions.takes(inner, conventions.CACHE_POSITION):
        kwargs[conventions.CACHE_POSITION] = selector.full_cache_position(cache, *new)
        return
    if kwargs.get(conventions.POSITION_IDS) is None:
        raise ValueError(
            "a step on a cache VisionSelector pruned needs position_ids (in the unpruned sequence, as generate "
            f"passes them): {type(inner).__name__} would count positions from the pruned cache's length"
        )


_DEEPSTACK = "_deepstack_process"  # Qwen3-VL's adding of per-layer visual features


def _layer_hooks(adapter: ModelAdapter, inner: nn.Module, selector: VisionSelector) -> None:
    """The hooks by which methods drop tokens inside the language model
    (:mod:`.layer_drops`): on every decoder layer, and after the language model. Registered the
    first time such a method runs, so that a model whose methods never do is not touched by
    them (the hooks run eagerly: a compiled forward breaks its graph at each layer)."""
    if selector.layer_hooks:
        return
    reason = layer_drops_unavailable()
    if reason:
        raise ValueError(f"the {selector.layer_method.name!r} method: {reason}")
    register_capture()
    language_model = adapter.language_model(inner)
    for index, layer in enumerate(language_model.layers):
        layer.__dict__["visionselector"] = selector
        selector.hooks += [
            layer.register_forward_pre_hook(functools.partial(_layer_pre_hook, index), with_kwargs=True),
            layer.register_forward_hook(functools.partial(_layer_post_hook, index), always_call=True),
        ]
    selector.hooks.append(language_model.register_forward_hook(_language_model_post_hook, always_call=True))
    if hasattr(language_model, _DEEPSTACK):
        language_model.__dict__[_DEEPSTACK] = _DeepstackFollowingDrops(language_model)
    selector.layer_hooks = True


@_opaque_to_compile
def _layer_pre_hook(index: int, layer, args, kwargs):
    drops = layer.visionselector.layer_drops
    if drops is None:
        return None
    hidden = args[0] if args else kwargs.pop("hidden_states")
    hidden, kwargs = drops.before_layer(index, layer, hidden, kwargs)
    return (hidden, *args[1:]), kwargs


@_opaque_to_compile
def _layer_post_hook(index: int, layer, args, output):
    drops = layer.visionselector.layer_drops
    if drops is not None:
        drops.after_layer(index)


@_opaque_to_compile
def _language_model_post_hook(language_model, args, output):
    language_model.visionselector.finish_layer_drops()


class _DeepstackFollowingDrops:
    """Qwen3-VL's ``_deepstack_process`` on a language model whose layers may have dropped
    tokens: the visual features and their mask follow the tokens still present. An object, not
    a closure, so that a deep copy of the model follows its own language model."""

    def __init__(self, language_model: nn.Module):
        self.language_model = language_model

    def __call__(self, hidden, visual_pos_masks, visual_embeds):
        drops = self.language_model.visionselector.layer_drops
        if isinstance(drops, PrefillDrops) and drops.dropped:
            visual_pos_masks, visual_embeds = drops.deepstack_inputs(visual_pos_masks.to(hidden.device), visual_embeds)
        return type(self.language_model)._deepstack_process(self.language_model, hidden, visual_pos_masks,
                                                             visual_embeds)


@_opaque_to_compile
def _inner_post_hook(inner, args, output):
    selector: VisionSelector = inner.visionselector
    state = selector.call_state
    if state is not None and state.balance_loss and hasattr(output, "keys"):
        state.router_logits = output.get("router_logits")
    return attach_selection(output, selector.end_call())


@_opaque_to_compile
def _language_model_pre_hook(language_model, args, kwargs):
    kwargs = conventions.keywords(language_model, args, kwargs)
    return (), language_model.visionselector.language_model_inputs(kwargs, language_model)


@dataclasses.dataclass
class CallState:
    """One call of the conditional-generation model, made by its pre-hook and consumed by its
    post-hook (``VisionSelector.call_state`` in between); the selection it makes is
    ``VisionSelector.last``.

    Attributes:
        budget: the call's budget (``visionselector_budget``, or the selector's).
        labels: the caller's labels, when the loss is computed after the forward on the kept
            tokens (eval mode below budget 1.0); None when the model computes it.
        loss_kwargs: what the model would hand its loss function besides the labels
            (``shift_labels``, ``num_items_in_batch``).
        as_tuple: the caller asked for a tuple (``return_dict=False``); the forward returns an
            output, turned into the tuple after the loss.
        balance_loss: an MoE model's balance loss is computed after the forward, over the
            tokens the language model saw.
        router_mask: the caller's attention mask (with ``balance_loss``; None: every token).
        router_logits: the routers' logits, recorded by the multimodal model's post-hook.
    """

    budget: float
    labels: torch.Tensor | None = None
    loss_kwargs: dict = dataclasses.field(default_factory=dict)
    as_tuple: bool = False
    balance_loss: bool = False
    router_mask: torch.Tensor | None = None
    router_logits: tuple | None = None


@_opaque_to_compile
def _top_pre_hook(model, args, kwargs):
    selector: VisionSelector = model.visionselector
    kwargs = conventions.keywords(model, args, kwargs)
    budget = kwargs.pop(BUDGET_KEYWORD, None)
    budget = selector.budget if budget is None else check_budget(budget, BUDGET_KEYWORD)
    # Made anew by every call: what an earlier call left behind when it raised cannot reach this one.
    selector.call_state = state = CallState(budget)
    if budget == 1.0 or model.training:
        return (), kwargs  # nothing is pruned: the model computes its own loss and outputs
    as_tuple = kwargs.get(conventions.RETURN_DICT, model.config.return_dict) is False
    labels = kwargs.get(conventions.LABELS)
    # Pruned logits no longer line up with the labels: the loss is computed after the forward
    # on the labels of the kept tokens.
    if labels is not None:
        state.labels = kwargs.pop(conventions.LABELS)
        state.loss_kwargs = {k: kwargs[k] for k in conventions.LOSS_KEYWORDS if kwargs.get(k) is not None}
    wants_router = kwargs.get(conventions.OUTPUT_ROUTER_LOGITS)
    if wants_router is None:
        wants_router = getattr(model.config.get_text_config(), "output_router_logits", False)
    if wants_router and routes_experts(model):
        # The model would weigh the routers of the pruned tokens with the caller's unpruned
        # attention mask; the balance loss is computed after the forward, on the pruned layout.
        kwargs[conventions.OUTPUT_ROUTER_LOGITS] = False
        state.balance_loss, state.router_mask = True, kwargs.get(conventions.ATTENTION_MASK)
    if as_tuple and (state.labels is not None or state.balance_loss):
        kwargs[conventions.RETURN_DICT] = True
        state.as_tuple = True
    return (), kwargs


@_opaque_to_compile
def _top_post_hook(model, args, output):
    selector: VisionSelector = model.visionselector
    state, selector.call_state = selector.call_state, None
    selection = selector.last
    if state is None or not hasattr(output, "keys"):
        return output
    if state.labels is not None:
        vocab = model.config.get_text_config().vocab_size
        loss = causal_lm_loss(model.loss_function, output.logits, state.labels, selection, vocab, **state.loss_kwargs)
        output = replaced(output, loss=loss)
    if state.balance_loss and state.router_logits is not None:
        output = _with_router_balance_loss(model, output, state, selection)
    if state.as_tuple:
        return output.to_tuple()
    return attach_selection(output, selection)


def _with_router_balance_loss(model, output, state: CallState, selection):
    """``output`` with the MoE balance loss (``aux_loss``) over the tokens the language model
    saw, added to the loss (by the config's coefficient) when there are labels, as transformers
    does."""
    if selection is not None and selection.keep is not None:
        mask = selection.attention_mask  # None: packed, every token real
    else:
        mask = state.router_mask
    balance = router_balance_loss(model, state.router_logits, mask)
    changes = {"aux_loss": balance}
    if state.labels is not None and output.get("loss") is not None:
        coefficient = model.config.get_text_config().router_aux_loss_coef
        changes["loss"] = output["loss"] + coefficient * balance.to(output["loss"].device)
    return replaced(output, **changes)
