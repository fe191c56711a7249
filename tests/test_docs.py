"""Docs that cannot drift.

- Every note the code cites exists in this repository. Citations look like
  `docs/field-notes.md #7`, `docs/field-notes.md #3-#5` or
  `docs/field-notes.md #4, #8 and #9`; each number must be a section of
  docs/field-notes.md. Notes kept outside the repository (the team's
  FIELD_NOTES / ENVIRONMENT / STYLE files) must not be cited at all: a reader
  of this repository cannot open them.
- The README and docs/ are a user's guide: every relative link (and its
  #anchor) resolves, the README stays under 250 lines, neither speaks of how
  the project is developed (sessions, lent machines, issue numbers, commit
  hashes, dates of runs), every `dinov2-triton <command>` they name exists and
  every flag they give it is one of its flags, and the README's results table
  is the newest file of benchmarks/ as `dinov2-triton report publish` renders it.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import re
import subprocess
from pathlib import Path

import pytest

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



# ----------------------------------------------------------------------------- the user's guide
README = ROOT / "README.md"
#: the pages a user reads: the README, docs/ and the generated repository's layout
GUIDE = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "model_repository" / "README.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`[^`\n]+`")
#: words that speak of how the project is worked on, not of how to use it (checked in prose)
DEV_TALK = re.compile(r"\bsessions?\b|\blent\b|\bissues? #?\d+|\bissues show\b", re.I)
#: a git commit hash: 7-40 hex digits with at least one letter and one digit
COMMIT = re.compile(r"\b(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b")
DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
COMMAND = re.compile(r"dinov2-triton((?: [a-z][a-z0-9-]*)*)")


def _prose(text: str) -> str:
    """The text without fenced code blocks and inline code spans."""
    return INLINE.sub(" ", FENCE.sub(" ", text))


def _without_results_block(text: str) -> str:
    from dinov2_triton.report.published import README_BEGIN, README_END

    if README_BEGIN in text and README_END in text:
        return text[:text.index(README_BEGIN)] + text[text.index(README_END):]
    return text


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    anchors = {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}
    return anchors | set(re.findall(r'<a id="([^"]+)"></a>', text))


def test_links_in_the_guide_resolve():
    broken = []
    for page in GUIDE:
        for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", target):            # http:, https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            if not dest.exists():
                broken.append(f"{page.relative_to(ROOT)}: ({target}): no such file or folder")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{page.relative_to(ROOT)}: ({target}): "
                              f"no heading or <a id> '{anchor}' in {file or 'itself'}")
    assert not broken, "\n".join(broken)


def test_the_link_checker_sees_a_broken_link(tmp_path):
    """A test of the test: the anchors and slugs it computes are GitHub's."""
    page = tmp_path / "p.md"
    page.write_text('# Capacity at a latency SLO, and the `tune` search\n<a id="fn-3"></a>\n## 3. Notes\n')
    assert _anchors(page) == {"capacity-at-a-latency-slo-and-the-tune-search", "fn-3", "3-notes"}


def test_the_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < 250, f"README.md has {lines} lines; move details into docs/ (a user's guide is under 250)"


def test_the_guide_does_not_speak_of_how_the_project_is_developed():
    hits = []
    for page in GUIDE:
        text = _without_results_block(page.read_text(encoding="utf-8"))
        prose = _prose(text)
        for pattern, what in ((DEV_TALK, "development talk"), (DATE, "a date")):
            hits += [f"{page.relative_to(ROOT)}: {what}: {m.group(0)!r}" for m in pattern.finditer(prose)]
        hits += [f"{page.relative_to(ROOT)}: a commit hash: {m.group(0)!r}" for m in COMMIT.finditer(text)]
    assert not hits, ("README.md and docs/ are for users; measured numbers go to benchmarks/ "
                      "(dinov2-triton report publish):\n" + "\n".join(hits))


def test_the_development_talk_patterns_match():
    """A test of the test."""
    prose = _prose("Measured in this session at `c46fbb0` on the machine lent to us (issue #19), 2026-12-01.")
    assert [m.group(0) for m in DEV_TALK.finditer(prose)] == ["session", "lent", "issue #19"]
    assert DATE.findall(prose) == ["2026-12-01"]
    assert COMMIT.findall("at c46fbb0 and 3d942d0, not deadbeef or 1234567 or avx512f") == ["c46fbb0", "3d942d0"]


def _subcommands(path: list[str]) -> dict | None:
    """The subcommands under ``dinov2-triton <path>``, or None for a command that takes options."""
    from dinov2_triton.cli import COMMANDS

    entry = COMMANDS
    for word in path:
        entry = entry[word]
    if isinstance(entry, dict):
        return entry
    module = importlib.import_module(entry[0])
    if hasattr(module, "SUBCOMMANDS"):
        return dict(module.SUBCOMMANDS)
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    for action in getattr(parser, "_actions", []):
        if action.__class__.__name__ == "_SubParsersAction":
            return dict(action.choices)
    return None


def _command_path(words: list[str]) -> tuple[list[str], str | None]:
    """The longest valid command path of ``words`` and an error for the first invalid word."""
    from dinov2_triton.cli import COMMANDS

    if not words:
        return [], None
    if words[0] not in COMMANDS:
        return [], f"unknown command {words[0]!r} (dinov2_triton/cli.py COMMANDS: {', '.join(COMMANDS)})"
    path = [words[0]]
    subs = _subcommands(path)
    if subs is not None and len(words) > 1:
        if words[1] not in subs:
            return path, f"unknown subcommand {' '.join(words[:2])!r} (one of: {', '.join(subs)})"
        path.append(words[1])
    elif subs is not None:
        return path, None
    return path, None


