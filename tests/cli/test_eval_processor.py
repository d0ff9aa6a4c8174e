"""The ``vsops`` lmms-eval model on a Hugging Face model directory: a tiny Qwen2.5-VL checkpoint
with its tokenizer, image and video processors and chat template, loaded through
``AutoProcessor``, answers padded batches of prompts with one image, two images, a video, and a
video beside an image. Budget 1.0 answers as the plain transformers model does; the records
count the prompt's visual tokens and the kept ones (per sample, or per image and video); a batch
answers as each prompt alone.

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


def frames(count, height, width, seed):
    """A video as lmms-eval's tasks could hand over its frames: uint8 [T, H, W, 3]."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, height, width, 3), generator=generator, dtype=torch.uint8).numpy()


def is_video(visual) -> bool:
    return getattr(visual, "ndim", None) == 4


# (question, visuals): one image, two images of other sizes, a video, a video and an image
PROMPTS = [
    ("w5 w6", [picture(16, 24, 0)]),
    ("w7", [picture(24, 32, 1), picture(32, 16, 2)]),
    ("w8 w9 w10 w11", [frames(4, 16, 24, 3)]),
    ("w12", [frames(2, 24, 16, 4), picture(32, 32, 5)]),
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
        [{"role": "user", "content": [{"type": "video" if is_video(v) else "image"} for v in visuals]
          + [{"type": "text", "text": q}]}], add_generation_prompt=True, tokenize=False) for q, visuals in PROMPTS]
    batch = processor(text=prompts, images=[v for _, vs in PROMPTS for v in vs if not is_video(v)],
                      videos=[v for _, vs in PROMPTS for v in vs if is_video(v)], padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = plain.generate(**batch, do_sample=False, max_new_tokens=NEW_TOKENS)
    expected = processor.batch_decode(ids[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    assert texts == expected
    ids = batch["input_ids"]
    visual_tokens = ((ids == plain.config.image_token_id) | (ids == plain.config.video_token_id)).sum(1).tolist()
    assert [r["visual_tokens"] for r in records] == visual_tokens
    assert [r["kept_visual_tokens"] for r in records] == visual_tokens
    assert all(r["prefill_ms"] > 0 for r in records)


@pytest.mark.parametrize("scope", ["sample", "image"])
def test_a_pruned_batch_keeps_the_budget_and_answers_as_each_prompt_alone(checkpoint, scope):
    model = VsopsModel(str(checkpoint), method="visionselector", budget=0.5, scope=scope, batch_size=len(PROMPTS))
    texts, records = answer(model, PROMPTS)
    for (question, visuals), text, record in zip(PROMPTS, texts, records):
        alone_texts, alone_records = answer(model, [(question, visuals)])
        assert alone_texts == [text] and alone_records[0]["kept_visual_tokens"] == record["kept_visual_tokens"]
        segments = [tokens_of(model.inputs, v) for v in visuals]  # an image or a whole video each
        assert record["visual_tokens"] == sum(segments)
        kept = [budget_to_k(n, 0.5) for n in segments] if scope == "image" else [budget_to_k(sum(segments), 0.5)]
        assert record["kept_visual_tokens"] == sum(kept)


def tokens_of(processor, visual) -> int:
    """The merged visual tokens of one image or video (4 patches each: merge 2 x 2)."""
    if is_video(visual):
        return int(processor.video_processor(videos=[visual], return_tensors="pt")["video_grid_thw"].prod()) // 4
    return int(processor.image_processor(images=[visual], return_tensors="pt")["image_grid_thw"].prod()) // 4
