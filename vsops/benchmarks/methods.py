"""Selection-method benchmarks, shared by ``tests/bench/test_bench_methods.py`` and ``vsops bench
--op methods``: one image's merged visual tokens ``[N, 3584]`` (Qwen2.5-VL-7B's width), random.

- DivPrune against the published algorithm in PyTorch (the full n x n cosine-distance matrix,
  then the greedy loop over its rows, batch 1) at budget 0.1, with the compute bound: one
  ``N x D`` by ``D x N`` product (the nearest-neighbour pass needs every pair), timed with
  ``torch.mm`` in the same run.
- VisionZip's attention received (``vsops.ops.attention_received``) in the vision tower's
  layer (Qwen2.5-VL-7B's: 16 heads of 80, 4 patches per token, so 4N patches) against what the
  published code reads, the attention weights formed whole (``softmax(q k^T)`` per head), with
  the compute bound: one ``q k^T`` product per head, timed on a tile of query rows in the same
  run (the CPU kernel makes it once, the GPU kernels twice).
- The attention FastV and PyramidDrop read inside the language model (a layer of
  Qwen2.5-VL-7B's: 28 query heads and 4 key heads of 128, causal) over a prompt of ``L``
  tokens: every query row's (FastV, :func:`vsops.methods.causal_attention_received`, tiles of
  query rows) and the last row's (PyramidDrop, the fused :func:`vsops.attention_received`),
  against the published reading, the causal attention weights formed whole.
- Every vision-stage method's selection time per image (``k = budget_to_k(N, 0.1)``; VisionZip's
  includes its attention pass), next to the learned LIS scorer's (hidden 3584 -> 1792), and the
  language-model prefill the dropped tokens save: ``2 x 6.5e9`` FLOPs per token (Qwen2.5-VL-7B's
  language model without embeddings; attention's quadratic term left out) at the matrix-product
  rate measured in the same run.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

import torch

from vsops.benchmarks.timing import seconds
from vsops.budget import budget_to_k
from vsops.reference import TILE_ELEMENTS

DIM = 3584
LANGUAGE_HEADS, LANGUAGE_KV_HEADS, LANGUAGE_HEAD_DIM = 28, 4, 128
LAYER_LENGTHS = (1024, 4096)
BUDGET = 0.1
DIVPRUNE_SIZES = (1024, 4096, 16384)
METHOD_SIZES = (1024, 4096)
VISION_HEADS, VISION_HEAD_DIM, MERGE_UNIT = 16, 80, 4
LANGUAGE_MODEL_PARAMETERS = 6.5e9
# Patches beyond which the published baseline's attention weights (H x S x S float32) exceed 2 GB.
MATERIALIZED_LIMIT = 2 << 30


def tokens(n: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``[n, DIM]`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g).to(device=device, dtype=dtype)


def vision_queries_keys(patches: int, device, dtype=torch.float32, seed: int = 1):
    """Random ``q, k [patches, VISION_HEADS, VISION_HEAD_DIM]`` of one image's tower layer."""
    g = torch.Generator().manual_seed(seed)
    shape = (patches, VISION_HEADS, VISION_HEAD_DIM)
    return (torch.randn(shape, generator=g).to(device=device, dtype=dtype),
            torch.randn(shape, generator=g).to(device=device, dtype=dtype))


def attention_received_fn(q: torch.Tensor, k: torch.Tensor) -> Callable[[], object]:
    from vsops.ops.attention_received import attention_received

    return lambda: attention_received(q, k)


def materialized_attention_fn(q: torch.Tensor, k: torch.Tensor) -> Callable[[], object]:
    """What the published VisionZip reads: every head's attention weights formed whole, then
    averaged over heads and queries."""
    scale = q.shape[-1] ** -0.5
    return lambda: (torch.matmul(q.transpose(0, 1), k.permute(1, 2, 0)) * scale).softmax(-1).mean((0, 1))


