"""End-to-end prefill benchmarks (pytest-benchmark): random-weight Qwen2-VL, Qwen2.5-VL, Qwen3-VL,
Qwen3.5 (5.x), their MoE variants and LLaVA-OneVision-1.5 of the same sizes (the last on
transformers 4.x, with lmms-engine's model code) on one prompt of 2,024 visual and 60 text tokens, unpatched and with
VisionSelector at each budget.

    python -m pytest tests/bench/test_bench_prefill.py --benchmark-only

``extra_info`` records the kept tokens, the speedup over the unpatched prefill (timed in the
same run), the ideal L / L', the selector's time and share of the prefill, and the peak memory
of one forward (unpatched: the vision tower's time alone). ``vsops bench --op prefill`` prints
the same measurements as one table.
"""
import pytest
import torch

pytest.importorskip("transformers")

from vsops.benchmarks import prefill as bench_prefill  # noqa: E402
from vsops.integrations import apply_visionselector, revert_visionselector  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module", params=sorted(bench_prefill.MODELS))
def model_and_batch(request):
    model = request.param
    if bench_prefill.unavailable_reason(model):
        pytest.skip(bench_prefill.unavailable_reason(model))
    return bench_prefill.build_model(DEVICE, model=model), bench_prefill.make_batch(DEVICE, model=model)


@pytest.fixture(scope="module")
def unpatched_seconds(model_and_batch):
    return bench_prefill.median_seconds(bench_prefill.prefill_fn(*model_and_batch), DEVICE)


@pytest.fixture
def patched(model_and_batch, unpatched_seconds, request):
    """(model, batch, unpatched seconds): the module's model with VisionSelector at the test's
    budget, reverted afterwards; the unpatched baseline is timed before the first patch."""
    model, batch = model_and_batch
    apply_visionselector(model, budget=request.param)
    yield model, batch, unpatched_seconds
    revert_visionselector(model)


def _time_prefill(benchmark, model, batch):
    benchmark.pedantic(
        bench_prefill.prefill_fn(model, batch), rounds=bench_prefill.REPEATS, iterations=1, warmup_rounds=1
    )


def _record_peak_memory(benchmark, model, batch):
    peak = bench_prefill.peak_memory_bytes(bench_prefill.prefill_fn(model, batch), DEVICE)
    if peak is not None:
        benchmark.extra_info["peak_mb"] = round(peak / 2**20, 1)


def test_prefill_unpatched(benchmark, model_and_batch):
    model, batch = model_and_batch
    benchmark.group = "prefill"
    _time_prefill(benchmark, model, batch)
    if benchmark.disabled:
        return
    benchmark.extra_info["tokens"] = batch["input_ids"].shape[1]
    vision_tower = bench_prefill.median_seconds(bench_prefill.vision_tower_fn(model, batch), DEVICE)
    benchmark.extra_info["vision_tower_ms"] = round(1e3 * vision_tower, 1)
    _record_peak_memory(benchmark, model, batch)


@pytest.mark.parametrize("patched", bench_prefill.BUDGETS, indirect=True, ids=lambda b: f"budget={b}")
def test_prefill_visionselector(benchmark, patched):
    model, batch, unpatched = patched
    benchmark.group = "prefill"
    _time_prefill(benchmark, model, batch)
    if benchmark.disabled:
        return
    prefill = benchmark.stats.stats.median
    tokens, (kept, _) = batch["input_ids"].shape[1], bench_prefill.kept_tokens(model, batch)
    selector = bench_prefill.selector_seconds(model, batch, DEVICE)
    benchmark.extra_info["tokens"], benchmark.extra_info["kept_tokens"] = tokens, kept
    benchmark.extra_info["speedup"] = round(unpatched / prefill, 2)
    benchmark.extra_info["ideal_speedup"] = round(tokens / kept, 2)
    benchmark.extra_info["selector_ms"] = round(1e3 * selector, 2)
    benchmark.extra_info["selector_share"] = round(selector / prefill, 4)
    _record_peak_memory(benchmark, model, batch)
