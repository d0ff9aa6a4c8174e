"""The ``vsops`` lmms-eval model on a Hugging Face model directory: a tiny Qwen2.5-VL checkpoint
with its tokenizer, image processor and chat template, loaded through ``AutoProcessor``, answers
padded batches of one- and two-image prompts. Budget 1.0 answers as the plain transformers
model does; the records count the prompt's image tokens and the kept ones; a batch answers as
each prompt alone.

Qwen's processors need torchvision (for their video processor). Where it is missing the module
is skipped; CI runs it with the registry's torchvision beside the CPU torch (.ci/run).
"""
import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("lmms_eval")
transformers = pytest.importorskip("transformers")

from vsops.budget import budget_to_k  # noqa: E402
from vsops.eval.model import VsopsModel  # noqa: E402
from vsops.integrations.testing.checkpoint import write_tiny_checkpoint  # noqa: E402

NEW_TOKENS = 4


def picture(height, width, seed):
    import numpy
    from PIL import Image

    pixels = torch.randint(0, 256, (height, width, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    return Image.fromarray(numpy.ascontiguousarray(pixels.numpy()))


# (question, images): one image, two images of other sizes, one image again with a longer text
PROMPTS = [
    ("w5 w6", [picture(16, 24, 0)]),
    ("w7", [picture(24, 32, 1), picture(32, 16, 2)]),
    ("w8 w9 w10 w11", [picture(32, 32, 3)]),
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qwen2_5_vl") / "model", "qwen2_5_vl")


def answer(model: VsopsModel, prompts):
    texts, records = model._answer([q for q, _ in prompts], [images for _, images in prompts],
                                   {"max_new_tokens": NEW_TOKENS})
    return texts, records


def test_budget_1_answers_as_the_plain_model(checkpoint):
    vsops_model = VsopsModel(str(checkpoint), budget=1.0, batch_size=len(PROMPTS))
    texts, records = answer(vsops_model, PROMPTS)

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    plain = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint).eval()
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(images) + [{"type": "text", "text": q}]}],
        add_generation_prompt=True, tokenize=False) for q, images in PROMPTS]
    batch = processor(text=prompts, images=[i for _, images in PROMPTS for i in images], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        ids = plain.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == expected
    image_tokens = (batch["input_ids"] == plain.config.image_token_id).sum(1).tolist()
    assert [r["visual_tokens"] for r in records] == image_tokens
    assert [r["kept_visual_tokens"] for r in records] == image_tokens
    assert all(r["prefill_ms"] > 0 for r in records)


@pytest.mark.parametrize("scope", ["sample", "image"])
def test_a_pruned_batch_keeps_the_budget_and_answers_as_each_prompt_alone(checkpoint, scope):
    model = VsopsModel(str(checkpoint), method="visionselector", budget=0.5, scope=scope, batch_size=len(PROMPTS))
    texts, records = answer(model, PROMPTS)
    for (question, images), text, record in zip(PROMPTS, texts, records):
        alone_texts, alone_records = answer(model, [(question, images)])
        assert alone_texts == [text] and alone_records[0]["kept_visual_tokens"] == record["kept_visual_tokens"]
        processor = model.inputs.image_processor
        per_image = [int(processor(images=[i], return_tensors="pt")["image_grid_thw"].prod()) // 4 for i in images]
        assert record["visual_tokens"] == sum(per_image)
        kept = [budget_to_k(n, 0.5) for n in per_image] if scope == "image" else [budget_to_k(sum(per_image), 0.5)]
        assert record["kept_visual_tokens"] == sum(kept)
