"""FP16 and INT8 ONNX variants on the tiny model (28 px) through the real
export pipeline: gates computed, calibration from the train split only,
FP32 I/O names, the accuracy-budget search stopping and recording its
attempts, and the TensorRT variants SKIPPED (with the reason) where TensorRT
is missing. ModelOpt itself runs in child processes."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.export.gates import GATES, Gate
from dinov2_triton.export.quant_search import Candidate, parity_summary, run_search, search_gate

# --------------------------------------------------------------------------- fixtures
OPTIONS = dict(bench_seconds=0.2, max_batch_size=8, preferred_batch_sizes=(4, 8), calib_size=512)
#: thresholds no model can meet (cosine > 1): every gate fails
IMPOSSIBLE_GATES = ["fp16.min_logit_cosine=1.5", "onnx_int8.min_logit_cosine=1.5"]
IMPOSSIBLE_TEST = "test_impossible_gates_fail_and_the_search_records_every_attempt"
#: _export in a child process: argv[1] is JSON {checkpoint, repository, data, variants, options}
_EXPORT_CHILD = """
import json, sys
sys.modules["tensorrt"] = None   # as _export: the same result on GPU hosts
from dinov2_triton.export.pipeline import run_export
a = json.loads(sys.argv[1])
run_export(a["checkpoint"], a["repository"], data_path=a["data"], variants=a["variants"], **a["options"])
"""


def _export(checkpoint, dataset, repo, variants, **options):
    from dinov2_triton.export.pipeline import run_export

    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", None)   # same result on GPU hosts: the skip path is tested
        return run_export(checkpoint, repo, data_path=dataset, variants=variants, **OPTIONS, **options)


@pytest.fixture(scope="module")
def optimized(tmp_path_factory, tiny_checkpoint, tiny_dataset):
    repo = tmp_path_factory.mktemp("opt") / "model_repository"
    manifest = _export(tiny_checkpoint, tiny_dataset, repo, "onnx_fp16,onnx_int8,trt_fp16,trt_int8")
    return repo, manifest.to_dict()


@pytest.fixture(scope="module")
def impossible_export(tmp_path_factory, tiny_checkpoint, tiny_dataset):
    """The impossible gates' export (_export in a child process), started, not waited for:
    (repository, process, log folder)."""
    import json
    import subprocess

    repo = tmp_path_factory.mktemp("impossible") / "model_repository"
    logs = tmp_path_factory.mktemp("impossible_logs")
    args = dict(checkpoint=str(tiny_checkpoint), repository=str(repo), data=str(tiny_dataset),
                variants="onnx_fp16,onnx_int8", options={**OPTIONS, "gates": IMPOSSIBLE_GATES})
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", _EXPORT_CHILD, json.dumps(args)],
                                cwd=Path(__file__).resolve().parents[1], stdout=out, stderr=err, text=True)
    try:
        yield repo, proc, logs
    finally:
        if proc.poll() is None:       # the module ended before the test waited for it
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _impossible_export_beside_the_module(request):
    """Starts the impossible gates' export with the module's first test when its test is
    selected, so that it runs beside the `optimized` export (each mostly on one core: tracing
    and ModelOpt's child processes) instead of after it; not started otherwise (-m unit)."""
    if any(item.name == IMPOSSIBLE_TEST and getattr(item, "module", None) is request.module
           for item in request.session.items):
        request.getfixturevalue("impossible_export")


@pytest.fixture(scope="module")
def impossible(impossible_export):
    """Thresholds no model can meet (cosine > 1): every gate fails. (repository, the manifest it
    wrote, as a dict)."""
    import subprocess

    from dinov2_triton.export.manifest import read_export_manifest

    repo, proc, logs = impossible_export
    try:
        proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    # run_export returns normally when gates fail (the manifest's exit_code says 1); a crash does not
    assert proc.returncode == 0, (logs / "stderr").read_text()[-3000:]
    return repo, read_export_manifest(repo).to_dict()


def _io(path: Path):
    import onnx

    m = onnx.load(str(path))
    return m, [(v.name, v.type.tensor_type.elem_type) for v in list(m.graph.input) + list(m.graph.output)]


def _run(path: Path, x: np.ndarray):
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(["logits", "embedding"], {"pixel_values": x})


# --------------------------------------------------------------------------- the real exports
@pytest.mark.slow
def test_fp16_variant_verified_fp32_io_and_kept_layers(optimized, tiny_dataset):
    import onnx

    repo, manifest = optimized
    v = manifest["variants"]["onnx_fp16"]
    assert v["status"] == "OK", v["reason"]
    assert v["gate"] == "fp16" and v["gate_passed"] and v["published"]
    assert v["verification"]["batch_sizes"]["8"]["top1_agreement"] >= GATES["fp16"].min_top1_agreement
    path = repo / "dinov2_onnx_fp16" / "1" / "model.onnx"
    model, io = _io(path)
    assert io == [("pixel_values", onnx.TensorProto.FLOAT), ("logits", onnx.TensorProto.FLOAT),
                  ("embedding", onnx.TensorProto.FLOAT)]
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer), "no FP16 weights inside"
    info = v["build_info"]
    kept = info["conversion"]["fp32_nodes_by_op"]
    assert kept.get("LayerNormalization", 0) >= 5 and kept.get("Softmax", 0) == 2   # 2 blocks: 2x2 + final norm
    assert len(info["keep_fp32_nodes"]) == 2 and kept.get("Gemm") == 1 and kept.get("Conv") == 1  # head, patch embed
    assert info["range_check_on"] == "4 train images"
    x = np.random.default_rng(0).standard_normal((3, 3, 28, 28)).astype(np.float32)
    logits, emb = _run(path, x)
    assert logits.dtype == np.float32 and logits.shape == (3, 3) and emb.shape == (3, 96)


