"""The documentation's links and paths: in README.md and every docs/**/*.md, each relative
markdown link (images included) names an existing file, and its #anchor a heading of that page;
each repository path in backticks or in a code block exists; the README stays short."""
from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
README_MAX_LINES = 250

# Paths that the pages name but that are not the repository's: placeholders and the
# directories a user's own commands write to.
NOT_REPOSITORY = ("path/to/", "/path/to/", "output-dir/", "DIR/", "runs/", "plots/", "vsops-demo/")
# The top-level entries of the repository: a word in a code block that starts with one of
# them is a repository path.
TOP_LEVEL = {p.name for p in ROOT.iterdir() if p.name not in {".git"}}
# A file name's extension, for backticked paths outside the top-level entries.
EXTENSION = re.compile(r"\.(py|md|json|toml|cpp|h|cu|cuh|sh|png|jsonl|yaml|safetensors|txt)$")

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"`([^`]+)`")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.MULTILINE)
PATH_LIKE = re.compile(r"^[\w.\-*]+(/[\w.\-*]*)+$")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _relative(page: Path) -> str:
    return str(page.relative_to(ROOT))


def _prose_and_code(text: str) -> tuple[str, list[tuple[int, str]]]:
    """The page with its fenced code blocks blanked (newlines kept, so offsets give line
    numbers), and the lines of those blocks with their numbers."""
    prose, code, fenced = [], [], False
    for number, line in enumerate(text.split("\n"), 1):
        if FENCE.match(line):
            fenced = not fenced
            prose.append("")
        elif fenced:
            code.append((number, line))
            prose.append("")
        else:
            prose.append(line)
    return "\n".join(prose), code


def _line(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    prose, _ = _prose_and_code(page.read_text())
    anchors, seen = set(), {}
    for line in prose.split("\n"):
        found = HEADING.match(line)
        if found:
            slug = _slug(found.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def _exists(path: str) -> bool:
    path = path.rstrip("/")
    if any(c in path for c in "*?["):
        return bool(glob.glob(str(ROOT / path)))
    return (ROOT / path).exists()


def _repository_path(token: str, in_code_block: bool) -> str | None:
    """``token`` as a path to check, or None when it does not name a repository path."""
    token = token.strip("\"'(),;:")
    token = re.sub(r"(::\S*|:\d+(-\d+)?)$", "", token)  # pytest node ids, line numbers
    if "://" in token or token.startswith(NOT_REPOSITORY) or not PATH_LIKE.match(token):
        return None
    if token.split("/")[0] in TOP_LEVEL:
        return token
    if in_code_block:
        return None  # command arguments: only paths under the repository's own entries
    if EXTENSION.search(token) or token.endswith("/"):
        return token  # a file or directory that should be the repository's
    return None  # e.g. `flash_attention_2/3`, `cu_seq_lens_q/k`, model ids


def _link_failures(page: Path) -> list[str]:
    text = page.read_text()
    prose, _ = _prose_and_code(text)
    prose_without_code = CODE_SPAN.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), prose)
    targets = [(m.start(1), m.group(1)) for m in LINK.finditer(prose_without_code)]
    targets += [(m.start(1), m.group(1)) for m in REFERENCE.finditer(prose_without_code)]
    failures = []
    for offset, target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        where = f"{_relative(page)}:{_line(prose_without_code, offset)}"
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            failures.append(f"{where}: link to {target!r}: no such file")
        elif not file.is_relative_to(ROOT):
            failures.append(f"{where}: link to {target!r}: outside the repository")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            failures.append(f"{where}: link to {target!r}: no heading with that anchor in {file.name}")
    return failures


def _path_failures(page: Path) -> list[str]:
    text = page.read_text()
    prose, code = _prose_and_code(text)
    failures = []
    for span in CODE_SPAN.finditer(prose):
        words = span.group(1).split()
        # A span of one word is a path by the rules of prose; a command's words as in a code block.
        paths = [_repository_path(w, in_code_block=len(words) > 1) for w in words]
        for path in paths:
            if path is not None and not _exists(path):
                failures.append(f"{_relative(page)}:{_line(prose, span.start())}: `{span.group(1)}`: no such path")
    for number, line in code:
        for word in line.split():
            path = _repository_path(word, in_code_block=True)
            if path is not None and not _exists(path):
                failures.append(f"{_relative(page)}:{number}: {path}: no such path")
    return failures


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_relative_links_resolve(page):
    failures = _link_failures(page)
    assert not failures, "broken links:\n" + "\n".join(failures)


@pytest.mark.parametrize("page", PAGES, ids=_relative)
def test_repository_paths_exist(page):
    failures = _path_failures(page)
    assert not failures, "paths that do not exist:\n" + "\n".join(failures)


def test_readme_is_short():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines, at most {README_MAX_LINES}: move detail to docs/"
