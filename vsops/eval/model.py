"""The ``vsops`` model of lmms-eval: any model vsops integrates, with any selection method and
budget, answering lmms-eval's generation requests in padded batches.

    lmms-eval --model vsops --model_args pretrained=DIR,method=divprune,budget=0.2 --tasks ...

It loads ``pretrained`` through :func:`vsops.integrations.from_pretrained` with the directory's
processor and chat template (a synthetic-task model made by ``vsops train --task synthetic``,
such as the demo's, through :class:`~vsops.eval.synthetic.SyntheticModelInputs`). Budget 1.0 is
the unpatched model. Each answer carries a record of its prompt's visual tokens before and
after selection, the batch's prefill time and peak memory; tasks put it in their per-sample
logs (``vsops_synthetic`` does, under ``vsops``), and the run's means reach lmms-eval's results
under ``throughput``.
"""
from __future__ import annotations

import json
import time

import torch
from lmms_eval.api.model import lmms

from vsops.budget import check_budget

__all__ = ["VsopsModel", "split_response", "RECORD_KEYS"]

RECORD_KEYS = ("visual_tokens", "kept_visual_tokens", "prefill_ms", "peak_mb")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def split_response(results: list) -> tuple[str, dict | None]:
    """A task's view of one :class:`VsopsModel` answer (lmms-eval hands ``process_results`` the
    ``[answer, record]`` strings it returned): the answer text and the record, None for a
    model that gives no record."""
    if isinstance(results, str):
        return results, None
    answer = results[0]
    return answer, json.loads(results[1]) if len(results) > 1 else None


