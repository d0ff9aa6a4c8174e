"""vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL with VisionSelector: one processor mixin and one model
mixin over vLLM's own classes, which they leave unchanged where the model config has no
``visionselector`` entry (or budget 1.0).

- The processor writes ``budget_to_k(n, budget)`` placeholders per image or video instead of
  ``n`` (vLLM schedules, caches and positions the prompt by them).
- The model runs vLLM's tower and merger, selects that many tokens of each medium with the
  configured method, and hands vLLM the kept rows with their M-RoPE offsets appended (vLLM's
  pruned-media path). Its ``get_mrope_input_positions`` gives the text the unpruned prompt's
  positions, and its ``recompute_mrope_positions`` writes each kept token's own position when
  its prefill chunk runs (vLLM's function for pruned video mistakes a chunk that starts at a
  second medium's ``<|vision_start|>`` for the middle of the first).
- Its weight loader takes the learned scorer from ``visual.importance_scorer.*`` or
  ``model.visual.importance_scorer.*`` (either published layout) instead of failing on them.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vsops.budget import budget_to_k
from vsops.methods import VisionSelectorMethod, make_method
from vsops.scorer import SCORER_PREFIXES, LearnableImportanceScorer
from vsops.vllm.selection import OFFSET_COLUMNS, media_positions, select_media, write_media_positions
from vsops.vllm.settings import ServingSettings, settings_of

__all__ = ["VisionSelectorQwen2VL", "VisionSelectorQwen2_5_VL", "VisionSelectorQwen3VL"]

class _KeptPlaceholders:
    """Processor mixin: each medium's placeholder run shortened to the tokens kept of it."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        settings = settings_of(self.info.get_hf_config())
        if settings is None:
            return updates
        return [dataclasses.replace(update, replacement=_kept_run(update.replacement, settings.budget))
                for update in updates]


def _kept_run(replacement, budget: float):
    """A placeholder replacement (a token list, or a function of the item index giving one)
    cut to ``budget_to_k`` of its length; every token of a Qwen-VL run is the same."""
    def kept(item_idx: int):
        run = replacement(item_idx) if callable(replacement) else replacement
        if not isinstance(run, list):
            # Qwen3-VL's videos: frames with timestamps between them, one run per frame.
            raise ValueError("the vsops vLLM plugin prunes this model's images only; send videos to a model "
                             "served without a visionselector entry")
        return run[: budget_to_k(len(run), budget)]

    return kept


