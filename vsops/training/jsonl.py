"""Real training data: the LLaVA / Cambrian JSONL annotation format VisionSelector trains on.

One JSON object per line (blank lines are skipped)::

    {"id": "0001", "image": "coco/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red cup."},
                       {"from": "human", "value": "What colour is the wall?"},
                       {"from": "gpt", "value": "White."}]}

* ``image``: one path, a list of paths, or absent (a text-only sample). Paths are relative to
  ``image_root`` (default: the JSONL file's directory) unless absolute.
* ``conversations``: an optional leading ``system`` turn (replacing the default system prompt),
  then ``human`` and ``gpt`` turns alternating, starting with ``human`` and ending with ``gpt``.
* Each ``<image>`` in a human turn becomes that image's vision block, in order. A sample with
  images and no ``<image>`` tag gets ``"<image>\\n"`` per image prepended to its first human turn
  (the LLaVA convention); any other mismatch of tags and images is an error.

A sample becomes Qwen2.5-VL's ChatML conversation::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>\\nQuestion<|im_end|>\\n
    <|im_start|>assistant\\nAnswer<|im_end|>\\n

with ``n = t*h*w / merge_size**2`` for the image's ``image_grid_thw`` row ``(t, h, w)``. The loss
applies to every answer's tokens and its ``<|im_end|>``; system, user and role-header tokens get
-100. Turns are tokenized piece by piece (text runs between special tokens), so the label spans
are exact and the ids equal those of tokenizing the whole conversation text at once.
"""
from __future__ import annotations

import array
import json
import os

import torch

from vsops.training.data import Example

__all__ = [
    "JsonlDataset", "write_jsonl", "export_synthetic",
    "SYSTEM_PROMPT", "IMAGE_TAG", "COLOUR_NAMES", "PNG_SCALE", "PNG_OFFSET",
]

SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_TAG = "<image>"
_SPECIAL = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


