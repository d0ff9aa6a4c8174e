"""End-to-end prefill benchmark, shared by ``tests/bench/test_bench_prefill.py`` and ``vsops bench
--op prefill [--model NAME]``: one forward over a prompt (``model(**batch, use_cache=False)``,
eval mode, inference mode, sdpa attention) of a model built from a config with random weights
(Qwen2.5-VL by default, or Qwen2-VL, Qwen3-VL, Qwen3.5, their MoE variants or
LLaVA-OneVision-1.5, of the same sizes), without VisionSelector and with it at budgets 1.0, 0.3, 0.2 and 0.1 (the same weights,
patched once).

The prompt is batch 1: 30 text tokens, one image of 88 x 92 patches (2,024 visual tokens between
its vision-start and vision-end tokens), 30 text tokens; L = 2,086 tokens. Per row:

- prefill ms: the median of several forwards after a warm-up, on all the threads torch uses;
- speedup over the unpatched prefill, and the ideal L / L': the total tokens over the tokens the
  language model keeps, i.e. the speedup of a language model whose cost were linear in its
  tokens. For a method dropping tokens inside the language model (``--method fastv``, ``pdrop``,
  ``dart``), the layers before a drop see every token: the ideal is then ``layers x L`` over
  the tokens the layers see, and each of its rows (budgets 1.0, 0.5, 0.3, 0.2, 0.1, those it can
  reach) is followed by the learned vision-stage selector's at the same budget. The vision tower sees every patch whatever the budget; its time alone is printed
  with the table, as the part of the prefill that cannot shrink;
- selector ms and its share of the prefill: the time spent in
  ``VisionSelector.language_model_inputs`` (the method's selection, LIS scoring and top-k by
  default, and gathering the kept tokens into the padded language-model inputs), plus, for a
  method reading the vision tower's attention, that attention pass, and for a method inside the
  language model, its drops, summed per forward;
- peak MB: the memory the forward adds at its peak (CUDA: ``max_memory_allocated``; CPU on
  Linux: the resident-set high-water mark, reset through ``/proc/self/clear_refs``).
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

import torch

from vsops.integrations.testing.qwen_vl import QWEN_VL_MODEL_TYPES

BUDGETS = (1.0, 0.3, 0.2, 0.1)
# Methods inside the language model also at 0.5: PyramidDrop's average over the layers cannot go
# below the share of layers before its first drop (2 of 6 here).
LAYER_BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.1)
COMPARED_METHOD = "visionselector"  # the vision-stage rows beside a method inside the language model
MODELS = {
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
    "qwen3_vl_moe": "Qwen3-VL-MoE",
    "qwen3_5": "Qwen3.5",
    "qwen3_5_moe": "Qwen3.5-MoE",
    "llava_ov_1_5": "LLaVA-OneVision-1.5",
}
PROMPT = (30, ("image", 88, 92), 30)
# About 1 s of unpatched prefill on 2 CPU threads, a third of it in the vision tower, which sees
# the 8,096 patches before the 2 x 2 merge (in Qwen2.5-VL-7B, roughly a quarter of the FLOPs).
MODEL_SIZES = dict(
    hidden_size=512,
    layers=6,
    heads=8,
    kv_heads=2,
    intermediate_size=1536,
    vision_hidden_size=128,
    vision_depth=4,
    vocab_size=1024,
)
REPEATS = 5
SELECTOR_REPEATS = 3


def transformers_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def unavailable_reason(model: str) -> str | None:
    """Why ``model`` (a key of :data:`MODELS`) cannot be built here (the installed transformers
    lacks it; LLaVA-OV-1.5 also needs lmms-engine and transformers 4.x), or None."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if not transformers_available():
        return "transformers is not installed"
    if model == "llava_ov_1_5":
        from vsops.integrations.testing.llava_ov_1_5 import unavailable_reason as llava_reason

        return llava_reason()
    from vsops.integrations import adapter_for

    try:
        adapter_for(model).classes()
    except ImportError as e:
        return str(e)
    return None


