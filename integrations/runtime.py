"""Model-agnostic VisionSelector runtime: score the visual tokens a language model is about to
see, then either prune them (inference) or scale them by the soft mask (training), and keep the
pruned KV cache and the attention mask of later decode steps in agreement. The language model's
other per-token inputs that an adapter declares (``token_inputs``, e.g. Qwen3-VL's deepstack
features) follow the kept tokens, and in training the soft mask.

The hooks of :mod:`vsops.integrations.patching` tell the selector, per forward call, which
tokens are visual (:meth:`VisionSelector.begin_call`, from what a model's adapter declares),
and route the language model's keyword arguments through
:meth:`VisionSelector.language_model_inputs`. The selection itself is the public varlen path
(:func:`vsops.varlen.select_visual_tokens`, :func:`vsops.varlen.kept_counts`,
:func:`vsops.varlen.select_and_pack` / :func:`~vsops.varlen.select_and_pad`), the one
``vsops bench --op varlen`` measures; the packs and pads run on host counts. Host syncs per
prefill: one to read the visual and real token counts of each sample (and image); with
``scope="image"``, the image-id assignment's checks and the one
:func:`~vsops.varlen.select_visual_tokens` documents; with a method that returns a keep mask
rather than scores, one to check its counts; with a method that reads the vision tower's
attention, a few more (the kinds of the visual tokens, the attention op's argument checks per
tower call, and the tower's window order on Qwen2.5-VL). Per decode step on a pruned cache:
one, reading ``cache_position[0]`` to check the caller counts in the unpruned sequence.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping

import torch

from vsops.budget import budget_to_k, check_budget
from vsops.difftopk import constraint_loss, difftopk
from vsops.integrations.adapter import TOKENS, VISUAL_ROWS
from vsops.integrations.conventions import (
    ATTENTION_MASK,
    CACHE_POSITION,
    INPUTS_EMBEDS,
    POSITION_IDS,
    USE_CACHE,
    cache_length,
    cache_of,
    with_cache,
)
from vsops.methods import (
    VISION_ATTENTION,
    ScoringMethod,
    Selected,
    SelectionMethod,
    VisionSelectorMethod,
    check_selected,
    make_method,
    merge_rows,
)
from vsops.methods.layer import LayerMethod, Stages
from vsops.methods.registry import DEFAULT as DEFAULT_METHOD
from vsops.integrations.layer_drops import PrefillDrops, decode_drops
from vsops.varlen import (
    SCOPES,
    cu_seqlens_from_counts,
    kept_counts,
    select_and_pack,
    select_and_pad,
    select_visual_tokens,
    unpack,
)

__all__ = ["VisionSelector", "Selection", "VARLEN_ATTENTION", "register_varlen_attention"]

# Attention implementations that take packed sequences with cu_seq_lens_q/k (FlashAttention's
# varlen convention). Extended by register_varlen_attention.
VARLEN_ATTENTION = {"flash_attention_2", "flash_attention_3", "flash_attention_4"}


def register_varlen_attention(name: str) -> None:
    """Declares that the attention implementation ``name`` (registered with transformers'
    ``AttentionInterface``) reads ``cu_seq_lens_q/k`` and ``max_length_q/k``, so that a pruned
    prefill without a cache is handed to it packed instead of padded."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    VARLEN_ATTENTION.add(name)


@dataclasses.dataclass
class Selection:
    """What the selector did in one forward call; attached to the model output as
    ``output.visionselector``.

    Attributes:
        keep: bool ``[B, L]``: the tokens the language model saw (inference); None in training.
        soft_mask: float32 ``[B, L]``: the factor each token was scaled by (training; 1 at
            text tokens); None in inference.
        visual_mask: bool ``[B, L]``: the visual tokens scored (training).
        hard_mask: bool ``[B, L]``: the visual tokens the hard top-k selects, the target of the
            constraint loss (training).
        constraint_loss: ``BCE(M_soft, M_hard)`` over the visual tokens (training), a scalar.
        cu_seqlens, max_seqlen: the packed layout (int32 ``[B + 1]``) when the kept tokens went
            to the language model packed; None when padded.
        lengths: the kept token count of each sample (the caller's padding is dropped; the
            kept tokens are re-padded on the left, or packed).
        attention_mask: int64 ``[B, L']``: the language model's mask of the re-padded kept
            tokens of this call (inference); None when packed.
        padding_side: where the kept tokens were re-padded: the side the caller padded on.
        visual_counts, kept_visual: per sample, the visual tokens before any selection and
            those the last layer saw, when a method dropped tokens inside the language model
            (then ``keep``, ``lengths`` and ``attention_mask`` describe what the last layer saw);
            None otherwise.
        layer_tokens: with drops inside the language model, the real tokens of the batch each
            decoder layer saw; None otherwise.
    """

    keep: torch.Tensor | None = None
    soft_mask: torch.Tensor | None = None
    visual_mask: torch.Tensor | None = None
    hard_mask: torch.Tensor | None = None
    constraint_loss: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    max_seqlen: int | None = None
    lengths: list[int] | None = None
    attention_mask: torch.Tensor | None = None
    padding_side: str = "left"
    visual_counts: list[int] | None = None
    kept_visual: list[int] | None = None
    layer_tokens: list[int] | None = None

    @property
    def kept_fraction(self) -> float | None:
        """The visual tokens the last layer saw over those of the call, when a method dropped
        tokens inside the language model; None otherwise."""
        if self.visual_counts is None or not sum(self.visual_counts):
            return None
        return sum(self.kept_visual) / sum(self.visual_counts)