@pytest.mark.slow
def test_int8_variant_calibrated_on_train_split_only(optimized, tiny_dataset):
    import onnx

    from dinov2_triton.export.quant_graph import node_roles, quantized_nodes

    repo, manifest = optimized
    v = manifest["variants"]["onnx_int8"]
    assert v["status"] == "OK", v["reason"]
    assert v["gate"] == "int8" and v["gate_passed"]
    with open(tiny_dataset / "manifest.csv", newline="") as fh:
        split_of = {r["path"]: r["split"] for r in csv.DictReader(fh)}
    n_train = sum(s == "train" for s in split_of.values())
    info = v["build_info"]
    # asked for 512, capped at the train split (18 images)
    assert info["calibration"] == {**info["calibration"], "images": n_train, "split": "train",
                                   "requested_images": 512}
    assert v["calibration_files"]["splits"] == ["train"]
    cal = manifest["calibration"]
    assert cal["splits"] == ["train"] and cal["files_sample"]
    assert all(split_of[f] == "train" for f in cal["files_sample"])

    path = repo / "dinov2_onnx_int8" / "1" / "model.onnx"
    model, io = _io(path)
    assert [n for n, _ in io] == ["pixel_values", "logits", "embedding"]
    assert {t for _, t in io} == {onnx.TensorProto.FLOAT}
    fp32 = onnx.load(str(repo / "dinov2_onnx" / "1" / "model.onnx"))
    roles = {r.name: r.role for r in node_roles(fp32)}
    q = quantized_nodes(model)
    assert sorted(roles[n] for n in q) == sorted(["qkv", "proj", "fc1", "fc2"] * 2)
    op_of = {n.name: n.op_type for n in model.graph.node}
    assert not {op_of[n] for n in q} & {"LayerNormalization", "Softmax", "Add", "Erf", "Mul", "Gemm", "Conv"}
    assert any(i.data_type == onnx.TensorProto.INT8 for i in model.graph.initializer)   # int8 weights stored
    search = info["search"]
    assert search["passed"] and search["n_attempts"] == 1 and search["chosen"] == "default"
    assert search["attempts"][0]["parity"]["top1_agreement"] >= 0.99
    x = np.random.default_rng(1).standard_normal((2, 3, 28, 28)).astype(np.float32)
    logits, emb = _run(path, x)
    assert logits.shape == (2, 3) and emb.shape == (2, 96)


@pytest.mark.slow
def test_tensorrt_variants_skipped_with_reason(optimized):
    repo, manifest = optimized
    assert manifest["exit_code"] == 0
    for name in ("trt_fp16", "trt_int8"):
        v = manifest["variants"][name]
        assert v["status"] == "SKIPPED" and not v["published"]
        assert v["reason"].startswith("not built: needs an NVIDIA GPU and TensorRT (tensorrt not importable")
        assert not (repo / f"dinov2_{name}").exists()