def build_model(device, dtype=torch.float32, seed: int = 0, model: str = "qwen2_5_vl") -> torch.nn.Module:
    """A model of :data:`MODEL_SIZES` (``model``: a key of :data:`MODELS`), random weights,
    eval mode. LLaVA-OneVision-1.5 is remote code: it is saved to a temporary directory with
    its code and loaded from there, as a user loads the published checkpoint."""
    if model in QWEN_VL_MODEL_TYPES:
        from vsops.integrations import adapter_for
        from vsops.integrations.testing import tiny_qwen_vl_config

        torch.manual_seed(seed)
        config = tiny_qwen_vl_config(model, **MODEL_SIZES, attn_implementation="sdpa")
        built = adapter_for(model).classes()[1](config)
    elif model == "llava_ov_1_5":
        import tempfile

        from transformers import AutoModelForCausalLM

        from vsops.integrations.testing import llava_ov_1_5_model_dir

        with tempfile.TemporaryDirectory() as directory:
            path = llava_ov_1_5_model_dir(directory, seed=seed, **MODEL_SIZES)
            built = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, attn_implementation="sdpa")
    else:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    return built.to(device=device, dtype=dtype).eval()


def make_batch(device, dtype=torch.float32, seed: int = 0, model: str = "qwen2_5_vl") -> dict:
    """The model inputs of :data:`PROMPT`: ``input_ids`` and ``attention_mask`` int64 ``[1, L]``,
    ``pixel_values`` ``[8096, patch values]`` in ``dtype``, ``image_grid_thw`` int64 ``[1, 3]``."""
    from vsops.integrations import testing

    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    if model in QWEN_VL_MODEL_TYPES:
        batch = testing.qwen_vl_batch([list(PROMPT)], model, seed=seed)
    else:
        batch = getattr(testing, f"{model}_batch")([list(PROMPT)], seed=seed)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    return {name: t.to(device) for name, t in batch.items()}


def prefill_fn(model, batch) -> Callable[[], object]:
    """One prefill forward; returns the model output."""
    def run():
        with torch.inference_mode():
            return model(**batch, use_cache=False)

    return run


