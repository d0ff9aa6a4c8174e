"""LIS scoring benchmark, shared by ``tests/bench/test_bench_lis.py`` and ``vsops bench --op lis``.

``lis_score`` against (a) Eq. 2 as published (Q, K and the N x N matrix in PyTorch) and
(b) the ``Q . mean(K)`` form in PyTorch (no N x N matrix, but Q and K still formed), at the
Qwen2.5-VL-7B sizes D = 3584, d = 1792, and the share of the memory-bandwidth bound: the
bytes the operator must move at least once over the copy bandwidth measured in the same run
(alternating with it, ``vsops.benchmarks.timing.PairedTiming``).
The baselines, like the published code, take one image at a time.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable, TextIO

import torch
from torch.nn import functional as F

from vsops import backends
from vsops.benchmarks.timing import paired_timing, seconds
from vsops.lis import lis_score

HIDDEN, PROJ = 3584, 1792


@dataclasses.dataclass(frozen=True)
class LisCase:
    """One image of ``length`` tokens, or several of the ``ragged`` lengths packed."""

    name: str
    length: int = 0
    ragged: tuple[int, ...] = ()

    @property
    def lengths(self) -> tuple[int, ...]:
        return self.ragged or (self.length,)

    def make(self, device, dtype=torch.float32, seed=0):
        """(x, cu_seqlens or None, (q_weight, q_bias, k_weight, k_bias))."""
        g = torch.Generator().manual_seed(seed)
        tokens = sum(self.lengths)
        x = torch.randn(tokens, HIDDEN, generator=g).to(device=device, dtype=dtype)
        weights = tuple(
            t.to(device=device, dtype=dtype)
            for t in (
                torch.randn(PROJ, HIDDEN, generator=g) * HIDDEN**-0.5,
                torch.randn(PROJ, generator=g),
                torch.randn(PROJ, HIDDEN, generator=g) * HIDDEN**-0.5,
                torch.randn(PROJ, generator=g),
            )
        )
        if not self.ragged:
            return x.view(1, tokens, HIDDEN), None, weights
        cu = torch.zeros(len(self.ragged) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(self.ragged).cumsum(0)
        return x, cu.to(device), weights


CASES = (
    LisCase("N=1024", 1024),
    LisCase("N=4096", 4096),
    LisCase("N=16384", 16384),
    # A micro-batch of 8 images of different sizes, packed.
    LisCase("ragged-8", ragged=(256, 1024, 64, 4096, 729, 2304, 16, 1296)),
)


def dense_eq2(v, q_weight, q_bias, k_weight, k_bias):
    """(a) Eq. 2 as published, one image ``[N, D]``: the N x N matrix, then its row means."""
    q = F.linear(v, q_weight, q_bias)
    k = F.linear(v, k_weight, k_bias)
    return (q @ k.T / q_weight.shape[0] ** 0.5).mean(1)


def factored_eq2(v, q_weight, q_bias, k_weight, k_bias):
    """(b) ``Q . mean(K)``: no N x N matrix, but Q and K ([N, d] each) are formed."""
    q = F.linear(v, q_weight, q_bias)
    k_mean = F.linear(v, k_weight, k_bias).mean(0)
    return q @ k_mean / q_weight.shape[0] ** 0.5


def _per_image(fn, x, cu):
    if cu is None:
        return lambda *w: fn(x[0], *w).unsqueeze(0)
    bounds = list(zip(cu[:-1].tolist(), cu[1:].tolist()))
    return lambda *w: [fn(x[a:b], *w) for a, b in bounds]


PASSES = ("fwd", "fwd+bwd", "scorer fwd+bwd")
"""Timed passes: the forward; forward + backward to x and the four weights; and forward +
backward to the weights only, x frozen, which is how the scorer trains on a frozen backbone."""


def timed_fns(method: str, x, cu, weights) -> dict[str, Callable[[], object]]:
    """One closure per pass in PASSES, for ``method`` in {"vsops", "dense", "factored"}."""
    if method == "vsops":
        def run(x_, *w):
            return lis_score(x_, *w, cu_seqlens=cu)
    else:
        base = dense_eq2 if method == "dense" else factored_eq2

        def run(x_, *w):
            out = _per_image(base, x_, cu)(*w)
            return torch.cat(out) if isinstance(out, list) else out
    grad = torch.randn(x.shape[:-1], device=x.device)

    def backward_fn(leaves):
        def forward_backward():
            out = run(*leaves)
            out.backward(grad.to(out.dtype))
            for t in leaves:
                t.grad = None

        return forward_backward

    trainable = [t.detach().clone().requires_grad_(True) for t in weights]
    return {
        "fwd": lambda: run(x, *weights),
        "fwd+bwd": backward_fn([x.detach().clone().requires_grad_(True), *trainable]),
        "scorer fwd+bwd": backward_fn([x, *trainable]),
    }


def bound_bytes(x, weights) -> dict[str, int]:
    """Minimum traffic per pass. The forward reads x twice and the weights once. The backward
    reads x once more and the weights again, writes the weights' gradients and, when x needs
    one, writes dx; without dx only W_q is read again (W_k^T r is dx's term)."""
    xb = x.numel() * x.element_size()
    wb = sum(t.numel() * t.element_size() for t in weights if t is not None)
    qb = weights[0].numel() * weights[0].element_size()
    forward = 2 * xb + wb
    return {"fwd": forward, "fwd+bwd": forward + 2 * xb + 2 * wb, "scorer fwd+bwd": forward + xb + qb + wb}


@dataclasses.dataclass
class LisRow:
    case: str
    dtype: str
    backend: str
    ms: dict  # {(method, pass): milliseconds}, pass in PASSES
    bound_share: dict  # {pass: share of the bandwidth bound reached by vsops}
    bandwidth: dict  # {pass: copy bandwidth (bytes/s) measured alternately with vsops}

    def speedup(self, method: str, which: str) -> float:
        return self.ms[(method, which)] / self.ms[("vsops", which)]


def measure_case(case: LisCase, device, dtype=torch.float32, dense: bool = True) -> LisRow:
    """Times vsops (alternating with a device copy, see ``vsops.benchmarks.timing.PairedTiming``) and the
    baselines on one case. ``dense=False`` skips baseline (a)."""
    x, cu, weights = case.make(device, dtype)
    nbytes = bound_bytes(x, weights)
    ms, bound_share, bandwidth = {}, {}, {}
    for which, fn in timed_fns("vsops", x, cu, weights).items():
        paired = paired_timing(fn, device)
        ms[("vsops", which)] = 1e3 * paired.seconds
        bound_share[which] = paired.share(nbytes[which])
        bandwidth[which] = paired.bandwidth
    for method in ("factored",) + (("dense",) if dense else ()):
        # The dense baseline takes seconds per call at N = 16384: one timed call, no warm-up.
        slow = method == "dense" and max(case.lengths) >= 8192
        for which, fn in timed_fns(method, x, cu, weights).items():
            ms[(method, which)] = 1e3 * seconds(fn, 0.3, warmup=not slow)
    return LisRow(
        case=case.name,
        dtype=str(dtype).replace("torch.", ""),
        backend=backends.select(x.device, dtype),
        ms=ms,
        bound_share=bound_share,
        bandwidth=bandwidth,
    )


def print_table(rows: list[LisRow], device, file: TextIO = sys.stdout) -> None:
    print(f"LIS scoring, D={HIDDEN}, d={PROJ}, device {device}", file=file)
    print(
        "| case | dtype | backend | pass | vsops ms | copy GB/s | % of bw bound | (b) Q.mean(K) ms "
        "| speedup vs (b) | (a) N x N ms | speedup vs (a) |",
        file=file,
    )
    print("|" + "---|" * 11, file=file)
    for r in rows:
        for which in PASSES:
            dense = (
                f"{r.ms[('dense', which)]:.1f} | {r.speedup('dense', which):.0f}x"
                if ("dense", which) in r.ms
                else "- | -"
            )
            print(
                f"| {r.case} | {r.dtype} | {r.backend} | {which} | {r.ms[('vsops', which)]:.2f} | "
                f"{r.bandwidth[which] / 1e9:.1f} | {100 * r.bound_share[which]:.0f}% | "
                f"{r.ms[('factored', which)]:.2f} | {r.speedup('factored', which):.1f}x | {dense} |",
                file=file,
            )


def summary(device="cpu", dtype=torch.float32, dense: bool = True, file: TextIO = sys.stdout) -> list[LisRow]:
    """Measures every case and prints the table; returns the rows."""
    device = torch.device(device)
    rows = [measure_case(case, device, dtype, dense) for case in CASES]
    print_table(rows, device, file)
    return rows


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op lis [--no-dense]``."""
    summary(args.device, dtype, dense=not args.no_dense, file=file)