@pytest.mark.slow
def test_impossible_gates_fail_and_the_search_records_every_attempt(impossible):
    repo, manifest = impossible
    assert manifest["exit_code"] == 1
    fp16 = manifest["variants"]["onnx_fp16"]
    assert fp16["status"] == "GATE_FAILED" and not fp16["published"]
    assert "logit cosine" in fp16["reason"]
    v = manifest["variants"]["onnx_int8"]
    assert v["status"] == "GATE_FAILED" and not v["published"]
    assert not (repo / "dinov2_onnx_int8").exists() and not (repo / "dinov2_onnx_fp16").exists()
    search = v["build_info"]["search"]
    assert not search["passed"] and search["stopped_because"] == "no more configurations to try"
    labels = [a["label"] for a in search["attempts"]]
    # 2 blocks: default, fc2 of the last block, + the most sensitive block, then the other calibration method
    assert labels[:2] == ["default", "fp32 fc2 in last 1 block(s)"]
    assert labels[2].startswith("+ fp32 top-1 sensitive block(s)")
    first = search["attempts"][0]["config"]["calib_method"]
    other = {"entropy": "max", "max": "entropy"}[first]
    assert labels[3:] == [f"calibration {other}", f"calibration {other}, most conservative"]
    for a in search["attempts"]:
        assert a["passed"] is False and a["failures"] and a["seconds"] >= 0
        assert a["parity"]["top1_agreement"] is not None and "calib_method" in a["config"]
    assert search["attempts"][1]["config"]["fp32_nodes"] == ["block 1 fc2"]
    assert search["gate"]["min_logit_cosine"] == 1.5
    assert search["chosen"] in labels and search["sensitivity"][0]["block"] in (0, 1)
    assert set(v["build_info"]["modelopt_runs"]) == {"entropy", "max"}


# --------------------------------------------------------------------------- graph roles and Q/DQ surgery
@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import torch

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import export_onnx
    from tests.fixtures.models import scale_head, tiny_model

    d = tmp_path_factory.mktemp("tiny_onnx")
    model = scale_head(tiny_model())
    paths = {}
    for exporter in ("dynamo", "legacy"):
        paths[exporter] = d / f"{exporter}.onnx"
        export_onnx(export_module(model), torch.randn(2, 3, 28, 28), paths[exporter], exporter=exporter)
    return paths


EXPECTED_ROLES = ([("patch_embed", None)]
                  + [(r, b) for b in (0, 1) for r in ("qkv", "attn_qk", "attn_v", "proj", "fc1", "fc2")]
                  + [("head", None)])


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_node_roles_from_module_names_and_structure(tiny_onnx, exporter):
    import onnx

    from dinov2_triton.export.quant_graph import node_roles, select_nodes

    model = onnx.load(str(tiny_onnx[exporter]))
    assert [(r.role, r.block) for r in node_roles(model)] == EXPECTED_ROLES
    # without metadata or meaningful names the LayerNorm order still tells the roles apart
    for i, node in enumerate(model.graph.node):
        del node.metadata_props[:]
        node.name = f"n{i}"
    roles = node_roles(model)
    assert [(r.role, r.block) for r in roles] == EXPECTED_ROLES
    assert len(select_nodes(roles, ("qkv", "proj", "fc1", "fc2"))) == 8
    assert len(select_nodes(roles, ("fc2",), exclude={(1, "fc2")})) == 1
    assert select_nodes(roles, ("qkv", "fc1"), exclude_blocks={0}) == [r.name for r in roles
                                                                       if r.block == 1 and r.role in ("qkv", "fc1")]


