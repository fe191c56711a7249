"""Export stage: registry, variants, verification gates, atomic publishing,
calibration data, the preprocessing model and the CLI (tiny model, tiny data)."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.core.resources import resource_path
from dinov2_triton.export import registry
from dinov2_triton.export.registry import REGISTRY, SkipVariant, Variant, get_variant, load_builtin_variants

ROOT = Path(__file__).resolve().parents[1]
load_builtin_variants()


def _tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _ctx(checkpoint, data_path, tmp_path, **options):
    from dinov2_triton.export.context import ExportContext
    from dinov2_triton.train.model import load_classifier

    model, record = load_classifier(checkpoint)
    return ExportContext(model, record, data_path=data_path, work_dir=tmp_path / "work",
                         options={"max_batch_size": 8, **options})


# --------------------------------------------------------------------------- registry
def _variant(name, parent=None, precision="fp32"):
    return Variant(name, "onnxruntime_onnx", "model.onnx", precision, build=None, load_runner=None,
                   parent=parent, gate=precision)


def test_registry_api():
    names = registry.variant_names()
    assert names[:2] == ["torchscript", "onnx"]
    onnx = get_variant("onnx")
    assert onnx.model_name == registry.model_name("onnx") == registry.model_name(onnx) == "dinov2_onnx"
    assert onnx.filename == "model.onnx" and get_variant("torchscript").platform == "pytorch_libtorch"
    assert registry.ensemble_candidates() == ["onnx", "torchscript"]
    assert {"int8", "onnx_int8", "dinov2_onnx_int8"} <= registry.gate_scopes()
    with pytest.raises(KeyError, match="unknown variant 'nope'.*torchscript"):
        get_variant("nope")
    with pytest.raises(ValueError, match="platform"):
        Variant("x", "tensorflow", "model.savedmodel", "fp32", build=None, load_runner=None)
    with pytest.raises(ValueError, match="gate 'fp64' not in dinov2_triton.export.gates.GATES"):
        Variant("x", "onnxruntime_onnx", "model.onnx", "fp32", build=None, load_runner=None, gate="fp64")


def test_build_order_follows_declared_parents_not_registration_order(monkeypatch):
    # children declared before their parents, as a module imported first would
    monkeypatch.setattr(registry, "REGISTRY", {})
    for v in (_variant("c", parent="b", precision="int8"), _variant("b", parent="a", precision="fp16"),
              _variant("a"), _variant("z")):
        registry.register(v)
    assert registry.build_order(["c"]) == ["a", "b", "c"]
    assert registry.build_order(["z", "b"]) == ["a", "b", "z"]
    assert registry.build_order(registry.REGISTRY) == ["a", "b", "c", "z"]
    registry.register(_variant("orphan", parent="not_there"))
    with pytest.raises(ValueError, match="variant orphan: parent 'not_there' is not registered"):
        registry.build_order(["orphan"])
    registry.register(_variant("p", parent="q"))
    registry.register(_variant("q", parent="p"))
    with pytest.raises(ValueError, match="p -> q -> p: the parents form a cycle"):
        registry.build_order(["p"])
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['nope'\]"):
        registry.build_order(["nope"])


def test_variant_modules_table(monkeypatch, tmp_path):
    """A missing optional module is fine; an ImportError inside an existing one is not hidden."""
    monkeypatch.setattr(registry, "REGISTRY", dict(REGISTRY))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "VARIANT_MODULES", (("dinov2_triton.export._no_such_variant_module", False),))
    assert registry.load_builtin_variants() == REGISTRY
    (tmp_path / "broken_variant_mod.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_loaded", False)
    monkeypatch.setattr(registry, "VARIANT_MODULES", (("broken_variant_mod", False),))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_installed"):
        registry.load_builtin_variants()
    monkeypatch.setattr(registry, "VARIANT_MODULES", (("dinov2_triton.export._no_such_variant_module", True),))
    with pytest.raises(ModuleNotFoundError):
        registry.load_builtin_variants()


# --------------------------------------------------------------------------- the tiny export
def test_tiny_export_verified_and_published(tiny_repository):
    from dinov2_triton.export.manifest import read_export_manifest

    raw = json.loads((tiny_repository / "export_manifest.json").read_text())
    assert raw["schema_version"] == 1 and "format_version" not in raw
    assert read_export_manifest(tiny_repository).variants["onnx"].status == "OK"
    assert raw["pretrained"] is False            # the checkpoint's boolean, not a guess from text
    manifest = raw
    assert manifest["exit_code"] == 0
    assert manifest["eval_set"]["split"] == "test" and manifest["eval_set"]["labelled"]
    assert len(manifest["source_checkpoint"]["sha256"]) == 64
    assert manifest["preprocessing"]["image_size"] == 28
    assert manifest["class_names"] == ["cat", "dog", "fox"]
    assert "torch" in manifest["versions"] and "onnxruntime" in manifest["versions"]
    assert manifest["baseline"]["benchmark"]["batch1"]["median_ms"] > 0
    for name, filename in (("torchscript", "model.pt"), ("onnx", "model.onnx")):
        v = manifest["variants"][name]
        assert v["status"] == "OK", v["reason"]
        assert v["published"] and v["version"] == 1 and v["gate_passed"]
        assert (tiny_repository / f"dinov2_{name}" / "1" / filename).is_file()
        assert v["size_bytes"] == (tiny_repository / f"dinov2_{name}" / "1" / filename).stat().st_size
        ver = v["verification"]
        assert set(ver["batch_sizes"]) == {"1", "8"}
        for parity in ver["batch_sizes"].values():
            assert parity["n"] == manifest["eval_set"]["n"] == 12
            assert parity["top1_agreement"] == 1.0
            assert parity["logits"]["max_abs_diff"] < 1e-3
            assert parity["embedding"]["cosine_min"] > 0.9999
            assert "accuracy" in parity["deltas"]
        assert ver["batch_consistency"]["logits"]["max_rel_diff"] <= 1e-4
        assert v["benchmark"]["batch1"]["iterations"] >= 3
        assert v["benchmark"]["batch8"]["img_per_s"] > 0
        assert v["speed"]["baseline"] == "eager pytorch"
        assert isinstance(v["slower_than_parent"], bool)
    assert manifest["ensemble"]["classifier"] == "dinov2_onnx"
    pre = tiny_repository / "dinov2_preprocess" / "1"
    # __pycache__ appears once a server or test has imported the model: not written by export
    assert sorted(p.name for p in pre.iterdir() if p.name != "__pycache__") == [
        "dinov2_image_limits.py", "dinov2_images.py", "dinov2_preprocessing.py", "model.py", "preprocessing.json"]
    assert json.loads((pre / "preprocessing.json").read_text()) == manifest["preprocessing"]
    warm = (tiny_repository / "dinov2_preprocess" / "warmup" / "sample_image").read_bytes()
    assert int.from_bytes(warm[:4], "little") == len(warm) - 4 and warm[5:8] == b"PNG"
    assert (tiny_repository / "dinov2" / "1").is_dir()
    assert not [p for p in tiny_repository.rglob(".staging-*")]


def test_export_manifest_record_reader(tiny_repository, tmp_path):
    """One reader: old files (format_version 1) still load; a bad file fails
    with one line naming the file and the field."""
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.export.manifest import ExportManifest, read_export_manifest, write_export_manifest

    raw = json.loads((tiny_repository / "export_manifest.json").read_text())
    m = read_export_manifest(tiny_repository / "export_manifest.json")
    assert isinstance(m, ExportManifest) and m.preprocess_config().image_size == m.img_size == 28
    assert list(m.published()) == ["torchscript", "onnx"] and m.ensemble.classifier == "dinov2_onnx"
    # round trip through the one writer is lossless
    write_export_manifest(m, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == raw

    def reads(data, name="export_manifest.json"):
        path = tmp_path / name
        path.write_text(json.dumps(data))
        return read_export_manifest(path)

    old = {k: v for k, v in raw.items() if k not in ("schema_version", "pretrained")}
    migrated = reads({**old, "format_version": 1}, "old.json")
    assert migrated.schema_version == 1 and migrated.pretrained is None
    assert migrated.variants["onnx"] == m.variants["onnx"]
    cases = [
        ({k: v for k, v in raw.items() if k != "img_size"}, "field 'img_size': missing (required)"),
        ({**raw, "schema_version": 7}, "field 'schema_version': 7 is newer than this code reads (1)"),
        (old, "field 'schema_version': missing"),
        ({**raw, "num_classes": "three"}, "field 'num_classes': Input should be a valid integer"),
        ({**raw, "variants": {**raw["variants"], "onnx": {**raw["variants"]["onnx"], "status": "FINE"}}},
         "field 'variants.onnx.status': Input should be 'OK', 'FAILED', 'SKIPPED' or 'GATE_FAILED'"),
        ({**raw, "img_size": 56}, "img_size 56 differs from preprocessing.image_size 28"),
        ({**raw, "surprise": 1}, "field 'surprise': unknown field"),
    ]
    for data, message in cases:
        with pytest.raises(RecordError) as info:
            reads(data)
        text = str(info.value)
        assert text.startswith(f"{tmp_path / 'export_manifest.json'}: ") and message in text, text
        assert "\n" not in text
    assert "regenerate it with: dinov2-triton export" in str(pytest.raises(RecordError, reads, old).value)
    with pytest.raises(FileNotFoundError, match="no such export manifest"):
        read_export_manifest(tmp_path / "nothing_here")
    assert read_export_manifest(tmp_path / "nothing_here", missing_ok=True) is None


def test_onnx_graph_contract(tiny_repository):
    import onnx
    import onnxruntime as ort

    path = tiny_repository / "dinov2_onnx" / "1" / "model.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["pixel_values"]
    assert [o.name for o in model.graph.output] == ["logits", "embedding"]

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
    ins, (lo, em) = dims(model.graph.input[0]), map(dims, model.graph.output)
    assert isinstance(ins[0], str) and ins[0] and ins[1:] == [3, 28, 28]
    assert isinstance(lo[0], str) and lo[1:] == [3] and em[1:] == [96]
    assert next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        lo, em = sess.run(None, {"pixel_values": np.zeros((batch, 3, 28, 28), np.float32)})
        assert lo.shape == (batch, 3) and em.shape == (batch, 96)


def test_check_io_rejects_auto_generated_names(tiny_repository):
    import onnx

    from dinov2_triton.export.variants.onnx import OnnxContractError, check_io

    model = onnx.load(str(tiny_repository / "dinov2_onnx" / "1" / "model.onnx"))
    model.graph.output[1].name = "308"
    with pytest.raises(OnnxContractError, match="outputs are"):
        check_io(model, image_size=28, num_classes=3, embed_dim=96)


# --------------------------------------------------------------------------- gates
def _corrupt(variant: Variant) -> Variant:
    def load_runner(path):
        run = variant.load_runner(path)

        def corrupted(x):
            lo, em = run(x)
            return lo[:, ::-1].copy(), em   # swapped classes: top-1 flips
        return corrupted
    return dataclasses.replace(variant, load_runner=load_runner)


def test_failed_verification_publishes_nothing(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    from dinov2_triton.export.pipeline import run_export

    monkeypatch.setitem(REGISTRY, "torchscript", _corrupt(REGISTRY["torchscript"]))
    repo = tmp_path / "repo"
    manifest = run_export(tiny_checkpoint, repo, data_path=tiny_dataset, variants="torchscript",
                          bench_seconds=0)
    v = manifest.variants["torchscript"]
    assert v.status == "GATE_FAILED" and not v.published and v.version is None
    assert "top-1 agreement" in v.reason and "flipped" in v.reason
    assert v.verification.batch_sizes["8"]["top1_agreement"] < 0.999
    assert v.verification.batch_sizes["8"]["flipped_examples"][0]["name"].startswith("images/test/")
    assert manifest.exit_code == 1
    assert not (repo / "dinov2_torchscript").exists()   # no version, no empty model folder
    assert manifest.ensemble.status == "SKIPPED" and not (repo / "dinov2").exists()
    on_disk = json.loads((repo / "export_manifest.json").read_text())
    assert on_disk["variants"]["torchscript"]["gate_failures"] == v.gate_failures

    # --allow-failed-gates publishes it, marked, and the run is accepted
    manifest = run_export(tiny_checkpoint, repo, data_path=tiny_dataset, variants="torchscript",
                          bench_seconds=0, allow_failed_gates=True)
    v = manifest.variants["torchscript"]
    assert v.status == "GATE_FAILED" and v.published and v.version == 1
    assert manifest.exit_code == 0


def test_impossible_gate_fails_through_cli(tiny_checkpoint, tiny_dataset, tmp_path, capsys):
    from dinov2_triton.export.cli import main

    repo = tmp_path / "repo"
    rc = main(["--model-path", str(tiny_checkpoint), "--repository", str(repo), "--data-path",
               str(tiny_dataset), "--variants", "torchscript", "--bench-seconds", "0", "-q",
               "--gates", "dinov2_torchscript.min_logit_cosine=1.5", "fp32.min_top1_agreement=1.0"])
    assert rc == 1
    captured = capsys.readouterr()
    manifest = json.loads((repo / "export_manifest.json").read_text())
    v = manifest["variants"]["torchscript"]
    assert v["status"] == "GATE_FAILED" and not v["published"]
    assert any("logit cosine" in f and "< 1.5" in f for f in v["gate_failures"])
    assert v["verification"]["gate"]["min_logit_cosine"] == 1.5
    assert v["verification"]["gate"]["min_top1_agreement"] == 1.0
    assert v["gate"] == "fp32+overrides"
    assert "GATE_FAILED" in captured.out


def test_batch_size_dependent_outputs_fail(tiny_checkpoint, tiny_dataset, tmp_path):
    from dinov2_triton.export.context import eager_runner
    from dinov2_triton.export.verify import verify_variant

    ctx = _ctx(tiny_checkpoint, tiny_dataset, tmp_path)
    eager = eager_runner(ctx.model)

    def batch_dependent(x):
        lo, em = eager(x)
        return lo + 0.05 * np.abs(lo).max() * (len(x) > 1), em
    result = verify_variant(ctx, REGISTRY["onnx"], batch_dependent, gates={})
    assert not result["passed"]
    assert any("batch 1 vs batch 8" in f for f in result["failures"])
    ok = verify_variant(ctx, REGISTRY["onnx"], eager, gates={})
    assert ok["passed"], ok["failures"]


def test_gate_overrides_one_parser_one_order():
    from dinov2_triton.export.gates import GATES, GateError, batch_tolerance, parse_gate_overrides, resolve_gate
    from dinov2_triton.export.registry import gate_scopes

    ov = parse_gate_overrides(["fp32.min_top1_agreement=0.99, onnx.max_accuracy_drop=none",
                               "dinov2_onnx.min_logit_cosine = 0.5", "batch.max_rel_diff=1e-3"],
                              scopes=gate_scopes())
    assert ov == {"fp32": {"min_top1_agreement": 0.99}, "onnx": {"max_accuracy_drop": None},
                  "dinov2_onnx": {"min_logit_cosine": 0.5}, "batch": {"max_rel_diff": 1e-3}}
    gate = resolve_gate(REGISTRY["onnx"], ov)   # precision, then variant name, then model name
    assert (gate.min_top1_agreement, gate.max_accuracy_drop, gate.min_logit_cosine) == (0.99, None, 0.5)
    assert gate.name == "fp32+overrides" and GATES["fp32"].min_top1_agreement == 0.999
    assert resolve_gate(REGISTRY["torchscript"], {}).min_top1_agreement == 0.999
    assert resolve_gate("dinov2_onnx", ov, precision="fp32").min_logit_cosine == 0.5
    assert resolve_gate("dinov2_x_bf16", precision="bf16").name == "bf16"   # gated like FP16
    assert resolve_gate("dinov2_x_bf16", precision="bf16").min_embedding_cosine == GATES["fp16"].min_embedding_cosine
    assert resolve_gate("dinov2_x_fp4", precision="fp4").name == "fp32"     # no gate of its own: fp32's
    assert batch_tolerance("fp32", ov) == {"max_rel_diff": 1e-3, "min_top1_agreement": 1.0}
    assert batch_tolerance("int8")["max_rel_diff"] == 5e-2
    result = gate.evaluate({"n": 4, "top1_agreement": 0.75, "flipped": 1, "embedding": {"cosine_mean": 1.0},
                            "logits": {"cosine_mean": 0.4, "max_abs_diff": 1.0}})
    assert not result.passed and result.to_dict()["gate"]["name"] == gate.name
    assert [f.split(" ")[0] for f in result.failures] == ["top-1", "logit"]
    for bad, message in (("fp32.min_top1_agreement", "expected SCOPE.FIELD=VALUE"),
                         ("nope.min_top1_agreement=1", "unknown scope 'nope'"),
                         ("fp32.speed=1", "unknown field 'speed'"),
                         ("batch.min_logit_cosine=1", "unknown field 'min_logit_cosine'"),
                         ("fp32.min_top1_agreement=abc", "'abc' is not a number"),
                         ("fp32.min_top1_agreement=-1", "finite number >= 0")):
        with pytest.raises(GateError, match=f"^--gates '{bad}': .*{message}"):
            parse_gate_overrides([bad], scopes=gate_scopes())
    with pytest.raises(GateError, match="unknown field 'max_rel_diff'"):   # dinov2_triton.qa.parity has no batch check
        parse_gate_overrides(["batch.max_rel_diff=1"], batch_scope=False)


# --------------------------------------------------------------------------- publishing
def test_versions_interrupted_publish_and_stale_staging(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    import dinov2_triton.export.repository as repository
    from dinov2_triton.export.pipeline import run_export

    repo = tmp_path / "repo"
    kw = dict(data_path=tiny_dataset, variants="torchscript", bench_seconds=0)
    assert run_export(tiny_checkpoint, repo, **kw).variants["torchscript"].version == 1
    model_dir = repo / "dinov2_torchscript"
    before = _tree_digest(model_dir)

    def interrupt(_path):
        raise KeyboardInterrupt   # after staging was written, before the rename
    with monkeypatch.context() as m:
        m.setattr(repository, "fsync_path", interrupt)
        with pytest.raises(KeyboardInterrupt):
            run_export(tiny_checkpoint, repo, **kw)
    assert _tree_digest(model_dir) == before          # version 1 and its config untouched
    assert repository.version_dirs(model_dir) == [1]
    assert not list(model_dir.glob(".staging-*"))

    # a kill -9 leftover: a staging folder of a dead process with a half-written file
    stale = model_dir / ".staging-999999-abcd"
    stale.mkdir()
    (stale / "model.pt").write_bytes(b"half")
    m2 = run_export(tiny_checkpoint, repo, **kw)
    assert not stale.exists()
    assert m2.variants["torchscript"].version == 2
    assert repository.version_dirs(model_dir) == [1, 2]
    assert _tree_digest(model_dir / "1") == {k[2:]: v for k, v in before.items() if k.startswith("1/")}
    m3 = run_export(tiny_checkpoint, repo, **kw, default_variant="onnx")   # keep_versions=2: version 1 goes
    assert m3.variants["torchscript"].version == 3
    assert repository.version_dirs(model_dir) == [2, 3]
    assert repository.version_dirs(repo / "dinov2_preprocess") == [2, 3]
    cfg = (repo / "dinov2" / "config.pbtxt").read_text()
    assert 'model_name: "dinov2_torchscript"' in cfg    # --default-variant onnx not built: fallback
    assert any("--default-variant onnx was not published" in w for w in m3.warnings)
    assert m3.ensemble.classifier == "dinov2_torchscript"
    # without --default-variant the registry's preference decides, without a warning
    assert "preferred ensemble variant" in m2.ensemble.classifier_reason and not m2.warnings


def test_parent_failure_skips_child(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    from dinov2_triton.export.pipeline import run_export

    def failing_build(ctx, path):
        raise RuntimeError("exporter exploded")

    def child_build(ctx, path):  # pragma: no cover - must not run
        raise AssertionError("child built although its parent failed")
    monkeypatch.setitem(REGISTRY, "torchscript", dataclasses.replace(REGISTRY["torchscript"], build=failing_build))
    monkeypatch.setitem(REGISTRY, "ts_child", Variant("ts_child", "pytorch_libtorch", "model.pt", "fp16",
                                                      build=child_build, load_runner=None,
                                                      parent="torchscript", gate="fp16"))
    manifest = run_export(tiny_checkpoint, tmp_path / "repo", data_path=tiny_dataset, variants="ts_child",
                          bench_seconds=0)
    assert manifest.added_as_parents == ["torchscript"]
    assert list(manifest.variants) == ["torchscript", "ts_child"]
    ts, child = manifest.variants["torchscript"], manifest.variants["ts_child"]
    assert ts.status == "FAILED" and "exporter exploded" in ts.reason and "RuntimeError" in ts.error
    assert child.status == "SKIPPED" and "parent torchscript FAILED" in child.reason
    assert manifest.exit_code == 1


def test_skip_variant_reason_keeps_exit_zero(tiny_checkpoint, tmp_path, monkeypatch):
    from dinov2_triton.export.pipeline import run_export

    def needs_gpu(ctx, path):
        raise SkipVariant("not built: needs an NVIDIA GPU and TensorRT")
    monkeypatch.setitem(REGISTRY, "torchscript", dataclasses.replace(REGISTRY["torchscript"], build=needs_gpu))
    manifest = run_export(tiny_checkpoint, tmp_path / "repo", variants="torchscript", bench_seconds=0)
    v = manifest.variants["torchscript"]
    assert v.status == "SKIPPED" and v.reason == "not built: needs an NVIDIA GPU and TensorRT"
    assert manifest.exit_code == 0
    assert manifest.eval_set.synthetic  # no --data-path: loud random-input verification
    assert any("RANDOM" in w for w in manifest.warnings)


# --------------------------------------------------------------------------- data access
def test_calibration_uses_only_train_split(tiny_checkpoint, tiny_dataset, tmp_path):
    from dinov2_triton.core.preprocessing import preprocess_source
    from dinov2_triton.data.datasets import read_manifest

    ctx = _ctx(tiny_checkpoint, tiny_dataset, tmp_path)
    split_of = {r.path: r.split for r in read_manifest(tiny_dataset)}
    x = ctx.calibration_images(4, seed=1)
    assert x.shape == (4, 3, 28, 28) and x.dtype == np.float32
    assert {split_of[p] for p in ctx.calibration_files} == {"train"} and ctx.calibration_splits == {"train"}
    np.testing.assert_array_equal(x[0], preprocess_source(tiny_dataset / ctx.calibration_files[0],
                                                          ctx.preprocessing))
    everything = ctx.calibration_images(10_000)          # more than exist: all train images, no others
    n_train = sum(s == "train" for s in split_of.values())
    assert len(everything) == n_train
    assert not set(ctx.calibration_files) & set(ctx.eval_set().names)
    assert {split_of[n] for n in ctx.eval_set().names} == {"test"}
    with pytest.raises(SkipVariant, match="--data-path"):
        _ctx(tiny_checkpoint, None, tmp_path).calibration_images(4)


def test_eval_set_falls_back_to_val(tiny_checkpoint, tiny_dataset, tmp_path, caplog):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data, symlinks=True)
    lines = (data / "manifest.csv").read_text().splitlines()
    (data / "manifest.csv").write_text("\n".join(line for line in lines if ",test," not in line) + "\n")
    ctx = _ctx(tiny_checkpoint, data, tmp_path)
    es = ctx.eval_set()
    assert es.split == "val" and len(es) == 6 and "no test split" in es.notes[0]
    assert "no test split" in caplog.text
    parity = ctx.evaluate(lambda x: ctx.reference_outputs() if len(x) == len(es) else None,
                          batch_size=len(es))
    assert parity["top1_agreement"] == 1.0 and parity["deltas"]["accuracy"] == 0.0


# --------------------------------------------------------------------------- preprocessing model
def _load_preprocess_module(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _FakeTensor:
    def __init__(self, name, data):
        self._name, self._data = name, data

    def as_numpy(self):
        return self._data


def _fake_pb_utils():
    """The parts of triton_python_backend_utils the model uses."""
    class TritonError:
        def __init__(self, msg):
            self._msg = msg

        def message(self):
            return self._msg

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    return types.SimpleNamespace(
        Tensor=_FakeTensor, TritonError=TritonError, InferenceResponse=InferenceResponse,
        get_input_tensor_by_name=lambda req, name: req.get(name))


def test_preprocess_model_matches_reference_and_isolates_bad_requests(tiny_checkpoint):
    from dinov2_triton.core.preprocessing import preprocess_source
    from dinov2_triton.train.checkpoint import read_checkpoint
    from tests.fixtures.images import jpeg_bytes, png_bytes

    mod = _load_preprocess_module(resource_path("dinov2_triton.serve", "preprocess_model", "model.py"), "_pre_src")
    cfg = read_checkpoint(tiny_checkpoint).preprocessing
    good = [png_bytes((40, 31), seed=1), jpeg_bytes((33, 50), seed=2)]
    out = mod.preprocess_images(np.array([[g] for g in good], dtype=object), cfg)
    np.testing.assert_array_equal(out, np.stack([preprocess_source(g, cfg) for g in good]))
    assert out.dtype == np.float32 and out.shape == (2, 3, 28, 28)

    utils = _fake_pb_utils()
    requests = [{"image": _FakeTensor("image", np.array(arr, dtype=object))}
                for arr in ([[b"not an image at all"], [good[0]]], [[good[1]]], [[b""]])]
    r_bad, r_ok, r_empty = mod.execute_requests(requests, cfg, utils)
    assert r_bad.error is not None and r_bad.output_tensors == []
    assert r_bad.error.message().startswith("image 0 of request: not a decodable image (")
    assert r_ok.error is None
    np.testing.assert_array_equal(r_ok.output_tensors[0].as_numpy(), out[1:])
    assert r_ok.output_tensors[0]._name == "pixel_values"
    assert "image 0 of request: empty image data" in r_empty.error.message()


def test_published_preprocess_model_is_self_contained(tiny_repository):
    version = tiny_repository / "dinov2_preprocess" / "1"
    mod = _load_preprocess_module(version / "model.py", "_pre_published")
    try:
        assert Path(mod.images.__file__).parent == version
        assert Path(mod.preprocessing.__file__).parent == version
        cfg = mod.load_record(str(version))
        assert cfg.image_size == 28
        src = (version / "model.py").read_text() + (version / "dinov2_preprocessing.py").read_text()
        assert "from train" not in src.replace("from dinov2_triton.core.images import open_rgb", "")
    finally:
        sys.modules.pop("dinov2_images", None)
        sys.modules.pop("dinov2_preprocessing", None)


# --------------------------------------------------------------------------- benchmark and CLI
def test_benchmark_and_slower_flag():
    from dinov2_triton.export.benchmark import benchmark_runner, compare

    x = np.zeros((3, 3, 4, 4), np.float32)
    res = benchmark_runner(lambda b: (b.sum((1, 2, 3))[:, None], b[:, 0, 0]), x, seconds=0.1)
    assert res["batch1"]["iterations"] >= 3 and res["batch8"]["batch_size"] == 8
    assert benchmark_runner(lambda b: b, x, seconds=0) is None
    fast = {"throughput_batch": 8, "batch1": {"median_ms": 10.0}, "batch8": {"img_per_s": 100.0}}
    slow = {"throughput_batch": 8, "batch1": {"median_ms": 12.0}, "batch8": {"img_per_s": 99.0}}
    c = compare(slow, fast, baseline_name="onnx")
    assert c["slower_than_parent"] and "batch-1 latency" in c["detail"] and "throughput" not in c["detail"]
    assert not compare(fast, slow, baseline_name="x")["slower_than_parent"]


@pytest.mark.parametrize("argv, message", [
    (["--model-path", "/nonexistent/model_final.pth"], "checkpoint not found"),
    (["--model-path", "CKPT", "--variants", "torchscript,tensorflow"], "unknown ['tensorflow']"),
    (["--model-path", "CKPT", "--preferred-batch-sizes", "4,16"], "--preferred-batch-sizes [16]"),
    (["--model-path", "CKPT", "--gates", "fp32.min_top1=1"], "unknown field 'min_top1'"),
    (["--model-path", "CKPT", "--accuracy-budget", "-1"], "--accuracy-budget -1.0: must be"),
    (["--model-path", "CKPT", "--opset", "13"], "--opset 13"),
    (["--model-path", "CKPT", "--data-path", "/nonexistent/data"], "--data-path /nonexistent/data"),
])
def test_cli_bad_input_exits_2(argv, message, tiny_checkpoint, tmp_path, capsys):
    from dinov2_triton.export.cli import main

    argv = [str(tiny_checkpoint) if a == "CKPT" else a for a in argv]
    assert main(argv + ["--repository", str(tmp_path / "repo")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "repo" / "export_manifest.json").exists()


def test_cli_help_is_fast_and_has_groups():
    import subprocess
    import time

    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "dinov2_triton.cli", "export", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "Required" in out.stdout and "--allow-failed-gates" in out.stdout
    assert time.perf_counter() - t < 10
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, dinov2_triton.export.cli; print(' '.join(sys.modules))"], cwd=ROOT,
        capture_output=True, text=True, timeout=60).stdout.split()
