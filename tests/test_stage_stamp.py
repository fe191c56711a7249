"""Stage fingerprints (core/stage_stamp.py). The seed's root scripts: tests/test_cli.py, tests/test_seed_model.py."""
from __future__ import annotations

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


def test_stamp_hashes_its_inputs_once_and_agrees_with_the_functions(tmp_path):
    """The Stamp class (what the pipeline runner uses): check/start/finish/may_resume
    on one fingerprint, computed when first needed, the same as the module functions'."""
    src, out, state = _tree(tmp_path), tmp_path / "m.pth", tmp_path / "state"
    a = _args(src, out)
    stamp = stage_stamp.Stamp(state, "export", inputs=a["inputs"], params=a["params"], outputs=a["outputs"])
    assert stamp.fingerprint == stage_stamp.fingerprint("export", a["inputs"], a["params"])
    ok, why = stamp.check()
    assert not ok and "no finished run" in why
    assert not stamp.may_resume()
    stamp.start()
    assert stamp.may_resume() and stage_stamp.may_resume(state, "export", a["inputs"], a["params"])
    out.write_bytes(b"x")
    # an input changed while the stage ran: the stamp records what the run started from
    (src / "cat" / "a.jpg").write_bytes(b"changed during the run")
    stamp.finish()
    ok, why = stage_stamp.check(state, "export", a["inputs"], a["params"], a["outputs"])
    assert not ok and "inputs or parameters changed" in why
    (src / "cat" / "a.jpg").write_bytes(b"a")
    assert stage_stamp.check(state, "export", a["inputs"], a["params"], a["outputs"])[0]
    with pytest.raises(ValueError, match="started or done"):
        stage_stamp.record(state, "export", "begun", a["inputs"], a["params"], a["outputs"])


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