def test_strip_qdq_restores_fp32_exactly(optimized, tmp_path):
    import onnx

    from dinov2_triton.export.quant_graph import quantized_nodes, strip_qdq

    repo, _ = optimized
    fp32_path = repo / "dinov2_onnx" / "1" / "model.onnx"
    q = onnx.load(str(repo / "dinov2_onnx_int8" / "1" / "model.onnx"))
    originals = {i.name: i for i in onnx.load(str(fp32_path)).graph.initializer}
    nodes = quantized_nodes(q)
    full = strip_qdq(q, nodes, originals)
    assert not [n for n in full.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    partial = strip_qdq(q, nodes[:3], originals)
    assert len(quantized_nodes(partial)) == len(nodes) - 3
    x = np.random.default_rng(2).standard_normal((4, 3, 28, 28)).astype(np.float32)
    ref = _run(fp32_path, x)
    onnx.save(full, str(tmp_path / "stripped.onnx"))
    out = _run(tmp_path / "stripped.onnx", x)
    np.testing.assert_allclose(out[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], ref[1], rtol=1e-5, atol=1e-5)


def test_parse_roles_and_keep_lists(tiny_onnx):
    import onnx

    from dinov2_triton.export.quant_graph import parse_roles
    from dinov2_triton.export.variants.onnx_fp16 import resolve_keep_list

    assert parse_roles("qkv,proj,mha") == ("qkv", "proj", "attn_qk", "attn_v")
    with pytest.raises(ValueError, match="unknown role 'attention'"):
        parse_roles("qkv,attention")
    model = onnx.load(str(tiny_onnx["dynamo"]))
    ops, nodes = resolve_keep_list(model, "LayerNormalization,Softmax,head,Conv,BatchNormalization")
    assert ops == ["LayerNormalization", "Softmax", "Conv"]   # ops absent from the graph are dropped
    assert len(nodes) == 1 and "Gemm" in nodes[0]
    _, nodes = resolve_keep_list(model, "node_MatMul_1\\d$")
    assert nodes and all(n.startswith("node_MatMul_1") for n in nodes)
    with pytest.raises(ValueError, match="matches no node name"):
        resolve_keep_list(model, "no_such_node")


# --------------------------------------------------------------------------- the search itself
def _parity(agreement: float, cosine: float = 0.999) -> dict:
    return {"n": 100, "top1_agreement": agreement, "flipped": round((1 - agreement) * 100),
            "logits": {"cosine_mean": cosine, "max_abs_diff": 0.1, "non_finite": False},
            "embedding": {"cosine_mean": cosine}, "deltas": {"accuracy": agreement - 1.0}}


def _cands(results: list, made: list, lazy_calls: list | None = None):
    def gen():
        for i, (label, agreement) in enumerate(results):
            if i == 2 and lazy_calls is not None:
                lazy_calls.append(i)          # stands for the expensive sensitivity analysis
            yield Candidate(label, {"i": i, "agreement": agreement},
                            lambda p, i=i: (made.append(i), Path(p).write_text(str(i))))
    return gen()


def test_search_stops_at_the_first_passing_configuration(tmp_path):
    made, lazy = [], []
    scores = {0: 0.95, 1: 0.995, 2: 1.0}
    res = run_search(_cands([("a", 0.95), ("b", 0.995), ("c", 1.0)], made, lazy),
                     evaluate=lambda p: _parity(scores[int(Path(p).read_text())]),
                     gate=GATES["int8"], work_dir=tmp_path)
    assert res.passed and res.chosen == 1 and made == [0, 1] and lazy == []
    d = res.to_dict()
    assert d["chosen"] == "b" and d["n_attempts"] == 2 and d["stopped_because"] == "gate passed"
    assert [a["passed"] for a in d["attempts"]] == [False, True]
    assert "top-1 agreement" in d["attempts"][0]["failures"][0]
    assert "path" not in d["attempts"][0]


def test_search_records_every_failing_attempt_and_keeps_the_best(tmp_path):
    made = []
    impossible = Gate(name="impossible", min_logit_cosine=1.5)
    agreements = [0.9, 0.97, 0.96]
    res = run_search(_cands([(f"c{i}", a) for i, a in enumerate(agreements)], made),
                     evaluate=lambda p: _parity(agreements[int(Path(p).read_text())]),
                     gate=impossible, work_dir=tmp_path)
    assert not res.passed and made == [0, 1, 2] and len(res.attempts) == 3
    assert res.chosen == 1 and res.stopped_because == "no more configurations to try"
    assert all(a["failures"] == ["logit cosine 0.999000 < 1.5"] for a in res.attempts)


def test_search_limits_duplicates_and_errors(tmp_path):
    def gen():
        yield Candidate("broken", {"x": 0}, lambda p: (_ for _ in ()).throw(RuntimeError("boom")))
        yield Candidate("a", {"x": 1}, lambda p: Path(p).write_text("1"), key="same")
        yield Candidate("a again", {"x": 2}, lambda p: Path(p).write_text("2"), key="same")
        yield Candidate("b", {"x": 3}, lambda p: Path(p).write_text("3"))
        yield Candidate("c", {"x": 4}, lambda p: Path(p).write_text("4"))
    res = run_search(gen(), evaluate=lambda p: _parity(0.5), gate=GATES["int8"], work_dir=tmp_path, max_attempts=3)
    labels = [a["label"] for a in res.attempts]
    assert labels == ["broken", "a", "b"] and res.stopped_because == "reached the maximum of 3 attempts"
    assert res.attempts[0]["error"] == "RuntimeError: boom" and res.chosen == 1


def test_search_gate_is_the_verification_gate():
    from dinov2_triton.export.gates import parse_gate_overrides, resolve_gate, with_accuracy_budget
    from dinov2_triton.export.registry import gate_scopes, get_variant

    variant = get_variant("onnx_int8")
    g = search_gate(variant, {"gates": ["int8.min_top1_agreement=0.95"], "accuracy_budget": 0.005})
    assert g.min_top1_agreement == 0.95 and g.max_accuracy_drop == 0.005
    assert search_gate(variant, {"accuracy_budget": 0.01}) == GATES["int8"]   # the default budget
    for opts in ({"accuracy_budget": 0.05}, {"gates": ["int8.max_accuracy_drop=0.002"], "accuracy_budget": 0.05},
                 {"gates": ["onnx_int8.max_accuracy_drop=none"], "accuracy_budget": 0.02}):
        # exactly what the pipeline verifies with (dinov2_triton.export.pipeline.run_export resolves the same way)
        verify = resolve_gate(variant, with_accuracy_budget(parse_gate_overrides(opts.get("gates"),
                                                                                 scopes=gate_scopes()),
                                                            opts["accuracy_budget"]))
        assert search_gate(variant, opts) == verify
    assert search_gate(variant, {"accuracy_budget": 0.05}).max_accuracy_drop == 0.05
    assert search_gate(variant, {"gates": ["int8.max_accuracy_drop=0.002"],
                                 "accuracy_budget": 0.05}).max_accuracy_drop == 0.002   # explicit wins
    assert search_gate(variant, {"gates": ["onnx_int8.max_accuracy_drop=none"],
                                 "accuracy_budget": 0.02}).max_accuracy_drop is None
    with pytest.raises(ValueError, match="accuracy-budget"):
        search_gate(variant, {"accuracy_budget": -1})
    assert parity_summary(_parity(0.99))["accuracy_delta"] == pytest.approx(-0.01)


def test_ladder_order_and_lazy_sensitivity():
    from dinov2_triton.export.variants.onnx_int8 import ladder

    calls = []

    def sensitivity():
        calls.append(1)
        return [{"block": b} for b in (7, 3, 11, 0, 5, 1, 2, 4, 6, 8, 9, 10)]
    steps = ladder(12, ["entropy", "max"], sensitivity)
    first = [next(steps), next(steps)]
    assert [s[0] for s in first] == ["default", "fp32 fc2 in last 3 block(s)"] and not calls
    assert first[1][2] == {(9, "fc2"), (10, "fc2"), (11, "fc2")}
    rest = list(steps)
    assert [s[3] for s in rest[:4]] == [{7}, {7, 3}, {7, 3, 11, 0}, {7, 3, 11, 0, 5, 1}]
    assert [(s[0], s[1]) for s in rest[4:]] == [("calibration max", "max"),
                                                ("calibration max, most conservative", "max")]
    assert rest[5][3] == {7, 3, 11, 0, 5, 1} and len(calls) == 4
    assert [s[3] for s in ladder(2, ["max"], sensitivity)][2:] == [{7}]


def test_modelopt_worker_failure_is_reported_with_its_log(tmp_path):
    from dinov2_triton.export.modelopt_worker import run_modelopt_quantize
    from dinov2_triton.export.quant_graph import Int8Error

    (tmp_path / "m.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(Int8Error, match=r"(?s)exit 2.*--calib .*missing\.npy: file not found"):
        run_modelopt_quantize(tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "missing.npy", ["n"],
                              calib_method="entropy", timeout_s=120)
    assert not (tmp_path / "out.onnx").exists()
