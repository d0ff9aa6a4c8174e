"""The demo's timings: a short run of the operator benchmarks (one small case each, seconds in
all, no N x N baseline beyond N = 1024) and the prefill benchmark's table."""
from __future__ import annotations

import dataclasses

import torch

__all__ = ["KernelRow", "kernel_rows", "prefill_rows"]


@dataclasses.dataclass
class KernelRow:
    """One operator on one case: its speedup over the PyTorch baseline, and the share of the
    bound (``bound``: "memory" for a copy of the bytes it must move, "compute" for the products
    it must make) it reaches."""

    operator: str
    case: str
    baseline: str
    speedup: float
    bound: str
    share: float


def _difftopk(device):
    from vsops.benchmarks import difftopk as bench

    r = bench.measure_case(bench.Case("1x8192", 1, 8192), device)
    return KernelRow("DiffTopK fwd+bwd", r.case, "Algorithm 1 (bisection loop)", r.fwd_bwd_speedup, "memory",
                     r.fwd_bwd_bound_share)


def _lis(device):
    from vsops.benchmarks import lis as bench_lis

    r = bench_lis.measure_case(bench_lis.LisCase("N=1024", 1024), device, dense=False)
    return KernelRow("LIS score fwd", r.case, "factored PyTorch", r.speedup("factored", "fwd"), "memory",
                     r.bound_share["fwd"])


def _varlen(device):
    from vsops.benchmarks import varlen as bench_varlen

    r = bench_varlen.measure_case(bench_varlen.VarlenCase("H=2048", 2048), device)
    return KernelRow("select + pack", f"8x4096, {r.case}", "unpad_input route", r.route_ms["unpad_input"] / r.ms,
                     "memory", r.copy_share)


def _divprune(device):
    from vsops.benchmarks import methods as bench_methods

    r = bench_methods.measure_divprune(1024, device)
    return KernelRow("DivPrune", "N=1024", "published (n x n matrix)", r.speedup, "compute", r.share)


def _attention(device):
    from vsops.benchmarks import methods as bench_methods

    r = bench_methods.measure_attention(256, device)
    return KernelRow("attention received", f"{r.patches} patches", "attention weights formed whole",
                     r.materialized_ms / r.vsops_ms, "compute", r.share)


KERNELS = (_difftopk, _lis, _varlen, _divprune, _attention)
PREFILL_ROWS = 5  # the unpatched model and the learned scorer at the 4 budgets of vsops bench --op prefill


def kernel_rows(device="cpu", progress=None) -> list[KernelRow]:
    rows = []
    for measure in KERNELS:
        rows.append(measure(torch.device(device)))
        if progress is not None:
            progress.update(1)
    return rows


def prefill_rows(device="cpu", progress=None):
    """``(rows, vision tower ms)`` of ``vsops bench --op prefill`` (the learned scorer);
    ``progress`` (a tqdm bar) advances by one per row."""
    from vsops.benchmarks import prefill as bench_prefill

    device = torch.device(device)
    model = bench_prefill.build_model(device)
    batch = bench_prefill.make_batch(device)
    vision_ms = 1e3 * bench_prefill.median_seconds(bench_prefill.vision_tower_fn(model, batch), device)
    return bench_prefill.measure_all(model, batch, device, progress=progress), vision_ms
