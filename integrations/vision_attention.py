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

One tower call per kind of visual input (images, videos): the hook matches each call to its
kind by its grid.
"""
from __future__ import annotations

import torch

from vsops.methods import VisionAttention
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
    """The hooks of one model's vision tower and what they read during one call.

    Attributes:
        hooks: the hook handles (removed by ``revert_visionselector``).
    """

    def __init__(self, adapter, tower):
        self.adapter = adapter
        self.hooks = []
        self._grids: dict[int, tuple[str, torch.Tensor]] | None = None  # None: inactive
        self._pending = None
        self._patches = None
        self._items: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        layer = adapter.vision_attention_layer(tower)
        self.heads = layer.num_heads
        self.hooks = [
            layer.register_forward_pre_hook(self._layer_pre_hook, with_kwargs=True),
            layer.qkv.register_forward_hook(self._qkv_hook),
            tower.register_forward_hook(self._tower_hook, with_kwargs=True),
        ]

    def begin(self, grids: dict[int, tuple[str, torch.Tensor]] | None) -> None:
        """Starts a call: ``grids`` maps each kind of visual input of the call (its index in the
        adapter's placeholders) to its name and ``[n, 3]`` grid; None turns the hooks off."""
        self._grids = grids
        self._pending = self._patches = None
        self._items = {}

    def collect(self, kinds: torch.Tensor) -> VisionAttention:
        """The :class:`~vsops.methods.VisionAttention` of the call's visual tokens, whose kinds
        in packed order are ``kinds`` (int64 ``[total]``)."""
        if self._grids is None:
            raise ValueError("the vision attention was not captured for this call")
        received = torch.empty(kinds.shape[0], dtype=torch.float32, device=kinds.device)
        keys = None
        for kind in self._grids:
            where = kinds == kind
            if kind not in self._items:
                raise ValueError(
                    "the method needs the vision tower's attention, but the tower did not run on this call's "
                    f"{self._grids[kind][0]} inputs (precomputed vision features cannot be used)"
                )
            item_received, item_keys = self._items[kind]
            if item_received.shape[0] != int(where.sum()):
                raise ValueError(f"the vision tower produced {item_received.shape[0]} tokens for "
                                 f"{int(where.sum())} placeholders")
            if keys is None:
                keys = item_keys.new_empty((kinds.shape[0], item_keys.shape[1]))
            received[where] = item_received.to(received.device)
            keys[where] = item_keys.to(keys.device)
        return VisionAttention(received, keys)

    # -- the hooks -----------------------------------------------------------------------------

    def _layer_pre_hook(self, module, args, kwargs):
        if self._grids is None:
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
        if self._grids is None or self._pending is None:
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
        if self._grids is None:
            return None
        if self._patches is None:
            raise ValueError("the vision tower ran without its attention layer; the capture cannot read it")
        received, keys, cu = self._patches
        self._patches = None
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        kind = self._kind_of(grid)
        if self.adapter.vision_class_token:
            patch = torch.ones(received.shape[0], dtype=torch.bool, device=received.device)
            patch[cu[:-1].long()] = False
            received, keys = received[patch], keys[patch]
        unit = self.adapter.merge_unit(tower)
        received = received.view(-1, unit).mean(1)
        keys = keys.view(-1, unit, keys.shape[1]).mean(1)
        order = self.adapter.vision_merged_order(tower, grid)
        if order is not None:
            order = order.to(received.device)
            received, keys = received[order], keys[order]
        self._items[kind] = (received, keys)
        return None

    def _kind_of(self, grid) -> int:
        for kind, (_, expected) in self._grids.items():
            if kind not in self._items and grid is not None and (
                grid is expected or (grid.shape == expected.shape and torch.equal(grid.cpu(), expected.cpu()))
            ):
                return kind
        raise ValueError("a vision tower call matches none of this call's image or video grids")
