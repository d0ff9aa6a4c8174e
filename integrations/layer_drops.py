"""Drops inside the language model: methods such as FastV remove visual tokens before a
decoder layer ``K``, from what layer ``K - 1`` computed (:mod:`vsops.methods.layer`).

At a prefill, hooks on the decoder layers do it:

- layer ``K - 1``'s attention hands its queries and keys (after the rotary embedding) to the
  method on the way to the model's own attention function (:func:`capturing_attention`,
  registered with transformers' ``AttentionInterface``), so sdpa, eager and flash-attention run
  unchanged and no attention matrix is held;
- before layer ``K``, the method's keep mask packs the hidden states, the rotary embeddings and
  the per-token bookkeeping in one :func:`~vsops.varlen.select_and_pad` (or
  :func:`~vsops.varlen.select_and_pack` where the input came packed); the masks of the later
  layers are made anew for the kept tokens, each sized against its own layer of the cache;
- every later layer gets those masks (or the packed sequences' offsets) and rotary embeddings
  in place of the language model's.

Layers before ``K`` keep every token in the cache, the later ones the kept tokens only. The
cache carries a record of each drop (:class:`DropRecord`), by which later steps give each layer
the mask of what it holds; positions stay those of the unpruned sequence. Static caches are
refused (their layout is fixed); transformers 5 only.
"""
from __future__ import annotations

import dataclasses
import sys

import torch

from vsops.integrations.conventions import ATTENTION_MASK, cache_of
from vsops.methods.layer import LAYER_HIDDEN, LayerMethod, LayerState
from vsops.varlen import cu_seqlens_from_counts, select_and_pack, select_and_pad

__all__ = ["CAPTURE_IMPLEMENTATION", "DropRecord", "PrefillDrops", "DecodeDrops", "drop_record", "register_capture",
           "unavailable_reason"]

CAPTURE_IMPLEMENTATION = "vsops_layer_capture"
_RECORD_ATTRIBUTE = "_vsops_layer_drops"
_FULL = "full_attention"


@dataclasses.dataclass
class DropRecord:
    """What a prefill with drops left in its cache.

    Attributes:
        prefill_length: the tokens the layers before the first drop hold from the prefill.
        stages: per drop, its first layer and the int64 ``[B, L_s]`` attention mask of what
            the layers from there on hold from the prefill.
    """

    prefill_length: int
    stages: list[tuple[int, torch.Tensor]]


def unavailable_reason() -> str | None:
    """Why drops inside the language model cannot run with the installed transformers (its
    4.x models take positions and masks in a form the drops do not rewrite); None when they
    can."""
    import transformers

    if int(transformers.__version__.split(".")[0]) < 5:
        return f"drops inside the language model need transformers >= 5 (this is {transformers.__version__})"
    return None


def drop_record(cache) -> DropRecord | None:
    """The drops recorded in ``cache`` (None for a cache without)."""
    return None if cache is None else getattr(cache, _RECORD_ATTRIBUTE, None)


def register_capture() -> None:
    """Registers :func:`capturing_attention` with transformers' ``AttentionInterface``."""
    from transformers import AttentionInterface

    AttentionInterface.register(CAPTURE_IMPLEMENTATION, capturing_attention)


class _CaptureConfig:
    """What a layer's attention sees as its config while a drop reads it: the original config
    (``original``) in every attribute but the attention implementation, which is the capture
    (that then runs the original implementation)."""

    _attn_implementation = CAPTURE_IMPLEMENTATION

    def __init__(self, config, sink: dict, index: int):
        self.original, self.sink, self.index = config, sink, index

    def __getattr__(self, name):
        return getattr(self.original, name)


def capturing_attention(module, query, key, value, attention_mask, **kwargs):
    """An attention function that records ``query [B, Hq, L, d]`` and ``key [B, Hkv, L', d]``
    (after rotary embedding and the cache update) for a drop, then runs the module's own
    implementation on them."""
    capture: _CaptureConfig = module.config
    capture.sink[capture.index] = (query, key)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module.config = capture.original
    try:
        name = capture.original._attn_implementation
        function = None if name == "eager" else ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
        if function is None:
            function = sys.modules[type(module).__module__].eager_attention_forward
        return function(module, query, key, value, attention_mask, **kwargs)
    finally:
        module.config = capture


