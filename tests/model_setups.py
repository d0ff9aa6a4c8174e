"""The models of the integration contract suite: one entry per registered model family, each a
tiny random model built offline and the way to hand-feed its language model. A new model is
one adapter plus one entry here.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import tempfile
from pathlib import Path
from typing import Callable

import torch

from vsops.integrations.testing.llava_ov_1_5 import unavailable_reason

TRANSFORMERS_VERSION = None
if importlib.util.find_spec("transformers") is not None:
    import transformers

    TRANSFORMERS_VERSION = tuple(int(p) for p in transformers.__version__.split(".")[:2])


@dataclasses.dataclass(frozen=True)
class ModelSetup:
    """name: the adapter's name. make_model(attn, seed): an unpatched eval-mode model.
    make_batch(prompts, seed, padding_side): its inputs for prompts of text/("image", h, w)/("video", t,
    h, w).
    lm_positions(rows): the language model's ``position_ids`` for one sample from its rope rows
    ``[R, n]``. decode_positions(model, longer, token): the ``position_ids`` a hand-written
    decode step passes (None: the model derives them). skip: why this transformers cannot run it."""

    name: str
    make_model: Callable
    make_batch: Callable
    lm_positions: Callable
    decode_positions: Callable
    generate_prompts: list
    skip: str | None

    def __repr__(self) -> str:
        return self.name


def _qwen_model(model_type, attn="sdpa", seed=0, **config):
    from vsops.integrations import adapter_for
    from vsops.integrations.testing import tiny_qwen_vl_config

    torch.manual_seed(seed)
    model_cls = adapter_for(model_type).classes()[1]
    return model_cls(tiny_qwen_vl_config(model_type, attn_implementation=attn, **config)).eval()


def _qwen_batch(model_type, prompts, seed=1, padding_side="left"):
    from vsops.integrations.testing import qwen_vl_batch

    return qwen_vl_batch(prompts, model_type, seed=seed, padding_side=padding_side)


def _qwen_unavailable(model_type) -> str | None:
    if TRANSFORMERS_VERSION is None:
        return "transformers is not installed"
    from vsops.integrations import adapter_for

    try:
        adapter_for(model_type).classes()
    except ImportError as e:
        return str(e)
    return None


def _qwen_decode_positions(model, longer, token):
    # transformers 5 does not infer the 3-D position in a hand-written decode loop; rope_deltas
    # counts from the unpadded length in transformers 5 and from the padded one in 4.x.
    mask = longer["attention_mask"]
    if TRANSFORMERS_VERSION >= (5, 0):
        index = mask.sum(1, keepdim=True) - 1
    else:
        index = torch.full_like(token, mask.shape[1] - 1)
    return (index + model.model.rope_deltas).unsqueeze(0).expand(3, -1, -1)


@functools.lru_cache(maxsize=None)
def _llava_dir(seed: int) -> str:
    from vsops.integrations.testing import llava_ov_1_5_model_dir

    # One folder name for every seed: transformers names the remote code's module after it.
    return str(llava_ov_1_5_model_dir(Path(tempfile.mkdtemp()) / "tiny_llava_ov_1_5", seed=seed))


def _llava_model(attn="sdpa", seed=0):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(_llava_dir(seed), trust_remote_code=True, attn_implementation=attn).eval()


def _llava_batch(prompts, seed=1, padding_side="left"):
    from vsops.integrations.testing import llava_ov_1_5_batch

    return llava_ov_1_5_batch(prompts, seed=seed, padding_side=padding_side)


def _qwen_setup(model_type: str) -> ModelSetup:
    return ModelSetup(
        name=model_type,
        make_model=functools.partial(_qwen_model, model_type),
        make_batch=functools.partial(_qwen_batch, model_type),
        lm_positions=lambda rows: rows[:, None],
        decode_positions=_qwen_decode_positions,
        # Pruning changes which sample is longest: sample 0 loses 12 of its 25 tokens, sample
        # 1 (7 of padding) 3 of its 18, so the pruned cache's padding differs from the caller's.
        generate_prompts=[[3, ("image", 8, 8), 4], [10, ("image", 4, 4), 2]],
        skip=_qwen_unavailable(model_type),
    )


SETUPS = [
    _qwen_setup("qwen2_5_vl"),
    _qwen_setup("qwen2_vl"),
    _qwen_setup("qwen3_vl"),
    _qwen_setup("qwen3_vl_moe"),
    _qwen_setup("qwen3_5"),
    _qwen_setup("qwen3_5_moe"),
    ModelSetup(
        name="llava_ov_1_5",
        make_model=_llava_model,
        make_batch=_llava_batch,
        lm_positions=lambda rows: rows,
        decode_positions=lambda model, longer, token: None,
        # One image per call: the published RICE tower misreads every image after the first of
        # a call (tests/integrations/test_llava_ov_1_5_model.py), so a batch with two images
        # differs from its samples alone in the unpatched model too. Sample 0 goes from 25 tokens
        # to 13, below sample 1's 16: the pruned cache's padding differs from the caller's.
        generate_prompts=[[3, ("image", 8, 8), 4], [14]],
        skip=unavailable_reason(),
    ),
]
