"""Timing helpers of the benchmarks: the median seconds per call, and the copy bandwidth that
the memory-bandwidth bound is measured against, alternated with the timed operator.

Speed is reported as ratios measured in the same process (against a PyTorch baseline, and
against the bound: the time a copy kernel needs to move the bytes the operator must move at
least once, with the copy bandwidth measured on the spot).
"""
from __future__ import annotations

import dataclasses
import statistics
from typing import Callable

import torch
from torch.utils import benchmark as tbench

__all__ = ["seconds", "copy_bandwidth", "PairedTiming", "paired_timing"]


def seconds(fn: Callable[[], object], min_run_time: float = 0.3, warmup: bool = True) -> float:
    """Median seconds per call of ``fn``, with device synchronisation (and a warm-up call,
    which a baseline taking seconds per call can skip)."""
    if warmup:
        fn()
    # Timer pins torch to one thread unless told otherwise: time with all of them.
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time).median


def _copy_fn(device, nbytes: int) -> Callable[[], object]:
    """A device copy of ``nbytes``. The source is written first: an untouched CPU allocation
    maps every page to the kernel's shared zero page, and copying from it reads one cached page
    instead of memory (measured: 1.7x the bandwidth of a written source)."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def copy_bandwidth(device, nbytes: int = 1 << 27) -> float:
    """Bytes per second moved by a plain device copy (read + write) of ``nbytes``."""
    return 2 * nbytes / seconds(_copy_fn(device, nbytes))


@dataclasses.dataclass(frozen=True)
class PairedTiming:
    """Rounds of (seconds per call of an op, copy bandwidth just before it), alternated.

    This VM's memory bandwidth drifts by tens of percent within minutes, so a share of the
    bandwidth bound is taken per round, against the copy measured next to it, and the median
    over the rounds is reported.
    """

    rounds: tuple[tuple[float, float], ...]

    @property
    def seconds(self) -> float:
        return statistics.median(t for t, _ in self.rounds)

    @property
    def bandwidth(self) -> float:
        return statistics.median(bw for _, bw in self.rounds)

    def share(self, nbytes: int) -> float:
        """Median over the rounds of (nbytes / copy bandwidth) / seconds per call."""
        return statistics.median(nbytes / bw / t for t, bw in self.rounds)


def paired_timing(
    fn: Callable[[], object], device, rounds: int = 5, min_run_time: float = 0.1, nbytes: int = 1 << 27
) -> PairedTiming:
    """Times ``fn`` and a device copy of ``nbytes`` alternately, ``rounds`` times each."""
    copy = _copy_fn(device, nbytes)
    fn()
    pairs = []
    for _ in range(rounds):
        bandwidth = 2 * nbytes / seconds(copy, min_run_time)
        pairs.append((seconds(fn, min_run_time, warmup=False), bandwidth))
    return PairedTiming(tuple(pairs))
