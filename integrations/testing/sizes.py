"""The sizes every tiny test model shares, checked once, and the language-model config entries
that follow from them."""
from __future__ import annotations

import dataclasses

from vsops.integrations.testing.prompts import TOKENS

__all__ = ["TinySizes", "SPECIAL_IDS", "MEDIA_IDS"]

SPECIAL_IDS = dict(bos_token_id=TOKENS["bos"], eos_token_id=TOKENS["eos"], pad_token_id=TOKENS["pad"])
MEDIA_IDS = dict(image_token_id=TOKENS["image"], video_token_id=TOKENS["video"],
                 vision_start_token_id=TOKENS["vision_start"], vision_end_token_id=TOKENS["vision_end"])


@dataclasses.dataclass(frozen=True)
class TinySizes:
    """A tiny model's sizes: the language model's ``hidden_size``, ``layers``, attention
    ``heads`` and ``kv_heads``, MLP ``intermediate_size`` and ``vocab_size`` (above the special
    ids of :data:`~vsops.integrations.testing.prompts.TOKENS`); the vision tower's
    ``vision_hidden_size`` and ``vision_depth``. Every size is a positive int, ``heads``
    divides ``hidden_size`` and ``kv_heads`` divides ``heads`` (else a ValueError naming it);
    each model's builder adds its own constraints."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_depth: int = 2
    vocab_size: int = 128

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{field.name} must be a positive int, got {value!r}")
        if self.hidden_size % self.heads:
            raise ValueError(f"hidden_size // heads must be an int, got {self.hidden_size} / {self.heads}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads must be a multiple of kv_heads, got {self.heads} and {self.kv_heads}")
        if self.vocab_size <= max(TOKENS.values()):
            raise ValueError(f"vocab_size must exceed the special token ids ({max(TOKENS.values())}), got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.heads

    def text_config(self) -> dict:
        """The language-model config entries these sizes set, with 1e4 rope theta, room for 32k
        positions, an untied head and the special token ids."""
        return dict(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=32768,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            **SPECIAL_IDS,
        )