@dataclasses.dataclass
class _Call:
    visual_mask: torch.Tensor  # bool [B, L]
    image_ids: torch.Tensor | None  # int64 [B, L], images/videos numbered in order of appearance, -1 elsewhere
    items: int  # the number of distinct ids (images and videos of the call)
    scope: str  # the selector's scope when the call began (image_ids follow it)
    attention_mask: torch.Tensor | None
    budget: float
    training: bool
    kinds: torch.Tensor | None = None  # int64 [B, L]: the placeholder kind of each token, -1 for text
    placeholders: torch.Tensor | None = None  # bool [B, L]: every placeholder, padding included (the model's rows)
    sequences: torch.Tensor | None = None  # int64 [1, L]: a padding-free row's sequence of each token


@dataclasses.dataclass
class _Counts:
    """Token counts of a call on the host, read in one sync."""

    visual: list[int]  # visual tokens per sample
    real: list[int]  # tokens per sample that are not padding
    per_item: list[list[int]] | None  # scope "image": per sample, its images' token counts in order
    placeholders: list[int]  # placeholder tokens per sample, those under padding included
    padding_side: str  # "left" or "right": where the caller's padding is

    def segments(self) -> list[int]:
        """Lengths of the scored segments, in the packed order of the visual tokens."""
        if self.per_item is None:
            return [n for n in self.visual if n > 0]
        return [n for row in self.per_item for n in row]

    def kept(self, budget: float) -> list[int]:
        text = [r - v for r, v in zip(self.real, self.visual)]
        if self.per_item is None:
            return kept_counts(self.visual, text, budget)
        return kept_counts(self.per_item, text, budget, scope="image")


@dataclasses.dataclass
class _PrunedCache:
    full_length: int  # the caller's sequence length (its coordinates) when the record was made
    pruned_mask: torch.Tensor  # int64 [B, L']: the attention mask of what the cache then held


# The pruned prefill's record lives on the cache object itself, so that it follows the cache
# (a deep copy for prompt reuse, other forwards in between, another model instance).
_PRUNED_ATTRIBUTE = "_vsops_pruned_prefill"


def _pruned_record(cache) -> _PrunedCache | None:
    return None if cache is None else getattr(cache, _PRUNED_ATTRIBUTE, None)


