"""What the runtime needs to know about one model family, and the registry of those adapters.

An adapter is a short declaration: how to recognize the model (``config.model_type``, and its
classes where they exist before loading), where the vision tower, merger, language model and
scorer are, which placeholder tokens are visual and how many tokens each image or video has,
and the rows of the position ids its language model takes. The hooks, the output fields, the
loss and the loading are shared (:mod:`.patching`, :mod:`.loading`); the selection is the
model-agnostic :class:`~vsops.integrations.runtime.VisionSelector`.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModelAdapter", "TOKENS", "VISUAL_ROWS", "register_adapter", "adapter_for", "registered_model_types"]

# The layouts of ModelAdapter.token_inputs.
TOKENS = "tokens"  # [B, L, ...]: one entry per token
VISUAL_ROWS = "visual_rows"  # [V, ...] or a list of those: one row per visual token, row-major

_REGISTRY: dict[str, ModelAdapter] = {}


class ModelAdapter:
    """Base of the adapters; the defaults fit the Qwen2-VL family layout (``model.model`` is
    the multimodal model holding ``visual`` with its ``merger``, and ``language_model``; image
    and video placeholders whose token counts follow ``*_grid_thw`` and the spatial merge).

    Attributes:
        name: the adapter's short name (``vsops bench --model``, ``apply_visionselector_to_<name>``).
        model_types: the ``config.model_type`` values it serves.
        position_rows: rows of the language model's rope position ids (3: M-RoPE, 1: plain).
        visual_inputs: forward keywords whose presence means the call carries images or videos.
        remote_code: True when the model's classes come from the checkpoint
            (``trust_remote_code``), so that only instances can be patched.
        transformers_module: for a model transformers defines, its folder under
            ``transformers.models`` (the classes are in ``modeling_<folder>``); empty for
            remote code.
        class_prefix: the classes are ``<prefix>Model`` and ``<prefix>ForConditionalGeneration``.
        min_transformers: the oldest transformers ``(major, minor)`` the integration supports.
        vision_class_token: True when the vision tower opens each attention segment with a
            CLS token (whose attention row is the one VisionZip reads).
        token_inputs: language-model keyword arguments that describe the tokens and must
            follow the kept ones, by name: :data:`TOKENS` for a tensor laid out ``[B, L, ...]``
            (gathered with the kept tokens, padding 0), :data:`VISUAL_ROWS` for a tensor or a
            list of tensors ``[V, ...]`` with one row per visual token in row-major order
            (gathered with the kept visual tokens; in training scaled by each token's soft
            mask), e.g. Qwen3-VL's ``visual_pos_masks`` and ``deepstack_visual_embeds``.
        unpackable: why the language model cannot take packed sequences (the selector then pads,
            and ``packed=True`` is a ValueError saying so); empty when it can.
    """

    name: str = ""
    model_types: tuple[str, ...] = ()
    position_rows: int = 1
    visual_inputs: tuple[str, ...] = ("pixel_values", "pixel_values_videos")
    remote_code: bool = False
    transformers_module: str = ""
    class_prefix: str = ""
    min_transformers: tuple[int, int] = (4, 57)
    vision_class_token: bool = False
    token_inputs: dict[str, str] = {}
    unpackable: str = ""

    # -- recognizing the model ----------------------------------------------------------------

    def classes(self) -> tuple[type, type]:
        """``(multimodal model class, conditional-generation class)``, for the class patch."""
        if self.remote_code:
            raise ValueError(
                f"{self.name} is remote code (trust_remote_code): its classes exist only once a checkpoint "
                "is loaded; patch an instance, or load with vsops.integrations.from_pretrained"
            )
        import importlib

        try:
            import transformers
        except ImportError as e:  # pragma: no cover - exercised only without transformers
            raise ImportError(f"the {self.name} integration needs transformers") from e
        from packaging.version import Version

        found = Version(transformers.__version__).release[:2]
        wanted = ".".join(map(str, self.min_transformers))
        if found < self.min_transformers:
            raise ImportError(f"the {self.name} integration needs transformers >= {wanted} "
                              f"(found {transformers.__version__})")
        folder = self.transformers_module
        try:
            modeling = importlib.import_module(f"transformers.models.{folder}.modeling_{folder}")
        except ImportError as e:
            raise ImportError(f"transformers {transformers.__version__} has no {folder} model (the {self.name} "
                              f"integration needs transformers >= {wanted})") from e
        inner_name, top_name = self.class_names()[::-1]
        return getattr(modeling, inner_name), getattr(modeling, top_name)

    def split(self, model: nn.Module) -> tuple[nn.Module | None, nn.Module]:
        """``(top, inner)``: the conditional-generation model (or None when ``model`` is the
        multimodal model itself) and the multimodal model. Raises TypeError for any other
        module."""
        top_cls_name, inner_cls_name = self.class_names()
        names = {cls.__name__ for cls in type(model).__mro__}
        if top_cls_name in names:
            return model, model.model
        if inner_cls_name in names:
            return None, model
        raise TypeError(f"model must be a {top_cls_name} or {inner_cls_name}, got {type(model).__name__}")

    def class_names(self) -> tuple[str, str]:
        """Names of the conditional-generation and multimodal classes."""
        return f"{self.class_prefix}ForConditionalGeneration", f"{self.class_prefix}Model"

    def load(self, path, **hf_kwargs) -> nn.Module:
        """The unpatched model from a checkpoint directory (or hub id)."""
        return self.classes()[1].from_pretrained(path, **hf_kwargs)

    def check_checkpoint(self, config, keys: list[str]) -> None:
        """Raises ValueError when the tensor names ``keys`` of a checkpoint do not fit its
        ``config`` in a way transformers would load silently wrong. Nothing by default."""

    # -- where things are ---------------------------------------------------------------------

    def vision_tower(self, inner: nn.Module) -> nn.Module:
        """The module the scorer is attached to (as ``importance_scorer``, the published key)."""
        return inner.visual

    def merger(self, inner: nn.Module) -> nn.Module:
        """The module whose output the scorer scores (it sets the scorer's device and dtype)."""
        return inner.visual.merger

    def language_model(self, inner: nn.Module) -> nn.Module:
        return inner.language_model

    def vision_attention_layer(self, tower: nn.Module) -> nn.Module:
        """The attention module whose attention methods such as VisionZip read: the last
        full-attention block's (``qkv`` a fused projection laid out ``[S, 3, heads, head_dim]``,
        ``num_heads``; called with ``cu_seqlens`` and rotary ``position_embeddings``)."""
        full = getattr(tower, "fullatt_block_indexes", None)
        if not full:
            return tower.blocks[-1].attn
        inside = [i for i in full if 0 <= i < len(tower.blocks)]
        if not inside:
            raise ValueError(
                f"the vision tower's fullatt_block_indexes {list(full)} name no block of its {len(tower.blocks)}: "
                "it has no full-attention block whose attention a method could read (its config does not fit it)"
            )
        return tower.blocks[inside[-1]].attn

    def merge_unit(self, tower: nn.Module) -> int:
        """Patches per visual token (the merger joins ``merge x merge`` patches)."""
        return tower.spatial_merge_size**2

    def vision_merged_order(self, tower: nn.Module, grid: torch.Tensor) -> torch.Tensor | None:
        """For each visual token of a tower call in output order, its index in the attention
        layer's order of merge units; None when the orders agree."""
        return None

    def scorer_size(self, inner: nn.Module) -> int:
        """The scorer's input size: the language model's hidden size, which the merger emits."""
        return inner.config.text_config.hidden_size

    # -- which tokens are visual --------------------------------------------------------------

    def placeholders(self, config) -> dict[str, tuple[int, str]]:
        """Per kind of visual input, its placeholder token id and the forward keyword of its
        ``[n, 3]`` grids: ``{"image": (id, "image_grid_thw"), "video": (id, "video_grid_thw")}``,
        in the order the model assigns features to placeholders."""
        return {
            "image": (config.image_token_id, "image_grid_thw"),
            "video": (config.video_token_id, "video_grid_thw"),
        }

    def tokens_per_item(self, inner: nn.Module, grid: torch.Tensor) -> torch.Tensor:
        """Placeholder tokens of each image or video of ``grid`` (int64 ``[n, 3]`` of
        t, h, w patches): the merger joins ``merge x merge`` patches into one token."""
        return grid.prod(-1) // inner.visual.spatial_merge_size**2

    def extra_inputs(self, input_ids: torch.Tensor, config) -> dict:
        """Per-token inputs the model's forward takes besides ``input_ids`` (built from them),
        e.g. for a collate function. None by default."""
        return {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Adds ``adapter`` to the registry under each of its ``model_types`` and its ``name``."""
    for key in (*adapter.model_types, adapter.name):
        _REGISTRY[key] = adapter
    return adapter


def registered_model_types() -> list[str]:
    """The ``config.model_type`` values an adapter serves."""
    _load_builtin_adapters()
    return sorted({t for a in _REGISTRY.values() for t in a.model_types})


def adapter_for(model_type: str) -> ModelAdapter:
    """The adapter of ``model_type`` (a ``config.model_type``, or an adapter's name)."""
    if not isinstance(model_type, str):
        raise TypeError(f"model_type must be a str, got {type(model_type).__name__}")
    _load_builtin_adapters()
    adapter = _REGISTRY.get(model_type)
    if adapter is None:
        names = sorted({a.name for a in _REGISTRY.values()})
        raise ValueError(
            f"no VisionSelector adapter for model_type {model_type!r}; supported model_types: "
            f"{registered_model_types()} (adapter names {names})"
        )
    return adapter


def _load_builtin_adapters() -> None:
    # Importing an adapter module registers it; they import transformers lazily.
    from vsops.integrations import llava_ov_1_5, qwen2_5_vl, qwen2_vl, qwen3_5, qwen3_vl  # noqa: F401
