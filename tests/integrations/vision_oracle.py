"""The vision-tower attention VisionZip reads, computed the plain way for the contract suite:
each segment's attention formed whole from the layer's own projection and its model's own rotary
function, and the order of the tower's output tokens read off the tower itself (its output rows
matched to the merger's), not from the window bookkeeping the integration uses."""
from __future__ import annotations

import sys

import torch

from vsops.integrations import adapter_for
from vsops.integrations.testing import TOKENS


def _merged_order(merged: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """For each output row, the merger row it equals."""
    same = (output.unsqueeze(1) == merged.unsqueeze(0)).all(-1)
    assert bool((same.sum(1) == 1).all()), "the tower's output rows must match one merger row each"
    return same.float().argmax(1)


def _per_patch(layer, hidden, cu, cos, sin, class_token):
    rotary = sys.modules[type(layer).__module__].apply_rotary_pos_emb_vision
    rows = hidden.shape[0]
    q, k, _ = layer.qkv(hidden).view(rows, 3, layer.num_heads, -1).unbind(1)
    keys = k.double().mean(1)
    q, k = rotary(q, k, cos, sin)
    received = torch.zeros(rows, dtype=torch.float64)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        attention = torch.einsum("ihd,jhd->hij", q[start:end].double(), k[start:end].double())
        attention = (attention * q.shape[-1] ** -0.5).softmax(-1)
        if class_token:
            received[start:end] = attention[:, 0].mean(0) * (end - start - 1)
        else:
            received[start:end] = attention.mean((0, 1)) * (end - start)
    if class_token:
        patch = torch.ones(rows, dtype=torch.bool)
        patch[cu[:-1].long()] = False
        received, keys = received[patch], keys[patch]
    return received, keys


def vision_attention_by_hand(setup, model, batch):
    """``(received float64 [total], keys float64 [total, d])`` of the batch's visual tokens in
    packed (row-major) order, from the unpatched ``model``."""
    adapter = adapter_for(setup.name)
    tower = adapter.vision_tower(model.model)
    layer = adapter.vision_attention_layer(tower)
    calls, inputs, merged = [], [], []
    handles = [
        layer.register_forward_pre_hook(
            lambda m, args, kwargs: inputs.append((args[0], kwargs["cu_seqlens"], kwargs["position_embeddings"])),
            with_kwargs=True,
        ),
        tower.merger.register_forward_hook(lambda m, args, out: merged.append(out)),
        tower.register_forward_hook(
            # transformers 5: an output with pooler_output; 4.57's Qwen3-VL: (merged, deepstack)
            lambda m, args, out: calls.append(out[0] if isinstance(out, tuple) else getattr(out, "pooler_output", out))
        ),
    ]
    with torch.no_grad():
        model(**batch, use_cache=False)
        per_call = []
        for (hidden, cu, (cos, sin)), merger_rows, output in zip(inputs, merged, calls):
            unit = tower.spatial_merge_size**2
            # A tower with one more row per segment than its patches opens each with a CLS token.
            class_token = hidden.shape[0] == output.shape[0] * unit + cu.numel() - 1
            received, keys = _per_patch(layer, hidden, cu, cos, sin, class_token)
            received, keys = received.view(-1, unit).mean(1), keys.view(-1, unit, keys.shape[1]).mean(1)
            order = _merged_order(merger_rows, output)
            per_call.append((received[order], keys[order]))
    for handle in handles:
        handle.remove()
    ids = batch["input_ids"]
    kinds = [ids == TOKENS["image"], ids == TOKENS["video"]]
    visual = kinds[0] | kinds[1]
    present = [kind for kind in kinds if kind.any()]  # the tower runs on images, then videos
    received = torch.empty(int(visual.sum()), dtype=torch.float64)
    keys = torch.empty(int(visual.sum()), per_call[0][1].shape[1], dtype=torch.float64)
    for kind, (r, k) in zip(present, per_call, strict=True):
        received[kind[visual]], keys[kind[visual]] = r, k
    return received, keys
