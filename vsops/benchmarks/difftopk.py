"""DiffTopK's benchmark table, shared by ``tests/bench/test_bench_difftopk.py`` and ``vsops bench
--op difftopk``: against the paper's Algorithm 1 in PyTorch (64 bisection steps), and against
the memory-bandwidth bound (:mod:`vsops.benchmarks.timing`).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import TextIO

import torch

from vsops import backends, reference
from vsops.benchmarks.timing import copy_bandwidth, seconds
from vsops.budget import budget_to_k
from vsops.difftopk import difftopk

BUDGET = 0.2


@dataclasses.dataclass(frozen=True)
class Case:
    """A DiffTopK benchmark input: padded rows, or ragged segments packed with cu_seqlens."""

    name: str
    rows: int = 1
    length: int = 0
    ragged: tuple[int, ...] = ()

    def make(self, device, dtype=torch.float32, seed=0):
        g = torch.Generator().manual_seed(seed)
        if self.ragged:
            lengths = torch.tensor(self.ragged)
            cu = torch.zeros(len(self.ragged) + 1, dtype=torch.int32)
            cu[1:] = lengths.cumsum(0)
            scores = torch.randn(int(cu[-1]), generator=g).to(device=device, dtype=dtype)
            return scores, budget_to_k(lengths, BUDGET).to(device), cu.to(device)
        scores = torch.randn(self.rows, self.length, generator=g).to(device=device, dtype=dtype)
        return scores, budget_to_k(self.length, BUDGET), None

    @property
    def elements(self) -> int:
        return sum(self.ragged) if self.ragged else self.rows * self.length


CASES = (
    Case("1x1024", 1, 1024),
    Case("1x8192", 1, 8192),
    Case("16x4096", 16, 4096),
    Case("1x65536", 1, 65536),
    # A micro-batch of images and video clips of different sizes, packed.
    Case("ragged-8", ragged=(256, 1024, 64, 4096, 729, 2304, 1, 8192)),
)


def forward_fn(scores, k, cu):
    return lambda: difftopk(scores, k, cu_seqlens=cu)


def forward_backward_fn(scores, k, cu):
    x = scores.detach().requires_grad_(True)
    grad = torch.randn_like(scores)

    def run():
        difftopk(x, k, cu_seqlens=cu).backward(grad)
        x.grad = None

    return run


def algorithm1_fns(scores, k, cu):
    """Algorithm 1 as published: padded batches with one k, a Python loop over segments otherwise."""
    if cu is None:
        x = scores.detach().requires_grad_(True)
        grad = torch.randn_like(scores)

        def fwd_bwd():
            reference.difftopk_algorithm1(x, k).backward(grad)
            x.grad = None

        return (lambda: reference.difftopk_algorithm1(scores, k)), fwd_bwd
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist(), k.tolist()))
    segments = [(scores[a:b].view(1, -1), kk) for a, b, kk in bounds if b > a]

    def fwd():
        return [reference.difftopk_algorithm1(s, kk) for s, kk in segments]

    def fwd_bwd():
        for s, kk in segments:
            x = s.detach().requires_grad_(True)
            reference.difftopk_algorithm1(x, kk).backward(torch.ones_like(x))

    return fwd, fwd_bwd


@dataclasses.dataclass
class Row:
    case: str
    dtype: str
    backend: str
    fwd_ms: float
    alg1_fwd_ms: float
    fwd_bwd_ms: float
    alg1_fwd_bwd_ms: float
    fwd_bound_share: float
    fwd_bwd_bound_share: float

    @property
    def fwd_speedup(self):
        return self.alg1_fwd_ms / self.fwd_ms

    @property
    def fwd_bwd_speedup(self):
        return self.alg1_fwd_bwd_ms / self.fwd_bwd_ms


def measure_case(case: Case, device, dtype=torch.float32, bandwidth: float | None = None) -> Row:
    """Times one case for vsops and Algorithm 1, and the share of the bandwidth bound.

    Minimum traffic: the forward reads s and writes M (2 N elements); forward + backward
    adds reading g and s and writing dL/ds (5 N elements).
    """
    bandwidth = bandwidth or copy_bandwidth(device)
    scores, k, cu = case.make(device, dtype)
    fwd = seconds(forward_fn(scores, k, cu))
    fwd_bwd = seconds(forward_backward_fn(scores, k, cu))
    alg1_fwd, alg1_fwd_bwd = (seconds(f) for f in algorithm1_fns(scores, k, cu))
    elem = scores.element_size() * case.elements
    return Row(
        case=case.name,
        dtype=str(dtype).replace("torch.", ""),
        backend=backends.select(scores.device, dtype),
        fwd_ms=fwd * 1e3,
        alg1_fwd_ms=alg1_fwd * 1e3,
        fwd_bwd_ms=fwd_bwd * 1e3,
        alg1_fwd_bwd_ms=alg1_fwd_bwd * 1e3,
        fwd_bound_share=(2 * elem / bandwidth) / fwd,
        fwd_bwd_bound_share=(5 * elem / bandwidth) / fwd_bwd,
    )


def print_table(rows: list[Row], bandwidth: float, device, file: TextIO = sys.stdout) -> None:
    print(f"DiffTopK, budget {BUDGET}, device {device}, copy bandwidth {bandwidth / 1e9:.1f} GB/s", file=file)
    print(
        "| case | dtype | backend | fwd ms | Alg.1 fwd ms | fwd speedup | fwd % of bw bound "
        "| fwd+bwd ms | Alg.1 fwd+bwd ms | fwd+bwd speedup | fwd+bwd % of bw bound |",
        file=file,
    )
    print("|" + "---|" * 11, file=file)
    for r in rows:
        print(
            f"| {r.case} | {r.dtype} | {r.backend} | {r.fwd_ms:.3f} | {r.alg1_fwd_ms:.3f} | "
            f"{r.fwd_speedup:.1f}x | {100 * r.fwd_bound_share:.0f}% | {r.fwd_bwd_ms:.3f} | "
            f"{r.alg1_fwd_bwd_ms:.3f} | {r.fwd_bwd_speedup:.1f}x | {100 * r.fwd_bwd_bound_share:.0f}% |",
            file=file,
        )


def summary(device="cpu", dtype=torch.float32, file: TextIO = sys.stdout) -> list[Row]:
    """Measures every case and prints the table; returns the rows."""
    device = torch.device(device)
    bandwidth = copy_bandwidth(device)
    rows = [measure_case(case, device, dtype, bandwidth) for case in CASES]
    print_table(rows, bandwidth, device, file)
    return rows


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op difftopk``."""
    summary(args.device, dtype, file=file)
