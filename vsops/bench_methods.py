"""Selection-method benchmarks, shared by ``benchmarks/test_bench_methods.py`` and ``vsops bench
--op methods``: one image's merged visual tokens ``[N, 3584]`` (Qwen2.5-VL-7B's width), random.

- DivPrune against the published algorithm in PyTorch (the full n x n cosine-distance matrix,
  then the greedy loop over its rows, batch 1) at budget 0.1, with the compute bound: one
  ``N x D`` by ``D x N`` product (the nearest-neighbour pass needs every pair), timed with
  ``torch.mm`` in the same run.
- Every registered method's selection time per image (``k = budget_to_k(N, 0.1)``), next to
  the learned LIS scorer's (hidden 3584 -> 1792).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

import torch

from vsops.bench import seconds
from vsops.budget import budget_to_k

DIM = 3584
BUDGET = 0.1
DIVPRUNE_SIZES = (1024, 4096, 16384)
METHOD_SIZES = (1024, 4096)


def tokens(n: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """``[n, DIM]`` random tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, DIM, generator=g).to(device=device, dtype=dtype)


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


def measure_divprune(n: int, device) -> DivPruneRow:
    x = tokens(n, device)
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
    """One image's selection by the method ``name`` (the learned one: a fresh LIS scorer)."""
    from vsops.methods import make_method
    from vsops.scorer import LearnableImportanceScorer

    cu = torch.tensor([0, x.shape[0]], dtype=torch.int32, device=x.device)
    kk = torch.tensor([k], device=x.device)
    if name == "visionselector":
        method = make_method(name, scorer=LearnableImportanceScorer(DIM, device=x.device, dtype=x.dtype))
    else:
        method = make_method(name)

    def run():
        with torch.inference_mode():
            return method.select(x, kk, cu)

    return run


def measure_methods(device) -> dict[str, dict[int, float]]:
    """Milliseconds per image of every registered method at each of :data:`METHOD_SIZES`."""
    from vsops.methods import available

    table: dict[str, dict[int, float]] = {}
    for n in METHOD_SIZES:
        x = tokens(n, device)
        k = budget_to_k(n, BUDGET)
        for name in available():
            table.setdefault(name, {})[n] = 1e3 * seconds(method_fn(name, x, k), 0.3)
    return table


def summary(device="cpu", file: TextIO = sys.stdout, sizes=DIVPRUNE_SIZES) -> None:
    device = torch.device(device)
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    print(f"Selection methods, one image [N, {DIM}] float32, budget {BUDGET}, device {device}{threads}", file=file)
    print("\nDivPrune against the published algorithm (full n x n matrix + greedy loop):", file=file)
    print("| N | k | vsops ms | published ms | speedup | bound ms (one N x N x D product) | share of bound |", file=file)
    print("|" + "---|" * 7, file=file)
    for n in sizes:
        r = measure_divprune(n, device)
        print(f"| {r.n} | {r.k} | {r.vsops_ms:.1f} | {r.published_ms:.1f} | {r.speedup:.1f}x | {r.bound_ms:.1f} | "
              f"{100 * r.share:.0f}% |", file=file)
    table = measure_methods(device)
    print("\nSelection time per image (ms), every method:", file=file)
    print("| method | " + " | ".join(f"N = {n}" for n in METHOD_SIZES) + " |", file=file)
    print("|" + "---|" * (1 + len(METHOD_SIZES)), file=file)
    for name, times in table.items():
        print(f"| {name} | " + " | ".join(f"{times[n]:.2f}" for n in METHOD_SIZES) + " |", file=file)
