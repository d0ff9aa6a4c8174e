"""A synthetic visual question task on which token selection decides the answer.

Every image is a ``grid x grid`` board of cells, one merged visual token each (8 x 8 pixels
for the tiny Qwen2.5-VL: patch 4, merge 2). Every cell holds a glyph in a colour: two cells
hold the two *target* glyphs, all others one of several *distractor* glyphs. The question
names a target; the answer is its colour. So the answer lives in one cell among
``grid**2`` equally busy ones: a model that keeps the wrong 20% of the visual tokens guesses.

All glyphs light the same number of pixels and all colours have the same norm, so a token's
norm says nothing about whether it is a target, and the two targets are fixed for the task, so
a question-agnostic scorer (LIS) can learn to keep them.

Two variants:

- ``distinct``: the glyphs light disjoint pixels and the few distractor glyphs repeat over the
  board, so each target is the one cell of its kind: the cells a question needs are also the
  most distinctive ones, and picking diverse tokens finds them.
- ``marked``: every cell holds a different glyph of the same number of randomly chosen pixels,
  so the targets are no more distinctive than any distractor; what sets them apart is a mark of
  a few pixels both share and no distractor has whole. Keeping the targets means knowing what
  matters, which a trained scorer can learn and diversity cannot see.

Example ``i`` is a pure function of ``(task seed, i)``: every process, resumed run and
evaluation sees the same data without storing it.
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from vsops.integrations.testing import TOKENS
from vsops.training.data import Example

__all__ = ["SyntheticTask", "NamedTask", "NAMED_TASKS", "VARIANTS", "patchify"]

PATCH, MERGE, TEMPORAL = 4, 2, 2
CELL = PATCH * MERGE  # pixels per side of one merged visual token

# Token ids of the task's words; the tiny config's vocabulary is 128 and ids >= 100 are special.
QUESTION_TOKENS = (10, 11)  # "colour of target A?" / "... target B?"
COLOUR_TOKENS = tuple(range(20, 28))
VARIANTS = ("distinct", "marked")
MARK, MARKED_LIT = 4, 16  # the marked variant: pixels of the targets' shared mark, lit per glyph
_PALETTE = [(1, 0, 0), (0, 1, 0), (0, 0, 1), (1, 1, 0), (1, 0, 1), (0, 1, 1), (1, 1, 1), (2, 1, 0)]


@dataclasses.dataclass(frozen=True)
class SyntheticTask:
    """The task's shape. ``grid**2`` visual tokens per image, ``colours`` possible answers.

    Attributes:
        grid: cells per side (visual tokens per image: ``grid**2``).
        colours: number of colours, the answer classes (at most 8).
        distractors: number of distractor glyphs (``marked``: at least ``grid**2 - 2``, as
            a board draws each at most once).
        noise: standard deviation of the pixel noise.
        questions: 2: the question names target A or B; 1: always A.
        seed: the task's seed; it fixes the glyphs and palette, and with an index, an example.
        variant: ``"distinct"`` or ``"marked"`` (:data:`VARIANTS`, the module's docstring).
    """

    grid: int = 6
    colours: int = 8
    distractors: int = 6
    noise: float = 0.3
    questions: int = 2
    seed: int = 0
    variant: str = "distinct"

    def __post_init__(self):
        if not 2 <= self.grid:
            raise ValueError(f"grid must be >= 2, got {self.grid}")
        if not 2 <= self.colours <= len(COLOUR_TOKENS):
            raise ValueError(f"colours must be in [2, {len(COLOUR_TOKENS)}], got {self.colours}")
        if self.distractors < 1:
            raise ValueError(f"distractors must be >= 1, got {self.distractors}")
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.variant == "marked" and self.distractors < self.visual_tokens - 2:
            raise ValueError(f"the marked variant draws every distractor at most once per board: distractors must be "
                             f">= grid**2 - 2 = {self.visual_tokens - 2}, got {self.distractors}")

    @property
    def visual_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def answer_tokens(self) -> tuple[int, ...]:
        """The token ids an answer can be, in colour order."""
        return COLOUR_TOKENS[: self.colours]

    @functools.cached_property
    def _glyphs_and_palette(self):
        # Colours are distinct non-negative directions of equal norm, as colours are.
        g = torch.Generator().manual_seed(self.seed)
        glyphs = (_marked_glyphs if self.variant == "marked" else _disjoint_glyphs)(2 + self.distractors, g)
        palette = torch.tensor(_PALETTE[: self.colours], dtype=torch.float32)
        palette = palette / palette.norm(dim=1, keepdim=True) * 3**0.5
        return glyphs.view(-1, CELL, CELL), palette

    def image(self, index: int) -> tuple[torch.Tensor, int, int, int]:
        """Image ``index``: float32 ``[3, grid*8, grid*8]``, the asked target (0 or 1), the
        answer's colour and the flat cell of the asked target."""
        glyphs, palette = self._glyphs_and_palette
        g = torch.Generator().manual_seed((self.seed + 1) * 1_000_003 + index)
        cells = self.visual_tokens
        if self.variant == "marked":
            shapes = 2 + torch.randperm(self.distractors, generator=g)[:cells]
        else:
            shapes = 2 + torch.randint(self.distractors, (cells,), generator=g)
        colours = torch.randint(self.colours, (cells,), generator=g)
        where = torch.randperm(cells, generator=g)[:2]
        shapes[where] = torch.tensor([0, 1])
        asked = int(torch.randint(2, (1,), generator=g)) if self.questions == 2 else 0
        # [cells, 3, CELL, CELL] -> the board [3, grid*CELL, grid*CELL]
        board = palette[colours][:, :, None, None] * glyphs[shapes][:, None]
        board = board.view(self.grid, self.grid, 3, CELL, CELL).permute(2, 0, 3, 1, 4)
        board = board.reshape(3, self.grid * CELL, self.grid * CELL)
        board = board + self.noise * torch.randn(board.shape, generator=g)
        return board, asked, int(colours[where[asked]]), int(where[asked])

    def target_position(self, index: int) -> int:
        """Where example ``index``'s asked target sits in its prompt (after ``<bos>
        <vision_start>``)."""
        return 2 + self.image(index)[3]

    def __getitem__(self, index: int) -> Example:
        return self.example(index)

    def example(self, index: int) -> Example:
        """Example ``index`` as the model takes it: ``<bos> <vision_start> <image>*grid**2
        <vision_end> <question> <answer> <eos>``, with the loss on the answer only."""
        pixels, asked, colour, _ = self.image(index)
        prompt = (
            [TOKENS["bos"], TOKENS["vision_start"]]
            + [TOKENS["image"]] * self.visual_tokens
            + [TOKENS["vision_end"], QUESTION_TOKENS[asked]]
        )
        answer = [COLOUR_TOKENS[colour]]
        return Example(
            input_ids=torch.tensor(prompt + answer),
            labels=torch.tensor([-100] * len(prompt) + answer),
            pixel_values=patchify(pixels),
            image_grid_thw=torch.tensor([[1, self.grid * MERGE, self.grid * MERGE]]),
            prompt_length=len(prompt),
        )


def _disjoint_glyphs(count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` glyphs lighting disjoint, equally many pixels (orthogonal, equal norm)."""
    lit = CELL * CELL // count
    order = torch.randperm(CELL * CELL, generator=g)
    glyphs = torch.zeros(count, CELL * CELL)
    for i in range(count):
        glyphs[i, order[i * lit : (i + 1) * lit]] = 1.0
    return glyphs


def _marked_glyphs(count: int, g: torch.Generator) -> torch.Tensor:
    """``count`` glyphs of ``MARKED_LIT`` random pixels each; the first two (the targets) share
    ``MARK`` pixels, which no other glyph lights all of. Every pixel is lit about equally often,
    so two glyphs overlap by about as much whichever they are: the mark is learnable, but it
    does not set the targets apart from the distractors."""
    pixels = CELL * CELL
    mark = torch.randperm(pixels, generator=g)[:MARK]
    rest = torch.ones(pixels, dtype=torch.bool)
    rest[mark] = False
    rest = rest.nonzero().squeeze(1)
    glyphs = torch.zeros(count, pixels)
    for i in range(2):
        glyphs[i, mark] = 1.0
        glyphs[i, rest[torch.randperm(len(rest), generator=g)[: MARKED_LIT - MARK]]] = 1.0
    for i in range(2, count):
        while True:
            lit = torch.randperm(pixels, generator=g)[:MARKED_LIT]
            if not torch.isin(mark, lit).all():
                break
        glyphs[i, lit] = 1.0
    return glyphs


def patchify(image: torch.Tensor) -> torch.Tensor:
    """A ``[3, H, W]`` image as Qwen2.5-VL's vision tower takes it: ``[H/4 * W/4, 3*2*4*4]``
    rows of 4 x 4 patches repeated over the 2 temporal frames, grouped by 2 x 2 merge window in
    row-major window order, the layout of transformers' ``Qwen2VLImageProcessor``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be [3, H, W], got {tuple(image.shape)}")
    _, height, width = image.shape
    if height % CELL or width % CELL:
        raise ValueError(f"image height and width must be multiples of {CELL}, got {height} x {width}")
    h, w = height // PATCH, width // PATCH
    frames = image.unsqueeze(0).expand(TEMPORAL, -1, -1, -1)  # [T, C, H, W]
    x = frames.reshape(TEMPORAL, 3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    # -> [h/m, w/m, m, m, C, T, p, p]
    x = x.permute(2, 5, 3, 6, 1, 0, 4, 7)
    return x.reshape(h * w, 3 * TEMPORAL * PATCH * PATCH).contiguous()


@dataclasses.dataclass(frozen=True)
class NamedTask:
    """A task ``vsops train --task NAME`` runs: the :class:`SyntheticTask` settings that differ
    from the defaults, and whether the backbone keeps its vision tower as initialized.

    A tower fitted to the marked variant learns to make the targets stand out in its output,
    and then picking diverse tokens finds them; a tower left as initialized is a generic
    feature map, as a pretrained tower is to a question it was not trained on.
    """

    settings: dict
    freeze_vision: bool = False

    def task(self, seed: int) -> SyntheticTask:
        return SyntheticTask(seed=seed, **self.settings)


NAMED_TASKS = {
    "synthetic": NamedTask({}),
    "synthetic-marked": NamedTask({"variant": "marked", "distractors": 64}, freeze_vision=True),
}
