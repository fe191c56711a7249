"""Stage fingerprints (train/stage_stamp.py) and the root-level seed scripts."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dinov2_triton.core import stage_stamp

ROOT = Path(__file__).resolve().parents[1]


def _tree(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "cat").mkdir(parents=True)
    (src / "dog").mkdir()
    (src / "cat" / "a.jpg").write_bytes(b"a")
    (src / "dog" / "b.jpg").write_bytes(b"b")
    return src


def _args(src: Path, out: Path, lr: str = "1e-3"):
    return dict(inputs=[str(src)], params=[f"lr={lr}"], outputs=[str(out)])


def test_unchanged_inputs_are_up_to_date_and_changes_are_noticed(tmp_path):
    src, out, state = _tree(tmp_path), tmp_path / "model.pth", tmp_path / "state"
    out.write_bytes(b"weights")
    a = _args(src, out)
    ok, why = stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])
    assert not ok and "no finished run" in why
    stage_stamp.record(state, "train", "done", a["inputs"], a["params"], a["outputs"])
    assert stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])[0]

    # a parameter, a file's bytes, a new file, a renamed file, the output: each reruns
    b = _args(src, out, lr="1e-4")
    assert not stage_stamp.check(state, "train", b["inputs"], b["params"], b["outputs"])[0]
    (src / "cat" / "a.jpg").write_bytes(b"A")
    assert not stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])[0]
    (src / "cat" / "a.jpg").write_bytes(b"a")
    assert stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])[0]
    (src / "cat" / "c.jpg").write_bytes(b"c")
    assert not stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])[0]
    (src / "cat" / "c.jpg").rename(src / "dog" / "c.jpg")
    stage_stamp.record(state, "train", "done", a["inputs"], a["params"], a["outputs"])
    (src / "dog" / "c.jpg").rename(src / "cat" / "c.jpg")
    assert not stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])[0]
    stage_stamp.record(state, "train", "done", a["inputs"], a["params"], a["outputs"])
    out.write_bytes(b"edited by hand")
    ok, why = stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])
    assert not ok and "changed since it was written" in why
    out.unlink()
    ok, why = stage_stamp.check(state, "train", a["inputs"], a["params"], a["outputs"])
    assert not ok and "missing" in why


def test_resume_only_with_the_same_inputs(tmp_path):
    src, state = _tree(tmp_path), tmp_path / "state"
    a = _args(src, tmp_path / "model.pth")
    assert not stage_stamp.may_resume(state, "train", a["inputs"], a["params"])
    stage_stamp.record(state, "train", "started", a["inputs"], a["params"], [])
    assert stage_stamp.may_resume(state, "train", a["inputs"], a["params"])
    assert not stage_stamp.may_resume(state, "train", a["inputs"], ["lr=9"])


def test_cli_exit_codes(tmp_path, capsys):
    src, out, state = _tree(tmp_path), tmp_path / "m.pth", tmp_path / "state"
    out.write_bytes(b"x")
    argv = ["--state", str(state), "--stage", "export", "--input", str(src), "--param", "v=onnx",
            "--output", str(out)]
    assert stage_stamp.main(["check", *argv]) == 1
    assert "export: runs (no finished run recorded)" in capsys.readouterr().out
    assert stage_stamp.main(["finish", *argv]) == 0
    assert stage_stamp.main(["check", *argv]) == 0
    assert "export: up to date, skipped" in capsys.readouterr().out


@pytest.mark.parametrize("script,usage", [("load_data.py", "dinov2_triton.data.load"),
                                          ("finetune.py", "dinov2_triton.train.finetune"),
                                          ("production_benchmarking.py", "dinov2_triton.pipeline.production_benchmarking")])
def test_seed_commands_work_from_the_repository_root(script, usage):
    res = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert usage in res.stdout


def test_root_model_module_is_the_model_definition():
    res = subprocess.run([sys.executable, "-c", "import model, dinov2_triton.train.model; "
                          "assert model.build_model is dinov2_triton.train.model.build_model; print('ok')"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_pycache_does_not_count(tmp_path):
    """A stage's source package is an input; Python's bytecode cache beside
    it must not make every run look changed."""
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "mod.py").write_text("x = 1\n")
    before = stage_stamp.fingerprint("s", [pkg], [])
    (pkg / "__pycache__").mkdir()
    (pkg / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\x00")
    assert stage_stamp.fingerprint("s", [pkg], []) == before
    (pkg / "mod.py").write_text("x = 2\n")
    assert stage_stamp.fingerprint("s", [pkg], []) != before
