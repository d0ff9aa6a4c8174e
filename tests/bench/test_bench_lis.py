"""LIS scoring microbenchmarks (pytest-benchmark) against Eq. 2 with the N x N matrix (a) and
the ``Q . mean(K)`` form (b), both in PyTorch, at D = 3584, d = 1792.

    python -m pytest tests/bench/test_bench_lis.py --benchmark-only

Each benchmark also times the baselines and a device copy in the same run and records, in
``extra_info``, the speedups and the share of the memory-bandwidth bound. ``vsops bench --op
lis`` prints the same measurements as one table.
"""
import pytest
import torch

from vsops.benchmarks import lis as bench_lis, timing

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {case.name: case for case in bench_lis.CASES}


@pytest.mark.parametrize("which", bench_lis.PASSES)
@pytest.mark.parametrize("name", CASES)
def test_lis_score(benchmark, name, which):
    case = CASES[name]
    x, cu, weights = case.make(DEVICE)
    benchmark.group = f"lis-{which}-{name}"
    benchmark(bench_lis.timed_fns("vsops", x, cu, weights)[which])
    if benchmark.disabled:
        return
    ours = benchmark.stats.stats.median
    paired = timing.paired_timing(bench_lis.timed_fns("vsops", x, cu, weights)[which], DEVICE)
    share = paired.share(bench_lis.bound_bytes(x, weights)[which])
    benchmark.extra_info["share_of_bandwidth_bound"] = round(share, 3)
    speedups = {}
    for method in ("factored", "dense"):
        slow = method == "dense" and max(case.lengths) >= 8192
        baseline = bench_lis.timed_fns(method, x, cu, weights)[which]
        speedups[method] = timing.seconds(baseline, warmup=not slow) / ours
        benchmark.extra_info[f"speedup_vs_{method}"] = round(speedups[method], 1)
    if DEVICE.type == "cpu" and name == "N=4096" and which == "fwd":
        # The compiled CPU kernels' required speedup over Eq. 2 and share of the bandwidth bound.
        assert speedups["dense"] >= 100, f"forward only {speedups['dense']:.0f}x faster than Eq. 2 (N x N)"
        assert share >= 1 / 1.5, f"forward at {share:.0%} of the bandwidth bound"
