"""``vsops show`` end to end on a tiny Qwen2.5-VL directory made offline (tokenizer and image
processor saved from objects built here): the highlighted cells are the tokens the model keeps;
bad input exits 2 naming the option."""
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
PIL = pytest.importorskip("PIL.Image")
tokenizers = pytest.importorskip("tokenizers")

from vsops.demo.plots import overlay_mask  # noqa: E402
from vsops.demo.show import select_on_image  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    from vsops.integrations import apply_visionselector
    from vsops.integrations.testing import tiny_qwen2_5_vl_config

    directory = tmp_path_factory.mktemp("tiny_qwen")
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    apply_visionselector(model)
    for p in model.visionselector.scorer.parameters():
        p.data.normal_()  # a clear ranking
    model.save_pretrained(directory)
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 3, "describe": 4, "the": 5, "image": 6},
                                                            unk_token="[UNK]"))
    words.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(directory)
    Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16,
                          max_pixels=64 * 64).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_path(tmp_path_factory):
    import numpy

    path = tmp_path_factory.mktemp("image") / "picture.png"
    pixels = (numpy.random.default_rng(0).random((40, 56, 3)) * 255).astype("uint8")
    PIL.fromarray(pixels).save(path)
    return path


@pytest.mark.parametrize("method", ["visionselector", "divprune", "visionzip"])
def test_the_highlighted_cells_are_the_tokens_the_model_keeps(model_dir, image_path, method):
    shown = select_on_image(model_dir, image_path, budget=0.25, method=method)
    reported = shown.model_keep[shown.visual]
    assert torch.equal(shown.keep.reshape(-1), reported)
    assert int(reported.sum()) == max(1, int(0.25 * reported.numel() + 1e-6))
    rows, cols = shown.keep.shape
    height, width = shown.image.shape[1:]
    mask = overlay_mask(shown.keep, height, width)
    # the centre of each token's block is highlighted exactly when the model kept the token
    centres = mask[((torch.arange(rows) + 0.5) * height / rows).long()][:, ((torch.arange(cols) + 0.5) * width / cols).long()]
    assert torch.equal(centres.bool(), shown.keep)
    assert (shown.scores is not None) == (method == "visionselector")


def test_the_command_writes_the_picture(model_dir, image_path, tmp_path):
    out = tmp_path / "shown.png"
    done = subprocess.run([sys.executable, "-m", "vsops.cli", "show", "--model", str(model_dir), "--image",
                           str(image_path), "--budget", "0.3", "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "visual tokens kept" in done.stdout
    picture = PIL.open(out)
    assert picture.format == "PNG" and picture.size == (1000, 500)


@pytest.mark.parametrize(
    "change, option",
    [
        ({"--model": "/nonexistent/model"}, "--model"),
        ({"--image": "NOT_AN_IMAGE"}, "--image"),
        ({"--image": "/nonexistent.png"}, "--image"),
        ({"--budget": "1.5"}, "--budget"),
        ({"--method": "nothing"}, "--method"),
    ],
)
def test_bad_input_exits_2_naming_the_option(model_dir, image_path, tmp_path, change, option):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    argv = {"--model": str(model_dir), "--image": str(image_path), "--budget": "0.2", "--method": "visionselector"}
    argv.update({k: (str(bad) if v == "NOT_AN_IMAGE" else v) for k, v in change.items()})
    done = subprocess.run([sys.executable, "-m", "vsops.cli", "show", *[x for kv in argv.items() for x in kv],
                           "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert option in done.stderr
