"""The tiny LLaVA-OneVision-1.5 of ``vsops.integrations.testing``: its checkpoint directory loads
through ``trust_remote_code`` like the hub one, runs forward and generate, and the RICE vision
tower's class-token defect is pinned; plus the shared prompt batches.

The model tests need lmms-engine 0.1.4 (the published remote code) and transformers 4.x; the
batch tests run everywhere.
"""
import importlib.util
import json
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from vsops.integrations.testing import (  # noqa: E402
    LLAVA_OV_1_5_LAYOUT,
    TOKENS,
    llava_ov_1_5_batch,
    llava_ov_1_5_model_dir,
    qwen2_5_vl_batch,
    tiny_llava_ov_1_5_config,
)
from vsops.integrations.testing import llava_ov_1_5 as llava_module  # noqa: E402

# Sample 0: text, an image of 8 x 8 patches (16 tokens), text. Sample 1: text, an image (8), a
# video of 4 frames (4 x 4 tokens), text. Sample 2: text only. Left padding.
PROMPTS = [
    [3, ("image", 8, 8), 4],
    [2, ("image", 4, 8), ("video", 4, 4, 4), 5],
    [9],
]
TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
MODEL_SKIP = llava_module.unavailable_reason()
needs_model = pytest.mark.skipif(MODEL_SKIP is not None, reason=MODEL_SKIP or "")
MERGE = LLAVA_OV_1_5_LAYOUT.spatial_merge_size**2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # A fixed folder name: transformers 4.x names the remote code's module after it.
    return llava_ov_1_5_model_dir(tmp_path_factory.mktemp("llava") / "tiny_llava_ov_1_5", seed=0)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True).eval()


def _module_name(checkpoint_key):
    """The module's parameter name of a hub checkpoint key (the remote code's conversion map)."""
    if checkpoint_key.startswith("visual."):
        return "model." + checkpoint_key
    if checkpoint_key.startswith("model."):
        return "model.language_model." + checkpoint_key[len("model."):]
    return checkpoint_key


@needs_model
def test_model_dir_loads_exactly_the_saved_weights(model_dir):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    assert "lmms_engine" not in sys.modules  # found, not imported
    assert json.loads((model_dir / "config.json").read_text()) == tiny_llava_ov_1_5_config()
    for name in llava_module.REMOTE_CODE_FILES:
        assert (model_dir / name).read_bytes() == (llava_module.remote_code_dir() / name).read_bytes()

    loaded, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True, output_loading_info=True)
    assert type(loaded).__name__ == "LLaVAOneVision1_5_ForConditionalGeneration"
    assert not any(info.values()), info
    state = loaded.state_dict()
    saved = {_module_name(k): v for k, v in load_file(model_dir / "model.safetensors").items()}
    assert saved.keys() == state.keys()
    assert all(torch.equal(saved[k], state[k]) for k in state)

    # The directory holds the model's own init under seed 0; the rotary buffers (not saved)
    # come back as built.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        built = AutoModelForCausalLM.from_config(
            AutoConfig.from_pretrained(model_dir, trust_remote_code=True), trust_remote_code=True
        )
    expected = dict(built.named_buffers(), **built.state_dict())
    got = dict(loaded.named_buffers(), **state)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in got)


