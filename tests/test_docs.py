"""The documentation stands on its own: every relative link in README.md and docs/*.md reaches an existing
file (and, with `#anchor`, an existing anchor of it), every "docs/<file>.md section N" cited anywhere in the
repository names an existing numbered section, and no file points to the project's internal documents, which
are not in the repository. Plain text only: no JAX, runs in well under a second."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The internal spec and design notes (not shipped), cited by name or as "<SPEC> 3", "<SPEC> section 4".
# Spelled in pieces so that this file does not mention them itself.
SPEC, DESIGN = "REFERENCE", "DESIGN"
FORBIDDEN = re.compile(rf"{SPEC}\.md|{DESIGN}\.md|\b{SPEC}\s+(?:sections?\s+)?\d")

# Files allowed to cite the internal documents (none now). A file listed here that no longer cites them
# fails `test_no_file_cites_documents_outside_the_repository`, so the list cannot outlive its reason.
ALLOWED = ()

# the way to cite a numbered section of a document: "docs/method.md section 6", "docs/method.md sections
# 2, 13-15 and 19" (a line break, with a comment's `#`, may separate the file from the word "section")
NUMBERS = r"\d+(?:\s*(?:-|,\s*and|,|and)\s*\d+)*"
CITATION = re.compile(rf"docs/(?P<file>[\w.-]+\.md)(?:\s|#)+sections?\s+(?P<numbers>{NUMBERS})")
OTHER_FORM = re.compile(r"docs/[\w.-]+\.md\s*§")  # one form everywhere: "section N", not "§N"
CITING_SUFFIXES = (".py", ".yaml", ".yml", ".md")
SKIPPED_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", "outputs", "runs", "build"}  # as .gitignore

LINK = re.compile(r"!?\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)(?:\s+\"[^\"]*\")?\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(?P<target>\S+)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
ANCHOR_TAG = re.compile(r"<a\s+(?:id|name)=\"(?P<id>[^\"]+)\"")
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<title>.+?)\s*#*\s*$", re.M)
NUMBERED = re.compile(r"^(?P<n>\d+)\.\s")


# ---- reading the repository ------------------------------------------------------------------------------
def repository_files(root: Path = ROOT) -> list[Path]:
    """Tracked and untracked-but-not-ignored files (git's view); without git, a walk that skips what
    .gitignore names."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                             capture_output=True, check=True, timeout=60).stdout
        files = [root / name for name in out.decode().split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in root.rglob("*") if not any(part in SKIPPED_DIRS or part.endswith(".egg-info")
                                                         for part in p.relative_to(root).parts)]
    return sorted(p for p in files if p.is_file() and not p.is_symlink())


def text_of(path: Path) -> str:
    return path.read_bytes().decode("utf-8", errors="replace")


def markdown_files(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def slug(title: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    title = re.sub(r"[`*_]|<[^>]+>", "", title).strip().lower()
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title))


def sections(text: str) -> tuple[dict[str, int | None], set[int]]:
    """({anchor: number of the section it opens, or None}, {numbers of the numbered headings}). An
    explicit `<a id>` belongs to the next heading; every heading has its slug as an anchor too."""
    anchors: dict[str, int | None] = {}
    numbers: set[int] = set()
    pending: list[str] = []
    body = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    for line in body.splitlines():
        pending += ANCHOR_TAG.findall(line)
        heading = HEADING.match(line)
        if heading:
            numbered = NUMBERED.match(heading.group("title"))
            n = int(numbered.group("n")) if numbered else None
            if n is not None:
                numbers.add(n)
            for anchor in (*pending, slug(heading.group("title"))):
                anchors.setdefault(anchor, n)
            pending = []
    for anchor in pending:  # anchors after the last heading
        anchors.setdefault(anchor, None)
    return anchors, numbers


def cited_numbers(numbers: str) -> list[int]:
    """"2, 13-15 and 19" -> [2, 13, 14, 15, 19]."""
    out = []
    for part in re.split(r"\s*(?:,\s*and|,|and)\s*", numbers.strip()):
        low, _, high = part.partition("-")
        out += range(int(low), int(high or low) + 1)
    return out


# ---- the checks, as functions of text so that they can be checked themselves ------------------------------
def link_problems(source: Path, text: str, root: Path = ROOT) -> list[str]:
    """Relative links of a Markdown file that lead nowhere, or whose "section N" text names another section
    than the one its anchor opens."""
    problems = []
    body = FENCE.sub("", text)
    targets = [(m.group("text"), m.group("target")) for m in LINK.finditer(body)]
    targets += [("", m.group("target")) for m in REFERENCE_LINK.finditer(body)]
    for label, target in targets:
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (source.parent / path_part).resolve() if path_part else source
        where = f"{source.relative_to(root)}: link [{label}]({target})"
        if not dest.exists():
            problems.append(f"{where}: {path_part} does not exist")
            continue
        if not anchor:
            continue
        if dest.suffix != ".md" or not dest.is_file():
            problems.append(f"{where}: an anchor into a file that is not Markdown")
            continue
        anchors, _ = sections(text_of(dest) if dest != source else text)
        if anchor not in anchors:
            problems.append(f"{where}: no anchor #{anchor} in {dest.relative_to(root.resolve())}")
            continue
        named = re.search(r"sections?\s+(\d+)", label)
        if named and anchors[anchor] is not None and int(named.group(1)) != anchors[anchor]:
            problems.append(f"{where}: #{anchor} opens section {anchors[anchor]}, not {named.group(1)}")
    return problems


def citation_problems(name: str, text: str, root: Path = ROOT) -> list[str]:
    """"docs/<file>.md section N" citations whose file or numbered section does not exist."""
    problems = []
    for m in CITATION.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        doc = root / "docs" / m.group("file")
        if not doc.is_file():
            problems.append(f"{name}:{line}: docs/{m.group('file')} does not exist")
            continue
        _, numbers = sections(text_of(doc))
        missing = [n for n in cited_numbers(m.group("numbers")) if n not in numbers]
        if missing:
            has = f"it has {min(numbers)}-{max(numbers)}" if numbers else "it has no numbered sections"
            problems.append(f"{name}:{line}: docs/{m.group('file')} has no section {missing} ({has})")
    for m in OTHER_FORM.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        problems.append(f"{name}:{line}: cite as \"docs/<file>.md section N\", not with §")
    return problems


def forbidden_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if FORBIDDEN.search(line)]


