"""The seed's root ``model.py`` never shadows the stand-in backends' ``model`` module.

Triton's Python backend stub imports a Python-based backend's code as
``import model`` after appending the backend's folder to ``sys.path``; a
server whose working directory is the checkout root (Triton Model Analyzer's
local launch does that) finds the root model.py first. The root model.py
therefore hands the import on to the backend's own file when it is imported
inside a stub, and re-exports the model factory everywhere else.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.triton import TINY_CLASSES, TINY_EMBED, TINY_IMAGE, make_tiny_repository, tiny_reference

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd, extra_path=()):
    """Run ``code`` in a fresh interpreter with ``cwd`` first on sys.path (as a server's stub has it)."""
    prelude = f"import sys; sys.path[:0] = [{str(cwd)!r}]; sys.path += {[str(p) for p in extra_path]!r}\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_root_model_module_re_exports_the_model_factory():
    res = _python("""
        import model, dinov2_triton.train.model as m
        assert model.build_model is m.build_model and model.DinoV2Classifier is m.DinoV2Classifier
        assert model.load_classifier is m.load_classifier and model.resolve_arch is m.resolve_arch
        assert not hasattr(model, "TritonPythonModel")
        print("ok")
    """, ROOT)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_inside_a_backend_stub_the_root_model_module_becomes_the_backends(tmp_path):
    """What the stub does, without the server: the Python backend's folder
    (triton_python_backend_utils.py) and the backend's folder appended to
    sys.path, the working directory first, then ``import model``."""
    backend = tmp_path / "onnxruntime"
    backend.mkdir()
    (backend / "model.py").write_text("class TritonPythonModel:\n    SOURCE = __file__\n")
    (tmp_path / "triton_python_backend_utils.py").write_text("")
    res = _python("""
        import model
        print(model.TritonPythonModel.SOURCE)
        assert sys.modules["model"] is model and "dinov2_triton.train.model" not in sys.modules
    """, ROOT, extra_path=[tmp_path, backend])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(backend / "model.py")


def test_inside_a_stub_without_a_backend_model_the_import_fails_clearly(tmp_path):
    (tmp_path / "triton_python_backend_utils.py").write_text("")
    res = _python("import model", ROOT, extra_path=[tmp_path])
    assert res.returncode != 0
    assert "no other model.py on sys.path" in res.stderr and str(ROOT / "model.py") in res.stderr


@pytest.mark.triton
def test_server_started_from_the_checkout_root_loads_the_standin_backend(
        tmp_path, tiny_classifier, triton_server_factory):
    """A real tritonserver whose working directory is the checkout root serves
    an ONNX model through the onnxruntime stand-in (without the fix its load
    failed: "module 'model' has no attribute 'TritonPythonModel'")."""
    assert (ROOT / "model.py").is_file()
    repo = make_tiny_repository(tmp_path / "repo", tiny_classifier, broken=False, tensorrt=False)
    server = triton_server_factory(repo, load_models=["tiny_onnx"], cwd=ROOT)
    states = server.model_states()
    assert states["tiny_onnx"] == "READY", f"{states}\n{server.log_tail(40)}"
    batch = np.random.default_rng(3).standard_normal((2, *TINY_IMAGE)).astype(np.float32)
    with server.connect("http", with_key=False) as conn:
        result = conn.infer("tiny_onnx", [conn.tensor_input("pixel_values", batch, "FP32")],
                            [conn.requested_output(n) for n in ("logits", "embedding")])
        logits, embedding = result.as_numpy("logits"), result.as_numpy("embedding")
    ref_logits, ref_embedding = tiny_reference(tiny_classifier, batch)
    assert logits.shape == (2, TINY_CLASSES) and embedding.shape == (2, TINY_EMBED)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4)
    np.testing.assert_allclose(embedding, ref_embedding, atol=1e-4)