class VisionSelector:
    """The selector's settings and per-call state, reachable as ``model.visionselector``.

    Attributes:
        scorer: the :class:`vsops.LearnableImportanceScorer` (an attribute of the vision tower);
            any module called as ``scorer(x [total, D], cu_seqlens) -> float32 [total]`` may
            stand in.
        method: the selection method (:mod:`vsops.methods`): ``"visionselector"`` (the learned
            scorer, the default and the only one with a training mode) or any registered name
            or :class:`~vsops.methods.SelectionMethod`; may be changed at any time.
        budget: fraction of visual tokens kept, in (0, 1]; may be changed at any time.
        scope: ``"sample"`` (one budget over all visual tokens of a sample, as published) or
            ``"image"`` (one budget per image or video).
        packed: None (pack when the attention implementation takes varlen input and no cache
            is used), True (same, but raise when that is impossible) or False (always pad).
        position_rows: rows of the rope position ids the language model takes (3 for M-RoPE,
            1 for plain RoPE); set by the model's adapter.
        token_inputs: the language model's other per-token inputs that follow the kept
            tokens, by name, with their layout (``"tokens"`` or ``"visual_rows"``, see
            :attr:`vsops.integrations.ModelAdapter.token_inputs`); set by the model's adapter.
        unpackable: why the language model cannot take packed sequences (then the kept tokens
            are always re-padded), empty when it can; set by the model's adapter.
        vision_capture: what reads the vision tower's attention for methods that need it
            (:class:`~vsops.integrations.vision_attention.VisionAttentionCapture`); made by the
            integration when a method first needs it, None until then.
        call_state: the conditional-generation model's call in progress
            (:class:`~vsops.integrations.patching.CallState`), None between calls.
        generate_masks: the conditional-generation model's maker of generate's 4-D masks
            (:class:`~vsops.integrations.static_cache.GenerateMasks`), whose masks later steps
            on a pruned cache accept as made for it; None on a multimodal model alone.
        last: the :class:`Selection` of the last call that selected; None after a call that
            pruned nothing.
    """

    def __init__(
        self,
        scorer,
        *,
        budget: float = 0.2,
        scope: str = "sample",
        packed: bool | None = None,
        position_rows: int = 1,
        method=None,
        token_inputs: Mapping[str, str] | None = None,
        unpackable: str = "",
    ):
        if position_rows not in (1, 3):
            raise ValueError(f"position_rows must be 1 or 3, got {position_rows!r}")
        token_inputs = dict(token_inputs or {})
        for name, layout in token_inputs.items():
            if layout not in (TOKENS, VISUAL_ROWS):
                raise ValueError(f"token_inputs[{name!r}] must be {TOKENS!r} or {VISUAL_ROWS!r}, got {layout!r}")
        self.token_inputs = token_inputs
        self.unpackable = unpackable
        self.scorer = scorer
        self.method = method
        self.budget = budget
        self.scope = scope
        self.packed = packed
        self.position_rows = position_rows
        self.last: Selection | None = None
        self.hooks: list = []  # the integration's hook handles, for reverting
        self.vision_capture = None
        self._call: _Call | None = None
        self._call_cache = None  # the cache the multimodal model's call in progress was given
        self._call_budget = None  # the budget of the multimodal model's call in progress
        self.call_state = None
        self.generate_masks = None
        self.layer_drops = None  # the in-LM drops of the language model's call in progress
        self.layer_hooks = False  # whether the decoder layers carry the in-LM hooks

    @property
    def vision_method(self) -> SelectionMethod | None:
        """The method of the vision stage (None when the method acts inside the language model
        only)."""
        method = self.method
        if isinstance(method, Stages):
            return VisionSelectorMethod(self.scorer) if method.vision == DEFAULT_METHOD else method.vision
        return None if isinstance(method, LayerMethod) else method

    @property
    def layer_method(self) -> LayerMethod | None:
        """The method that drops tokens inside the language model, or None."""
        method = self.method
        if isinstance(method, Stages):
            return method.language
        return method if isinstance(method, LayerMethod) else None

    def _vision_budget(self, budget: float) -> float:
        """The vision stage's budget when the call's budget is ``budget``."""
        method = self.method
        if isinstance(method, Stages):
            return method.vision_budget
        return 1.0 if isinstance(method, LayerMethod) else budget

    @property
    def method(self) -> SelectionMethod:
        if self._method is None:  # the learned scorer, which follows self.scorer
            return VisionSelectorMethod(self.scorer)
        return self._method

    @method.setter
    def method(self, value) -> None:
        if value is None or value == DEFAULT_METHOD:
            self._method = None
        else:
            self._method = make_method(value)

    @property
    def budget(self) -> float:
        return self._budget

    @budget.setter
    def budget(self, value: float) -> None:
        self._budget = check_budget(value)

    @property
    def call_budget(self) -> float:
        """The budget of the call in progress (a per-call budget, or :attr:`budget`)."""
        return self._call_budget if self._call_budget is not None else self.budget

    @property
    def scope(self) -> str:
        return self._scope

    @scope.setter
    def scope(self, value: str) -> None:
        if value not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {value!r}")
        self._scope = value

    @property
    def packed(self) -> bool | None:
        return self._packed

    @packed.setter
    def packed(self, value: bool | None) -> None:
        if value not in (None, True, False):
            raise TypeError(f"packed must be None, True or False, got {value!r}")
        self._packed = value

    @contextlib.contextmanager
    def using(self, *, budget: float | None = None, scope: str | None = None, method=None):
        """Temporarily other settings, e.g. for one ``generate`` call (which does not pass
        unknown keywords such as ``visionselector_budget`` to the model)::

            with model.visionselector.using(budget=0.1, method="divprune"):
                model.generate(**inputs)
        """
        saved = self.budget, self.scope, self._method
        try:
            self.budget = saved[0] if budget is None else budget
            self.scope = saved[1] if scope is None else scope
            if method is not None:
                self.method = method
            yield self
        finally:
            self.budget, self.scope, self._method = saved

    def __repr__(self) -> str:
        return (f"VisionSelector(method={self.method.name!r}, budget={self.budget}, scope={self.scope!r}, "
                f"packed={self.packed})")

    # -- per-call protocol -------------------------------------------------------------------

    def begin_call(self, visual_mask, image_ids, attention_mask, *, items=0, budget=None, training=False,
                   kinds=None, cache=None, placeholders=None, sequences=None) -> None:
        """Called by the integration before the multimodal forward: which tokens are visual.

        Args:
            visual_mask: bool ``[B, L]``, True at the visual placeholder tokens (not padding);
                None for a call without visual input (the selector then only follows the cache).
            image_ids: int64 ``[B, L]``: the image or video of each visual token, numbered
                ``0 .. items - 1`` over the batch in order of appearance (row-major), -1
                elsewhere; needed for ``scope="image"``, may be None with ``scope="sample"``.
            attention_mask: the caller's ``[B, L]`` padding mask, or None.
            items: the number of images and videos of the call (a host int).
            budget: this call's budget, overriding :attr:`budget`.
            training: soft-mask training (all tokens stay) instead of pruning.
            kinds: int64 ``[B, L]``, the kind of visual input of each token (an index the
                :attr:`vision_capture` knows), -1 elsewhere; needed by methods that read the
                vision tower's attention.
            cache: the call's KV cache (:func:`~vsops.integrations.conventions.cache_of`), or
                None; its language model must be called with the same one. Visual tokens that
                arrive on a non-empty cache (images in a later turn) are selected among
                themselves, and appended to what the cache holds.
            placeholders: bool ``[B, L]``: every visual placeholder, those under the padding
                mask included (the model builds rows for them too); default ``visual_mask``.
            sequences: int64 ``[1, L]``: for a padding-free row (several sequences in one row,
                no attention mask), the sequence of each token, numbered from 0 along the row;
                each sequence is then selected as a sample of its own.
        """
        self.last = None
        self.layer_drops = None
        self._call_cache = cache
        budget = self.budget if budget is None else check_budget(budget, "visionselector_budget")
        self._call_budget = budget
        if visual_mask is None:
            self._call = None
            return
        if self.scope == "image" and image_ids is None:
            raise ValueError('scope="image" needs the image of each visual token (image_ids)')
        if self.layer_method is not None and (training or sequences is not None):
            raise ValueError(f"the {self.layer_method.name!r} method drops tokens inside the language model, at "
                             "inference on padded batches: not in training mode, nor on a padding-free row")
        self._call = _Call(visual_mask, image_ids, items, self.scope, attention_mask, self._vision_budget(budget),
                           training, kinds, visual_mask if placeholders is None else placeholders, sequences)

    def end_call(self) -> Selection | None:
        """Ends the call; returns what was selected (also kept as :attr:`last`)."""
        self._call = self._call_cache = self._call_budget = None
        return self.last

    @staticmethod
    def continues_pruned_cache(cache) -> bool:
        """Whether ``cache`` holds a prefill this selector's kind pruned."""
        return _pruned_record(cache) is not None

    @staticmethod
    def full_cache_position(cache, new_tokens: int, device) -> torch.Tensor | None:
        """For a decode step on a cache a selector pruned, called without ``cache_position``:
        the positions of the ``new_tokens`` in the caller's (unpruned) sequence, int64
        ``[new_tokens]``, so that a model deriving rope positions from them continues at the
        unpruned length. None for any other cache."""
        if _pruned_record(cache) is None:
            return None
        start = cache_length(cache) + VisionSelector._shift(cache)
        return torch.arange(start, start + new_tokens, device=device)

    def language_model_inputs(self, kwargs: dict, language_model) -> dict:
        """The language model's keyword arguments with the selection applied.

        At prefill (empty cache) with visual tokens: pruned (inference) or scaled by the soft
        mask (training). At later steps on the cache this selector pruned: the attention mask
        (and ``cache_position``) rewritten to the pruned cache; positions are left as computed
        on the full sequence. ``language_model`` is the module called (its config, and the
        keyword its forward takes the cache under).

        With a method acting inside the language model, the prefill's drops are prepared
        (:attr:`layer_drops`, run by the decoder layers' hooks), and a call on a cache with
        drops gives each layer the mask of what it holds.
        """
        out = self._vision_stage_inputs(kwargs, language_model)
        call, layer_method = self._call, self.layer_method
        if call is not None and layer_method is not None:
            self.layer_drops = self._prefill_drops(call, out, language_model, layer_method)
        else:
            self.layer_drops = decode_drops(language_model, out)
        return out

    def _prefill_drops(self, call: _Call, out: dict, language_model, method: LayerMethod) -> PrefillDrops:
        """The in-LM drops of this prefill, on the language model's input ``out``: the caller's
        tokens, or those the vision stage kept (re-padded, or packed)."""
        if self.packed and (self.last is None or self.last.cu_seqlens is None):
            raise ValueError(f"packed=True: the {method.name!r} method drops tokens inside the language model of the "
                             "input it is handed, which is packed only after a vision stage pruned it (vsops.methods."
                             "Stages) on a varlen attention without a cache")
        if cache_length(cache_of(out)):
            raise ValueError(f"the {method.name!r} method drops visual tokens at a prefill from an empty cache; this "
                             "call brings visual tokens to a cache that holds some already")
        visual = call.visual_mask
        b, length = visual.shape
        segment = self._image_index(call) if call.scope == "image" else torch.zeros_like(visual, dtype=torch.long)
        origin = torch.arange(length, device=visual.device).expand(b, length)
        sample = torch.arange(b, device=visual.device).unsqueeze(1).expand(b, length)
        visual_counts = visual.sum(1).tolist()
        selection = self.last
        carried = (sample, origin, visual.long(), segment)
        cu_seqlens, padding_side = None, "left"
        if selection is not None and selection.cu_seqlens is not None:
            tensors = [t.unsqueeze(0) for t in select_and_pack(selection.keep, *carried,
                                                               counts=selection.lengths).tensors]
            cu_seqlens = selection.cu_seqlens
        elif selection is not None and selection.keep is not None:
            padding_side = selection.padding_side
            tensors = select_and_pad(selection.keep, *carried, padding_side=padding_side, pad_values=(-1, 0, 0, 0),
                                     counts=selection.lengths).tensors
        else:
            mask = call.attention_mask
            real = torch.ones_like(visual) if mask is None else mask.bool()
            padding_side = _padding_side(real[:, 0].tolist(), real[:, -1].tolist())
            tensors = sample.masked_fill(~real, -1), origin, visual.long(), segment
        sample, origin, visual, segment = tensors
        return PrefillDrops(language_model, method, self.call_budget, sample=sample, origin=origin,
                            visual=visual.bool(), segment=segment, padding_side=padding_side,
                            visual_counts=visual_counts, cu_seqlens=cu_seqlens)

    def finish_layer_drops(self) -> None:
        """After the language model's forward: the prefill's drops become :attr:`last`."""
        drops, self.layer_drops = self.layer_drops, None
        if not isinstance(drops, PrefillDrops) or not drops.dropped or self._call is None:
            return
        keep = drops.keep_of_caller(*self._call.visual_mask.shape)
        packed = drops.cu_seqlens is not None
        self.last = Selection(keep=keep, lengths=keep.sum(1).tolist(), attention_mask=None if packed else drops.mask,
                              cu_seqlens=drops.cu_seqlens if packed else None,
                              max_seqlen=int(drops.cu_seqlens.diff().max()) if packed else None,
                              padding_side=drops.padding_side, visual_counts=drops.visual_counts,
                              kept_visual=drops.kept_visual, layer_tokens=drops.layer_tokens())

    def _vision_stage_inputs(self, kwargs: dict, language_model) -> dict:
        call = self._call
        cache = cache_of(kwargs)
        if self._call_cache is not None and cache is not self._call_cache:
            # The multimodal model was given a cache and handed its language model another (or
            # none, or under a name not known here): whether it continues a pruned prefill is
            # unknowable, and guessing gives wrong tokens.
            raise ValueError(
                "the language model was not called with the cache the multimodal model was given; VisionSelector "
                "cannot tell whether it continues a pruned prefill (see vsops.integrations.conventions)"
            )
        past = cache_length(cache)
        if call is None:
            return self._unpruned_inputs(kwargs, cache, past)
        embeds = kwargs[INPUTS_EMBEDS]
        if call.visual_mask.shape != embeds.shape[:2]:
            raise ValueError(
                f"the visual mask is {tuple(call.visual_mask.shape)} but inputs_embeds is {tuple(embeds.shape)}"
            )
        row, caller = None, kwargs
        if call.sequences is not None:
            # The row's sequences are selected as the samples of a right-padded batch.
            row = _Sequences.of(call.sequences)
            call, kwargs = row.virtual_call(call), {**kwargs, INPUTS_EMBEDS: row.to_batch(embeds)}
            embeds = kwargs[INPUTS_EMBEDS]
        counts = self._counts(call)
        if sum(counts.visual) == 0 or (not call.training and sum(counts.kept(call.budget)) == sum(counts.real)):
            kwargs = caller
            # Nothing to prune (every segment keeps all its tokens): the method is not asked,
            # and the language model sees the call as it would unpatched.
            return self._unpruned_inputs(kwargs, cache, past)
        visual = select_and_pack(call.visual_mask, embeds, counts=counts.visual)
        rows_of = select_and_pack(call.placeholders, counts=counts.placeholders).indices
        visual_rows = self._visual_rows(kwargs, rows_of.numel())
        segments = counts.segments()
        cu = cu_seqlens_from_counts(segments, embeds.device)
        method = self.vision_method
        if call.training and not method.trainable:
            raise ValueError(
                f"the {method.name!r} method has no training mode: train with the learned scorer "
                "(method='visionselector'), or put the model in eval mode"
            )
        b, length = call.visual_mask.shape
        # A scoring method that keeps ScoringMethod's select goes through the varlen path, with
        # the same ranking; one with a select of its own is asked for its answer.
        if isinstance(method, ScoringMethod) and type(method).select is ScoringMethod.select:
            scores = method.score(visual.tensors[0], cu)
            keep = select_visual_tokens(
                unpack(scores.detach(), visual.indices, b, length),
                call.visual_mask,
                call.budget,
                scope=call.scope,
                image_index=self._image_index(call) if call.scope == "image" else None,
            )
            if call.training:
                k = self._segment_k(segments, call, cu)
                out = self._soft_inputs(kwargs, call, scores, k, cu, keep, visual, visual_rows, rows_of)
                return out if row is None else row.soft_inputs_in_row(out, self.last)
        else:
            k = self._segment_k(segments, call, cu)
            extra = {"vision": self._vision_attention(call, method)} if VISION_ATTENTION in method.needs else {}
            chosen = check_selected(method.select(visual.tensors[0], k, cu, **extra), method, visual.tensors[0], k, cu)
            keep = unpack(chosen.keep, visual.indices, b, length) | ~call.visual_mask
            if chosen.embeds is not None:
                # The method's embeddings take the kept tokens' places before the gather.
                rows = embeds.reshape(b * length, -1).index_copy(0, visual.indices, chosen.embeds.to(embeds.dtype))
                kwargs = {**kwargs, INPUTS_EMBEDS: rows.view_as(embeds)}
            if chosen.merged_into is not None and visual_rows:
                # A merged token's other rows (deepstack features) merge as its embedding did:
                # the merge targets, numbered over the visual tokens, renumbered over the rows.
                row_of_visual = _row_of_visual(call, visual.indices, rows_of)
                into = torch.full((rows_of.numel(),), -1, dtype=torch.long, device=rows_of.device)
                merged = chosen.merged_into.to(rows_of.device)
                into[row_of_visual] = torch.where(merged >= 0, row_of_visual[merged.clamp(min=0)], -1)
                visual_rows = _each_tensor(visual_rows, lambda t: merge_rows(t, into.to(t.device)))
        if call.attention_mask is not None:
            keep &= call.attention_mask.bool()  # the caller's padding goes; the kept tokens are re-padded
        lengths = counts.kept(call.budget)
        if row is not None:
            out = self._padding_free_inputs(kwargs, row, keep, lengths)
        else:
            out = self._pruned_inputs(kwargs, language_model, keep, lengths, counts.padding_side, cache, past)
        if visual_rows:
            kept_visual = sum(lengths) - (sum(counts.real) - sum(counts.visual))
            out.update(self._kept_visual_rows(visual_rows, keep, rows_of, kept_visual))
        return out

    # -- the pieces ----------------------------------------------------------------------------

    @staticmethod
    def _counts(call: _Call) -> _Counts:
        """The visual and real token counts of each sample (and with image ids, of each image
        in order of appearance), read in one host sync."""
        visual = call.visual_mask
        b, length = visual.shape
        real = visual.new_ones(()) if call.attention_mask is None else call.attention_mask.bool()
        real = real.expand(b, length)
        columns = [visual.sum(1, keepdim=True), real.sum(1, keepdim=True), call.placeholders.sum(1, keepdim=True),
                   real[:, :1].long(), real[:, -1:].long()]
        if call.image_ids is not None:
            cells = b * call.items  # one per (sample, image); the last slot takes the text tokens
            slot = torch.where(visual, torch.arange(b, device=visual.device).unsqueeze(1) * call.items + call.image_ids, cells)
            per = torch.zeros(cells + 1, dtype=torch.long, device=visual.device)
            per.scatter_add_(0, slot.reshape(-1), torch.ones(b * length, dtype=torch.long, device=visual.device))
            columns.append(per[:cells].view(b, call.items))
        rows = torch.cat(columns, 1).tolist()  # the one host sync
        visual_counts, real_counts, placeholders = [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]
        padding_side = _padding_side([r[3] for r in rows], [r[4] for r in rows])
        # Ids follow the order of appearance, so a sample's ids in increasing order are its
        # images in the packed order of its visual tokens.
        per_item = None if call.image_ids is None else [[n for n in r[5:] if n > 0] for r in rows]
        return _Counts(visual_counts, real_counts, per_item, placeholders, padding_side)

    @staticmethod
    def _segment_k(segments: list[int], call: _Call, cu: torch.Tensor) -> torch.Tensor:
        """int64 ``[S]``: tokens kept per segment, on the tokens' device. Only the soft mask and
        methods that return a keep mask need it; the varlen path derives k itself."""
        return budget_to_k(torch.tensor(segments), call.budget).to(cu.device)

    def _vision_attention(self, call: _Call, method):
        if self.vision_capture is None or call.kinds is None:
            raise ValueError(f"the {method.name!r} method needs the vision tower's attention, which this "
                             "integration did not capture for this call")
        return self.vision_capture.collect(call.kinds[call.visual_mask])

    @staticmethod
    def _image_index(call: _Call) -> torch.Tensor:
        """The image of each visual token numbered from 0 within its sample, -1 elsewhere."""
        ids = call.image_ids
        first = ids.masked_fill(ids < 0, call.items).amin(1, keepdim=True)
        return torch.where(call.visual_mask, ids - first, -1)

    def _visual_rows(self, kwargs, placeholders: int) -> dict:
        """The language model's :data:`VISUAL_ROWS` inputs of this call, each checked to hold
        one row per placeholder token (those under padding included, as the model builds them)."""
        found = {}
        for name, layout in self.token_inputs.items():
            value = kwargs.get(name)
            if layout != VISUAL_ROWS or value is None:
                continue
            for tensor in _tensors_of(value):
                if tensor.shape[0] != placeholders:
                    raise ValueError(
                        f"the language model's {name} has {tensor.shape[0]} rows, but the call has {placeholders} "
                        "visual placeholder tokens: its rows must follow them one to one"
                    )
            found[name] = value
        return found

    @staticmethod
    def _kept_visual_rows(visual_rows: dict, keep, rows_of, kept: int) -> dict:
        """The :data:`VISUAL_ROWS` inputs reduced to the rows of the kept placeholder tokens
        (``kept`` of them, a host count; ``rows_of``: the flat position of each row's token),
        every tensor of every input in one pack."""
        tensors = [t for value in visual_rows.values() for t in _tensors_of(value)]
        device = tensors[0].device
        kept_visual = keep.reshape(-1).index_select(0, rows_of).to(device).view(1, -1)
        packed = select_and_pack(kept_visual, *(t.reshape(1, t.shape[0], -1) for t in tensors), counts=[kept]).tensors
        out, start = {}, 0
        for name, value in visual_rows.items():
            parts = _tensors_of(value)
            rows = [p.view(kept, *t.shape[1:]) for p, t in zip(packed[start : start + len(parts)], parts)]
            out[name] = _like(value, rows)
            start += len(parts)
        return out

    def _soft_inputs(self, kwargs, call: _Call, scores, k, cu, keep, visual, visual_rows: dict, rows_of) -> dict:
        soft = difftopk(scores, k, cu_seqlens=cu)
        factor = unpack(soft, visual.indices, visual.batch, visual.length, fill=1.0)
        embeds = kwargs[INPUTS_EMBEDS]
        self.last = Selection(
            soft_mask=factor,
            visual_mask=call.visual_mask,
            hard_mask=keep & call.visual_mask,
            constraint_loss=constraint_loss(soft, keep.reshape(-1).index_select(0, visual.indices)),
        )
        # A softly dropped token's rows are scaled as its embedding is: inference drops both.
        # Rows of placeholders under padding keep a factor of 1.
        row_factor = factor.reshape(-1).index_select(0, rows_of)
        scaled = _each_tensor(visual_rows,
                              lambda t: t * row_factor.to(t.device, t.dtype).view(-1, *(1,) * (t.dim() - 1)))
        return {**kwargs, INPUTS_EMBEDS: embeds * factor.unsqueeze(-1).to(embeds.dtype), **scaled}

    def _use_packed(self, kwargs, config) -> bool:
        use_cache = _resolved_use_cache(kwargs, config)
        varlen = getattr(config, "_attn_implementation", None) in VARLEN_ATTENTION
        if self.packed is False:
            return False
        if self.unpackable:
            if self.packed:
                raise ValueError(f"packed=True is not possible on this model: {self.unpackable}")
            return False
        possible = varlen and not use_cache and cache_of(kwargs) is None
        if self.packed and not possible:
            raise ValueError(
                "packed=True needs a varlen attention implementation (flash_attention_2 or one declared "
                f"with register_varlen_attention; this model uses {config._attn_implementation!r}) and "
                "use_cache=False"
            )
        return possible

    def _pruned_inputs(self, kwargs, language_model, keep, lengths, padding_side, cache, past) -> dict:
        config = language_model.config
        embeds = kwargs[INPUTS_EMBEDS]
        b, length = keep.shape
        rows = self.position_rows
        full_past = past + self._shift(cache)
        self._check_cache_position(kwargs, past, full_past)
        positions = kwargs.get(POSITION_IDS)
        if positions is None:
            # What the language model would have used for the full sequence.
            positions = torch.arange(full_past, full_past + length, device=embeds.device).view(1, 1, -1)
        elif positions.dim() == 2:
            positions = positions.unsqueeze(0)
        # Only the rope rows: a language model may take more (Qwen2.5-VL's 4-row form carries
        # text positions in row 0 for packed-sequence detection), and after pruning those have
        # gaps that the detection would read as sequence starts.
        positions = positions[-rows:].expand(rows, b, length)
        out = dict(kwargs)
        # The per-token inputs follow the kept tokens in the same pass.
        names = [n for n, layout in self.token_inputs.items() if layout == TOKENS and kwargs.get(n) is not None]
        per_token = [kwargs[n] for n in names]
        if self._use_packed(kwargs, config):
            packed = select_and_pack(keep, embeds, positions, *per_token, counts=lengths)
            out[INPUTS_EMBEDS] = packed.tensors[0].unsqueeze(0)
            out[POSITION_IDS] = packed.tensors[1].unsqueeze(1) if rows > 1 else packed.tensors[1]
            out.update({n: t.unsqueeze(0) for n, t in zip(names, packed.tensors[2:])})
            out[ATTENTION_MASK] = None
            out["cu_seq_lens_q"] = out["cu_seq_lens_k"] = packed.cu_seqlens
            out["max_length_q"] = out["max_length_k"] = packed.max_seqlen
            self.last = Selection(keep=keep, cu_seqlens=packed.cu_seqlens, max_seqlen=packed.max_seqlen, lengths=lengths)
            return out
        padded = select_and_pad(keep, embeds, positions, *per_token, padding_side=padding_side,
                                pad_values=(0, 1, *(0,) * len(per_token)), counts=lengths)
        out[INPUTS_EMBEDS], padded_positions = padded.tensors[:2]
        out[POSITION_IDS] = padded_positions if rows > 1 else padded_positions[0]
        out.update(zip(names, padded.tensors[2:]))
        mask = padded.attention_mask
        self.last = Selection(keep=keep, lengths=lengths, attention_mask=mask, padding_side=padding_side)
        if past:
            # The cache keeps what it holds; this call's kept tokens are appended after it.
            held = self._cache_mask(cache, past, kwargs.get(ATTENTION_MASK))
            held = mask.new_ones(b, past) if held is None else held.to(mask.dtype)
            mask = torch.cat([held, mask], dim=1)
        out[ATTENTION_MASK] = mask
        if cache is None and _resolved_use_cache(kwargs, config):
            # Made here rather than inside the language model, so that the steps on it can be
            # recognized.
            from transformers.cache_utils import DynamicCache

            cache = DynamicCache(config=config)
            out = with_cache(out, cache, language_model)
        if cache is not None:
            setattr(cache, _PRUNED_ATTRIBUTE, _PrunedCache(full_past + length, mask))
        if kwargs.get(CACHE_POSITION) is not None:
            out[CACHE_POSITION] = past + torch.arange(out[INPUTS_EMBEDS].shape[1], device=kwargs[CACHE_POSITION].device)
        return out

    def _padding_free_inputs(self, kwargs, row: "_Sequences", keep, lengths) -> dict:
        """A padding-free row pruned: each sequence's kept tokens, in one row again, with their
        rope positions and text positions counting the kept tokens of each sequence from 0 (by
        which transformers keeps the sequences apart)."""
        keep = row.to_row(keep)
        embeds = row.to_row(kwargs[INPUTS_EMBEDS])
        length = keep.shape[1]
        positions = kwargs[POSITION_IDS]
        positions = (positions.unsqueeze(0) if positions.dim() == 2 else positions)[-3:].expand(3, 1, length)
        names = [n for n, layout in self.token_inputs.items() if layout == TOKENS and kwargs.get(n) is not None]
        packed = select_and_pack(keep, embeds, positions, *(kwargs[n] for n in names), counts=[sum(lengths)])
        text = torch.cat([torch.arange(n, device=embeds.device) for n in lengths]).view(1, 1, -1)
        out = dict(kwargs)
        out[INPUTS_EMBEDS] = packed.tensors[0].unsqueeze(0)
        out[POSITION_IDS] = torch.cat([text.to(packed.tensors[1].dtype), packed.tensors[1].unsqueeze(1)], 0)
        out.update({n: t.unsqueeze(0) for n, t in zip(names, packed.tensors[2:])})
        out[ATTENTION_MASK] = None
        cu = cu_seqlens_from_counts(lengths, embeds.device)
        self.last = Selection(keep=keep, cu_seqlens=cu, max_seqlen=max(lengths), lengths=lengths)
        return out

    @staticmethod
    def _shift(cache) -> int:
        """How many tokens of the caller's sequence the cache lacks (those pruned)."""
        pruned = _pruned_record(cache)
        return 0 if pruned is None else pruned.full_length - pruned.pruned_mask.shape[1]

    @staticmethod
    def _cache_mask(cache, past: int, caller_mask) -> torch.Tensor | None:
        """The attention mask of what ``cache`` holds (``past`` tokens), int64 ``[B, past]``:
        a pruned prefill's recorded mask and the caller's columns of the tokens cached since; for
        a cache never pruned, the caller's mask of the cached tokens. None when neither is known
        (no record and no mask)."""
        pruned = _pruned_record(cache)
        if pruned is None:
            return None if caller_mask is None else caller_mask[:, :past]
        since = past - pruned.pruned_mask.shape[1]
        if caller_mask is None:
            tail = pruned.pruned_mask.new_ones(pruned.pruned_mask.shape[0], since)
        else:
            tail = caller_mask[:, pruned.full_length : pruned.full_length + since].to(pruned.pruned_mask.dtype)
        return torch.cat([pruned.pruned_mask, tail], dim=1)

    @staticmethod
    def _check_cache_position(kwargs, past: int, full_past: int) -> None:
        """The caller counts in its (unpruned) sequence: a call whose ``cache_position`` counts
        in the pruned cache (e.g. generate continuing from a pruned cache it did not fill) would
        misplace its tokens."""
        position = kwargs.get(CACHE_POSITION)
        if position is not None and full_past != past and int(position[0]) != full_past:
            raise ValueError(
                f"cache_position starts at {int(position[0])}, but after a pruned prefill the next token is at "
                f"{full_past} of the unpruned sequence ({past} cached + {full_past - past} pruned): continue with "
                "positions and attention_mask in the unpruned sequence's coordinates"
            )

    def _unpruned_inputs(self, kwargs, cache, past: int) -> dict:
        """A call that prunes nothing: as the caller made it, but on a cache a selector pruned,
        with the attention mask (and ``cache_position``) rewritten to what the cache holds."""
        if past == 0 or _pruned_record(cache) is None:
            return kwargs
        mask = kwargs.get(ATTENTION_MASK)
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
            if self.generate_masks is None or not self.generate_masks.owns(mask):
                raise ValueError(
                    "after a pruned prefill, later steps need the 2-D attention mask in the unpruned sequence "
                    "(generate's 4-D masks of a static cache are made for the pruned cache by the patched model; "
                    "a 4-D mask made elsewhere cannot be mapped to it)"
                )
            # Made by the patched model's create_masks_for_generate: in the cache's slots already.
            kwargs = {k: v for k, v in kwargs.items() if k != ATTENTION_MASK}
            return {**self.slot_inputs(kwargs, cache, past, kwargs[INPUTS_EMBEDS].shape[1]), ATTENTION_MASK: mask}
        return self.slot_inputs(kwargs, cache, past, kwargs[INPUTS_EMBEDS].shape[1])

    def slot_inputs(self, kwargs, cache, past: int, new_tokens: int) -> dict:
        """``kwargs`` of a call of ``new_tokens`` per sample on ``cache`` (holding ``past``
        tokens, pruned by a selector), with the 2-D attention mask (``[B, unpruned length]``) and
        ``cache_position`` rewritten from the caller's unpruned sequence to the cache's slots:
        the mask becomes int64 ``[B, past + new_tokens]``."""
        out = dict(kwargs)
        mask = kwargs.get(ATTENTION_MASK)
        shift = self._shift(cache)
        self._check_cache_position(kwargs, past, past + shift)
        if mask is not None:
            if mask.shape[1] != past + shift + new_tokens:
                raise ValueError(
                    f"attention_mask has {mask.shape[1]} columns; after a pruned prefill it must cover the "
                    f"unpruned sequence: {past + shift + new_tokens} ({past} cached + {shift} pruned + "
                    f"{new_tokens} new)"
                )
            held = self._cache_mask(cache, past, mask)
            out[ATTENTION_MASK] = torch.cat([held, mask[:, past + shift:].to(held.dtype)], dim=1)
        if kwargs.get(CACHE_POSITION) is not None:
            out[CACHE_POSITION] = kwargs[CACHE_POSITION] - shift
        return out