class _VisionSelectorModel:
    """Model mixin over a vLLM Qwen-VL model class (see the module's docstring)."""

    supports_multimodal_pruning = True

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.visionselector: ServingSettings | None = settings_of(vllm_config.model_config.hf_config)
        # Read by vLLM's model runners: the kept tokens' positions are rewritten after the
        # encoder (vsops.vllm.runner turns it on where a runner does not).
        self.is_multimodal_pruning_enabled = self.visionselector is not None
        # The learned scorer's method is made when its weights load.
        settings = self.visionselector
        self._selection_method = None if settings is None or settings.needs_scorer else make_method(
            settings.method, **settings.options)

    # -- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        scorer: dict[str, torch.Tensor] = {}

        def model_weights():
            for name, tensor in weights:
                prefix = next((p for p in SCORER_PREFIXES if name.startswith(p)), None)
                if prefix is None:
                    yield name, tensor
                else:
                    scorer[name[len(prefix):]] = tensor

        loaded = super().load_weights(model_weights())
        settings = self.visionselector
        if settings is None:
            return loaded  # a checkpoint's scorer is read past, as the model is served unpruned
        if not settings.needs_scorer:
            return loaded
        if not scorer:
            raise ValueError(
                "the visionselector method needs the learned scorer, but the checkpoint has no "
                f"{SCORER_PREFIXES[0]}* or {SCORER_PREFIXES[1]}* weights; serve a trained checkpoint, or choose a "
                "method that needs none (e.g. 'divprune', 'norm', 'random')"
            )
        weight = scorer.get("q_proj.weight")
        if weight is None:
            raise ValueError(f"the checkpoint's scorer has no q_proj.weight (keys: {sorted(scorer)})")
        reference = next(self.visual.parameters())
        module = LearnableImportanceScorer(weight.shape[1], weight.shape[0], device=reference.device,
                                           dtype=reference.dtype)
        module.load_state_dict(scorer)
        self.visionselector_scorer = module
        self._selection_method = VisionSelectorMethod(module)
        return loaded | {f"visionselector_scorer.{name}" for name in scorer}

    # -- the visual tokens ----------------------------------------------------------------------

    def embed_multimodal(self, **kwargs) -> Sequence[torch.Tensor]:
        settings = self.visionselector
        if settings is None:
            return super().embed_multimodal(**kwargs)
        if self._selection_method is None:
            raise ValueError("the visionselector method's scorer was never loaded (weights not read from a "
                             "checkpoint, e.g. load_format='dummy'): serve a checkpoint with the scorer")
        merge = self.config.vision_config.spatial_merge_size
        tokens_per_second = getattr(self.config.vision_config, "tokens_per_second", 1.0)
        # Qwen3-VL's rows carry its deepstack features after the merged token: scored on the
        # token alone, kept whole.
        width = getattr(self, "visual_dim", None) if getattr(self, "use_deepstack", False) else None
        out: tuple[torch.Tensor, ...] = ()
        for key, media in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            image = key.startswith("image")
            embeds = self._process_image_input(media) if image else self._process_video_input(media)
            grids = media["image_grid_thw" if image else "video_grid_thw"].tolist()
            seconds = None if image else media.get("second_per_grid_ts")
            positions = [
                media_positions(grid, merge, 1.0 if seconds is None else float(seconds[i]),
                                1.0 if image else tokens_per_second)
                for i, grid in enumerate(grids)
            ]
            out += select_media(embeds, positions, settings.budget, self._selection_method, score_width=width)
        return out

    # -- positions ------------------------------------------------------------------------------

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features) -> tuple[torch.Tensor, int]:
        if self.visionselector is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        # The unpruned prompt's positions for its text; each medium's run of kept
        # placeholders holds the first of its grid positions until its tokens are selected
        # (recompute_mrope_positions then writes the kept tokens' own).
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        chunks, start, next_position = [], 0, 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self._media_grids(features)):
            text = offset - start
            chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            grid = np.indices((t, h, w))
            grid[0] = (grid[0] * t_factor).astype(np.int64)
            grid = grid.reshape(3, -1) + next_position + text
            run = feature.mm_position.length
            chunks.append(grid[:, :run])
            next_position = int(grid.max()) + 1
            start = offset + run
        text = len(input_tokens) - start
        chunks.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
        positions = np.concatenate(chunks, axis=1)
        return torch.from_numpy(np.ascontiguousarray(positions)), next_position + text - len(input_tokens)

    def _media_grids(self, features):
        """(offset, t, h, w, t factor) of each medium in merged tokens, in prompt order: vLLM's
        own reading where the model has one (Qwen2-VL, Qwen2.5-VL), else images alone."""
        if hasattr(self, "iter_mm_grid_thw"):
            yield from self.iter_mm_grid_thw(features)
            return
        merge = self.config.vision_config.spatial_merge_size
        for feature in features:
            if feature.modality != "image":
                raise ValueError("the vsops vLLM plugin prunes this model's images only")
            t, h, w = feature.data["image_grid_thw"].data.tolist()
            yield feature.mm_position.offset, t, h // merge, w // merge, 1.0

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        """The kept rows without their offsets, the prompt's positions with the kept tokens of
        this chunk's media written in, and the decode delta (the text positions, and so the
        delta, are final from :meth:`get_mrope_input_positions`)."""
        config = self.config
        ids = torch.as_tensor(input_ids, device=mrope_positions.device)
        media = (ids == config.image_token_id) | (ids == config.video_token_id)
        rows = [m[:, :-OFFSET_COLUMNS] for m in multimodal_embeddings]
        offsets = [m[:, -OFFSET_COLUMNS:].round().long() for m in multimodal_embeddings]
        offsets = torch.cat(offsets) if offsets else mrope_positions.new_zeros(0, OFFSET_COLUMNS)
        positions = write_media_positions(media, offsets, mrope_positions, num_computed_tokens)
        return rows, positions, int(positions[0, -1]) + 1 - ids.numel()


class _Qwen2VLProcessor(_KeptPlaceholders, Qwen2VLMultiModalProcessor):
    pass


class _Qwen2_5_VLProcessor(_KeptPlaceholders, Qwen2_5_VLMultiModalProcessor):
    pass


class _Qwen3VLProcessor(_KeptPlaceholders, Qwen3VLMultiModalProcessor):
    pass


@MULTIMODAL_REGISTRY.register_processor(_Qwen2VLProcessor, info=Qwen2VLProcessingInfo,
                                        dummy_inputs=Qwen2VLDummyInputsBuilder)
class VisionSelectorQwen2VL(_VisionSelectorModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with VisionSelector."""


@MULTIMODAL_REGISTRY.register_processor(_Qwen2_5_VLProcessor, info=Qwen2_5_VLProcessingInfo,
                                        dummy_inputs=Qwen2_5_VLDummyInputsBuilder)
class VisionSelectorQwen2_5_VL(_VisionSelectorModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with VisionSelector."""


@MULTIMODAL_REGISTRY.register_processor(_Qwen3VLProcessor, info=Qwen3VLProcessingInfo,
                                        dummy_inputs=Qwen3VLDummyInputsBuilder)
class VisionSelectorQwen3VL(_VisionSelectorModel, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with VisionSelector (images; videos are refused while it prunes)."""