@needs_model
def test_forward_and_greedy_generate(model):
    batch = llava_ov_1_5_batch(PROMPTS, seed=1)
    length = batch["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**batch).logits
        generated = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert logits.shape == (3, length, 128) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert generated.shape[0] == 3 and length < generated.shape[1] <= length + 4
    assert torch.equal(generated[:, :length], batch["input_ids"])
    assert torch.equal(generated[:, length], logits[:, -1].argmax(-1))

    # The pixels reach the samples that hold images, and only them.
    batch["pixel_values"] = batch["pixel_values"] + 1
    batch["pixel_values_videos"] = batch["pixel_values_videos"] + 1
    with torch.no_grad():
        moved = model(**batch).logits
    for row in (0, 1):
        assert not torch.allclose(moved[row], logits[row])
    torch.testing.assert_close(moved[2], logits[2])


@needs_model
def test_a_samples_logits_depend_on_the_images_before_it(model):
    """The defect end to end: sample 1's image is the batch's second, so its logits differ from
    sample 1 alone; samples 0 and 2 match theirs (left padding only shifts their 1-D RoPE
    positions, which attention does not see)."""
    batch = llava_ov_1_5_batch(PROMPTS, seed=1)
    with torch.no_grad():
        logits = model(**batch).logits
        for i, prompt in enumerate(PROMPTS):
            alone = model(**llava_ov_1_5_batch([prompt], seed=1 + i)).logits[0]
            row = logits[i, logits.shape[1] - alone.shape[0] :]
            assert torch.allclose(row, alone, rtol=1e-4, atol=1e-5) == (i != 1), i


def _run_tower(visual, pixels, grid):
    """The RICE tower's output and what it packed, the last block returned and the merger got."""
    seen = {}
    hooks = [
        visual.pre_layernorm.register_forward_pre_hook(lambda m, args: seen.__setitem__("packed", args[0].clone())),
        visual.blocks[-1].register_forward_hook(lambda m, args, out: seen.__setitem__("blocks", out.clone())),
        visual.merger.register_forward_pre_hook(lambda m, args: seen.__setitem__("merger", args[0].clone())),
    ]
    try:
        with torch.no_grad():
            seen["features"] = visual(pixels, grid_thw=grid)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _tower(visual, pixels, grid):
    with torch.no_grad():
        return visual(pixels, grid_thw=grid)


@needs_model
def test_rice_reads_the_second_image_one_row_early(model):
    """Upstream defect, unpatched: RICE packs ``[cls, image 1, cls, image 2, ...]`` (segment i
    at offset +i) but unpacks every segment at offset +1, so the merger gets image 2's class
    token and its first n-1 patches instead of its n patches."""
    visual = model.model.visual
    batch = llava_ov_1_5_batch([[("image", 8, 8), ("image", 4, 8)]], seed=2)
    pixels, grid = batch["pixel_values"], batch["image_grid_thw"]
    n1, n2 = 64, 32
    seen = _run_tower(visual, pixels, grid)

    with torch.no_grad():
        patches = visual.patch_embed(pixels)
    packed, cls = seen["packed"], visual.class_embedding
    assert packed.shape[0] == n1 + n2 + 2
    assert torch.equal(packed[0], cls) and torch.equal(packed[n1 + 1], cls)
    assert torch.equal(packed[1 : n1 + 1], patches[:n1]) and torch.equal(packed[n1 + 2 :], patches[n1:])

    out, read = seen["blocks"], seen["merger"]
    assert torch.equal(read[:n1], out[1 : n1 + 1])  # image 1: its patches
    assert torch.equal(read[n1:], out[n1 + 1 : n1 + n2 + 1])  # image 2: its cls + patches 0..n2-2
    assert not torch.equal(read[n1:], out[n1 + 2 :])  # not where its patches are

    features, k1 = seen["features"], n1 // MERGE
    alone = [_tower(visual, pixels[:n1], grid[:1]), _tower(visual, pixels[n1:], grid[1:])]
    torch.testing.assert_close(features[:k1], alone[0])
    assert not torch.allclose(features[k1:], alone[1], rtol=1e-2, atol=1e-3)
    # Read at the right rows, image 2 would come out as alone.
    with torch.no_grad():
        torch.testing.assert_close(visual.merger(out[n1 + 2 :]), alone[1])


@needs_model
def test_rice_reads_each_later_video_frame_early(model):
    """The same defect within one video: every frame is a segment (temporal patch 1), so frame
    k is read k - 1 rows before its class token; frame 0 alone comes out right."""
    visual = model.model.visual
    batch = llava_ov_1_5_batch([[("video", 4, 4, 4)]], seed=3)
    pixels, grid = batch["pixel_values_videos"], batch["video_grid_thw"]
    assert grid.tolist() == [[4, 4, 4]]
    n = 16
    seen = _run_tower(visual, pixels, grid)
    out, read, features = seen["blocks"], seen["merger"], seen["features"]
    for k in range(4):
        own = out[k * n + k + 1 : (k + 1) * n + k + 1]  # frame k's patches, after its class token
        assert torch.equal(read[k * n : (k + 1) * n], out[k * n + 1 : (k + 1) * n + 1])
        assert torch.equal(read[k * n : (k + 1) * n], own) == (k == 0)
        # A video frame is an image of its own to RICE (own segment, same positions).
        frame = _tower(visual, pixels[k * n : (k + 1) * n], torch.tensor([[1, 4, 4]]))
        tokens = features[k * n // MERGE : (k + 1) * n // MERGE]
        assert torch.allclose(tokens, frame, rtol=1e-5, atol=1e-6) == (k == 0)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_llava_batch_rows_are_the_single_prompts(padding_side):
    batch = llava_ov_1_5_batch(PROMPTS, seed=5, padding_side=padding_side)
    singles = [llava_ov_1_5_batch([p], seed=5 + i, padding_side=padding_side) for i, p in enumerate(PROMPTS)]
    assert set(batch) == {"input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                          "pixel_values_videos", "video_grid_thw"}
    for i, single in enumerate(singles):
        n = single["input_ids"].shape[1]
        cols = slice(batch["input_ids"].shape[1] - n, None) if padding_side == "left" else slice(0, n)
        assert torch.equal(batch["input_ids"][i, cols], single["input_ids"][0])
        assert torch.equal(batch["attention_mask"][i, cols], torch.ones(n, dtype=torch.long))
        assert batch["attention_mask"][i].sum() == n
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        assert torch.equal(batch[key], torch.cat([s[key] for s in singles if key in s]))

    # The processor's layout: 48-wide rows, one frame per temporal step, t*h*w/4 placeholders.
    assert batch["pixel_values"].shape == (64 + 32, 48) and batch["pixel_values_videos"].shape == (64, 48)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 4, 8]]
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    ids = batch["input_ids"]
    assert (ids[0] == TOKENS["image"]).sum() == 16 and (ids[1] == TOKENS["image"]).sum() == 8
    assert (ids[1] == TOKENS["video"]).sum() == 16
    row = singles[1]["input_ids"][0].tolist()
    video = row.index(TOKENS["video"])
    assert row[video - 1] == TOKENS["vision_start"] and row[video + 16] == TOKENS["vision_end"]


@pytest.mark.parametrize(
    "prompts, kwargs, error, match",
    [
        ([[("image", 3, 4)]], {}, ValueError, "spatial merge size"),
        ([[("audio", 4)]], {}, ValueError, "unknown prompt item"),
        ([[("video", 4, 4)]], {}, ValueError, r"\('video', t, h, w\)"),
        ([[-1]], {}, ValueError, "text item"),
        ([3], {}, TypeError, r"prompts\[0\]"),
        ([], {}, TypeError, "prompts"),
        ([[3]], {"padding_side": "middle"}, ValueError, "padding_side"),
    ],
)
def test_llava_batch_rejects_bad_input(prompts, kwargs, error, match):
    with pytest.raises(error, match=match):
        llava_ov_1_5_batch(prompts, **kwargs)


def test_qwen_batch_rejects_frames_off_the_temporal_patch():
    with pytest.raises(ValueError, match="temporal patch size 2"):
        qwen2_5_vl_batch([[("video", 3, 4, 4)]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"heads": 3}, "hidden_size // heads"),
        ({"kv_heads": 3}, "kv_heads"),
        ({"vision_hidden_size": 20}, "vision_hidden_size"),
        ({"vocab_size": 100}, "vocab_size"),
        ({"layers": 0}, "layers"),
    ],
)
def test_llava_config_rejects_bad_sizes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tiny_llava_ov_1_5_config(**kwargs)


def test_missing_lmms_engine_names_the_install(monkeypatch):
    find_spec = importlib.util.find_spec
    hidden = lambda name, *args: None if name == "lmms_engine" else find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(llava_module.importlib.util, "find_spec", hidden)
    with pytest.raises(ImportError, match=r"pip install --no-deps lmms-engine==0\.1\.4"):
        llava_module.remote_code_dir()


@pytest.mark.skipif(not TRANSFORMERS_5, reason="transformers 4.x writes the checkpoint")
def test_model_dir_refuses_transformers_5(tmp_path):
    with pytest.raises(ImportError, match="needs transformers 4.x"):
        llava_ov_1_5_model_dir(tmp_path / "tiny_llava_ov_1_5")


@pytest.mark.skipif(MODEL_SKIP is None, reason="this install can build the model")
def test_the_prefill_benchmark_refuses_it_where_it_cannot_run():
    import subprocess

    done = subprocess.run([sys.executable, "-m", "vsops.cli", "bench", "--op", "prefill", "--model", "llava_ov_1_5"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "--model llava_ov_1_5" in done.stderr and "Traceback" not in done.stderr
