"""The documentation: README.md and docs/**/*.md link only to files inside the repository, and the
README stays the short entrance that opens with the two commands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_MAX_BYTES = 12_288
FIRST_COMMANDS = ("make demo", "make test")

FENCE = re.compile(r"^ {0,3}(```|~~~)")
INLINE_CODE = re.compile(r"(`+).*?\1")
# [text](target) and ![alt](target); the target may be <...> and may carry a "title".
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*(<[^>]*>|[^)\s]*)(?:\s+[\"'(][^)]*)?\s*\)")
# [label]: target
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>]*>|\S+)")
EXTERNAL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # http:, https:, mailto:, ...


def markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def outside_fences(text: str) -> list[tuple[int, str]]:
    """(line number, line) of every line outside fenced code blocks."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = FENCE.match(line)
        if match:
            if fence is None:
                fence = match.group(1)
            elif match.group(1) == fence:
                fence = None
        elif fence is None:
            lines.append((number, line))
    return lines


def prose_lines(text: str) -> list[tuple[int, str]]:
    """Lines outside fenced code blocks, with inline code spans removed (a link there is only text)."""
    return [(number, INLINE_CODE.sub("", line)) for number, line in outside_fences(text)]


def relative_links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every link that is not external (http, https, mailto, ...)."""
    links = []
    for number, line in prose_lines(path.read_text(encoding="utf-8")):
        targets = [match.group(1) for match in INLINE_LINK.finditer(line)]
        reference = REFERENCE_LINK.match(line)
        if reference:
            targets.append(reference.group(1))
        for target in targets:
            target = target.strip("<>")
            if target and not EXTERNAL.match(target):
                links.append((number, target))
    return links


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda match: match.group(0).strip("`"), heading.strip()).lower()
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """The anchors of a page's headings; a repeated heading gets -1, -2, ... as on GitHub."""
    found, seen = set(), {}
    for _, line in outside_fences(path.read_text(encoding="utf-8")):
        heading = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            base = slug(heading.group(1))
            found.add(f"{base}-{seen[base]}" if base in seen else base)
            seen[base] = seen.get(base, 0) + 1
    return found


def link_problem(source: Path, target: str) -> str | None:
    """Why `target`, linked from `source`, is broken; None when it resolves inside the repository."""
    if target.startswith("/"):
        return "absolute path: link relative to the file instead"
    path_part, _, anchor = target.partition("#")
    resolved = (source.parent / path_part).resolve() if path_part else source.resolve()
    if not resolved.is_relative_to(ROOT):
        return f"leaves the repository ({resolved})"
    if not resolved.exists():
        return f"no such file or folder ({resolved.relative_to(ROOT)})"
    if anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
        return f"no heading #{anchor} in {resolved.relative_to(ROOT)}"
    return None


@pytest.mark.parametrize("path", markdown_files(), ids=lambda path: str(path.relative_to(ROOT)))
def test_relative_links_resolve_inside_the_repository(path):
    broken = [
        f"{path.relative_to(ROOT)}:{number}: ({target}) {problem}"
        for number, target in relative_links(path)
        if (problem := link_problem(path, target))
    ]
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_docs_pages_exist():
    pages = {path.name for path in (ROOT / "docs").glob("*.md")}
    assert {"architecture.md", "development.md"} <= pages, pages


def test_readme_is_short():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes; the limit is {README_MAX_BYTES}: move detail to docs/"


def test_readme_opens_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    block = re.search(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    assert block, "README.md has no code block"
    commands = [line.strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) >= 2, commands
    for line, command in zip(commands, FIRST_COMMANDS):
        assert line == command or line.startswith(command + " "), (
            f"expected {command!r} in README's first code block, got {line!r}"
        )


def test_link_checker_catches_what_it_must(tmp_path):
    """The checker itself: a missing file, a link out of the repository, a bad anchor; code blocks ignored."""
    page = ROOT / "docs" / "architecture.md"
    assert link_problem(page, "no-such-page.md")
    assert link_problem(page, "../../outside.md")
    assert link_problem(README, "../shared/DESIGN.md")
    assert link_problem(page, "/README.md")
    assert link_problem(page, "training.md#no-such-heading")
    assert link_problem(page, "training.md#fine-tuning") is None
    assert link_problem(README, "docs/architecture.md") is None
    sample = tmp_path / "sample.md"
    sample.write_text(
        '[a](x.md) `[b](y.md)` [c](https://example.com) [d](mailto:a@b.c) ![e](<img.png> "title")\n'
        "```\n[f](inside-a-fence.md)\n```\n[g]: ref.md\n",
        encoding="utf-8",
    )
    assert [target for _, target in relative_links(sample)] == ["x.md", "img.png", "ref.md"]
