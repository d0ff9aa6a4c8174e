"""Select + pack microbenchmarks (pytest-benchmark) against the PyTorch routes it replaces.

    python -m pytest tests/bench/test_bench_varlen.py --benchmark-only

``extra_info`` records the speedups over each PyTorch route (``bench_varlen.ROUTES``), the
pack's GB/s and its share of the copy bandwidth measured in the same run.
"""
import pytest
import torch

from vsops.benchmarks import timing, varlen as bench_varlen

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = {case.name: case for case in bench_varlen.CASES}


@pytest.mark.parametrize("name", CASES)
def test_select_and_pack(benchmark, name):
    inputs = CASES[name].make(DEVICE)
    benchmark.group = f"select-and-pack-{name}"
    benchmark(bench_varlen.vsops_fn(*inputs))
    if benchmark.disabled:
        return
    ours = benchmark.stats.stats.median
    nbytes = bench_varlen.moved_bytes(*inputs)
    benchmark.extra_info["gb_per_s"] = round(nbytes / ours / 1e9, 1)
    paired = timing.paired_timing(bench_varlen.vsops_fn(*inputs), DEVICE)
    benchmark.extra_info["share_of_copy_bandwidth"] = round(paired.share(nbytes), 3)
    for label, route in bench_varlen.ROUTES.items():
        benchmark.extra_info[f"speedup_vs_{label.replace(' ', '_')}"] = round(timing.seconds(route(*inputs)) / ours, 2)