def _layer_types(language_model) -> list[str]:
    config = language_model.config
    return list(getattr(config, "layer_types", None) or [_FULL] * len(language_model.layers))


def _stage_masks(language_model, hidden, mask, cache, first: int) -> dict:
    """The masks of layers ``first`` on, by layer type, for tokens ``hidden [B, q, D]`` whose
    2-D mask over what those layers hold and the new tokens is ``mask`` (None: no padding),
    each sized against the first layer of its type from ``first``."""
    from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

    types = _layer_types(language_model)
    out = {}
    for index in range(first, len(types)):
        kind = types[index]
        if kind not in out:
            make = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING[kind]
            out[kind] = make(config=language_model.config, inputs_embeds=hidden, attention_mask=mask, cache=cache,
                             layer_idx=index)
    return out


def _gather_tokens(t: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """``t [..., B, L, d]`` (a rotary embedding) at ``slots`` int64 ``[B, L']``."""
    b, length = slots.shape
    lead = t.shape[:-3]
    t = t.expand(*lead, b, t.shape[-2], t.shape[-1])
    index = slots.view(*(1,) * len(lead), b, length, 1).expand(*lead, b, length, t.shape[-1])
    return t.gather(t.dim() - 2, index)


def _check_attention_layer(language_model, layer: int, method) -> None:
    types = _layer_types(language_model)
    if types[layer] not in (_FULL, "sliding_attention") or not hasattr(language_model.layers[layer], "self_attn"):
        full = [i + 1 for i, kind in enumerate(types) if kind == _FULL and i + 1 < len(types)]
        raise ValueError(
            f"the {method.name!r} method drops before layer {layer + 1}, reading layer {layer}'s attention, which is "
            f"a {types[layer]} layer; choose a drop layer after a softmax-attention layer: {full}"
        )


class PrefillDrops:
    """The drops of one prefill, on the language model's input: a padded batch, or (``cu_seqlens``)
    the samples packed in one row.

    Made with the bookkeeping of each slot of that input, ``[B, L]`` (``[1, T]`` packed):
    ``sample``, the caller's sample (-1 at padding); ``origin``, the caller's token index;
    ``visual`` and ``segment`` as in :class:`~vsops.methods.layer.LayerState`. The decoder
    layers' hooks call :meth:`before_layer` and :meth:`after_layer`.
    """

    def __init__(self, language_model, method: LayerMethod, budget: float, *, sample, origin, visual, segment,
                 padding_side: str, visual_counts: list[int], cu_seqlens: torch.Tensor | None = None):
        layers = len(language_model.layers)
        self.language_model, self.method, self.budget = language_model, method, budget
        self.drops = method.drop_layers(layers)
        for layer in self.drops:
            _check_attention_layer(language_model, layer - 1, method)
        self.sample, self.origin, self.visual, self.segment = sample, origin, visual & (sample >= 0), segment
        self.slots = torch.arange(sample.shape[1], device=sample.device).expand_as(sample)  # the input's slot
        self.padding_side, self.cu_seqlens = padding_side, cu_seqlens
        self.samples = len(visual_counts)
        self.visual_counts = visual_counts
        self.kept_visual = visual_counts
        self.stage_tokens = [(0, int((sample >= 0).sum()))]  # (first layer, real tokens of the batch there)
        self.captured: dict = {}
        self.overrides: dict | None = None
        self._masks: dict = {}
        self.record: DropRecord | None = None
        self._swapped: dict = {}

    @property
    def mask(self) -> torch.Tensor:
        """int64 ``[B, L]``: the real slots of the current layout."""
        return (self.sample >= 0).long()

    def before_layer(self, index: int, layer, hidden: torch.Tensor, kwargs: dict):
        """``(hidden, kwargs)`` for decoder layer ``index``: the drop before it, if any, and the
        masks and rotary embeddings of the kept tokens."""
        if index in self.drops:
            # A later drop gathers from the rotary embeddings of the tokens an earlier one kept.
            hidden, kwargs = self._drop(index, hidden, {**kwargs, **(self.overrides or {})})
        if self.overrides is not None:
            kwargs = {**kwargs, **self.overrides}
            if self.cu_seqlens is None:
                kwargs[ATTENTION_MASK] = self._masks[_layer_types(self.language_model)[index]]
        if index + 1 in self.drops:
            attention = layer.self_attn
            self._swapped[index] = attention
            attention.config = _CaptureConfig(attention.config, self.captured, index)
        return hidden, kwargs

    def after_layer(self, index: int) -> None:
        attention = self._swapped.pop(index, None)
        if attention is not None:
            attention.config = attention.config.original

    def _drop(self, index: int, hidden, kwargs):
        query, key = self.captured.pop(index - 1)
        cache = cache_of(kwargs)
        if getattr(cache, "is_compileable", False):
            raise ValueError(f"the {self.method.name!r} method drops tokens inside the language model, which a static "
                             "cache's fixed layout cannot hold: use a dynamic cache")
        b, length = self.sample.shape
        segments = self.segment.masked_fill(~self.visual, -1)
        width = int(segments.max()) + 1 if segments.numel() else 0
        # Each sample's tokens of each segment (a slot with no visual segment counts in column 0).
        cell = (self.sample.clamp(min=0) * (width + 1) + segments + 1).masked_fill(self.sample < 0, 0)
        counts = torch.zeros(self.samples * (width + 1), dtype=torch.long, device=hidden.device)
        counts.scatter_add_(0, cell.reshape(-1), (self.sample >= 0).long().reshape(-1))
        counts = counts.view(self.samples, width + 1).tolist()  # each sample's text, then its segments' tokens
        text = [row[0] for row in counts]
        drop = self.drops.index(index)
        normed = self.language_model.norm(hidden) if LAYER_HIDDEN in self.method.needs else None
        keep = torch.zeros_like(self.visual)
        for sample in range(self.samples):
            row, where = self._positions(sample)
            state = LayerState(
                layer=index,
                visual=self.visual[row, where],
                segment=segments[row, where],
                query=query[row, :, where].transpose(0, 1),
                key=key[row, :, where].transpose(0, 1),
                hidden=None if normed is None else normed[row, where],
            )
            k = [self.method.kept(n, self.budget, len(self.language_model.layers), drop) for n in counts[sample][1:]]
            chosen = self.method.keep(state, k)
            if chosen.dtype != torch.bool or chosen.shape != state.visual.shape or not bool(
                    (chosen | state.visual).all()):
                raise ValueError(f"the {self.method.name!r} method must keep every non-visual token, as a bool mask "
                                 f"[{where.numel()}]")
            keep[row, where] = chosen
        slot = torch.arange(length, device=hidden.device).expand(b, length)
        carried = (hidden, slot, self.sample, self.origin, self.slots, self.visual.long(), self.segment)
        if self.cu_seqlens is None:
            lengths = keep.sum(1).tolist()
            padded = select_and_pad(keep, *carried, padding_side=self.padding_side, pad_values=(0, 0, -1, 0, 0, 0, 0),
                                    counts=lengths)
            tensors = padded.tensors
        else:
            lengths = torch.zeros(self.samples, dtype=torch.long, device=keep.device).index_add_(
                0, self.sample[keep], torch.ones_like(self.sample[keep])).tolist()
            tensors = [t.unsqueeze(0) for t in select_and_pack(keep, *carried, counts=[sum(lengths)]).tensors]
        self.stage_tokens.append((index, sum(lengths)))
        hidden, slot, self.sample, self.origin, self.slots, visual, self.segment = tensors
        self.visual = visual.bool()
        self.kept_visual = [n - t for n, t in zip(lengths, text)]  # every text token is kept
        cos_sin = kwargs["position_embeddings"]
        self.overrides = {"position_embeddings": tuple(_gather_tokens(t, slot) for t in cos_sin), "position_ids": None}
        if self.cu_seqlens is not None:
            self.cu_seqlens = cu_seqlens_from_counts(lengths, hidden.device)
            self.overrides.update(cu_seq_lens_q=self.cu_seqlens, cu_seq_lens_k=self.cu_seqlens,
                                  max_length_q=max(lengths), max_length_k=max(lengths))
            return hidden, kwargs
        mask = None if bool((self.sample >= 0).all()) else self.mask
        self._masks = _stage_masks(self.language_model, hidden, mask, cache, index)
        if cache is not None:
            if self.record is None:
                # The first drop sees the language model's input: what the earlier layers hold.
                self.record = DropRecord(length, [])
                setattr(cache, _RECORD_ATTRIBUTE, self.record)
            self.record.stages.append((index, self.mask))
        return hidden, kwargs

    def _positions(self, sample: int) -> tuple[int, torch.Tensor]:
        """The row and the slots of the caller's ``sample`` in the current layout."""
        if self.cu_seqlens is None:
            return sample, (self.sample[sample] >= 0).nonzero().squeeze(1)
        bounds = self.cu_seqlens[sample : sample + 2].tolist()
        return 0, torch.arange(bounds[0], bounds[1], device=self.sample.device)

    @property
    def dropped(self) -> bool:
        return self.overrides is not None

    def layer_tokens(self) -> list[int]:
        """The batch's real tokens each decoder layer saw."""
        return [[tokens for first, tokens in self.stage_tokens if first <= index][-1]
                for index in range(len(self.language_model.layers))]

    def deepstack_inputs(self, visual_pos_masks: torch.Tensor, visual_embeds: torch.Tensor):
        """Qwen3-VL's per-layer visual features (rows of the ``visual_pos_masks [B, L]`` tokens
        of the language model's input) reduced to the tokens still present, and their mask in
        the current layout."""
        present = torch.zeros_like(visual_pos_masks)
        real = self.sample >= 0
        present[real.nonzero()[:, 0], self.slots[real]] = True
        rows = present[visual_pos_masks]
        return visual_pos_masks.gather(1, self.slots) & real, visual_embeds[rows.to(visual_embeds.device)]

    def keep_of_caller(self, batch: int, length: int) -> torch.Tensor:
        """bool ``[batch, length]``: the caller's tokens the last layer saw."""
        keep = torch.zeros(batch, length, dtype=torch.bool, device=self.sample.device)
        real = self.sample >= 0
        keep[self.sample[real], self.origin[real]] = True
        return keep


class DecodeDrops:
    """A call on a cache with drops: each stage's layers get the mask of what they hold and
    the call's tokens. ``mask``: the language model's 2-D mask over what the layers before the
    first drop hold and the call's tokens (None: no padding)."""

    def __init__(self, language_model, record: DropRecord, mask):
        self.language_model, self.record, self.mask = language_model, record, mask
        self._masks: dict[int, dict] = {}
        self.dropped = False

    def before_layer(self, index: int, layer, hidden, kwargs):
        stages = [first for first, _ in self.record.stages if first <= index]
        if not stages:
            return hidden, kwargs
        first = stages[-1]
        if first not in self._masks:
            held = dict(self.record.stages)[first]
            cache = cache_of(kwargs)
            since = _held_length(self.language_model, cache, first) + hidden.shape[1] - held.shape[1]
            if self.mask is not None:
                tail = self.mask[:, self.record.prefill_length:].to(held.dtype)
                if tail.shape[1] != since:
                    raise ValueError(
                        f"the attention mask covers {tail.shape[1]} tokens after the prefill, but the cache holds "
                        f"{since - hidden.shape[1]} of them from layer {first} on and the call adds {hidden.shape[1]}"
                    )
            else:
                tail = held.new_ones(held.shape[0], since)
            full = torch.cat([held, tail], dim=1)
            self._masks[first] = _stage_masks(self.language_model, hidden, None if bool(full.bool().all()) else full,
                                              cache, first)
        return hidden, {**kwargs, ATTENTION_MASK: self._masks[first][_layer_types(self.language_model)[index]]}

    def after_layer(self, index: int) -> None:
        pass


def _held_length(language_model, cache, first: int) -> int:
    """The tokens the cache's softmax-attention layers from ``first`` on hold (recurrent layers
    hold a state, not tokens: with none of those after ``first``, the prefill's count)."""
    for index, kind in enumerate(_layer_types(language_model)[first:], first):
        if kind in (_FULL, "sliding_attention"):
            return cache.layers[index].get_seq_length()
    return 0


def decode_drops(language_model, kwargs) -> DecodeDrops | None:
    """The :class:`DecodeDrops` of a call on a cache with drops (``kwargs``: the language
    model's), None for any other call."""
    record = drop_record(cache_of(kwargs))
    if record is None:
        return None
    mask = kwargs.get(ATTENTION_MASK)
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        raise ValueError("after a prefill with drops inside the language model, later steps need the 2-D "
                         "attention mask (the layers after a drop hold fewer tokens)")
    return DecodeDrops(language_model, record, mask)