# ---- the tests ---------------------------------------------------------------------------------------------
def test_relative_links_and_anchors_resolve():
    problems = []
    for path in markdown_files():
        problems += link_problems(path, text_of(path))
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_section_citations_name_existing_sections():
    problems, count = [], 0
    for path in repository_files():
        if path.suffix in CITING_SUFFIXES:
            text = text_of(path)
            count += len(CITATION.findall(text))
            problems += citation_problems(str(path.relative_to(ROOT)), text)
    assert not problems, "citations of missing sections:\n" + "\n".join(problems)
    assert count >= 40, f"only {count} section citations found: is the pattern still the one the code uses?"


def test_no_file_cites_documents_outside_the_repository():
    offending, stale = {}, []
    for path in repository_files():
        name = path.relative_to(ROOT).as_posix()
        lines = forbidden_lines(text_of(path))
        if name in ALLOWED:
            if not lines:
                stale.append(name)
        elif lines:
            offending[name] = lines
    missing = [name for name in ALLOWED if not (ROOT / name).is_file()]
    assert not offending, ("cite docs/method.md (\"docs/method.md section N\") instead of documents that are not "
                           "in the repository:\n" + "\n".join(f"{k}: {v}" for k, v in offending.items()))
    assert not stale and not missing, f"remove from ALLOWED in {Path(__file__).name}: {stale + missing}"


def test_the_checks_catch_what_they_should(tmp_path):
    """The checks flag a link to a missing file or anchor, a section number the anchor does not open,
    a citation of a missing section, the § form, and a pointer to the internal spec (as README.md did,
    pointing beside the repository); and they pass the forms the repository uses."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "m.md").write_text('# M\n\n<a id="one"></a>\n## 1. One\n\ntext\n\n## 2. Two `code`\n\n'
                                          '```\n## 9. not a heading\n```\n')
    readme = tmp_path / "README.md"
    good = "[m](docs/m.md), [section 1](docs/m.md#one), [two](docs/m.md#2-two-code), [web](https://x.org/a#b)"
    assert link_problems(readme, good, tmp_path) == []
    bad = "[gone](docs/none.md) [anchor](docs/m.md#three) [section 2](docs/m.md#one)"
    assert len(link_problems(readme, bad, tmp_path)) == 3
    m = "docs" + "/m.md"  # spelled in pieces: this file's own citations are checked too
    assert citation_problems("x.py", f"# see {m} sections 1-2 and {m}\n# section 2", tmp_path) == []
    bad = f"{m} section 9; {m} sections 1, 3; docs" + "/x.md section 1"
    assert len(citation_problems("x.py", bad, tmp_path)) == 3
    assert len(citation_problems("x.py", f"{m} \u00a71", tmp_path)) == 1
    assert cited_numbers("2, 13-15 and 19") == [2, 13, 14, 15, 19]
    old_readme = f"The method's specification is\n`../shared/{SPEC}.md` (beside the repository)"
    assert forbidden_lines(old_readme) == [f"`../shared/{SPEC}.md` (beside the repository)"]
    assert forbidden_lines(f"a PyTorch oracle of {SPEC} 3; {SPEC} section 4; see {DESIGN}.md") != []
    assert forbidden_lines("# ---- OFFICIAL REFERENCE: transcribed from the official scripts") == []
