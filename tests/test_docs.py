"""Docs that cannot drift: every note the code cites exists in this repository.

Citations look like `docs/field-notes.md #7`, `docs/field-notes.md #3-#5` or
`docs/field-notes.md #4, #8 and #9`; each number must be a section of
docs/field-notes.md. Notes kept outside the repository (the team's
FIELD_NOTES / ENVIRONMENT / STYLE files) must not be cited at all: a reader
of this repository cannot open them."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIELD_NOTES = ROOT / "docs" / "field-notes.md"
# A citation and the run of numbers after it ("#3-#5", "#4, #8 and #9").
CITATION = re.compile(r"docs/field-notes\.md ((?:#\d+)(?:(?:-|, | and |, and )#\d+)*)")
OUTSIDE_NOTES = re.compile(r"FIELD_NOTES[ #]?\d|\bENVIRONMENT\.md|\bSTYLE\.md")
TEXT_SUFFIXES = {".py", ".sh", ".md", ".txt", ".toml", ".pbtxt", ".yml", ".yaml", ".cfg", ""}


def _repo_files() -> list[Path]:
    """Tracked and untracked (not ignored) text files: what a clone would hold."""
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    files = []
    for rel in out.splitlines():
        path = ROOT / rel
        # tests/data holds outputs of earlier versions, kept verbatim on purpose.
        if (path.is_file() and path.suffix in TEXT_SUFFIXES and path != Path(__file__).resolve()
                and not rel.startswith("tests/data/")):
            files.append(path)
    return files


def _sections() -> set[int]:
    text = FIELD_NOTES.read_text(encoding="utf-8")
    headings = [int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)]
    anchors = [int(n) for n in re.findall(r'^<a id="fn-(\d+)"></a>\n## \1\. ', text, flags=re.M)]
    assert headings == list(range(1, len(headings) + 1)), f"{FIELD_NOTES}: sections not numbered 1..N: {headings}"
    assert anchors == headings, f"{FIELD_NOTES}: every '## N.' heading needs <a id=\"fn-N\"></a> just above it"
    return set(headings)


def _citations() -> list[tuple[str, int, int]]:
    found = []
    for path in _repo_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for m in CITATION.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            found.extend((str(path.relative_to(ROOT)), line, int(n)) for n in re.findall(r"#(\d+)", m.group(1)))
    return found


def test_every_cited_field_note_exists():
    sections = _sections()
    missing = [f"{f}:{line}: #{n}" for f, line, n in _citations() if n not in sections]
    assert not missing, f"cited notes missing from {FIELD_NOTES.relative_to(ROOT)}:\n" + "\n".join(missing)


def test_citation_pattern_reads_lists():
    """The pattern above reads every spelling the code uses (a test of the test)."""
    text = ("(docs/field-notes.md #3-#5) (docs/field-notes.md #4, #8, #9) "
            "(docs/field-notes.md #7 and #10) docs/field-notes.md #12.")
    numbers = [int(n) for m in CITATION.finditer(text) for n in re.findall(r"#(\d+)", m.group(1))]
    assert numbers == [3, 5, 4, 8, 9, 7, 10, 12]


def test_no_citations_of_notes_outside_the_repository():
    hits = []
    for path in _repo_files():
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        hits.extend(f"{path.relative_to(ROOT)}:{i}: {ln.strip()[:100]}"
                    for i, ln in enumerate(lines, 1) if OUTSIDE_NOTES.search(ln))
    assert not hits, ("these cite notes that are not in the repository; cite docs/field-notes.md #N "
                      "or docs/environment.md instead:\n" + "\n".join(hits))
