"""The JSONL training-data format: a tiny in-memory Qwen2.5-VL processor, PNGs and JSONL files
written to tmp_path; nothing comes from the hub."""
import json
import types

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("PIL")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vsops.training.data import collate  # noqa: E402
from vsops.training.jsonl import COLOUR_NAMES, JsonlDataset, export_synthetic, write_jsonl  # noqa: E402
from vsops.training.synthetic import SyntheticTask  # noqa: E402

SPECIAL = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
SIZES = {"a.png": (16, 24), "b.png": (8, 16), "c.png": (20, 30)}  # (h, w) in pixels
GRIDS = {"a.png": [1, 4, 6], "b.png": [1, 2, 4], "c.png": [1, 4, 8]}  # c is resized to 16 x 32
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def _processor():
    """Byte-level BPE without merges (one token per byte) plus Qwen's special tokens, and a
    Qwen2VLImageProcessor with the tiny model's patch 4 / merge 2. Qwen2_5_VLProcessor itself
    needs a video processor, which needs torchvision, so a namespace stands in for it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<|endoftext|>")
    image_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    image_processor = image_class(
        patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=64, max_pixels=64 * 64,
        image_mean=[0.5] * 3, image_std=[0.5] * 3,
    )
    return types.SimpleNamespace(image_processor=image_processor, tokenizer=tokenizer)


PROCESSOR = _processor()
TOK = PROCESSOR.tokenizer
PAD = TOK.convert_tokens_to_ids("<|image_pad|>")


def _human(value):
    return {"from": "human", "value": value}


def _gpt(value):
    return {"from": "gpt", "value": value}


RECORDS = [
    {"id": "multi-turn", "image": "a.png",
     "conversations": [_human("<image>\nWhat is it?"), _gpt("A cat."), _human("Its colour?"), _gpt("Black.")]},
    {"id": "two-images", "image": ["a.png", "b.png"],
     "conversations": [_human("First <image> then <image>. Same?"), _gpt("No.")]},
    {"id": "text-only", "conversations": [_human("Say hi."), _gpt("hi")]},
    {"id": "no-tag", "image": "c.png", "conversations": [_human("Describe."), _gpt("Stripes.")]},
    {"id": "system", "conversations": [{"from": "system", "value": "Be brief."}, _human("Sky?"), _gpt("Blue.")]},
]


def _block(name):
    t, h, w = GRIDS[name]
    return "<|vision_start|>" + "<|image_pad|>" * (t * h * w // 4) + "<|vision_end|>"


# The ChatML text each record must become, written out by hand.
TEXTS = [
    SYSTEM + f"<|im_start|>user\n{_block('a.png')}\nWhat is it?<|im_end|>\n<|im_start|>assistant\nA cat.<|im_end|>\n"
    "<|im_start|>user\nIts colour?<|im_end|>\n<|im_start|>assistant\nBlack.<|im_end|>\n",
    SYSTEM + f"<|im_start|>user\nFirst {_block('a.png')} then {_block('b.png')}. Same?<|im_end|>\n"
    "<|im_start|>assistant\nNo.<|im_end|>\n",
    SYSTEM + "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n",
    SYSTEM + f"<|im_start|>user\n{_block('c.png')}\nDescribe.<|im_end|>\n<|im_start|>assistant\nStripes.<|im_end|>\n",
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\nSky?<|im_end|>\n<|im_start|>assistant\nBlue.<|im_end|>\n",
]
ANSWERS = [["A cat.", "Black."], ["No."], ["hi"], ["Stripes."], ["Blue."]]


def _write_images(directory):
    rng = np.random.default_rng(0)
    for name, (h, w) in SIZES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(directory / name)


@pytest.fixture
def dataset(tmp_path):
    _write_images(tmp_path)
    return JsonlDataset(write_jsonl(tmp_path / "data.jsonl", RECORDS), PROCESSOR)


def _spans(labels):
    """The runs of labelled positions, as (start, end) pairs."""
    on = (labels != -100).tolist() + [False]
    starts = [i for i in range(len(on) - 1) if on[i] and (i == 0 or not on[i - 1])]
    return [(s, next(j for j in range(s, len(on)) if not on[j])) for s in starts]


def test_ids_are_the_chatml_conversation(dataset):
    assert len(dataset) == len(RECORDS)
    for example, text in zip(dataset, TEXTS):
        assert example.input_ids.dtype == torch.long and example.labels.dtype == torch.long
        assert example.input_ids.tolist() == TOK(text, add_special_tokens=False).input_ids


def test_labels_cover_exactly_the_answers(dataset):
    for example, answers in zip(dataset, ANSWERS):
        spans = _spans(example.labels)
        decoded = [TOK.decode(example.labels[s:e]) for s, e in spans]
        assert decoded == [a + "<|im_end|>" for a in answers]
        for s, e in spans:
            assert torch.equal(example.labels[s:e], example.input_ids[s:e])


def test_prompt_length_is_the_first_answer_token(dataset):
    for example, answers in zip(dataset, ANSWERS):
        n = example.prompt_length
        assert (example.labels[:n] == -100).all() and example.labels[n] != -100
        assert TOK.decode(example.input_ids[:n]).endswith("<|im_start|>assistant\n")
        assert TOK.decode(example.input_ids[n:]).startswith(answers[0])


def test_images_match_their_placeholders(dataset):
    expected = [["a.png"], ["a.png", "b.png"], [], ["c.png"], []]
    for example, names in zip(dataset, expected):
        grid = example.image_grid_thw
        assert grid.dtype == torch.long and grid.shape == (len(names), 3)
        assert grid.tolist() == [GRIDS[n] for n in names]
        assert (example.input_ids == PAD).sum() == int(grid.prod(dim=1).sum()) // 4
        assert example.pixel_values.shape == (int(grid.prod(dim=1).sum()), 3 * 2 * 4 * 4)
        assert example.pixel_values.dtype == torch.float32


def test_image_pixels_are_the_files(dataset, tmp_path):
    image = Image.open(tmp_path / "b.png").convert("RGB")
    expected = PROCESSOR.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    two = dataset[1]
    assert torch.equal(two.pixel_values[24:], expected)  # after a.png's 1*4*6 patches


def test_image_root_and_missing_file(tmp_path):
    (tmp_path / "pics").mkdir()
    _write_images(tmp_path / "pics")
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS[:2])
    assert JsonlDataset(path, PROCESSOR, image_root=tmp_path / "pics")[1].image_grid_thw.shape == (2, 3)
    dataset = JsonlDataset(path, PROCESSOR)  # the images are not beside the file
    with pytest.raises(ValueError, match=r"data.jsonl:2: field 'image': no file .*a.png"):
        dataset[1]


def test_blank_lines_are_skipped_and_lines_counted(tmp_path):
    good = json.dumps(RECORDS[2])
    (tmp_path / "data.jsonl").write_text(f"{good}\n\n{good}\n")
    assert len(JsonlDataset(tmp_path / "data.jsonl", PROCESSOR)) == 2
    (tmp_path / "data.jsonl").write_text(f"{good}\n\n{{oops\n")
    with pytest.raises(ValueError, match=r"data.jsonl:3: malformed JSON"):
        JsonlDataset(tmp_path / "data.jsonl", PROCESSOR)


@pytest.mark.parametrize("record, message", [
    ({"id": 1}, r"field 'conversations' must be a non-empty list"),
    ({"conversations": []}, r"field 'conversations' must be a non-empty list"),
    ({"conversations": [{"from": "bot", "value": "x"}, _gpt("y")]}, r"field 'conversations\[0\].from' is 'bot'"),
    ({"conversations": [_human("x"), {"from": "gpt", "value": 3}]}, r"field 'conversations\[1\].value'"),
    ({"conversations": [_gpt("x"), _human("y")]}, r"field 'conversations\[0\].from' is 'gpt'; turns must alternate"),
    ({"conversations": [_human("x"), _human("y")]}, r"field 'conversations\[1\].from' is 'human'; turns must alternate"),
    ({"conversations": [{"from": "system", "value": "s"}, _gpt("x")]}, r"field 'conversations\[1\].from' is 'gpt'"),
    ({"conversations": [_human("x"), _gpt("y"), {"from": "system", "value": "s"}, _gpt("z")]},
     r"field 'conversations\[2\].from' is 'system'"),
    ({"conversations": [_human("x"), _gpt("y"), _human("z")]}, r"field 'conversations' must end with a gpt turn"),
    ({"conversations": [_human("<image> <image>"), _gpt("y")], "image": "a.png"},
     r"field 'image': 2 <image> tags .* but 1 images"),
    ({"conversations": [_human("<image>"), _gpt("y")]}, r"field 'image': 1 <image> tags .* but 0 images"),
    ({"conversations": [_human("x"), _gpt("y")], "image": 7}, r"field 'image' must be a path or a list"),
    ([1, 2], r"expected a JSON object"),
])
def test_malformed_records_name_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "data.jsonl", [RECORDS[2], record])
    with pytest.raises(ValueError, match=r"data.jsonl:2: " + message):
        JsonlDataset(path, PROCESSOR)


def test_max_length(dataset, tmp_path):
    full = dataset[0]
    path = dataset.path
    cut = full.prompt_length + 3
    short = JsonlDataset(path, PROCESSOR, max_length=cut)[0]
    assert torch.equal(short.input_ids, full.input_ids[:cut]) and torch.equal(short.labels, full.labels[:cut])
    assert short.prompt_length == full.prompt_length
    assert JsonlDataset(path, PROCESSOR, max_length=len(full.input_ids))[0].input_ids.shape == full.input_ids.shape
    start = full.input_ids.tolist().index(PAD)
    with pytest.raises(ValueError, match=r"data.jsonl:1: max_length .* would cut into or drop an image"):
        JsonlDataset(path, PROCESSOR, max_length=start + 2)[0]
    with pytest.raises(ValueError, match=r"data.jsonl:1: max_length .* leaves no answer token"):
        JsonlDataset(path, PROCESSOR, max_length=full.prompt_length)[0]
    late = write_jsonl(tmp_path / "late.jsonl", [
        {"image": "a.png", "conversations": [_human("Hi"), _gpt("Yo"), _human("<image>"), _gpt("Ok")]}])
    whole = JsonlDataset(late, PROCESSOR)[0]
    end = whole.input_ids.tolist().index(TOK.convert_tokens_to_ids("<|vision_end|>")) + 1
    kept = JsonlDataset(late, PROCESSOR, max_length=end)[0]  # a cut right after the image keeps it
    assert torch.equal(kept.input_ids, whole.input_ids[:end]) and kept.image_grid_thw.tolist() == [GRIDS["a.png"]]
    two = dataset[1]  # the second image lies wholly past a cut after the first one
    second = len(two.input_ids) - two.input_ids.flip(0).tolist().index(PAD) - 5
    with pytest.raises(ValueError, match=r"data.jsonl:2: max_length .* would cut into or drop an image"):
        JsonlDataset(path, PROCESSOR, max_length=second)[1]


def test_tokenizer_without_chat_tokens_is_refused():
    from tokenizers import Tokenizer, models

    words = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    bare = transformers.PreTrainedTokenizerFast(tokenizer_object=words)
    processor = types.SimpleNamespace(image_processor=PROCESSOR.image_processor, tokenizer=bare)
    with pytest.raises(ValueError, match=r"lacks the special tokens .*<\|im_start\|>"):
        JsonlDataset("unused.jsonl", processor)


def test_collated_batch_trains_a_tiny_qwen2_5_vl(dataset):
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vsops.integrations.testing import tiny_qwen2_5_vl_config

    config = tiny_qwen2_5_vl_config(vocab_size=len(TOK))
    ids = dict(zip(SPECIAL, TOK.convert_tokens_to_ids(SPECIAL)))
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    examples = list(dataset)
    batch = collate(examples, pad_token_id=TOK.pad_token_id, config=config)
    assert batch["image_grid_thw"].tolist() == [GRIDS["a.png"], GRIDS["a.png"], GRIDS["b.png"], GRIDS["c.png"]]
    assert (batch["labels"] != -100).sum() == sum(int((e.labels != -100).sum()) for e in examples)
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, len(TOK))
    assert torch.isfinite(out.loss) and out.loss > 0


def test_export_synthetic_round_trips(tmp_path):
    task = SyntheticTask(grid=4, seed=3)
    path = export_synthetic(task, tmp_path, count=3, first_index=5)
    records = [json.loads(line) for line in open(path)]
    assert [r["image"] for r in records] == [f"images/{i:06d}.png" for i in (5, 6, 7)]
    dataset = JsonlDataset(path, PROCESSOR)
    assert len(dataset) == 3
    for k, index in enumerate((5, 6, 7)):
        pixels, asked, colour, _ = task.image(index)
        stored = torch.from_numpy(np.array(Image.open(tmp_path / records[k]["image"]))).permute(2, 0, 1)
        restored = (stored.float() - 64) / 64  # the documented PNG_OFFSET and PNG_SCALE
        inside = (pixels >= -1) & (pixels <= 191 / 64)
        assert inside.float().mean() > 0.99
        assert (restored - pixels)[inside].abs().max() <= 0.5 / 64 + 1e-6
        assert records[k]["conversations"][0]["value"] == f"<image>\nWhat colour is target {'AB'[asked]}?"
        example = dataset[k]
        assert example.image_grid_thw.tolist() == [[1, 8, 8]]
        assert (example.input_ids == PAD).sum() == task.visual_tokens
        assert TOK.decode(example.labels[example.labels != -100]) == COLOUR_NAMES[colour] + "<|im_end|>"


def test_vsops_train_on_jsonl_data(tmp_path):
    # The real-data path of `vsops train`: a model directory with its tokenizer and image
    # processor, JSONL conversations with PNG images; a scorer and eval losses come out.
    import subprocess
    import sys

    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    from vsops.integrations.testing import tiny_qwen2_5_vl_config

    model_dir = tmp_path / "model"
    config = tiny_qwen2_5_vl_config(vocab_size=len(TOK))
    ids = dict(zip(SPECIAL, TOK.convert_tokens_to_ids(SPECIAL)))
    config.image_token_id, config.video_token_id = ids["<|image_pad|>"], ids["<|video_pad|>"]
    config.vision_start_token_id, config.vision_end_token_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(model_dir)
    PROCESSOR.tokenizer.save_pretrained(model_dir)
    PROCESSOR.image_processor.save_pretrained(model_dir)
    data = export_synthetic(SyntheticTask(grid=4), tmp_path / "data", count=8)
    out = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "-m", "vsops.cli", "train", "--data", data, "--eval-data", data, "--model", str(model_dir),
         "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--no-progress", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(load_file(str(out / "scorer.safetensors"))) == {
        f"visual.importance_scorer.{p}_proj.{w}" for p in "qk" for w in ("weight", "bias")
    }
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["step"] == 2
    losses = metrics["eval_loss"]["visionselector"]
    assert set(losses) == {"0.1", "0.2", "0.3", "1.0"} and all(0 < v < 20 for v in losses.values())
    # at budget 1.0 every token stays: the loss is the unpatched model's
    plain = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir).eval()
    examples = list(JsonlDataset(data, PROCESSOR))
    batch = collate(examples, pad_token_id=TOK.pad_token_id, config=config)
    with torch.no_grad():
        assert losses["1.0"] == pytest.approx(plain(**batch).loss.item(), rel=1e-5)
    assert losses["0.1"] != pytest.approx(losses["1.0"], rel=1e-5)
