"""What the vLLM plugin tests share: the environment every engine runs in (loopback only, no
usage statistics, the engine in-process), the tiny checkpoint, the prompts, greedy runs through
vLLM and through vsops' transformers integration, and a script entry that runs the prompts on a
vLLM without vsops' plugin (``python vllm_engine.py DIR OUT.json``)."""
from __future__ import annotations

import json
import os
import sys

from vsops.vllm.environment import use_cpu_environment

# Before vLLM is imported: loopback only, the engine in this process.
ENVIRONMENT = use_cpu_environment()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

# vLLM's CPU attention takes head sizes of 32 and up.
SIZES = dict(hidden_size=128, heads=2, kv_heads=1, intermediate_size=256)
MAX_TOKENS = 6
ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=1024, limit_mm_per_prompt={"image": 2, "video": 0})


def images():
    """Three images of different sizes (float32 pixels in the processor's range)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")) for h, w in ((32, 48), (16, 32), (48, 48))]


def prompts():
    """(token ids with one image placeholder per image, images): one image, two images of other
    sizes, text alone."""
    one, two, three = images()
    return [([5, 6, 102, 100, 103, 7, 8], [one]), ([9, 102, 100, 103, 10, 102, 100, 103, 11], [two, three]),
            ([12, 13, 14], [])]


def vllm_requests(items=None):
    return [{"prompt_token_ids": ids, **({"multi_modal_data": {"image": list(media)}} if media else {})}
            for ids, media in (items or prompts())]


def vllm_greedy(llm, items=None) -> list[dict]:
    """Each prompt's prompt length, generated ids and their log-probabilities."""
    from vllm import SamplingParams

    outs = llm.generate(vllm_requests(items), SamplingParams(max_tokens=MAX_TOKENS, temperature=0, logprobs=0),
                        use_tqdm=False)
    return [{"prompt": len(o.prompt_token_ids), "ids": list(o.outputs[0].token_ids),
             "logprobs": [next(iter(step.values())).logprob for step in o.outputs[0].logprobs]} for o in outs]


def assert_same_generation(actual, expected) -> None:
    """The same greedy ids, and log-probabilities equal to float32 rounding (positions off by
    one change the log-probabilities of a tiny random model before its ids)."""
    import pytest

    assert [a["ids"] for a in actual] == [e["ids"] for e in expected]
    for a, e in zip(actual, expected):
        assert a["logprobs"] == pytest.approx(e["logprobs"], abs=1e-4)


def transformers_greedy(path, budget: float, method: str = "visionselector", items=None) -> list[dict]:
    """The same prompts through vsops' transformers integration (one budget per image, as the
    plugin serves it), each alone: generated ids and their log-probabilities."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from vsops.integrations import from_pretrained
    from vsops.integrations.testing.checkpoint import text_of

    processor = AutoProcessor.from_pretrained(path)
    if budget == 1.0:
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32)
    else:
        model = from_pretrained(path, budget=budget, scope="image", method=method, dtype=torch.float32)
    model.eval()
    out = []
    for ids, media in items or prompts():
        batch = processor(text=[text_of(ids)], images=list(media) or None, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**batch, max_new_tokens=MAX_TOKENS, do_sample=False,
                                       return_dict_in_generate=True, output_logits=True)
        ids = generated.sequences[0, batch["input_ids"].shape[1]:].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1)[i].item() for step, i in zip(generated.logits, ids)]
        out.append({"ids": ids, "logprobs": logprobs})
    return out


if __name__ == "__main__":
    # vLLM as it is: no plugin loads (VLLM_PLUGINS names none of them).
    os.environ["VLLM_PLUGINS"] = "none"
    from vllm import LLM

    results = vllm_greedy(LLM(model=sys.argv[1], **ENGINE))
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)
