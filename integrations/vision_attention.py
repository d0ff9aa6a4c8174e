"""Reading one attention layer of the vision tower for the methods that need it (VisionZip):
the attention each visual token receives and its keys, per forward call, without attention
weights (sdpa and flash-attention towers never return them).

Three hooks, active only during a call whose method needs them:

- a pre-hook on the layer's attention module keeps its ``cu_seqlens`` and rotary
  ``position_embeddings``;
- a hook on its fused ``qkv`` projection takes the queries and keys from the projection's
  output (nothing is computed twice), rotates them, and runs
  :func:`vsops.ops.attention_received.attention_received` (from the CLS query of each segment on
  towers with one);
- a hook on the tower turns the per-patch rows into per-token rows in the tower's output order
  (the CLS rows dropped, the tower's window order undone, each merge unit averaged).

The tower may run inside the model's forward or before it (transformers 5's ``generate``
encodes the images and videos first and hands the model ``mm_encoder_outputs``): what the tower
calls read waits for the next collection, images before videos, as both encode them.
"""
from __future__ import annotations

import torch

from vsops.methods import VISION_ATTENTION, VisionAttention
from vsops.ops.attention_received import attention_received

__all__ = ["VisionAttentionCapture", "rotate"]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding of the vision towers (halves rotated): ``x [S, H, d]`` with
    ``cos, sin [S, d]``, in float32."""
    x = x.float()
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.float().unsqueeze(1) + rotated * sin.float().unsqueeze(1)


class VisionAttentionCapture:
    """The hooks of one model's vision tower and what they read since the last collection.

    The hooks read the tower only while the selector's method needs its attention, the tower
    is in eval mode (training takes the learned scorer) and the budget is below 1 (at 1 every
    token stays and no method is asked).

    Attributes:
        hooks: the hook handles (removed by ``revert_visionselector``).
    """

    def __init__(self, adapter, tower, selector):
        self.adapter = adapter
        # An attribute, not a closure, so that a deep copy of the model reads its own selector.
        self.selector = selector
        self._pending = None
        self._patches = None
        self._items: list[tuple[torch.Tensor, torch.Tensor]] = []
        layer = adapter.vision_attention_layer(tower)
        self.heads = layer.num_heads
        self.hooks = [
            layer.register_forward_pre_hook(self._layer_pre_hook, with_kwargs=True),
            layer.qkv.register_forward_hook(self._qkv_hook),
            tower.register_forward_hook(self._tower_hook, with_kwargs=True),
        ]

    def wanted(self, module) -> bool:
        """Whether the hooks read the tower now (``module``: the hooked one, for its mode)."""
        selector = self.selector
        return VISION_ATTENTION in selector.method.needs and not module.training and selector.call_budget < 1.0

    def clear(self) -> None:
        """Forgets what the tower calls so far left (a forward that runs the tower itself)."""
        self._pending = self._patches = None
        self._items = []

    def collect(self, kinds: torch.Tensor) -> VisionAttention:
        """The :class:`~vsops.methods.VisionAttention` of a call's visual tokens, whose kinds
        (an index into the adapter's placeholders) in packed order are ``kinds`` (int64
        ``[total]``), from the tower calls since the last collection: each kind's in turn
        (images, then videos: the order in which the models and ``generate`` encode them)."""
        items, self._items = self._items, []
        if not items:
            raise ValueError("the method needs the vision tower's attention, but the tower did not run for this call")
        received = torch.cat([r for r, _ in items]).to(kinds.device)
        keys = torch.cat([k for _, k in items]).to(kinds.device)
        if received.shape[0] != kinds.shape[0]:
            raise ValueError(f"the vision tower produced {received.shape[0]} tokens since the last call, for "
                             f"{kinds.shape[0]} visual placeholders")
        # Stable: the tokens of one kind keep their order, and kinds come in index order.
        order = torch.sort(kinds, stable=True).indices
        out_received, out_keys = torch.empty_like(received), torch.empty_like(keys)
        out_received[order], out_keys[order] = received, keys
        return VisionAttention(out_received, out_keys)

    # -- the hooks -----------------------------------------------------------------------------

    def _layer_pre_hook(self, module, args, kwargs):
        if not self.wanted(module):
            return None
        cu_seqlens = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
        position = kwargs.get("position_embeddings")
        if cu_seqlens is None or position is None:
            raise ValueError(
                "the vision attention layer was called without cu_seqlens or position_embeddings; "
                "this transformers version's tower is not supported by the vision-attention capture"
            )
        self._pending = (cu_seqlens, position)
        return None

    def _qkv_hook(self, module, args, output):
        if self._pending is None or not self.wanted(module):
            return None
        cu_seqlens, (cos, sin) = self._pending
        self._pending = None
        rows = output.shape[0]
        q, k = output.detach().view(rows, 3, self.heads, -1).unbind(1)[:2]
        keys = k.float().mean(1)  # before the rotation: content, not position
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        cu = cu_seqlens.to(device=output.device, dtype=torch.int32)
        scale = q.shape[-1] ** -0.5
        if self.adapter.vision_class_token:
            # The CLS token opens each segment; its row of the attention is the one that counts.
            queries = q[cu[:-1].long()]
            cu_q = torch.arange(cu.numel(), dtype=torch.int32, device=cu.device)
            received = attention_received(queries, k, cu_q, cu, scale=scale)
            patches = (cu.diff() - 1).long()
        else:
            received = attention_received(q, k, cu, cu, scale=scale)
            patches = cu.diff().long()
        # Uniform attention is 1 in every segment, whatever its size.
        received = received.float() * torch.repeat_interleave(patches.clamp_min(1), cu.diff().long()).float()
        self._patches = (received, keys, cu)
        return None

    def _tower_hook(self, tower, args, kwargs, output):
        if not self.wanted(tower):
            return None
        if self._patches is None:
            raise ValueError("the vision tower ran without its attention layer; the capture cannot read it")
        received, keys, cu = self._patches
        self._patches = None
        if self.adapter.vision_class_token:
            patch = torch.ones(received.shape[0], dtype=torch.bool, device=received.device)
            patch[cu[:-1].long()] = False
            received, keys = received[patch], keys[patch]
        unit = self.adapter.merge_unit(tower)
        received = received.view(-1, unit).mean(1)
        keys = keys.view(-1, unit, keys.shape[1]).mean(1)
        order = self.adapter.vision_merged_order(tower, kwargs.get("grid_thw", args[1] if len(args) > 1 else None))
        if order is not None:
            order = order.to(received.device)
            received, keys = received[order], keys[order]
        self._items.append((received, keys))
        return None
