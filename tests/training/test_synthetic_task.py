"""The synthetic tasks' boards: the distinct variant's targets are its rarest cells, the marked
variant's are no more distinctive than any distractor but share a mark; and the marked task's
backbone keeps its vision tower as initialized."""
import dataclasses

import pytest
import torch

from vsops.training.synthetic import CELL, MARK, MARKED_LIT, NAMED_TASKS, SyntheticTask

MARKED = NAMED_TASKS["synthetic-marked"].task(seed=0)


def glyphs_on_board(task, index):
    """The glyph index of every cell of a noiseless board, read back from its pixels."""
    clean = dataclasses.replace(task, noise=0.0)
    board = clean.image(index)[0]
    cells = board.view(3, task.grid, CELL, task.grid, CELL).permute(1, 3, 0, 2, 4).reshape(task.visual_tokens, 3, -1)
    lit = (cells.abs().sum(1) > 0).float()  # [cells, CELL*CELL]
    glyphs = clean._glyphs_and_palette[0].flatten(1)
    matches = (lit[:, None] == glyphs[None]).all(-1)  # [cells, glyphs]
    assert (matches.sum(1) == 1).all(), "every cell shows exactly one glyph"
    return matches.float().argmax(1)


def overlaps(task):
    glyphs = task._glyphs_and_palette[0].flatten(1)
    return glyphs @ glyphs.T


def test_marked_glyphs_light_equally_many_pixels_and_the_targets_share_the_mark():
    glyphs = MARKED._glyphs_and_palette[0].flatten(1)
    assert (glyphs.sum(1) == MARKED_LIT).all()
    mark = (glyphs[0] * glyphs[1]).nonzero().squeeze(1)
    assert len(mark) >= MARK
    shared = glyphs[:, mark].sum(1)
    assert (shared[2:] < len(mark)).all(), "no distractor has the whole mark"


def test_marked_targets_overlap_distractors_as_much_as_distractors_overlap_each_other():
    o = overlaps(MARKED)
    distractors = o[2:, 2:]
    between = (distractors.sum() - distractors.diag().sum()) / (len(distractors) * (len(distractors) - 1))
    for target in (0, 1):
        assert abs(o[target, 2:].mean() - between) < 0.1 * between
    distinct = overlaps(SyntheticTask())
    assert (distinct - distinct.diag().diag() == 0).all(), "the distinct variant's glyphs are disjoint"


@pytest.mark.parametrize("index", [0, 7, 10**9])
def test_a_marked_board_shows_both_targets_and_every_distractor_at_most_once(index):
    shown = glyphs_on_board(MARKED, index)
    assert set(shown.tolist()) >= {0, 1}
    assert len(set(shown.tolist())) == MARKED.visual_tokens
    distinct = glyphs_on_board(SyntheticTask(), index)
    assert len(set(distinct.tolist())) < SyntheticTask().visual_tokens  # distractors repeat there


def test_the_answer_is_the_asked_targets_colour_on_both_variants():
    for task in (SyntheticTask(), MARKED):
        board, asked, colour, cell = dataclasses.replace(task, noise=0.0).image(3)
        assert glyphs_on_board(task, 3)[cell] == asked
        palette = task._glyphs_and_palette[1]
        pixels = board.view(3, task.grid, CELL, task.grid, CELL)[:, cell // task.grid, :, cell % task.grid]
        lit = pixels.abs().sum(0) > 0
        assert torch.allclose(pixels[:, lit].T, palette[colour].expand(int(lit.sum()), 3))


@pytest.mark.parametrize("settings, field", [
    ({"variant": "plain"}, "variant"),
    ({"variant": "marked", "distractors": 6}, "distractors"),
])
def test_bad_settings_name_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        SyntheticTask(**settings)


def test_a_frozen_vision_tower_does_not_move_while_the_language_model_does():
    transformers = pytest.importorskip("transformers")
    from vsops.integrations.testing import tiny_qwen2_5_vl_config
    from vsops.training.backbone import fit_backbone

    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    fit_backbone(model, SyntheticTask(grid=4), steps=2, batch_size=2, progress=False, freeze_vision=True)
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert moved and not any(name.startswith("model.visual.") for name in moved)
    assert any(name.startswith("model.language_model.") for name in moved)