class JsonlDataset(torch.utils.data.Dataset):
    """Samples of a JSONL annotation file (see the module docstring) as :class:`Example` s.

    Every line is parsed and checked once here, so a malformed file fails before training;
    only the lines' byte offsets are kept and ``__getitem__`` re-reads, tokenizes and loads the
    images of one sample (missing image files are reported then).

    Args:
        path: the JSONL file.
        processor: a Qwen2.5-VL processor, or any object with its ``image_processor`` (a
            ``Qwen2VLImageProcessor``) and ``tokenizer`` (whose vocabulary has the ChatML and
            vision special tokens); ``processor.image_token`` is used when present.
        image_root: the directory image paths are relative to; the file's directory by default.
        max_length: the most tokens an example keeps; longer conversations lose their tail.

    Raises:
        ValueError: naming the line and field, for malformed JSON, a missing or malformed
            ``conversations``, an unknown ``from``, turns not alternating human/gpt, or
            ``<image>`` tags not matching the images.
    """

    def __init__(self, path, processor, *, image_root=None, max_length: int | None = None):
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.path = os.fspath(path)
        default_root = os.path.dirname(os.path.abspath(self.path))
        self.image_root = os.fspath(image_root) if image_root is not None else default_root
        self.max_length = max_length
        self.image_processor = processor.image_processor
        self.tokenizer = processor.tokenizer
        image_token = getattr(processor, "image_token", None) or "<|image_pad|>"
        tokens = [*_SPECIAL, image_token]
        ids = self.tokenizer.convert_tokens_to_ids(tokens)
        unknown = [t for t, i in zip(tokens, ids) if i is None or i == self.tokenizer.unk_token_id]
        if unknown:
            raise ValueError(f"the tokenizer lacks the special tokens {unknown}")
        self.im_start, self.im_end, self.vision_start, self.vision_end, self.image_token_id = ids
        # array, not a list of dicts: DataLoader workers fork without copying on refcount touches.
        self._offsets, self._lines = array.array("q"), array.array("q")
        with open(self.path, "rb") as f:
            offset = 0
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    _sample(raw, f"{self.path}:{number}")
                    self._offsets.append(offset)
                    self._lines.append(number)
                offset += len(raw)

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: int) -> Example:
        """Sample ``index``: ``input_ids``/``labels`` int64 ``[L]``, ``pixel_values`` float
        ``[patches, 3*temporal_patch_size*patch_size**2]``, ``image_grid_thw`` int64
        ``[images, 3]`` (``[0, ...]`` for text-only samples)."""
        with open(self.path, "rb") as f:
            f.seek(self._offsets[index])
            raw = f.readline()
        where = f"{self.path}:{self._lines[index]}"
        turns, paths = _sample(raw, where)
        pixel_values, grid = self._images(paths, where)
        merge = self.image_processor.merge_size**2
        blocks = iter([self.vision_start, *[self.image_token_id] * (int(g.prod()) // merge), self.vision_end]
                      for g in grid)
        newline = self._encode("\n")
        ids, labels, prompt_length = [], [], None
        for role, text in turns:
            if role == "gpt":
                prompt_length = len(ids) if prompt_length is None else prompt_length
                answer = self._encode(text) + [self.im_end]
                ids += answer + newline
                labels += answer + [-100] * len(newline)
                continue
            if role == "system":
                piece = [self.im_start] + self._encode("system\n" + text)
            else:
                chunks = ("user\n" + text).split(IMAGE_TAG)
                piece = [self.im_start] + self._encode(chunks[0])
                for chunk in chunks[1:]:
                    piece += next(blocks) + self._encode(chunk)
            piece += [self.im_end] + newline
            if role == "human":
                piece += [self.im_start] + self._encode("assistant\n")
            ids += piece
            labels += [-100] * len(piece)
        ids, labels = self._truncate(ids, labels, prompt_length, where)
        return Example(
            input_ids=torch.tensor(ids, dtype=torch.long),
            labels=torch.tensor(labels, dtype=torch.long),
            pixel_values=pixel_values,
            image_grid_thw=grid,
            prompt_length=prompt_length,
        )

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text else []

    def _images(self, paths: list[str], where: str) -> tuple[torch.Tensor, torch.Tensor]:
        if not paths:
            p = self.image_processor
            patch_dim = 3 * p.temporal_patch_size * p.patch_size**2
            return torch.zeros(0, patch_dim), torch.zeros(0, 3, dtype=torch.long)
        from PIL import Image

        images = []
        for path in paths:
            full = os.path.join(self.image_root, path)
            if not os.path.isfile(full):
                raise ValueError(f"{where}: field 'image': no file {full!r}")
            with Image.open(full) as image:
                images.append(image.convert("RGB"))
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"], out["image_grid_thw"].long()

    def _truncate(self, ids, labels, prompt_length, where):
        cut = self.max_length
        if cut is None or len(ids) <= cut:
            return ids, labels
        # A dropped image's pixels would still reach the model, which checks tokens == features.
        if self.vision_end in ids[cut:]:
            raise ValueError(f"{where}: max_length {cut} would cut into or drop an image "
                             f"(the conversation has {len(ids)} tokens)")
        if prompt_length >= cut:
            raise ValueError(f"{where}: max_length {cut} leaves no answer token "
                             f"(the first answer starts at token {prompt_length})")
        return ids[:cut], labels[:cut]


def _sample(raw: bytes, where: str) -> tuple[list[tuple[str, str]], list[str]]:
    """One line's ``(role, text)`` turns (a system turn first, ``<image>`` tags in place) and
    image paths; errors name ``where`` (file:line) and the field."""
    try:
        record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: malformed JSON: {e}") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: field 'conversations' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(conversations):
        role = turn.get("from") if isinstance(turn, dict) else None
        if role not in ("system", "human", "gpt"):
            raise ValueError(f"{where}: field 'conversations[{k}].from' is {role!r}; "
                             "expected 'system', 'human' or 'gpt'")
        if not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: field 'conversations[{k}].value' must be a string")
        turns.append((role, turn["value"]))
    skip = turns[0][0] == "system"
    system = turns.pop(0)[1] if skip else SYSTEM_PROMPT
    for k, (role, _) in enumerate(turns):
        if role != ("human", "gpt")[k % 2]:
            raise ValueError(f"{where}: field 'conversations[{k + skip}].from' is {role!r}; turns must "
                             "alternate human, gpt (human first, after an optional system turn)")
    if not turns or len(turns) % 2:
        raise ValueError(f"{where}: field 'conversations' must end with a gpt turn")
    paths = record.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{where}: field 'image' must be a path or a list of paths")
    tags = sum(text.count(IMAGE_TAG) for role, text in turns if role == "human")
    if tags == 0 and paths:
        turns[0] = ("human", (IMAGE_TAG + "\n") * len(paths) + turns[0][1])
    elif tags != len(paths):
        raise ValueError(f"{where}: field 'image': {tags} <image> tags in the human turns "
                         f"but {len(paths)} images")
    return [("system", system)] + turns, paths


def write_jsonl(path, records) -> str:
    """Writes ``records`` (JSON-serializable dicts) one per line, UTF-8; returns the path."""
    path = os.fspath(path)
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


COLOUR_NAMES = ("red", "green", "blue", "yellow", "magenta", "cyan", "white", "orange")
# A synthetic image's float pixel v is stored as uint8 round(PNG_SCALE * v + PNG_OFFSET), clamped
# to [0, 255]: v in [-1, 2.98] survives (colours reach ~1.55, noise is a few tenths).
PNG_SCALE, PNG_OFFSET = 64.0, 64.0


def export_synthetic(task, directory, count: int, first_index: int = 0) -> str:
    """Saves examples ``first_index .. first_index+count-1`` of a :class:`SyntheticTask` in the
    JSONL format: ``images/{index:06d}.png`` (RGB uint8, see ``PNG_SCALE``/``PNG_OFFSET``) and
    ``synthetic.jsonl`` with "What colour is target A?" questions answered by a colour word
    (``COLOUR_NAMES``). Returns the JSONL path."""
    from PIL import Image

    os.makedirs(os.path.join(directory, "images"), exist_ok=True)
    records = []
    for index in range(first_index, first_index + count):
        pixels, asked, colour, _ = task.image(index)
        rgb = (pixels * PNG_SCALE + PNG_OFFSET).round().clamp(0, 255).to(torch.uint8)
        name = f"images/{index:06d}.png"
        Image.fromarray(rgb.permute(1, 2, 0).numpy()).save(os.path.join(directory, name))
        records.append({
            "id": f"synthetic-{task.seed}-{index}",
            "image": name,
            "conversations": [
                {"from": "human", "value": f"{IMAGE_TAG}\nWhat colour is target {'AB'[asked]}?"},
                {"from": "gpt", "value": COLOUR_NAMES[colour]},
            ],
        })
    return write_jsonl(os.path.join(directory, "synthetic.jsonl"), records)
