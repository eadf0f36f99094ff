"""Every relative link and anchor in README.md and docs/*.md resolves.

A link ``[text](target)`` or image ``![alt](target)`` outside code (fenced blocks and inline code spans are
ignored) with no URL scheme must name an existing file or folder, relative to the page; a ``#anchor`` (alone:
the page itself) must match a heading of the target Markdown page under GitHub's slug rules: the heading's text
(inline code and emphasis marks dropped, a link's text kept), lowercased, every character other than letters,
digits, spaces, ``-`` and ``_`` removed, spaces turned into ``-``; a repeated heading gets ``-1``, ``-2``, ...
"""

import re
import unicodedata
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO_ROOT / "README.md", *(REPO_ROOT / "docs").glob("*.md")])

FENCE = re.compile(r"^\s*(```|~~~)")
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def prose_lines(text: str):
    """``(line number, line)`` of the lines outside fenced code blocks."""
    fenced = None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if match:
            if fenced is None:
                fenced = match.group(1)
            elif match.group(1) == fenced:
                fenced = None
            continue
        if fenced is None:
            yield number, line


def slug(heading: str) -> str:
    """GitHub's anchor for a heading's Markdown text."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image: its text
    text = text.replace("`", "").replace("*", "")
    text = text.strip().lower()
    kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in "LN")
    return kept.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    for _, line in prose_lines(page.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        base = slug(match.group(2))
        count = seen.get(base, 0)
        seen[base] = count + 1
        result.add(base if count == 0 else f"{base}-{count}")
    return result


def links(page: Path):
    """``(line number, target)`` of every link and image of the page outside code."""
    for number, line in prose_lines(page.read_text(encoding="utf-8")):
        for match in LINK.finditer(CODE_SPAN.sub("", line)):
            yield number, match.group(1)


def problem(page: Path, target: str, root: Path) -> str | None:
    """Why ``target``, linked from ``page``, does not resolve (None when it does or is not a relative link)."""
    if not target or SCHEME.match(target) or target.startswith("//"):
        return None
    path_part, _, anchor = target.partition("#")
    path_part = unquote(path_part)
    if path_part.startswith("/"):
        return "absolute path (use a path relative to the page)"
    dest = (page.parent / path_part).resolve() if path_part else page
    if not dest.exists():
        return f"no such file or folder: {dest.relative_to(root) if dest.is_relative_to(root) else dest}"
    if anchor:
        if dest.suffix != ".md" or dest.is_dir():
            return f"#{anchor} on a file that is not a Markdown page"
        if unquote(anchor) not in anchors(dest):
            return f"no heading of {dest.relative_to(root)} has the anchor #{anchor}"
    return None


def broken_links(pages, root: Path = REPO_ROOT) -> dict[tuple[str, str], str]:
    """``{(page relative to root, target): why}`` for every link of ``pages`` that does not resolve."""
    found = {}
    for page in pages:
        for number, target in links(page):
            why = problem(page, target, root)
            if why:
                found[(page.relative_to(root).as_posix(), target)] = f"line {number}: {why}"
    return found


def test_every_relative_link_and_anchor_resolves():
    assert REPO_ROOT / "README.md" in PAGES and REPO_ROOT / "docs" / "results.md" in PAGES
    assert sum(1 for page in PAGES for _ in links(page)) > 50  # the pages' links are found at all
    broken = broken_links(PAGES)
    assert not broken, "broken links:\n" + "\n".join(f"{p} -> {t} ({why})" for (p, t), why in broken.items())


@pytest.mark.parametrize("heading,expected", [
    ("## Measured: throughput, one GPU", "measured-throughput-one-gpu"),
    ("### One GPU (measured)", "one-gpu-measured"),
    ("## `ppa-hf sweep`: the S-curve", "ppa-hf-sweep-the-s-curve"),
    ("## 1. Zero-shot patching", "1-zero-shot-patching"),
    ("## The rule (single source of truth: `ppa_hf/pattern.py`, `block_far_offsets`)",
     "the-rule-single-source-of-truth-ppa_hfpatternpy-block_far_offsets"),
    ("## See [the docs](docs/x.md) now", "see-the-docs-now"),
])
def test_slug_follows_githubs_rules(heading, expected):
    assert slug(HEADING.match(heading).group(2)) == expected


def test_the_checker_finds_broken_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "data.csv").write_text("a\n")
    (tmp_path / "docs" / "other.md").write_text("# Other page\n\n## A section: one\n\n## A section: one\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page\n\n## Local part\n\n"
        "[ok](other.md#a-section-one) [ok](other.md#a-section-one-1) [ok](#local-part) ![ok](data.csv)\n"
        "[ok](https://example.com/x.md#nowhere) [ok](./) `[code](missing.md)`\n"
        "```\n[fenced](missing.md)\n# Not a heading\n```\n"
        "[bad file](missing.csv) [bad anchor](other.md#a-section-two) [bad local](#not-a-heading)\n"
        "[anchor on data](data.csv#x) [outside](../../nowhere.md)\n"
    )
    broken = broken_links([page], root=tmp_path)
    assert sorted(target for _, target in broken) == [
        "#not-a-heading", "../../nowhere.md", "data.csv#x", "missing.csv", "other.md#a-section-two"]
