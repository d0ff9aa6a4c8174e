"""Select-and-pack benchmark, shared by ``tests/bench/test_bench_varlen.py`` and ``vsops bench
--op varlen``: vsops (``select_visual_tokens`` + ``select_and_pack``) on a batch of B = 8
prompts of L = 4096 tokens, 20% of the visual tokens kept, embeddings and 3-D rope position
ids packed, against three PyTorch routes (``ROUTES``), all tested to pack the same thing:

* ``unpad_input``: a top-k keep mask then ``flash_attn.bert_padding.unpad_input`` (nonzero +
  cumsum + gather);
* ``usual route``: top-k, sort, ``index_select`` into a padded batch, then ``unpad_input``;
* ``index_select``: the keep mask and one ``index_select`` per tensor, the fastest PyTorch
  we know (the strictest of the three baselines).

Speed is reported as the ratios and as the pack's effective bandwidth, reading and writing the
kept rows once, against the copy bandwidth measured in the same run (alternating with it,
``vsops.benchmarks.timing.PairedTiming``).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

import torch
from torch.nn import functional as F

from vsops import backends
from vsops.benchmarks.timing import paired_timing, seconds
from vsops.budget import budget_to_k
from vsops.varlen import select_and_pack, select_visual_tokens

BATCH, LENGTH, BUDGET = 8, 4096, 0.2


@dataclasses.dataclass(frozen=True)
class VarlenCase:
    name: str
    hidden: int

    def make(self, device, dtype=torch.bfloat16, seed=0):
        """(scores, visual_mask, embeds, position_ids): each prompt is some text, then an image
        of 2,000 to 3,900 visual tokens, then more text."""
        g = torch.Generator().manual_seed(seed)
        visual = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
        for b in range(BATCH):
            start = int(torch.randint(16, 128, (1,), generator=g))
            count = int(torch.randint(2000, 3900, (1,), generator=g))
            visual[b, start : start + count] = True
        scores = torch.randn(BATCH, LENGTH, generator=g)
        embeds = torch.randn(BATCH, LENGTH, self.hidden, generator=g).to(dtype)
        positions = torch.arange(LENGTH).expand(3, BATCH, LENGTH).contiguous()
        return tuple(t.to(device) for t in (scores, visual, embeds, positions))


CASES = (VarlenCase("H=2048", 2048), VarlenCase("H=3584", 3584))


def vsops_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    def run():
        keep = select_visual_tokens(scores, visual, BUDGET)
        return select_and_pack(keep, embeds, positions)

    return run


def _keep_mask(scores, visual):
    """The routes' selection: top-k of the visual scores (per sample) as a keep mask, text kept."""
    k = budget_to_k(visual.sum(1), BUDGET)
    masked = scores.masked_fill(~visual, float("-inf"))
    top = masked.topk(int(k.max()), dim=1).indices
    chosen = torch.arange(top.shape[1], device=top.device) < k.unsqueeze(1)
    return torch.zeros_like(visual).scatter_(1, top, chosen) | ~visual


