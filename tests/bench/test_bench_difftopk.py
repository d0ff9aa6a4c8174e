"""DiffTopK microbenchmarks (pytest-benchmark) against the paper's Algorithm 1 in PyTorch.

    python -m pytest tests/bench/test_bench_difftopk.py --benchmark-only

Each benchmark also times Algorithm 1 and a device copy in the same run and records, in
``extra_info``, the speedup over Algorithm 1 and the share of the memory-bandwidth bound.
``vsops bench`` prints the same measurements as one table.
"""
import pytest
import torch

from vsops.benchmarks import difftopk as bench, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {case.name: case for case in bench.CASES}


@pytest.fixture(scope="module")
def bandwidth():
    return timing.copy_bandwidth(DEVICE)


def _record(benchmark, baseline_fn, bound_bytes, bandwidth):
    if benchmark.disabled:
        return None
    ours = benchmark.stats.stats.median
    speedup = timing.seconds(baseline_fn) / ours
    benchmark.extra_info["speedup_vs_algorithm1"] = round(speedup, 2)
    benchmark.extra_info["share_of_bandwidth_bound"] = round(bound_bytes / bandwidth / ours, 4)
    return speedup


@pytest.mark.parametrize("name", CASES)
def test_forward(benchmark, bandwidth, name):
    case = CASES[name]
    scores, k, cu = case.make(DEVICE)
    benchmark.group = f"difftopk-forward-{name}"
    benchmark(bench.forward_fn(scores, k, cu))
    baseline, _ = bench.algorithm1_fns(scores, k, cu)
    _record(benchmark, baseline, 2 * scores.element_size() * case.elements, bandwidth)


@pytest.mark.parametrize("name", CASES)
def test_forward_backward(benchmark, bandwidth, name):
    case = CASES[name]
    scores, k, cu = case.make(DEVICE)
    benchmark.group = f"difftopk-forward-backward-{name}"
    benchmark(bench.forward_backward_fn(scores, k, cu))
    _, baseline = bench.algorithm1_fns(scores, k, cu)
    speedup = _record(benchmark, baseline, 5 * scores.element_size() * case.elements, bandwidth)
    if speedup is not None and name == "16x4096" and DEVICE.type == "cpu":
        # The compiled CPU kernel's required speedup over the paper's Algorithm 1.
        assert speedup >= 10, f"forward+backward only {speedup:.1f}x faster than Algorithm 1"
