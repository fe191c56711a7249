"""The CPU variants (issue 13): ONNX Runtime dynamic INT8, OpenVINO FP32 and
NNCF INT8, the OpenVINO stand-in backend, and `--variants auto` (the default).

Tiny model (2 blocks, 28 px), tiny data, temp folders; the served checks
run the real local Triton server. No timed asserts: speed is measured by
the cpu-sweep recipe, not tested here."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from dinov2_triton.export.registry import get_variant, load_builtin_variants

ROOT = Path(__file__).resolve().parents[1]
load_builtin_variants()
CPU_VARIANTS = "onnx,onnx_int8_dynamic,openvino,openvino_int8"
N_WEIGHT_MATMULS = 2 * 4   # TINY has 2 blocks: qkv, proj, fc1, fc2 each


def _ctx(checkpoint, data_path, tmp_path, **options):
    from dinov2_triton.export.context import ExportContext
    from dinov2_triton.train.model import load_classifier

    model, record = load_classifier(checkpoint)
    return ExportContext(model, record, data_path=data_path, work_dir=tmp_path / "work",
                         options={"max_batch_size": 8, **options})


@pytest.fixture(scope="module")
def cpu_repository(tiny_checkpoint, tiny_dataset, tmp_path_factory):
    """One export through the CLI with its default variants (auto: on this CPU host the CPU candidates)."""
    from dinov2_triton.export.cli import main

    repo = tmp_path_factory.mktemp("cpu_repo")
    code = main(["--model-path", str(tiny_checkpoint), "--repository", str(repo), "--data-path",
                 str(tiny_dataset), "--bench-seconds", "0.5", "-q"])
    assert code == 0
    return repo


# --------------------------------------------------------------------------- registry and config
def test_variants_declared_with_their_parents_and_backends():
    from dinov2_triton.export.auto import candidates

    dyn, ov32, ov8 = (get_variant(n) for n in ("onnx_int8_dynamic", "openvino", "openvino_int8"))
    assert (dyn.parent, dyn.platform, dyn.precision, dyn.gate) == ("onnx", "onnxruntime_onnx", "int8", "int8")
    assert (ov32.parent, ov32.platform, ov32.filename, ov32.gate) == ("onnx", "openvino", "model.xml", "fp32")
    assert (ov8.parent, ov8.platform, ov8.precision, ov8.gate) == ("openvino", "openvino", "int8", "int8")
    cands = candidates(gpu=False)
    assert {"torchscript", "onnx", "onnx_int8", "onnx_int8_dynamic", "openvino", "openvino_int8",
            "openvino_bf16", "onnx_fp16"} <= set(cands)
    assert not [c for c in cands if get_variant(c).platform == "tensorrt_plan"]
    # on a GPU host auto adds the TensorRT builders (SKIPPED with their reason where TensorRT is missing)
    gpu_only = set(candidates(gpu=True)) - set(cands)
    assert {"trt_fp16", "trt_int8"} <= gpu_only and {get_variant(n).platform for n in gpu_only} == {"tensorrt_plan"}


def test_bf16_variant_is_declared_gated_like_fp16_and_asks_the_backend_for_bf16():
    from dinov2_triton.export.gates import GATES, resolve_gate
    from dinov2_triton.export.variants.openvino import compile_properties, runtime_parameters

    bf16 = get_variant("openvino_bf16")
    assert (bf16.parent, bf16.platform, bf16.filename, bf16.precision) == ("openvino", "openvino", "model.xml", "bf16")
    gate = resolve_gate(bf16)
    assert gate.name == "bf16"
    assert (gate.min_top1_agreement, gate.min_embedding_cosine) == (GATES["fp16"].min_top1_agreement,
                                                                    GATES["fp16"].min_embedding_cosine)
    params = runtime_parameters({}, bf16=True)
    assert params["HINT_BF16"] == "YES" and "HINT_BF16" not in runtime_parameters({})
    assert compile_properties(params)["INFERENCE_PRECISION_HINT"] == "bf16"
    assert "INFERENCE_PRECISION_HINT" not in compile_properties(runtime_parameters({}))


@pytest.mark.parametrize("flags, builds", [
    ({"avx2", "fma"}, False),                                         # this kind of EPYC
    ({"avx2", "avx512f", "avx512_vnni"}, False),                      # AVX-512 VNNI, no BF16
    ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, True),         # AVX-512 BF16
    ({"avx2", "avx512f", "amx_tile", "amx_int8", "amx_bf16"}, True),   # AMX
])
def test_bf16_variant_is_built_only_where_the_cpu_has_bf16(flags, builds):
    from dinov2_triton.export.registry import SkipVariant
    from dinov2_triton.export.variants.openvino import bf16_gate

    if builds:
        bf16_gate(flags)
    else:
        with pytest.raises(SkipVariant) as exc:
            bf16_gate(flags)
        assert str(exc.value) == "not built: this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16)"


def test_auto_expands_to_the_hosts_candidates_and_named_variants_stay_exact():
    from dinov2_triton.export.auto import candidates, expand
    from dinov2_triton.export.pipeline import ExportInputError, resolve_variants

    assert expand(["onnx", "torchscript"]) == (["onnx", "torchscript"], {})
    got, implied = expand(["trt_fp16", "auto"], gpu=False)
    assert got == ["trt_fp16"] + candidates(gpu=False) and implied == {"ensemble_choice": "fastest"}
    # the export's default is auto; names are built exactly as named (parents added)
    order, added, implied = resolve_variants(None)
    assert set(order) == set(candidates()) and implied == {"ensemble_choice": "fastest"} and not added
    order, added, implied = resolve_variants("onnx_int8")
    assert order == ["onnx", "onnx_int8"] and added == ["onnx"] and implied == {}
    with pytest.raises(ExportInputError, match="unknown.*'auto' or 'all'"):
        resolve_variants("cpu-auto")


def test_openvino_config_names_the_backend_and_its_parameters():
    from dinov2_triton.export.triton_config import ConfigError, classifier_config, openvino_parameters, validate_config
    from dinov2_triton.export.variants.openvino import runtime_parameters

    cfg = classifier_config(get_variant("openvino"), image_size=28, num_classes=3, embed_dim=48, max_batch_size=8,
                            parameters=runtime_parameters({"ov_threads": 1}))
    text = validate_config(cfg)
    assert 'backend: "openvino"' in text and "platform:" not in text
    assert cfg.default_model_filename == "model.xml"
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["PERFORMANCE_HINT"] == "LATENCY" and params["NUM_STREAMS"] == "1"
    assert params["INFERENCE_NUM_THREADS"] == "1" and params["ENABLE_BATCH_PADDING"] == "YES"
    assert "INFERENCE_NUM_THREADS" not in runtime_parameters({})   # unset: every core
    onnx_cfg = classifier_config(get_variant("onnx_int8_dynamic"), image_size=28, num_classes=3, embed_dim=48,
                                 max_batch_size=8)
    assert onnx_cfg.platform == "onnxruntime_onnx" and not onnx_cfg.backend
    for kwargs, message in (({"performance_hint": "fast"}, "PERFORMANCE_HINT"),
                            ({"num_streams": "0"}, "NUM_STREAMS"),
                            ({"inference_num_threads": 0}, "INFERENCE_NUM_THREADS")):
        with pytest.raises(ConfigError, match=message):
            openvino_parameters(**kwargs)


def test_auto_picks_the_fastest_gated_variant_never_a_failed_one():
    from dinov2_triton.export.auto import deployment_choice

    def entry(name, thr, status="OK", passed=True, published=True):
        bench = {"throughput_batch": 8, "batch8": {"img_per_s": thr}} if thr is not None else None
        return SimpleNamespace(published=published, status=status, gate_passed=passed, benchmark=bench,
                               model_name=f"dinov2_{name}")

    variants = {"onnx": (100.0,), "onnx_int8": (300.0, "GATE_FAILED", False),   # fastest, published anyway
                "openvino": (180.0,), "openvino_int8": (250.0,), "onnx_int8_dynamic": (None,),
                "openvino_bf16": (None, "SKIPPED", None, False)}
    manifest = SimpleNamespace(variants={n: entry(n, *a) for n, a in variants.items()})
    choice = deployment_choice(manifest)
    assert choice.variant == "openvino_int8"
    assert "250.0 img/s" in choice.why and "openvino 180.0" in choice.why and "onnx_int8 " not in choice.why
    assert [r["variant"] for r in choice.ranking] == ["openvino_int8", "openvino", "onnx"]
    assert choice.ranking[0]["model_name"] == "dinov2_openvino_int8"
    assert deployment_choice(SimpleNamespace(variants={"onnx": entry("onnx", None)})) is None


# --------------------------------------------------------------------------- the export
def test_cpu_variants_exported_verified_published(cpu_repository):
    from dinov2_triton.export.manifest import read_export_manifest

    m = read_export_manifest(cpu_repository)
    for name in ("onnx", "onnx_int8_dynamic", "openvino", "openvino_int8"):
        v = m.variants[name]
        assert v.status == "OK", (name, v.reason)
        assert v.published and v.gate_passed and v.benchmark["batch8"]["img_per_s"] > 0
    # TensorRT is not a candidate on a host without a GPU: auto does not even try it
    assert not [n for n in m.variants if n.startswith("trt_")]

    dyn = m.variants["onnx_int8_dynamic"].build_info
    assert dyn["quantized_nodes"] == N_WEIGHT_MATMULS and dyn["qdq_nodes_left"] == 0
    assert dyn["quantized_by_role"] == {"qkv": 2, "proj": 2, "fc1": 2, "fc2": 2}
    assert dyn["op_types"].get("MatMulInteger", 0) + dyn["op_types"].get("DynamicQuantizeMatMul", 0) == 8

    ov32 = m.variants["openvino"]
    assert sorted(ov32.files) == ["model.bin", "model.xml"]
    assert ov32.build_info["precise_layers"] > 0
    # the pinned container's OpenVINO (core/resources/triton_release.env) reads opsets up to 16
    assert 1 <= ov32.build_info["max_opset"] <= 16
    # FP32 really computed in FP32 (on a BF16-capable CPU an unmarked IR drifts ~1e-2)
    assert ov32.headline.logits_max_abs_diff < 1e-4 and ov32.headline.top1_agreement == 1.0
    # what each one computes in, read from the engine (manifest `arithmetic`)
    units = ("AMX", "VNNI", "AVX-512", "AVX2", "SSE")
    arith = {n: v.arithmetic for n, v in m.variants.items() if v.status == "OK"}
    assert all(a is not None and a.unit in units for a in arith.values()), arith
    assert arith["openvino"].arithmetic == "FP32" and arith["openvino"].shares == {"FP32": 1.0}   # precise layers
    assert arith["openvino"].source.startswith("engine: OpenVINO compiled runtime model")
    assert all(k.endswith(("_f32", "_F32")) for k in arith["openvino"].kernels), arith["openvino"].kernels
    assert arith["openvino_int8"].arithmetic == "INT8" and 0 < arith["openvino_int8"].shares["INT8"] < 1
    assert arith["onnx"].arithmetic == "FP32" and arith["onnx"].source.startswith("engine: ONNX Runtime profile")
    dyn_kernels = arith["onnx_int8_dynamic"].source
    assert arith["onnx_int8_dynamic"].arithmetic == "INT8"
    assert "DynamicQuantizeMatMul" in dyn_kernels or "MatMulInteger" in dyn_kernels, dyn_kernels
    if "onnx_fp16" in arith:   # no FP16 matmul kernels on the CPU: ONNX Runtime casts to FP32
        assert arith["onnx_fp16"].arithmetic == "FP32" and "FP16 graph" in arith["onnx_fp16"].note
    # the BF16 variant: built where the CPU has BF16, SKIPPED with the reason elsewhere
    from dinov2_triton.core.cpu_features import bf16_support, read_cpu_flags

    bf16 = m.variants["openvino_bf16"]
    if bf16_support(read_cpu_flags())[0]:
        assert bf16.status == "OK" and bf16.arithmetic.arithmetic == "BF16", (bf16.status, bf16.reason)
        assert bf16.arithmetic.unit in ("AMX", "AVX-512")
        assert "HINT_BF16" in (cpu_repository / "dinov2_openvino_bf16" / "config.pbtxt").read_text()
    else:
        assert bf16.status == "SKIPPED" and not bf16.published
        assert bf16.reason == "not built: this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16)"
    ov8 = m.variants["openvino_int8"].build_info
    assert ov8["fake_quantize"] > 0 and ov8["calibration"]["split"] == "train"
    assert ov8["search"]["attempts"][0]["label"].startswith("nncf ptq")
    assert ov8["config_parameters"]["ENABLE_BATCH_PADDING"] == "YES"

    config = (cpu_repository / "dinov2_openvino_int8" / "config.pbtxt").read_text()
    assert 'backend: "openvino"' in config and "ENABLE_BATCH_PADDING" in config
    # auto: the ensemble calls the fastest gated variant of the run's own measurements, and the
    # manifest records that choice with the ranking it came from (what the report recommends)
    ranked = {n: v.benchmark["batch8"]["img_per_s"] for n, v in m.variants.items()
              if v.status == "OK" and v.gate_passed}
    assert m.ensemble.classifier == f"dinov2_{max(ranked, key=ranked.get)}"
    assert m.ensemble.classifier_reason.startswith("auto: the fastest gated variant")
    assert m.ensemble.classifier_choice == "fastest gated (auto)"
    assert [r["variant"] for r in m.ensemble.classifier_ranking] == sorted(ranked, key=ranked.get, reverse=True)
    assert m.options["ensemble_choice"] == "fastest"


@pytest.mark.slow
def test_nncf_accuracy_control_meets_the_gate(tiny_checkpoint, tiny_dataset, tmp_path):
    from dinov2_triton.export.variants.openvino import build_fp32, build_int8

    ctx = _ctx(tiny_checkpoint, tiny_dataset, tmp_path, ov_int8_accuracy_control="always", calib_size=16)
    onnx_path = tmp_path / "fp32" / "model.onnx"
    onnx_path.parent.mkdir()
    get_variant("onnx").build(ctx, onnx_path)
    ctx.artifacts["onnx"] = onnx_path
    xml = tmp_path / "ov" / "model.xml"
    xml.parent.mkdir()
    build_fp32(ctx, xml)
    ctx.artifacts["openvino"] = xml
    out = tmp_path / "int8" / "model.xml"
    out.parent.mkdir()
    info = build_int8(ctx, out)
    attempts = info["search"]["attempts"]
    assert [a["label"] for a in attempts] == ["nncf accuracy control"]      # "always": no plain PTQ first
    assert attempts[0]["passed"] and info["search"]["passed"]
    ac = info["accuracy_control"]
    assert ac["mode"] == "always" and ac["max_drop"] == pytest.approx(0.01)   # the INT8 gate's 99% agreement
    assert ac["validation_images"] == len(ctx.eval_set("search"))
    assert ctx.eval_set("search").split == "val"
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert set(ctx.calibration_splits) == {"train"}


def test_bf16_build_refuses_a_cpu_where_openvino_runs_no_bf16(cpu_repository, tiny_checkpoint, tiny_dataset,
                                                             tmp_path, monkeypatch):
    """A CPU that claims BF16 but whose OpenVINO compiles no layer in BF16 gets
    no BF16 variant (it would be FP32 under a BF16 name). On a host without
    BF16 that is what OpenVINO does once the flag check is passed."""
    from dinov2_triton.core.cpu_features import bf16_support, read_cpu_flags
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.registry import SkipVariant
    from dinov2_triton.export.variants import openvino as ovv

    if bf16_support(read_cpu_flags())[0]:
        pytest.skip("this CPU has BF16: the export test checks the real BF16 build")
    monkeypatch.setattr(ovv, "read_cpu_flags", lambda: frozenset({"avx2", "avx512f", "avx512_bf16"}))
    ctx = _ctx(tiny_checkpoint, tiny_dataset, tmp_path)
    m = read_export_manifest(cpu_repository)
    ctx.artifacts["openvino"] = Path(m.variants["openvino"].path) / "model.xml"
    with pytest.raises(SkipVariant, match="compiled no layer in BF16 on this CPU .*avx512_bf16.*f32"):
        ovv.build_bf16(ctx, tmp_path / "model.xml")


def test_standin_honours_the_bf16_parameter(cpu_repository, tmp_path, monkeypatch):
    """HINT_BF16=YES in config.pbtxt (what openvino_bf16 ships) reaches the
    local stand-in's compile as INFERENCE_PRECISION_HINT=bf16, as in the
    native backend; the compiled model then says what it runs."""
    import importlib.util
    import shutil

    from dinov2_triton.core.cpu_features import bf16_support, read_cpu_flags
    from dinov2_triton.export.triton_config import to_text
    from dinov2_triton.serve import install
    from dinov2_triton.serve.model_plan import read_model_config

    # the real triton_python_backend_utils (what the stub imports), plus the exception the C++ stub adds
    spec = importlib.util.spec_from_file_location(
        "triton_python_backend_utils", install.find_triton().python_backend / "triton_python_backend_utils.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    pb.TritonModelException = type("TritonModelException", (Exception,), {})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", pb)
    spec = importlib.util.spec_from_file_location("standin_openvino_bf16",
                                                  install.STANDIN_BACKENDS / "openvino" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def params(**kv):
        return {"parameters": {k: {"string_value": v} for k, v in kv.items()}}
    assert module.compile_properties(params(HINT_BF16="YES"), "m") == {"INFERENCE_PRECISION_HINT": "bf16"}
    assert "INFERENCE_PRECISION_HINT" not in module.compile_properties(params(PERFORMANCE_HINT="LATENCY"), "m")
    with pytest.raises(pb.TritonModelException, match="'HINT_BF16' to be YES, got NO"):
        module.compile_properties(params(HINT_BF16="NO"), "m")

    model_dir = tmp_path / "dinov2_openvino_bf16"
    shutil.copytree(cpu_repository / "dinov2_openvino", model_dir)
    cfg = read_model_config(model_dir / "config.pbtxt")
    cfg.name = model_dir.name
    cfg.parameters["HINT_BF16"].string_value = "YES"
    (model_dir / "config.pbtxt").write_text(to_text(cfg))
    from google.protobuf import json_format

    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(cfg, preserving_proto_field_name=True)),
                      "model_name": model_dir.name, "model_repository": str(model_dir), "model_version": "1"})
    want = "bf16" if bf16_support(read_cpu_flags())[0] else "f32"   # no BF16 arithmetic: OpenVINO runs FP32
    assert model.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name() == want
    lo, em = model._run({"pixel_values": np.zeros((2, 3, 28, 28), np.float32)})
    assert lo.shape == (2, 3) and np.isfinite(lo).all()


def test_missing_library_is_skipped_with_the_reason(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    from dinov2_triton.export.pipeline import run_export

    monkeypatch.setitem(sys.modules, "openvino", None)   # import openvino -> ImportError
    m = run_export(tiny_checkpoint, tmp_path / "repo", data_path=tiny_dataset, variants="openvino,openvino_int8",
                   bench_seconds=0)
    assert m.variants["openvino"].status == "SKIPPED"
    assert "OpenVINO is not installed" in m.variants["openvino"].reason
    assert m.variants["openvino_int8"].status == "SKIPPED" and "parent openvino" in m.variants["openvino_int8"].reason
    assert m.variants["onnx"].status == "OK" and m.exit_code == 0
    assert not (tmp_path / "repo" / "dinov2_openvino" / "1").exists()   # nothing half-published


def test_missing_nncf_or_ort_quantizer_is_skipped(tiny_checkpoint, tiny_dataset, tmp_path, monkeypatch):
    from dinov2_triton.export.registry import SkipVariant

    ctx = _ctx(tiny_checkpoint, tiny_dataset, tmp_path)
    monkeypatch.setitem(sys.modules, "nncf", None)
    with pytest.raises(SkipVariant, match="NNCF is not installed"):
        get_variant("openvino_int8").build(ctx, tmp_path / "model.xml")
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(SkipVariant, match="onnxruntime.quantization is not importable"):
        get_variant("onnx_int8_dynamic").build(ctx, tmp_path / "model.onnx")


def test_dynamic_worker_bad_input_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dinov2_triton.export.variants.onnx_int8_dynamic",
                           "--onnx", str(tmp_path / "no.onnx"), "--output", str(tmp_path / "out.onnx")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no.onnx: file not found" in proc.stderr


# --------------------------------------------------------------------------- served
@pytest.mark.triton
def test_served_cpu_variants_answer_like_in_process(cpu_repository, tiny_dataset, triton_server_factory):
    from dinov2_triton.export.context import ExportContext  # noqa: F401 - same process imports as the export
    from dinov2_triton.export.manifest import read_export_manifest

    m = read_export_manifest(cpu_repository)
    names = ["dinov2_onnx_int8_dynamic", "dinov2_openvino", "dinov2_openvino_int8"]
    server = triton_server_factory(cpu_repository, load_models=names)
    rng = np.random.default_rng(0)
    x8 = rng.standard_normal((8, 3, 28, 28)).astype(np.float32)
    with server.connect("grpc") as conn:
        for model in names:
            variant = model.removeprefix("dinov2_")
            runner = get_variant(variant).load_runner(
                Path(m.variants[variant].path) / get_variant(variant).filename)
            want_lo, want_em = runner(x8)
            for batch in (x8, x8[:1]):   # batch 1: zero-padded to max_batch_size by the openvino backend
                res = conn.infer(model, [conn.tensor_input("pixel_values", batch)],
                                 [conn.requested_output("logits"), conn.requested_output("embedding")])
                lo, em = res.as_numpy("logits"), res.as_numpy("embedding")
                n = len(batch)
                assert lo.shape == (n, 3) and em.shape == (n, want_em.shape[1])
                if model == "dinov2_openvino_int8":
                    # its unquantized layers run at the plugin's default precision (BF16 on
                    # BF16-capable CPUs), and the served model is compiled for a static batch
                    # of 8: other kernels, BF16-sized differences
                    assert (lo.argmax(1) == want_lo[:n].argmax(1)).all(), model
                    cos = (em * want_em[:n]).sum(1) / np.linalg.norm(em, axis=1) / np.linalg.norm(want_em[:n], axis=1)
                    assert cos.min() > 0.999, (model, cos.min())
                else:
                    np.testing.assert_allclose(lo, want_lo[:n], rtol=1e-3, atol=1e-3, err_msg=model)
                    np.testing.assert_allclose(em, want_em[:n], rtol=1e-3, atol=1e-3, err_msg=model)
        # a request that breaks the config gets its own error, naming the model and the input
        from dinov2_triton.serve.triton_access import RequestError

        with pytest.raises(RequestError, match="pixel_values"):
            conn.infer("dinov2_openvino", [conn.tensor_input("pixel_values", x8[:, :, :14])])
        # without ENABLE_BATCH_PADDING the backend (native and stand-in) refuses a partial batch
        cfg = json.loads(json.dumps(conn.model_config("dinov2_openvino")))
        cfg["parameters"].pop("ENABLE_BATCH_PADDING")
        cfg.pop("model_warmup")   # its batch-1 sample would fail the load, as in the container
        conn.load_model("dinov2_openvino", config=cfg)
        ok = conn.infer("dinov2_openvino", [conn.tensor_input("pixel_values", x8)])
        assert ok.as_numpy("logits").shape == (8, 3)
        with pytest.raises(RequestError, match="ENABLE_BATCH_PADDING"):
            conn.infer("dinov2_openvino", [conn.tensor_input("pixel_values", x8[:1])])


# --------------------------------------------------------------------------- the recommendation
def test_recommendation_ranks_gated_variants_and_names_the_cpu():
    from dinov2_triton.bench.results import GateVerdict, Machine, OperatingPoint, RowInProcess, RowServer, VariantRow
    from dinov2_triton.report.ranking import recommend

    def row(key, thr, precision="fp32", passed=True):
        return VariantRow(key=key, label=key, model_name=key, precision=precision, served=True,
                          server=RowServer(op_images_per_s=thr), gate=GateVerdict(passed=passed))

    rows = [VariantRow(key="pytorch", label="eager", kind="baseline", in_process=RowInProcess(op_images_per_s=100.0),
                       gate=GateVerdict(passed=True)),
            row("dinov2_onnx", 150.0), row("dinov2_openvino_int8", 300.0, "int8"),
            row("dinov2_onnx_int8", 400.0, "int8", passed=False), row("dinov2_openvino", 200.0)]
    machine = Machine(cpu_model="AMD EPYC", cpu_flags=["avx2", "fma", "avx512f", "avx512_vnni"], logical_cores=2,
                      usable_cores=2, memory_total_bytes=1, os="Linux", python="3.11")
    rec = recommend(rows, OperatingPoint(batch_size=8, concurrency=1, protocol="grpc"), machine=machine)
    assert rec.variant == "dinov2_openvino_int8"
    assert [r.variant for r in rec.ranking] == ["dinov2_openvino_int8", "dinov2_openvino", "dinov2_onnx"]
    assert "on AMD EPYC (avx2, fma, avx512f, avx512_vnni; no avx512_bf16, amx_int8), 2 cores" in rec.reason
    assert "1.50x the next gated variant, dinov2_openvino (200.0 img/s)" in rec.reason
    assert "3.00x eager PyTorch FP32 in process" in rec.reason
    assert "INT8 arithmetic on this CPU's avx512_vnni" in rec.reason
    avx2 = machine.model_copy(update={"cpu_flags": ["avx2", "fma"]})
    assert "this CPU has none of avx512_vnni, avx_vnni, amx_int8 for INT8" in recommend(
        rows, OperatingPoint(batch_size=8, concurrency=1, protocol="grpc"), machine=avx2).reason


# --------------------------------------------------------------------------- the benchmark's tools
def test_cpu_compare_table_from_a_results_file(tmp_path):
    from dinov2_triton.bench.results import read_results
    from dinov2_triton.report.cpu_compare import main, table_rows

    src = ROOT / "tests" / "data" / "perf_results_v1_server.json"
    rows = {r["name"]: r for r in table_rows(read_results(src))}
    onnx = rows["onnx"]
    assert onnx["served_over_in_process_b8"] == pytest.approx(onnx["served_b8"] / onnx["in_process_b8"])
    assert onnx["top1_agreement"] == 1.0 and rows["onnx_int8"]["gate_passed"] is False
    assert rows["pytorch"]["served_b8"] is None
    out = tmp_path / "table.md"
    assert main([str(src), "--out", str(out)]) == 0
    text = out.read_text()
    assert "| onnx (onnx) |" in text and "Served batch 8, dinov2_onnx vs the other gated engines: onnx_fp16" in text
    assert "onnx_int8 " not in text.split("other gated engines:")[1].splitlines()[0]   # failed its gate
    assert main([str(tmp_path / "missing.json")]) == 2


def test_thread_study_runs_each_setting(cpu_repository):
    from dinov2_triton.bench.cpu_threads import render, run_study, usable_cores

    study = run_study(cpu_repository, ["onnx_int8_dynamic", "openvino"], batch_size=8, seconds=0.2)
    cores = usable_cores()
    for name in ("onnx_int8_dynamic", "openvino"):
        rows = study["variants"][name]
        assert [r["instances"] for r in rows] == [1, 1, cores] and [r["clients"] for r in rows] == [1, cores, cores]
        assert all(r["requests"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert "| openvino | 1 instance, THROUGHPUT" in render(study)
    with pytest.raises(ValueError, match="trt_fp16: not published"):
        run_study(cpu_repository, ["trt_fp16"], batch_size=8, seconds=0.2)
    with pytest.raises(ValueError, match="torchscript: platform pytorch_libtorch has no thread study"):
        run_study(cpu_repository, ["torchscript"], batch_size=8, seconds=0.2)