def _tensors_of(value) -> list[torch.Tensor]:
    """A :data:`VISUAL_ROWS` input's tensors: the tensor, or those of a list or tuple."""
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _like(value, tensors: list[torch.Tensor]):
    """``tensors`` in the container of ``value`` (a tensor, list or tuple)."""
    if isinstance(value, (list, tuple)):
        return type(value)(tensors)
    return tensors[0]


def _each_tensor(visual_rows: dict, transform) -> dict:
    """Every tensor of every :data:`VISUAL_ROWS` input through ``transform``, each input in its
    own container."""
    return {name: _like(value, [transform(t) for t in _tensors_of(value)]) for name, value in visual_rows.items()}


def _resolved_use_cache(kwargs, config) -> bool:
    """Whether the language model will fill a cache: its ``use_cache``, or the config's."""
    return config.use_cache if kwargs.get(USE_CACHE) is None else bool(kwargs[USE_CACHE])


def _padding_side(first_real: list[int], last_real: list[int]) -> str:
    """Where a batch is padded, from whether each sample's first and last tokens are real:
    "right" when some sample ends in padding, else "left". Both is a ValueError: the pruned
    tokens could not keep each sample's side."""
    left, right = 0 in first_real, 0 in last_real
    if left and right:
        raise ValueError("attention_mask pads some samples on the left and others on the right (or both sides of "
                         "one): below budget 1.0 VisionSelector keeps one padding side per batch")
    return "right" if right else "left"