class VsopsModel(lmms):
    """lmms-eval's ``vsops`` model (a simple model: lmms-eval hands it the prompt's text and its
    task's images).

    Args:
        pretrained: a model directory of a family vsops integrates, or a synthetic-task model.
        method: a name of :func:`vsops.methods.available` (default: the learned scorer).
        budget: the fraction of visual tokens kept, in (0, 1]; 1.0 is the unpatched model.
        scope: ``"sample"`` or ``"image"``.
        batch_size: prompts per generation (padded on the left); lmms-eval's ``--batch_size``.
        device, dtype: where and in which float type the model runs (``float32``, ``bfloat16``,
            ``float16``).
        trust_remote_code: for models shipped as remote code (LLaVA-OneVision-1.5).
        max_new_tokens: the answer length when a task does not set it.
        min_pixels, max_pixels: the image processor's resolution range (Qwen's dynamic
            resolution; the directory's own when not given).

    Unknown arguments are a ValueError naming them.
    """

    is_simple = True

    def __init__(self, pretrained: str, method: str = "visionselector", budget: float = 0.2, scope: str = "sample",
                 batch_size=1, device: str | None = None, dtype: str = "float32", trust_remote_code: bool = False,
                 max_new_tokens: int = 64, min_pixels: int | None = None, max_pixels: int | None = None,
                 max_batch_size=None, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown vsops model_args {sorted(unknown)}; known: pretrained, method, budget, scope, "
                             "dtype, device, trust_remote_code, max_new_tokens, min_pixels, max_pixels (and "
                             "lmms-eval's --batch_size)")
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.budget = check_budget(budget, "budget")
        self.method, self.scope = str(method), str(scope)
        self.max_new_tokens = int(max_new_tokens)
        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pixels = {k: int(v) for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.model, self.inputs = _load(str(pretrained), self.method, self.budget, self.scope, self.device_name,
                                        _DTYPES[dtype], bool(trust_remote_code), pixels)

    def clean(self) -> None:
        """Keeps the model: lmms-eval's evaluator frees a model's modules after a run, and
        ``vsops eval`` runs its cells on one model."""

    def select(self, method: str, budget: float) -> None:
        """Selects with ``method`` at ``budget`` from the next request on (the weights stay)."""
        from vsops.methods import method_class

        method_class(method)
        self.method, self.budget = method, check_budget(budget, "budget")
        self.model.visionselector.method, self.model.visionselector.budget = method, self.budget

    # lmms-eval's request types -----------------------------------------------------------

    def generate_until(self, requests) -> list[list[str]]:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        out, records, began = [], [], time.perf_counter()
        for start in range(0, len(requests), self.batch_size_per_gpu):
            chunk = requests[start : start + self.batch_size_per_gpu]
            contexts, visuals, gen_kwargs = [], [], chunk[0].args[1]
            for request in chunk:
                context, _, doc_to_visual, doc_id, task, split = request.args
                contexts.append(context)
                visuals.append(doc_to_visual(self.task_dict[task][split][doc_id]))
            answers, batch_records = self._answer(contexts, visuals, gen_kwargs)
            out += [[answer, json.dumps(record)] for answer, record in zip(answers, batch_records)]
            records += batch_records
        elapsed = time.perf_counter() - began
        means = {key: sum(r[key] for r in records) / len(records) for key in RECORD_KEYS
                 if records and all(r[key] is not None for r in records)}
        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=len(records),
                    avg_speed=len(records) / elapsed if elapsed > 0 else 0.0, additional_metrics=means)
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("the vsops model answers generation tasks (output_type generate_until)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("the vsops model answers single-round generation tasks")

    # ------------------------------------------------------------------------------------

    def _answer(self, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> tuple[list[str], list[dict]]:
        from vsops.eval.synthetic import SyntheticModelInputs
        from vsops.integrations import kept_mask

        if isinstance(self.inputs, SyntheticModelInputs):
            boards = [images[0] for images in visuals]
            batch = _to(self.inputs.batch(contexts, boards), self.model)
            out, prefill_ms, peak_mb = _timed(lambda: self.model(**batch, use_cache=False), self.model)
            answers = self.inputs.answers(out.logits[:, -1].float())
        else:
            batch = _to(_processor_batch(self.inputs, contexts, visuals), self.model)
            answers, out, prefill_ms, peak_mb = _generate(self.model, self.inputs, batch, gen_kwargs,
                                                          self.max_new_tokens)
        visual = _visual_mask(self.model, batch["input_ids"])
        keep = kept_mask(out, batch.get("attention_mask"), batch["input_ids"].shape) & visual
        records = [{"visual_tokens": int(v), "kept_visual_tokens": int(k), "prefill_ms": prefill_ms,
                    "peak_mb": peak_mb} for v, k in zip(visual.sum(1).tolist(), keep.sum(1).tolist())]
        return answers, records


def _load(pretrained: str, method: str, budget: float, scope: str, device: str, dtype, trust_remote_code: bool,
          pixels: dict):
    """The patched model and what turns prompts into its inputs (a processor, or
    :class:`~vsops.eval.synthetic.SyntheticModelInputs`)."""
    from pathlib import Path

    from vsops.eval.synthetic import SyntheticModelInputs, is_synthetic_model, task_of
    from vsops.methods import method_class

    method_class(method)  # an unknown name is a ValueError naming the registered ones
    if not Path(pretrained).is_dir():
        raise ValueError(f"pretrained must be a model directory, got {pretrained!r}")
    if is_synthetic_model(pretrained):
        from vsops.demo.model import load

        model = load(Path(pretrained), device=device).to(dtype)
        inputs = SyntheticModelInputs(task_of(pretrained), model.config)
    else:
        from transformers import AutoProcessor

        from vsops.integrations import from_pretrained

        model = from_pretrained(pretrained, budget=budget, method=method, allow_missing_scorer=method != "visionselector",
                                trust_remote_code=trust_remote_code, torch_dtype=dtype).to(device).eval()
        inputs = AutoProcessor.from_pretrained(pretrained, trust_remote_code=trust_remote_code, **pixels)
        inputs.tokenizer.padding_side = "left"
    model.visionselector.budget, model.visionselector.scope = budget, scope
    model.visionselector.method = method
    return model, inputs


def _to(batch: dict, model) -> dict:
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    return {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def _visual_mask(model, input_ids: torch.Tensor) -> torch.Tensor:
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    mask = torch.zeros_like(input_ids, dtype=torch.bool)
    for token in ids:
        if token is not None:
            mask |= input_ids == token
    return mask


def _timed(forward, model):
    """``(output, ms, peak MB)`` of one forward (peak memory on CUDA only, else None)."""
    cuda = next(model.parameters()).is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = forward()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    return out, 1e3 * (time.perf_counter() - start), peak


def _processor_batch(processor, contexts: list[str], visuals: list[list]) -> dict:
    """Chat-templated prompts with their images and videos, padded on the left. A visual is an
    image (PIL, or a float ``[3, H, W]`` tensor in [0, 1] as vsops_synthetic's boards) or a
    video: its path, as lmms-eval's video tasks give it (the processor reads it), or its frames,
    uint8 ``[T, H, W, 3]``."""
    import numpy
    from PIL import Image

    texts, images, videos = [], [], []
    for context, items in zip(contexts, visuals):
        content = []
        for item in items:
            if isinstance(item, str) or getattr(item, "ndim", None) == 4:
                videos.append(item)
                content.append({"type": "video"})
                continue
            if torch.is_tensor(item):
                array = (item.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
                item = Image.fromarray(numpy.ascontiguousarray(array))
            images.append(item.convert("RGB"))
            content.append({"type": "image"})
        content.append({"type": "text", "text": context})
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                   tokenize=False))
    return dict(processor(text=texts, images=images or None, videos=videos or None, padding=True,
                          return_tensors="pt"))


def _generate(model, processor, batch: dict, gen_kwargs: dict, max_new_tokens: int):
    """Greedy answers cut at the task's stop strings (``until``), with the prefill's output,
    time and the generation's peak memory (the prefill read by hooks on the model's first
    forward)."""
    seen: dict = {}

    def pre_hook(module, args, kwargs):
        seen.setdefault("start", time.perf_counter())

    def post_hook(module, args, kwargs, output):
        if "out" not in seen:
            seen["out"], seen["ms"] = output, 1e3 * (time.perf_counter() - seen["start"])

    handles = [model.register_forward_pre_hook(pre_hook, with_kwargs=True),
               model.register_forward_hook(post_hook, with_kwargs=True)]
    new_tokens = int(gen_kwargs.get("max_new_tokens", max_new_tokens))
    try:
        sequences, _, peak = _timed(lambda: model.generate(**batch, do_sample=False, max_new_tokens=new_tokens), model)
    finally:
        for handle in handles:
            handle.remove()
    texts = processor.batch_decode(sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    until = gen_kwargs.get("until") or []
    for stop in [until] if isinstance(until, str) else until:
        texts = [text.split(stop)[0] for text in texts]
    return texts, seen["out"], seen["ms"], peak
