"""The kept tokens' M-RoPE positions the vLLM plugin writes (vsops.vllm.selection), against
transformers' Qwen2.5-VL ``get_rope_index`` of the unpruned prompt; needs no vLLM."""
import inspect

import pytest
import torch

pytest.importorskip("transformers")

from vsops.integrations.testing import qwen_vl_batch, tiny_qwen_vl_config  # noqa: E402
from vsops.vllm.selection import media_positions, write_media_positions  # noqa: E402


def test_kept_tokens_keep_the_unpruned_prompts_positions_whatever_the_chunks():
    from transformers import Qwen2_5_VLModel

    config = tiny_qwen_vl_config("qwen2_5_vl")
    batch = qwen_vl_batch([[3, ("image", 4, 8), 2, ("image", 6, 6), 4]], "qwen2_5_vl")
    ids = batch["input_ids"][0]
    rope_index = Qwen2_5_VLModel(config).get_rope_index
    taken = inspect.signature(rope_index).parameters  # mm_token_type_ids from 5.x on
    expected = rope_index(**{k: v for k, v in batch.items() if k in taken})[0][:, 0]
    media = ids == config.image_token_id
    offsets = [media_positions(grid, 2) for grid in batch["image_grid_thw"].tolist()]
    keep = torch.rand(int(media.sum()), generator=torch.Generator().manual_seed(0)) < 0.5
    # The pruned prompt: text with the text positions of the unpruned one, kept placeholders.
    kept_media = media.clone()
    kept_media[media] = keep
    pruned = ~media | kept_media
    text_positions = torch.where(media, torch.zeros_like(expected), expected)[:, pruned]
    all_offsets = torch.cat(offsets)[keep]
    for chunk in (len(ids), 5, 3):  # one prefill, and chunks that start inside and between media
        positions = text_positions
        for first in range(0, int(pruned.sum()), chunk):
            in_chunk = int(media[pruned][first:first + chunk].sum())
            done = int(media[pruned][:first].sum())
            positions = write_media_positions(media[pruned], all_offsets[done:done + in_chunk], positions, first)
        torch.testing.assert_close(positions, expected[:, pruned], rtol=0, atol=0)