def _row_of_visual(call: _Call, visual_indices: torch.Tensor, rows_of: torch.Tensor) -> torch.Tensor:
    """For each visual token (packed order), its row among the placeholders' rows."""
    rank = torch.cumsum(call.placeholders.reshape(-1).long(), 0) - 1
    return rank.index_select(0, visual_indices).to(rows_of.device)


@dataclasses.dataclass
class _Sequences:
    """A padding-free row's sequences laid out as the samples of a right-padded batch
    ``[S, W]`` (what the selection runs on), and the way back to the row."""

    slots: torch.Tensor  # int64 [L]: each token's slot in the batch's S * W
    count: int
    width: int

    @classmethod
    def of(cls, sequences: torch.Tensor) -> "_Sequences":
        ids = sequences[0]
        lengths = torch.bincount(ids).tolist()  # host sync: the batch's shape
        starts = torch.tensor([0, *lengths[:-1]], device=ids.device).cumsum(0)
        offset = torch.arange(ids.numel(), device=ids.device) - starts[ids]
        width = max(lengths)
        return cls(ids * width + offset, len(lengths), width)

    def to_batch(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        """``t [1, L, ...]`` as ``[S, W, ...]`` (``fill`` in the padding)."""
        out = t.new_full((self.count * self.width, *t.shape[2:]), fill)
        return out.index_copy(0, self.slots, t[0]).view(self.count, self.width, *t.shape[2:])

    def to_row(self, t: torch.Tensor) -> torch.Tensor:
        """``t [S, W, ...]`` as ``[1, L, ...]``."""
        return t.reshape(self.count * self.width, *t.shape[2:]).index_select(0, self.slots).unsqueeze(0)

    def virtual_call(self, call: _Call) -> _Call:
        batch = self.to_batch
        mask = batch(torch.ones_like(call.visual_mask, dtype=torch.long))
        return dataclasses.replace(
            call,
            visual_mask=batch(call.visual_mask),
            image_ids=None if call.image_ids is None else batch(call.image_ids, -1),
            attention_mask=mask,
            kinds=None if call.kinds is None else batch(call.kinds, -1),
            placeholders=batch(call.placeholders),
            sequences=None,
        )

    def soft_inputs_in_row(self, out: dict, selection: Selection) -> dict:
        """Training's soft-mask inputs (and the selection's masks) back in the row's layout."""
        for name in ("soft_mask", "visual_mask", "hard_mask"):
            setattr(selection, name, self.to_row(getattr(selection, name)))
        return {**out, INPUTS_EMBEDS: self.to_row(out[INPUTS_EMBEDS])}