def attention_bound_ms(q: torch.Tensor, k: torch.Tensor) -> float:
    """Milliseconds of one ``q k^T`` per head, timed as one head's product on a tile of query
    rows (about 16M logits, the CPU kernel's tile) and scaled to all rows and heads: the
    products' compute, not the writing of S x S logits. The CPU kernel makes that product once
    (its tiles hold whole rows); the GPU kernels make it twice (statistics, then column sums),
    so half the bound is their ceiling."""
    patches, heads = q.shape[0], q.shape[1]
    rows = max(1, min(patches, TILE_ELEMENTS // patches))
    tile, keys = q[:rows, 0], k[:, 0].T
    return 1e3 * seconds(lambda: torch.mm(tile, keys), 0.3) * heads * patches / rows


def published_divprune(x: torch.Tensor, k: int) -> torch.Tensor:
    """The published DivPrune (vbdi/divprune) with ``k`` picks in place of its ``round(ratio *
    n)``: the full cosine-distance matrix, then for pick i the minimum over the rows of the i
    picks so far. Returns the picked indices in pick order (a token may repeat, as published).
    The benchmark's baseline and the tests' oracle."""
    unit = x / x.norm(dim=1, keepdim=True)
    distance = 1.0 - unit @ unit.T
    picked = torch.empty(k, dtype=torch.long, device=x.device)
    for i in range(k):
        if i == 0:
            scores = torch.topk(distance, 2, dim=0, largest=False).values[1, :]
        else:
            scores = torch.min(torch.index_select(distance, 0, picked[:i]), dim=0).values
        picked[i] = torch.argmax(scores)
    return picked


def divprune_fn(x: torch.Tensor, k: int) -> Callable[[], object]:
    from vsops.methods import divprune

    return lambda: divprune(x, k)


def bound_fn(x: torch.Tensor) -> Callable[[], object]:
    """One ``x @ x.T``: the products every nearest-neighbour pass needs."""
    return lambda: torch.mm(x, x.T)


@dataclasses.dataclass
class DivPruneRow:
    n: int
    k: int
    vsops_ms: float
    published_ms: float
    bound_ms: float

    @property
    def speedup(self) -> float:
        return self.published_ms / self.vsops_ms

    @property
    def share(self) -> float:
        return self.bound_ms / self.vsops_ms


def measure_divprune(n: int, device, dtype=torch.float32) -> DivPruneRow:
    x = tokens(n, device, dtype)
    k = budget_to_k(n, BUDGET)
    slow = n >= 16384  # seconds per call: one timed call, no warm-up
    return DivPruneRow(
        n=n,
        k=k,
        vsops_ms=1e3 * seconds(divprune_fn(x, k), 0.1 if slow else 0.5, warmup=not slow),
        published_ms=1e3 * seconds(lambda: published_divprune(x, k), 0.1 if slow else 0.5, warmup=not slow),
        bound_ms=1e3 * seconds(bound_fn(x), 0.3),
    )


def method_fn(name: str, x: torch.Tensor, k: int) -> Callable[[], object]:
    """One image's selection by the method ``name`` (the learned one: a fresh LIS scorer; a
    method reading the vision tower's attention: that attention pass included)."""
    from vsops.methods import VISION_ATTENTION, VisionAttention, make_method
    from vsops.ops.attention_received import attention_received
    from vsops.scorer import LearnableImportanceScorer

    cu = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    kk = torch.tensor([k], device=x.device)
    if name == "visionselector":
        method = make_method(name, scorer=LearnableImportanceScorer(DIM, device=x.device, dtype=x.dtype))
    else:
        method = make_method(name)
    if VISION_ATTENTION not in method.needs:
        def run():
            with torch.inference_mode():
                return method.select(x, kk, cu)

        return run
    q, keys = vision_queries_keys(MERGE_UNIT * x.shape[0], x.device, x.dtype)

    def run_with_attention():
        with torch.inference_mode():
            received = attention_received(q, keys).view(-1, MERGE_UNIT).mean(1)
            merged_keys = keys.float().mean(1).view(-1, MERGE_UNIT, VISION_HEAD_DIM).mean(1)
            return method.select(x, kk, cu, vision=VisionAttention(received, merged_keys))

    return run_with_attention


@dataclasses.dataclass
class AttentionRow:
    tokens: int
    patches: int
    vsops_ms: float
    materialized_ms: float | None  # None: beyond MATERIALIZED_LIMIT
    bound_ms: float

    @property
    def share(self) -> float:
        return self.bound_ms / self.vsops_ms


def measure_attention(n: int, device, dtype=torch.float32) -> AttentionRow:
    patches = MERGE_UNIT * n
    q, k = vision_queries_keys(patches, device, dtype)
    materialized = None
    if VISION_HEADS * patches * patches * 4 <= MATERIALIZED_LIMIT:
        materialized = 1e3 * seconds(materialized_attention_fn(q, k), 0.3)
    return AttentionRow(n, patches, 1e3 * seconds(attention_received_fn(q, k), 0.3), materialized,
                        attention_bound_ms(q, k))


def measure_methods(device, dtype=torch.float32) -> dict[str, dict[int, float]]:
    """Milliseconds per image of every vision-stage method at each of :data:`METHOD_SIZES`."""
    from vsops.methods import available

    table: dict[str, dict[int, float]] = {}
    for n in METHOD_SIZES:
        x = tokens(n, device, dtype)
        k = budget_to_k(n, BUDGET)
        for name in available("vision"):
            table.setdefault(name, {})[n] = 1e3 * seconds(method_fn(name, x, k), 0.3)
    return table


def language_queries_keys(length: int, device, dtype=torch.float32, seed: int = 2):
    """Random ``q [length, LANGUAGE_HEADS, LANGUAGE_HEAD_DIM]`` and ``k [length,
    LANGUAGE_KV_HEADS, LANGUAGE_HEAD_DIM]`` of one language-model layer."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(length, LANGUAGE_HEADS, LANGUAGE_HEAD_DIM, generator=g)
    k = torch.randn(length, LANGUAGE_KV_HEADS, LANGUAGE_HEAD_DIM, generator=g)
    return q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype)


def materialized_causal_fn(q: torch.Tensor, k: torch.Tensor, last: bool) -> Callable[[], object]:
    """What the published FastV and PyramidDrop read: the layer's causal attention weights
    formed whole (eager attention), averaged over heads, then over the rows (or the last row)."""
    keys = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1).permute(1, 2, 0)
    scale = q.shape[-1] ** -0.5
    future = torch.ones(q.shape[0], q.shape[0], dtype=torch.bool, device=q.device).triu(1)

    def run():
        weights = (torch.matmul(q.transpose(0, 1), keys) * scale).masked_fill(future, float("-inf")).softmax(-1)
        return weights.mean(0)[-1] if last else weights.mean(0).mean(0)

    return run


@dataclasses.dataclass
class LayerAttentionRow:
    length: int
    rows: str  # "all" (FastV) or "last" (PyramidDrop)
    vsops_ms: float
    materialized_ms: float | None  # None: beyond MATERIALIZED_LIMIT


def measure_layer_attention(length: int, rows: str, device, dtype=torch.float32) -> LayerAttentionRow:
    from vsops.methods.layer import attention_received_by_rows

    q, k = language_queries_keys(length, device, dtype)
    materialized = None
    if LANGUAGE_HEADS * length * length * 4 <= MATERIALIZED_LIMIT:
        materialized = 1e3 * seconds(materialized_causal_fn(q, k, rows == "last"), 0.3)
    return LayerAttentionRow(length, rows, 1e3 * seconds(lambda: attention_received_by_rows(q, k, rows), 0.3),
                             materialized)


def prefill_saved_ms(n: int, device, dtype=torch.float32) -> float:
    """The language-model prefill the ``n - k`` dropped tokens of one image would take, at the
    matrix-product rate of this device measured now (``[n, DIM] x [DIM, n]``)."""
    x = tokens(n, device, dtype)
    rate = 2 * n * n * DIM / seconds(bound_fn(x), 0.3)
    return 1e3 * 2 * LANGUAGE_MODEL_PARAMETERS * (n - budget_to_k(n, BUDGET)) / rate


def summary(device="cpu", dtype=torch.float32, file: TextIO = sys.stdout, sizes=DIVPRUNE_SIZES) -> None:
    device = torch.device(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    name = str(dtype).removeprefix("torch.")
    print(f"Selection methods, one image [N, {DIM}] {name}, budget {BUDGET}, device {device}{threads}", file=file)
    print("\nDivPrune against the published algorithm (full n x n matrix + greedy loop):", file=file)
    print("| N | k | vsops ms | published ms | speedup | bound ms (one N x N x D product) | share of bound |", file=file)
    print("|" + "---|" * 7, file=file)
    for n in sizes:
        r = measure_divprune(n, device, dtype)
        print(f"| {r.n} | {r.k} | {r.vsops_ms:.1f} | {r.published_ms:.1f} | {r.speedup:.1f}x | {r.bound_ms:.1f} | "
              f"{100 * r.share:.0f}% |", file=file)
    print(f"\nVisionZip's attention received in the vision tower ({VISION_HEADS} heads x {VISION_HEAD_DIM}, "
          f"{MERGE_UNIT} patches per token) against the attention weights formed whole:", file=file)
    print("| N tokens | patches | vsops ms | materialized ms | speedup | bound ms (one q k^T per head) | "
          "share of bound |", file=file)
    print("|" + "---|" * 7, file=file)
    for n in METHOD_SIZES:
        r = measure_attention(n, device, dtype)
        slow = "-" if r.materialized_ms is None else f"{r.materialized_ms:.1f}"
        speedup = "-" if r.materialized_ms is None else f"{r.materialized_ms / r.vsops_ms:.1f}x"
        print(f"| {r.tokens} | {r.patches} | {r.vsops_ms:.1f} | {slow} | {speedup} | {r.bound_ms:.1f} | "
              f"{100 * r.share:.0f}% |", file=file)
    print(f"\nThe attention FastV (every row) and PyramidDrop (the last row) read in a language-model layer "
          f"({LANGUAGE_HEADS} query heads, {LANGUAGE_KV_HEADS} key heads x {LANGUAGE_HEAD_DIM}, causal) against the "
          "attention weights formed whole:", file=file)
    print("| L | rows | vsops ms | materialized ms | speedup |", file=file)
    print("|" + "---|" * 5, file=file)
    for length in LAYER_LENGTHS:
        for rows in ("all", "last"):
            r = measure_layer_attention(length, rows, device, dtype)
            slow = "-" if r.materialized_ms is None else f"{r.materialized_ms:.1f}"
            speedup = "-" if r.materialized_ms is None else f"{r.materialized_ms / r.vsops_ms:.1f}x"
            print(f"| {r.length} | {r.rows} | {r.vsops_ms:.2f} | {slow} | {speedup} |", file=file)
    table = measure_methods(device, dtype)
    saved = {n: prefill_saved_ms(n, device, dtype) for n in METHOD_SIZES}
    print("\nSelection time per image (ms), every method, and the language-model prefill the dropped tokens "
          f"save (2 x {LANGUAGE_MODEL_PARAMETERS:.1e} FLOPs per token at this run's matrix-product rate):", file=file)
    print("| method | " + " | ".join(f"N = {n}" for n in METHOD_SIZES) + " | "
          + " | ".join(f"share of the prefill saved, N = {n}" for n in METHOD_SIZES) + " |", file=file)
    print("|" + "---|" * (1 + 2 * len(METHOD_SIZES)), file=file)
    print("| (prefill saved) | " + " | ".join(f"{saved[n]:.0f}" for n in METHOD_SIZES) + " |"
          + " |" * len(METHOD_SIZES), file=file)
    for name, times in table.items():
        print(f"| {name} | " + " | ".join(f"{times[n]:.2f}" for n in METHOD_SIZES) + " | "
              + " | ".join(f"{100 * times[n] / saved[n]:.2f}%" for n in METHOD_SIZES) + " |", file=file)


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op methods``. The N = 16384 DivPrune row takes minutes (the published
    baseline alone ~1.5 min on 2 cores): only when the methods table is asked for by name."""
    summary(args.device, dtype, file=file, sizes=DIVPRUNE_SIZES if by_name else METHOD_SIZES)