def _commands(text: str):
    """(command words, the rest of the command) for every `dinov2-triton ...` in code spans
    and fenced blocks (continuation lines joined, comments cut), and the words in prose."""
    code = ([block.replace("\\\n", " ") for block in FENCE.findall(text)]
            + [span.strip("`") for span in INLINE.findall(FENCE.sub(" ", text))])
    for chunk in code:
        for line in chunk.splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line)
            # a command starts a line, or follows `;`, `&&` or `||` (not `kubectl -n dinov2-triton ...`)
            for part in re.split(r"(?:;|&&|\|\|)", line):
                m = re.match(r"\s*dinov2-triton(?=\s|$)(.*)", part)
                if m:
                    words = re.match(r"((?: [a-z][a-z0-9-]*)*)", m.group(1)).group(1).split()
                    yield words, m.group(1)
    for m in COMMAND.finditer(_prose(text)):
        yield m.group(1).split(), ""


def _help(path: list[str]) -> str:
    from dinov2_triton.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([*path, "--help"])
        except SystemExit:
            pass
    return out.getvalue()


_HELPS: dict[tuple[str, ...], set[str]] = {}


def _command_problems(text: str, name: str) -> list[str]:
    """Every unknown command, subcommand or flag of the `dinov2-triton ...` in ``text``."""
    problems = []
    for words, rest in _commands(text):
        path, error = _command_path(words)
        if error:
            problems.append(f"{name}: dinov2-triton {' '.join(words)}: {error}")
            continue
        flags = re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9_-]*)", rest)
        if not flags or not path:
            continue
        if tuple(path) not in _HELPS:
            _HELPS[tuple(path)] = set(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9_-]*)", _help(path)))
        problems += [f"{name}: dinov2-triton {' '.join(path)} {flag}: not one of its flags"
                     for flag in flags if flag not in _HELPS[tuple(path)]]
    return problems


def test_every_command_and_flag_the_guide_names_exists():
    problems = [p for page in GUIDE
                for p in _command_problems(page.read_text(encoding="utf-8"), str(page.relative_to(ROOT)))]
    assert not problems, "\n".join(problems)


def test_the_command_checker_sees_a_wrong_flag_and_a_wrong_command():
    """A test of the test: the seed's spelling, a flag of another command, a command that is not there."""
    text = ("```\ndinov2-triton export --model_path m --repository r\ndinov2-triton serve start --apply\n```\n"
            "Then `dinov2-triton qa parity --url u` and dinov2-triton deploy.")
    assert _command_problems(text, "page") == [
        "page: dinov2-triton export --model_path: not one of its flags",
        "page: dinov2-triton serve start --apply: not one of its flags",
        "page: dinov2-triton deploy: unknown command 'deploy' (dinov2_triton/cli.py COMMANDS: "
        + ", ".join(__import__("dinov2_triton.cli", fromlist=["COMMANDS"]).COMMANDS) + ")"]


def test_the_command_reader_splits_what_a_page_shows():
    """A test of the test: continuation lines, comments and two commands on one line."""
    text = ("```bash\ndinov2-triton serve start --replicas 2 \\\n    --repository r   # --not-a-flag\n"
            "dinov2-triton serve status ; dinov2-triton serve stop\n```\nthen `dinov2-triton qa parity --url u`.")
    assert [(w, re.findall(r"--[a-z-]+", r)) for w, r in _commands(text)] == [
        (["serve", "start"], ["--replicas", "--repository"]), (["serve", "status"], []), (["serve", "stop"], []),
        (["qa", "parity"], ["--url"])]
    assert list(_commands("```\nkubectl -n dinov2-triton create secret\ncd /tmp && dinov2-triton tune\n```")) == [
        (["tune"], " tune")]
    assert _command_path(["serve", "launch"])[1].startswith("unknown subcommand 'serve launch'")
    assert _command_path(["deploy"])[1].startswith("unknown command 'deploy'")


def test_the_readme_shows_the_newest_published_results():
    from dinov2_triton.report.published import newest_publication, read_publication, readme_block

    newest = newest_publication(ROOT / "benchmarks")
    assert newest is not None, ("benchmarks/ holds no published results: run `dinov2-triton report publish "
                                "<run>/results.json --out benchmarks/ --readme README.md`")
    md = newest.with_suffix(".md")
    assert md.is_file(), f"{newest} has no {md.name} beside it"
    pub = read_publication(newest)
    from dinov2_triton.report.published import render_publication

    assert md.read_text(encoding="utf-8") == render_publication(pub), (
        f"{md.relative_to(ROOT)} is not what its .json renders to; publish again")
    block = readme_block(pub, md.relative_to(ROOT).as_posix())
    assert block in README.read_text(encoding="utf-8"), (
        f"README.md's results block is not {md.relative_to(ROOT)}'s; run `dinov2-triton report publish "
        f"... --out benchmarks/ --readme README.md` (or publish the newest results again)")


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks").glob("*.json")) if (ROOT / "benchmarks").is_dir()
                         else [], ids=lambda p: p.name)
def test_every_published_file_reads_and_is_small(path):
    from dinov2_triton.report.published import read_publication

    pub = read_publication(path)
    assert path.stem == pub.stem, f"{path.name}: its record says it is {pub.stem}.json"
    assert path.stat().st_size < 200_000 and path.with_suffix(".md").stat().st_size < 100_000