def _unpad_indices(mask):
    """unpad_input's bookkeeping: the kept flat positions (nonzero), ``cu_seqlens`` (cumsum)
    and the longest sample (a host read)."""
    seqlens = mask.sum(-1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(seqlens.max())


def unpad_input(hidden, mask):
    """``flash_attn.bert_padding.unpad_input``'s forward, op for op (flash-attn itself needs a
    CUDA build): the bookkeeping of ``_unpad_indices``, then a ``torch.gather`` along the token
    axis with the indices expanded over each row. Returns (rows ``[T, ...]``, indices,
    cu_seqlens, max_seqlen)."""
    indices, cu_seqlens, max_seqlen = _unpad_indices(mask)
    flat = hidden.reshape(mask.numel(), -1)
    rows = torch.gather(flat, 0, indices.unsqueeze(1).expand(-1, flat.shape[1]))
    return rows.reshape(-1, *hidden.shape[2:]), indices, cu_seqlens, max_seqlen


def unpad_pipeline_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    """The ``unpad_input`` route: the keep mask, then ``unpad_input`` of the embeddings
    and of the position ids (``[B, L, 3]``, returned as ``[3, T]``). ``nonzero`` keeps the
    tokens in order, which the route's sort otherwise does."""
    def run():
        keep = _keep_mask(scores, visual)
        packed, _, cu_seqlens, max_seqlen = unpad_input(embeds, keep)
        packed_positions = unpad_input(positions.permute(1, 2, 0), keep)[0].T
        return packed, packed_positions, cu_seqlens, max_seqlen

    return run


def padded_route_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    """The usual route: top-k, sort, ``index_select`` of each sample's kept
    tokens into a padded batch, then ``unpad_input`` of that batch."""
    def run():
        keep = _keep_mask(scores, visual)
        kept = keep.sum(1)
        width = int(kept.max())
        # Kept positions first, in order (a stable sort of the mask), padded to the widest sample.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        mask = torch.arange(width, device=keep.device) < kept.unsqueeze(1)
        flat = (order + torch.arange(keep.shape[0], device=keep.device).unsqueeze(1) * keep.shape[1]).flatten()
        hidden = embeds.reshape(-1, embeds.shape[-1]).index_select(0, flat).view(*order.shape, -1)
        pos = positions.reshape(3, -1).index_select(1, flat).view(3, *order.shape)
        packed, _, cu_seqlens, max_seqlen = unpad_input(hidden, mask)
        return packed, unpad_input(pos.permute(1, 2, 0), mask)[0].T, cu_seqlens, max_seqlen

    return run


def index_select_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    """The fastest one-gather PyTorch we know: the keep mask, nonzero, one ``index_select`` per
    tensor (unpad_input with its gather replaced): a stricter baseline than the other two."""
    def run():
        indices, cu_seqlens, max_seqlen = _unpad_indices(_keep_mask(scores, visual))
        packed = embeds.reshape(-1, embeds.shape[-1]).index_select(0, indices)
        return packed, positions.reshape(3, -1).index_select(1, indices), cu_seqlens, max_seqlen

    return run


ROUTES = {"unpad_input": unpad_pipeline_fn, "usual route": padded_route_fn, "index_select": index_select_fn}
"""The PyTorch baselines, by the names the table gives them."""


def moved_bytes(scores, visual, embeds, positions) -> int:
    """Reading and writing each kept row of the packed tensors once."""
    keep = select_visual_tokens(scores, visual, BUDGET)
    kept = int(keep.sum())
    row = embeds.shape[-1] * embeds.element_size() + 3 * positions.element_size()
    return 2 * kept * row


@dataclasses.dataclass
class VarlenRow:
    case: str
    dtype: str
    backend: str
    ms: float
    route_ms: dict  # {name in ROUTES: milliseconds}
    gb_per_s: float
    copy_gb_per_s: float
    copy_share: float


def measure_case(case: VarlenCase, device, dtype=torch.bfloat16) -> VarlenRow:
    """Times vsops (alternating with a device copy, see ``vsops.benchmarks.timing.PairedTiming``) and the routes."""
    inputs = case.make(device, dtype)
    ours = paired_timing(vsops_fn(*inputs), device)
    nbytes = moved_bytes(*inputs)
    return VarlenRow(
        case=case.name,
        dtype=str(dtype).replace("torch.", ""),
        backend=backends.select(torch.device(device), torch.float32),
        ms=1e3 * ours.seconds,
        route_ms={name: 1e3 * seconds(route(*inputs)) for name, route in ROUTES.items()},
        gb_per_s=nbytes / ours.seconds / 1e9,
        copy_gb_per_s=ours.bandwidth / 1e9,
        copy_share=ours.share(nbytes),
    )


def print_table(rows: list[VarlenRow], device, file: TextIO = sys.stdout) -> None:
    print(f"Select + pack, B={BATCH}, L={LENGTH}, budget {BUDGET}, device {device}", file=file)
    routes = "".join(f" {name} ms | speedup |" for name in ROUTES)
    print(f"| case | dtype | backend | vsops ms |{routes} vsops GB/s | copy GB/s | % of copy bw |", file=file)
    print("|" + "---|" * (7 + 2 * len(ROUTES)), file=file)
    for r in rows:
        routes = "".join(f" {r.route_ms[name]:.2f} | {r.route_ms[name] / r.ms:.1f}x |" for name in ROUTES)
        print(
            f"| {r.case} | {r.dtype} | {r.backend} | {r.ms:.2f} |{routes} "
            f"{r.gb_per_s:.1f} | {r.copy_gb_per_s:.1f} | {100 * r.copy_share:.0f}% |",
            file=file,
        )


def summary(device="cpu", dtype=torch.bfloat16, file: TextIO = sys.stdout) -> list[VarlenRow]:
    device = torch.device(device)
    rows = [measure_case(case, device, dtype) for case in CASES]
    print_table(rows, device, file)
    return rows


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op varlen``: the pack moves bytes, so the model's dtype, bfloat16, unless
    another than float32 is asked for."""
    summary(args.device, torch.bfloat16 if dtype == torch.float32 else dtype, file=file)