def vision_tower_fn(model, batch) -> Callable[[], object]:
    """The vision tower alone on the prompt's image (patch embedding, blocks, merger)."""
    def run():
        with torch.inference_mode():
            return model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])

    return run


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], device, repeats: int = REPEATS) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` after one warm-up call. Not
    :func:`vsops.benchmarks.timing.seconds`: its ``torch.utils.benchmark.Timer`` pins torch to one thread."""
    device = torch.device(device)
    fn()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def timing_selector(selector, device):
    """Times every ``selector.language_model_inputs`` call while active, and the
    vision-attention pass of methods that read the tower (``attention_received`` inside its
    hooks), and the drops of methods inside the language model (their attention pass, selection
    and gathers); yields the list the call times (seconds) are appended to. The hooks look the
    method, the operator and the drop up on each call, so shadowing them is enough."""
    from vsops.integrations import layer_drops, vision_attention

    device = torch.device(device)

    def timed(function):
        def run(*args, **kwargs):
            _synchronize(device)
            start = time.perf_counter()
            result = function(*args, **kwargs)
            _synchronize(device)
            times.append(time.perf_counter() - start)
            return result

        return run

    times: list[float] = []
    operator, drop = vision_attention.attention_received, layer_drops.PrefillDrops._drop
    selector.language_model_inputs = timed(selector.language_model_inputs)
    vision_attention.attention_received = timed(operator)
    layer_drops.PrefillDrops._drop = timed(drop)
    try:
        yield times
    finally:
        del selector.language_model_inputs
        vision_attention.attention_received = operator
        layer_drops.PrefillDrops._drop = drop


def selector_seconds(model, batch, device, repeats: int = SELECTOR_REPEATS) -> float:
    """Median over ``repeats`` patched forwards of the selector's time per forward. Separate
    forwards from the timed ones: on CUDA the timer synchronizes around the selector."""
    run = prefill_fn(model, batch)
    per_forward = []
    with timing_selector(model.visionselector, device) as times:
        for _ in range(repeats):
            times.clear()
            run()
            per_forward.append(sum(times))
    return statistics.median(per_forward)


def kept_tokens(model, batch) -> tuple[int, list[int] | None]:
    """L', the tokens the language model's last layer sees in a patched prefill of one sample,
    and with drops inside the language model the tokens of each layer (a ValueError if the
    model is not patched)."""
    from vsops.integrations import is_visionselector_applied, kept_mask

    if not is_visionselector_applied(model):
        raise ValueError("the model does not carry VisionSelector")
    out = prefill_fn(model, batch)()
    selection = out.get("visionselector") if hasattr(out, "get") else None
    kept = int(kept_mask(out, batch.get("attention_mask"), batch["input_ids"].shape)[0].sum())
    return kept, None if selection is None else selection.layer_tokens


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _peak_rss_increase(fn: Callable[[], object]) -> int | None:
    """Bytes the resident set grows by at its peak during ``fn()``; None off Linux/glibc."""
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    # The benchmarks run with glibc told to keep freed memory (see vsops.cli), which would
    # otherwise be reused and hide the forward's growth: give it back so RSS counts live memory.
    libc.malloc_trim(0)
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    fn()
    return 1024 * (_status_kib("VmHWM") - before)


def peak_memory_bytes(fn: Callable[[], object], device) -> int | None:
    """Bytes allocated by one call of ``fn`` at its peak, over what was allocated before."""
    device = torch.device(device)
    if device.type != "cuda":
        return _peak_rss_increase(fn)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@dataclasses.dataclass
class PrefillRow:
    budget: float | None  # None: the unpatched model
    tokens: int  # L
    kept: int  # L': the tokens the last layer sees
    ms: float
    selector_ms: float
    peak_mb: float | None
    method: str = ""
    layer_tokens: list[int] | None = None  # with drops inside the language model: per layer

    @property
    def name(self) -> str:
        if self.budget is None:
            return "unpatched"
        return f"{self.method}, budget {self.budget}" if self.method else f"budget {self.budget}"

    @property
    def ideal_speedup(self) -> float:
        """The speedup of a language model whose cost were linear in its tokens: ``L / L'``, or
        with drops inside it ``layers x L`` over the tokens its layers see."""
        if self.layer_tokens is None:
            return self.tokens / self.kept
        return len(self.layer_tokens) * self.tokens / sum(self.layer_tokens)

    @property
    def selector_share(self) -> float:
        return self.selector_ms / self.ms


def prompt_token_counts() -> tuple[int, int]:
    """(text tokens, visual tokens) of :data:`PROMPT`; the vision start/end tokens are neither."""
    text = sum(item for item in PROMPT if isinstance(item, int))
    visual = sum(h * w // 4 for _, h, w in (item for item in PROMPT if not isinstance(item, int)))
    return text, visual


def _megabytes(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def measure_unpatched(model, batch, device) -> PrefillRow:
    run = prefill_fn(model, batch)
    tokens = batch["input_ids"].shape[1]
    return PrefillRow(
        budget=None,
        tokens=tokens,
        kept=tokens,
        ms=1e3 * median_seconds(run, device),
        selector_ms=0.0,
        peak_mb=_megabytes(peak_memory_bytes(run, device)),
    )


def measure_budget(model, batch, device, budget: float, method: str = "") -> PrefillRow:
    """One row for a model patched with :func:`vsops.integrations.apply_visionselector`
    (``method``: the name the row shows, if any)."""
    model.visionselector.budget = budget
    run = prefill_fn(model, batch)
    kept, layer_tokens = kept_tokens(model, batch)
    return PrefillRow(
        budget=budget,
        tokens=batch["input_ids"].shape[1],
        kept=kept,
        ms=1e3 * median_seconds(run, device),
        selector_ms=1e3 * selector_seconds(model, batch, device),
        peak_mb=_megabytes(peak_memory_bytes(run, device)),
        method=method,
        layer_tokens=layer_tokens,
    )


def measure_all(model, batch, device, method: str = "visionselector", progress=None) -> list[PrefillRow]:
    """The unpatched row, then one per budget of :data:`BUDGETS` selecting with ``method``; the
    model is patched for the budget rows and reverted afterwards. A method inside the language
    model is measured at :data:`LAYER_BUDGETS` (those it can reach), each beside the
    :data:`COMPARED_METHOD` vision stage at the same budget. ``progress`` (a tqdm bar)
    advances by one per row."""
    from vsops.integrations import apply_visionselector, revert_visionselector
    from vsops.methods import make_method, method_class

    rows = [measure_unpatched(model, batch, device)]
    if progress is not None:
        progress.update(1)
    inside = method_class(method).stage == "language"
    budgets = LAYER_BUDGETS if inside else BUDGETS
    apply_visionselector(model, budget=budgets[0], method=method)
    try:
        for budget in budgets:
            if inside and not make_method(method).reaches(budget, MODEL_SIZES["layers"]):
                continue
            model.visionselector.method = method
            rows.append(measure_budget(model, batch, device, budget, method if inside else ""))
            if inside and budget < 1.0:
                model.visionselector.method = COMPARED_METHOD
                rows.append(measure_budget(model, batch, device, budget, COMPARED_METHOD))
            if progress is not None:
                progress.update(1)
    finally:
        revert_visionselector(model)
    return rows


def print_table(rows: list[PrefillRow], vision_ms: float, device, dtype, file: TextIO = sys.stdout,
                model: str = "qwen2_5_vl", method: str = "visionselector") -> None:
    sizes = MODEL_SIZES
    text, visual = prompt_token_counts()
    threads = f", {torch.get_num_threads()} threads" if torch.device(device).type == "cpu" else ""
    print(
        f"{MODELS[model]} prefill, batch 1, L = {rows[0].tokens} tokens ({text} text, {visual} visual), "
        f"random weights: language model {sizes['layers']} x {sizes['hidden_size']} (MLP "
        f"{sizes['intermediate_size']}), vision tower {sizes['vision_depth']} x {sizes['vision_hidden_size']}; "
        f"sdpa, {str(dtype).replace('torch.', '')}, device {device}{threads}; method {method}",
        file=file,
    )
    print(f"Vision tower alone (every budget): {vision_ms:.1f} ms", file=file)
    print(
        "| model | L -> L' | prefill ms | speedup | ideal L/L' | selector ms | selector % of prefill | peak MB |",
        file=file,
    )
    print("|" + "---|" * 8, file=file)
    unpatched_ms = rows[0].ms
    for r in rows:
        peak = "n/a" if r.peak_mb is None else f"{r.peak_mb:.0f}"
        print(
            f"| {r.name} | {r.tokens} -> {r.kept} | {r.ms:.1f} | {unpatched_ms / r.ms:.2f}x | "
            f"{r.ideal_speedup:.2f}x | {r.selector_ms:.2f} | {100 * r.selector_share:.2f}% | {peak} |",
            file=file,
        )


def summary(device="cpu", dtype=torch.float32, file: TextIO = sys.stdout, model: str = "qwen2_5_vl",
            method: str = "visionselector") -> list[PrefillRow]:
    """Builds the model (a key of :data:`MODELS`), measures every row with the selection
    ``method`` (a name of :func:`vsops.methods.available`) and prints the table; returns the
    rows (none without transformers)."""
    if not transformers_available():
        print("Prefill benchmark skipped: it needs transformers (pip install transformers).", file=file)
        return []
    device = torch.device(device)
    name = model
    model, batch = build_model(device, dtype, model=name), make_batch(device, dtype, model=name)
    vision_ms = 1e3 * median_seconds(vision_tower_fn(model, batch), device)
    rows = measure_all(model, batch, device, method)
    print_table(rows, vision_ms, device, dtype, file, model=name, method=method)
    return rows


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op prefill [--model NAME] [--method NAME]``; with ``--op all`` only where
    transformers is installed."""
    if by_name or transformers_available():
        summary(args.device, dtype, file=file, model=args.model, method=args.method)
