"""The one command, ``dinov2-triton``, and the seed's three root commands.

- ``--help`` answers at every level (the command, each group, each
  subcommand) with exit 0, names the command the user typed, and loads none
  of torch, ONNX or tritonclient;
- every option has exactly one spelling, kebab-case;
- ``python load_data.py`` / ``finetune.py`` / ``production_benchmarking.py``
  keep the seed's underscore spellings and run under the checkout's .venv.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dinov2_triton.cli import COMMANDS
from dinov2_triton.seed_commands import kebab_flags
from tests.fixtures.images import make_class_tree

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "onnx", "onnxruntime", "tritonclient")
#: subcommands that live inside a subcommand module (the issue's command tree)
NESTED = {
    ("serve",): ("start", "stop", "status", "reload", "rollback", "container", "kubernetes"),
    ("report",): ("render", "compare", "publish"),
}


def _command_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]
    for name, entry in COMMANDS.items():
        paths.append((name,))
        if isinstance(entry, dict):
            paths += [(name, sub) for sub in entry]
    for parent, subs in NESTED.items():
        paths += [(*parent, sub) for sub in subs]
    return paths


# One interpreter walks every path: after each --help it reports the exit code,
# the usage text and which heavy modules that --help newly imported.
_WALK = textwrap.dedent("""
    import contextlib, io, json, sys
    from dinov2_triton.cli import main
    heavy, out = {heavy!r}, []
    for path in {paths!r}:
        before = {{m for m in heavy if m in sys.modules}}
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
                code = main([*path, "--help"])
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:  # a subcommand module that fails its contract
            code, buf = repr(exc), io.StringIO(repr(exc))
        out.append([path, code, buf.getvalue(), sorted({{m for m in heavy if m in sys.modules}} - before)])
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], tuple[object, str, list]]:
    code = _WALK.format(heavy=HEAVY, paths=[list(p) for p in _command_paths()])
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return {tuple(path): (rc, text, heavy) for path, rc, text, heavy in json.loads(res.stdout)}


def test_help_answers_at_every_level_without_heavy_imports(helps):
    bad = []
    for path, (rc, text, heavy) in helps.items():
        prog = " ".join(("dinov2-triton", *path))
        if rc != 0:
            bad.append(f"`{prog} --help` exits {rc}: {text.strip()[:300]}")
        elif not text.startswith(f"usage: {prog} "):
            bad.append(f"`{prog} --help` does not name its command: {text[:120]!r}")
        if heavy:
            bad.append(f"`{prog} --help` imports {heavy}")
    assert not bad, "\n".join(bad)


def test_every_option_has_one_kebab_case_spelling(helps):
    bad = {}
    for path, (_, text, _) in helps.items():
        usage = text.split("\n\n", 1)[0]       # argparse lists every option in its usage block
        snake = sorted(set(re.findall(r"--[a-z0-9]+_[a-z0-9_]+", usage)))
        if snake:
            bad[" ".join(("dinov2-triton", *path))] = snake
    assert not bad, f"options spelled with '_' (use kebab-case): {bad}"


def test_the_command_table_is_what_the_top_level_help_lists(helps):
    text = helps[()][1]
    for name in COMMANDS:
        assert re.search(rf"^  {re.escape(name)} ", text, re.M), name


def test_unknown_and_missing_commands_are_usage_errors(capsys):
    from dinov2_triton.cli import main

    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "train" in err
    assert main(["qa", "parity-check"]) == 2
    assert "dinov2-triton qa: unknown command 'parity-check'" in capsys.readouterr().err
    assert main([]) == 2 and "usage: dinov2-triton <command>" in capsys.readouterr().err


def test_version_is_the_package_version():
    import dinov2_triton

    res = subprocess.run([sys.executable, "-m", "dinov2_triton", "--version"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == f"python -m dinov2_triton {dinov2_triton.__version__}"


def test_removed_spellings_are_refused(capsys):
    from dinov2_triton.export.cli import main as export_main

    with pytest.raises(SystemExit) as exc:
        export_main(["--model-path", "x.pth", "--thresholds", "fp16.min_top1_agreement=0.9"])
    assert exc.value.code == 2 and "unrecognized arguments: --thresholds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(["--model_path", "x.pth"])
    assert "--model-path" in capsys.readouterr().err


# --------------------------------------------------------------------------- the seed's root commands
def test_seed_spellings_become_kebab_case():
    assert kebab_flags(["--data_path", "d_1", "--output_path=o_1", "-q", "--img-size", "28", "--", "--x_y"]) == [
        "--data-path", "d_1", "--output-path=o_1", "-q", "--img-size", "28", "--", "--x_y"]


def _root(script: str, *args, python: str = sys.executable, env: dict | None = None):
    return subprocess.run([python, script, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="2", **(env or {})))


@pytest.mark.parametrize("script", ["load_data.py", "finetune.py", "production_benchmarking.py"])
def test_seed_command_help(script):
    res = _root(script, "--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"usage: {script} ") and "--data-path" in res.stdout


def test_load_data_with_the_seed_spellings(tmp_path):
    src = make_class_tree(tmp_path / "src", {"cat": 6, "dog": 6})
    res = _root("load_data.py", "--data_path", tmp_path / "data", "--image_folder", src, "--seed", "3",
                "--no-progress")
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "data" / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["arguments"]["image_folder"] == str(src)


def test_finetune_and_production_benchmarking_take_the_seed_spellings(tmp_path):
    """Bad paths reach the stage itself (its own error), not argparse's 'unrecognized arguments'."""
    res = _root("finetune.py", "--data_path", tmp_path / "missing", "--output_path", tmp_path / "m",
                "--weights", "random")
    assert res.returncode == 2 and "labels.txt: not found" in res.stderr, res.stderr
    res = _root("production_benchmarking.py", "--model_path", tmp_path / "missing.pth")
    assert res.returncode == 2 and "missing.pth: file not found" in res.stderr, res.stderr


def test_seed_command_reruns_itself_under_the_checkouts_venv():
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        pytest.skip("no .venv in this checkout (scripts/setup_env.sh creates it)")
    res = _root("load_data.py", "--help", python=sys._base_executable)
    assert res.returncode == 0, res.stderr
    assert f"[load_data.py] running with {venv_python}" in res.stderr
    assert res.stdout.startswith("usage: load_data.py ")
