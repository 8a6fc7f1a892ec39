"""The documentation lives in the repository and its pointers resolve.

- No file names a path outside the repository (a developer's machine, a sibling folder): such a pointer
  works for one person only. The project's own user cache (``~/.cache/tl_steer``) is the one exception.
- Every pointer into ``docs/methods.md`` (``docs/methods.md, section N`` or ``docs/methods.md#<anchor>``)
  names a section that exists, and no file still cites the old "methods.md section N".
- Relative links in the Markdown docs point at files that exist, and their anchors at headings that exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ROOT / "docs" / "methods.md"

# Built from pieces so that this file does not name the paths it looks for.
_SLASH = "/"
_OUTSIDE = re.compile(
    "|".join(
        [
            re.escape(".." + _SLASH + "shared"),
            re.escape(_SLASH + "work" + _SLASH),
            re.escape(_SLASH + "tmp" + _SLASH),
            re.escape(_SLASH + "mnt" + _SLASH),
            re.escape(_SLASH + "root" + _SLASH),
            re.escape(_SLASH + "home" + _SLASH) + r"[A-Za-z_]",
            re.escape(_SLASH + "Users" + _SLASH) + r"[A-Za-z_]",
            r"[A-Za-z]:\\\\?Users\\",
            r"~" + re.escape(_SLASH) + r"(?!\.cache" + re.escape(_SLASH) + r"tl_steer)",
        ]
    )
)
_RELATIVE = re.compile(r"(?<![\w.])((?:\.\.\/)+)[\w.\-/]*")


def repository_files() -> list[Path]:
    """Tracked files and new files git does not ignore (what the next commit can hold)."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        # not a git checkout (e.g. an unpacked source archive): every file outside build and cache folders
        skip = {".git", ".venv", ".venv-peer", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache", "report"}
        return [
            p
            for p in ROOT.rglob("*")
            if p.is_file() and not any(part in skip or part.endswith(".egg-info") for part in p.relative_to(ROOT).parts)
        ]
    return [ROOT / name for name in out.decode().split("\0") if name and (ROOT / name).is_file()]


def text_of(path: Path) -> str | None:
    """The file as text, or None for a binary file (a NUL byte, or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def outside_pointers(path: Path, text: str) -> list[str]:
    """Each place in ``text`` (the file ``path``) that names a path outside the repository."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for match in _OUTSIDE.finditer(line):
            found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} in {line.strip()[:120]!r}")
        for match in _RELATIVE.finditer(line):
            target = (path.parent / match.group(0)).resolve()
            if not target.is_relative_to(ROOT):
                found.append(f"{path.relative_to(ROOT)}:{number}: {match.group(0)!r} leaves the repository")
    return found


def test_no_file_names_a_path_outside_the_repository() -> None:
    files = repository_files()
    assert len(files) > 50  # the listing worked
    problems = []
    for path in files:
        text = text_of(path)
        if text is not None:
            problems += outside_pointers(path, text)
    assert not problems, "paths outside the repository:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    "text",
    [
        "see ../" + "shared/notes.md",
        "cd /" + "work/main",
        "written to /" + "tmp/x.md",
        "/" + "home/alice/model",
        "C:\\" + "Users\\bob",
        "~" + "/notes.txt",
        "[link](" + "../" * 2 + "elsewhere.md)",
    ],
)
def test_outside_pointers_are_found(text: str) -> None:
    assert outside_pointers(ROOT / "docs" / "x.md", text)


@pytest.mark.parametrize(
    "text", ["~/.cache/tl_steer/models", "[m](../docs/methods.md#2-preference-and-utility)", "out/bench.md"]
)
def test_inside_pointers_pass(text: str) -> None:
    assert not outside_pointers(ROOT / "notebooks" / "x.ipynb", text)


def anchor(heading: str) -> str:
    """GitHub's anchor for a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> dict[str, str]:
    """Anchor -> heading text for every ``#`` heading outside code blocks."""
    out, fenced = {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            title = line.lstrip("#").strip()
            out[anchor(title)] = title
    return out


def methods_sections() -> dict[int, str]:
    """Section number -> anchor of docs/methods.md's numbered sections."""
    sections = {}
    for key, title in headings(METHODS).items():
        match = re.match(r"(\d+)\. ", title)
        if match:
            sections[int(match.group(1))] = key
    return sections


def test_methods_md_has_stable_numbered_sections() -> None:
    sections = methods_sections()
    assert sections[2] == "2-preference-and-utility"
    assert sorted(sections) == list(range(1, len(sections) + 1))


def test_every_pointer_into_methods_md_resolves() -> None:
    sections = methods_sections()
    anchors = set(headings(METHODS))
    problems, count = [], 0
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        where = path.relative_to(ROOT)
        if re.search(r"(?<!docs/)methods\.md,? sections? \d", text):
            problems.append(f"{where}: cites 'methods.md section N' without docs/")
        for match in re.finditer(r"docs/methods\.md,?\s+(?:sections?|sec\.)\s+(\d+)(?:\s+and\s+(\d+))?", text):
            count += 1
            for number in filter(None, match.groups()):
                if int(number) not in sections:
                    problems.append(f"{where}: {match.group(0)!r}: no section {number}")
        for match in re.finditer(r"methods\.md#([\w\-]+)", text):
            count += 1
            if match.group(1) not in anchors:
                problems.append(f"{where}: {match.group(0)!r}: no such heading")
    assert count >= 15  # the pointers were found
    assert not problems, "\n".join(problems)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_markdown_links_resolve() -> None:
    problems = []
    for path in markdown_files():
        text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such file")
            elif fragment and linked.suffix == ".md" and fragment not in headings(linked):
                problems.append(f"{path.relative_to(ROOT)}: {target}: no such heading")
    assert not problems, "\n".join(problems)
