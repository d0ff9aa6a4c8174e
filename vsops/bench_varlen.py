"""Select-and-pack benchmark, shared by ``benchmarks/test_bench_varlen.py`` and ``vsops bench
--op varlen``: vsops (``select_visual_tokens`` + ``select_and_pack``) against the PyTorch
pipeline it replaces (top-k, sort, a keep mask, then ``flash_attn.bert_padding.unpad_input``'s
nonzero + cumsum + gather), on a batch of B = 8 prompts of L = 4096 tokens, 20% of the
visual tokens kept, embeddings and 3-D rope position ids packed.

A second baseline, the route pruning code usually takes, first gathers each sample's kept
tokens into a padded batch and then unpads it. Speed is reported as the ratios and as the pack's effective bandwidth, reading
and writing the kept rows once, against the copy bandwidth measured in the same run
(alternating with it, ``bench.PairedTiming``).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

import torch
from torch.nn import functional as F

from vsops import backends
from vsops.bench import paired_timing, seconds
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


def pytorch_pipeline_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    """Top-k of the visual scores as a keep mask (nonzero below puts the kept tokens back in
    order, which the route's sort otherwise does), then unpad_input."""
    def run():
        k = budget_to_k(visual.sum(1), BUDGET)
        masked = scores.masked_fill(~visual, float("-inf"))
        top = masked.topk(int(k.max()), dim=1).indices
        chosen = torch.arange(top.shape[1], device=top.device) < k.unsqueeze(1)
        keep = torch.zeros_like(visual).scatter_(1, top, chosen) | ~visual
        seqlens = keep.sum(-1, dtype=torch.int32)
        indices = torch.nonzero(keep.flatten(), as_tuple=False).flatten()
        max_seqlen = int(seqlens.max())
        cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        packed = embeds.reshape(-1, embeds.shape[-1]).index_select(0, indices)
        packed_positions = positions.reshape(3, -1).index_select(1, indices)
        return packed, packed_positions, cu_seqlens, max_seqlen

    return run


def padded_route_fn(scores, visual, embeds, positions) -> Callable[[], object]:
    """The route token-pruning code usually takes: top-k, sort, gather the kept tokens of each
    sample into a padded batch (``index_select`` of the flat positions), then unpad_input on it."""
    def run():
        n_visual = visual.sum(1)
        k = budget_to_k(n_visual, BUDGET)
        kept = k + (visual.shape[1] - n_visual)
        width = int(kept.max())
        masked = scores.masked_fill(~visual, float("-inf"))
        top = masked.topk(int(k.max()), dim=1).indices
        chosen = torch.arange(top.shape[1], device=top.device) < k.unsqueeze(1)
        keep = torch.zeros_like(visual).scatter_(1, top, chosen) | ~visual
        # Kept positions first, in order (a stable sort of the mask), padded to the widest sample.
        order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices[:, :width]
        mask = torch.arange(width, device=keep.device) < kept.unsqueeze(1)
        flat = (order + torch.arange(keep.shape[0], device=keep.device).unsqueeze(1) * keep.shape[1]).flatten()
        hidden = embeds.reshape(-1, embeds.shape[-1]).index_select(0, flat).view(*order.shape, -1)
        pos = positions.reshape(3, -1).index_select(1, flat).view(3, *order.shape)
        indices = torch.nonzero(mask.flatten(), as_tuple=False).flatten()
        seqlens = mask.sum(-1, dtype=torch.int32)
        cu_seqlens = F.pad(torch.cumsum(seqlens, 0, dtype=torch.int32), (1, 0))
        packed = hidden.reshape(-1, hidden.shape[-1]).index_select(0, indices)
        return packed, pos.reshape(3, -1).index_select(1, indices), cu_seqlens, int(seqlens.max())

    return run


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
    pipeline_ms: float
    padded_route_ms: float
    gb_per_s: float
    copy_gb_per_s: float
    copy_share: float


def measure_case(case: VarlenCase, device, dtype=torch.bfloat16) -> VarlenRow:
    """Times vsops (alternating with a device copy, see ``bench.PairedTiming``) and both routes."""
    inputs = case.make(device, dtype)
    ours = paired_timing(vsops_fn(*inputs), device)
    pipeline = seconds(pytorch_pipeline_fn(*inputs))
    padded_route = seconds(padded_route_fn(*inputs))
    nbytes = moved_bytes(*inputs)
    return VarlenRow(
        case=case.name,
        dtype=str(dtype).replace("torch.", ""),
        backend=backends.select(torch.device(device), torch.float32),
        ms=1e3 * ours.seconds,
        pipeline_ms=1e3 * pipeline,
        padded_route_ms=1e3 * padded_route,
        gb_per_s=nbytes / ours.seconds / 1e9,
        copy_gb_per_s=ours.bandwidth / 1e9,
        copy_share=ours.share(nbytes),
    )


def print_table(rows: list[VarlenRow], device, file: TextIO = sys.stdout) -> None:
    print(f"Select + pack, B={BATCH}, L={LENGTH}, budget {BUDGET}, device {device}", file=file)
    print(
        "| case | dtype | backend | vsops ms | mask + unpad_input ms | speedup | padded route ms | speedup "
        "| vsops GB/s | copy GB/s | % of copy bw |",
        file=file,
    )
    print("|" + "---|" * 11, file=file)
    for r in rows:
        print(
            f"| {r.case} | {r.dtype} | {r.backend} | {r.ms:.2f} | {r.pipeline_ms:.2f} | "
            f"{r.pipeline_ms / r.ms:.1f}x | {r.padded_route_ms:.2f} | {r.padded_route_ms / r.ms:.1f}x | "
            f"{r.gb_per_s:.1f} | {r.copy_gb_per_s:.1f} | {100 * r.copy_share:.0f}% |",
            file=file,
        )


def summary(device="cpu", dtype=torch.bfloat16, file: TextIO = sys.stdout) -> list[VarlenRow]:
    device = torch.device(device)
    rows = [measure_case(case, device, dtype) for case in CASES]
    print_table(rows, device, file)
    return rows
