"""Selection-method benchmarks (pytest-benchmark): DivPrune against the published algorithm
(full n x n matrix + greedy loop) with the one-product compute bound, VisionZip's attention
received against the attention weights formed whole with its two-product bound, the attention
FastV and PyramidDrop read in a language-model layer against the causal weights formed whole,
and every vision-stage method's selection time per image, at D = 3584, budget 0.1.

    python -m pytest tests/bench/test_bench_methods.py --benchmark-only

``vsops bench --op methods`` prints the same measurements as tables (DivPrune also at N = 16384).
"""
import pytest
import torch

from vsops.benchmarks import methods as bench_methods, timing
from vsops.budget import budget_to_k
from vsops.methods import available

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("n", bench_methods.METHOD_SIZES)
def test_divprune_against_the_published_algorithm(benchmark, n):
    x = bench_methods.tokens(n, DEVICE)
    k = budget_to_k(n, bench_methods.BUDGET)
    benchmark.group = f"divprune-N={n}"
    benchmark(bench_methods.divprune_fn(x, k))
    if benchmark.disabled:
        return
    ours = benchmark.stats.stats.median
    benchmark.extra_info["speedup_vs_published"] = round(
        timing.seconds(lambda: bench_methods.published_divprune(x, k)) / ours, 2
    )
    benchmark.extra_info["share_of_compute_bound"] = round(timing.seconds(bench_methods.bound_fn(x)) / ours, 3)


@pytest.mark.parametrize("n", bench_methods.METHOD_SIZES)
def test_attention_received_against_materialized_attention(benchmark, n):
    q, k = bench_methods.vision_queries_keys(bench_methods.MERGE_UNIT * n, DEVICE)
    benchmark.group = f"attention-received-N={n}"
    benchmark(bench_methods.attention_received_fn(q, k))
    if benchmark.disabled:
        return
    ours = benchmark.stats.stats.median
    if bench_methods.measure_attention(n, DEVICE).materialized_ms is not None:
        benchmark.extra_info["speedup_vs_materialized"] = round(
            timing.seconds(bench_methods.materialized_attention_fn(q, k)) / ours, 2
        )
    benchmark.extra_info["share_of_compute_bound"] = round(1e-3 * bench_methods.attention_bound_ms(q, k) / ours, 3)


@pytest.mark.parametrize("rows", ["all", "last"])
def test_layer_attention_against_materialized_attention(benchmark, rows):
    from vsops.methods.layer import attention_received_by_rows

    length = bench_methods.LAYER_LENGTHS[0]
    q, k = bench_methods.language_queries_keys(length, DEVICE)
    benchmark.group = f"layer-attention-L={length}"
    benchmark(lambda: attention_received_by_rows(q, k, rows))
    if benchmark.disabled:
        return
    materialized = timing.seconds(bench_methods.materialized_causal_fn(q, k, rows == "last"))
    benchmark.extra_info["speedup_vs_materialized"] = round(materialized / benchmark.stats.stats.median, 2)


@pytest.mark.parametrize("name", available("vision"))
@pytest.mark.parametrize("n", bench_methods.METHOD_SIZES)
def test_method_selection_per_image(benchmark, name, n):
    x = bench_methods.tokens(n, DEVICE)
    benchmark.group = f"methods-N={n}"
    benchmark(bench_methods.method_fn(name, x, budget_to_k(n, bench_methods.BUDGET)))
