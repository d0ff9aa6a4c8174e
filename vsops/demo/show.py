"""``vsops show``: the tokens a model keeps of a user's own image, over the image (the patch
grid of each kept token highlighted) beside the learned scorer's heat map."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy
import torch

__all__ = ["Shown", "select_on_image", "show_figure"]


@dataclasses.dataclass
class Shown:
    """``image``: float32 ``[3, H, W]`` in [0, 1] (as given); ``keep``: bool ``[rows, cols]``
    over the visual tokens (one per merged patch block); ``scores``: float32 ``[rows, cols]`` of
    the learned scorer, or None when the model has none."""

    image: torch.Tensor
    keep: torch.Tensor
    scores: torch.Tensor | None
    method: str
    budget: float
    model_keep: torch.Tensor  # bool [L]: the model's own report (output.visionselector.keep) of the prompt
    visual: torch.Tensor  # bool [L]: the prompt's visual tokens


def _read_image(path):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as e:
        raise ValueError(f"cannot read the image {path}: {e}") from None


@torch.no_grad()
def select_on_image(model_dir, image_path, *, budget: float = 0.2, method: str = "visionselector",
                    prompt: str = "Describe the image.", trust_remote_code: bool = False) -> Shown:
    """Loads the model of ``model_dir`` (any registered family, with its tokenizer and image
    processor) with VisionSelector, runs one prompt with the image, and returns what it kept."""
    from transformers import AutoImageProcessor, AutoTokenizer

    from vsops.demo.selection import merged_tokens
    from vsops.integrations import adapter_for, from_pretrained, kept_mask

    if not Path(model_dir, "config.json").is_file():
        raise ValueError(f"{model_dir} is not a model directory (no config.json)")
    picture = _read_image(image_path)
    remote = dict(trust_remote_code=trust_remote_code)
    model = from_pretrained(model_dir, budget=budget, method=method, allow_missing_scorer=method != "visionselector",
                            **remote)
    adapter = adapter_for(model.config.model_type)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, **remote)
    processor = AutoImageProcessor.from_pretrained(model_dir, **remote)
    pixels = processor(images=[picture], return_tensors="pt")
    grid = pixels["image_grid_thw"]
    _, inner = adapter.split(model)
    tokens = int(adapter.tokens_per_item(inner, grid)[0])
    config = model.config
    ids = ([config.vision_start_token_id] + [config.image_token_id] * tokens + [config.vision_end_token_id]
           + tokenizer(prompt, add_special_tokens=False)["input_ids"])
    batch = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
             "pixel_values": pixels["pixel_values"].to(model.dtype), "image_grid_thw": grid,
             **adapter.extra_inputs(torch.tensor([ids]), config)}
    out = model(**batch, use_cache=False)
    visual = batch["input_ids"][0] == config.image_token_id
    # The tokens follow the processor's merge blocks in row-major order.
    tower = adapter.vision_tower(inner)
    merge = int(round(adapter.merge_unit(tower) ** 0.5))
    shape = (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)
    model_keep = kept_mask(out, batch["attention_mask"])[0]
    keep = model_keep[visual].view(shape)
    scores = None
    if method == "visionselector":
        merged = merged_tokens(tower, batch["pixel_values"], grid)
        cu = torch.tensor([0, merged.shape[0]], dtype=torch.int32)
        scores = model.visionselector.scorer(merged.to(model.visionselector.scorer.q_proj.weight.dtype), cu)
        scores = scores.float().view(shape)
    image = torch.from_numpy(numpy.array(picture)).permute(2, 0, 1).float() / 255
    return Shown(image, keep, scores, method, budget, model_keep, visual)


def show_figure(shown: Shown):
    """The image with the kept tokens' patch blocks highlighted (the rest dimmed), and the
    learned scorer's heat map where there is one."""
    from vsops.demo.plots import overlay_mask, plt

    panels = 2 if shown.scores is not None else 1
    figure, axes = plt.subplots(1, panels, figsize=(5 * panels, 5), squeeze=False, layout="constrained")
    rows, cols = shown.keep.shape
    height, width = shown.image.shape[1:]
    mask = overlay_mask(shown.keep, height, width)
    axes[0][0].imshow((shown.image * (0.25 + 0.75 * mask)).permute(1, 2, 0).numpy())
    for r, c in shown.keep.nonzero().tolist():
        axes[0][0].add_patch(plt.Rectangle((c * width / cols, r * height / rows), width / cols, height / rows,
                                           fill=False, edgecolor="yellow", linewidth=0.8))
    axes[0][0].set_title(f"{shown.method}: {int(shown.keep.sum())} of {rows * cols} tokens kept "
                         f"(budget {shown.budget})", fontsize=10)
    if shown.scores is not None:
        heat = axes[0][1].imshow(shown.scores.numpy(), cmap="magma")
        figure.colorbar(heat, ax=axes[0][1], shrink=0.8)
        axes[0][1].set_title("learned importance scores", fontsize=10)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    return figure
