"""`openvino` (FP32) and `openvino_int8` (NNCF INT8): OpenVINO IR served by
Triton's OpenVINO backend (config.pbtxt `backend: "openvino"`, model.xml +
model.bin in the version folder, the backend's default file name).

- `openvino`: the FP32 ONNX graph (the `onnx` variant) read by OpenVINO and
  saved as IR with FP32 weights. Every layer is marked ``precise`` in the
  IR: OpenVINO's CPU plugin otherwise runs an "FP32" model in BF16 on CPUs
  with native BF16 (AVX512_BF16, AMX), and Triton's OpenVINO backend has no
  parameter to ask for FP32 (only HINT_BF16=YES). Measured here (AMD EPYC
  with avx512_bf16, ViT-S/14 56 px): unmarked, max |logit diff| vs ONNX
  Runtime FP32 was 1e-3 to 1e-2 (BF16); marked, 7e-7.
- `openvino_int8`: NNCF post-training quantization of that IR
  (ModelType.TRANSFORMER: NNCF's transformer preset, "mixed" = symmetric
  weights, asymmetric activations; SmoothQuant; fast bias correction),
  calibrated on the train split only (ExportContext.calibration_images).
  The layers NNCF leaves unquantized run at the CPU plugin's default
  precision (BF16 on BF16-capable CPUs, FP32 elsewhere), as in the NVIDIA
  container; the build info records which. When plain PTQ misses the INT8
  gate on the val split, NNCF's accuracy-aware mode
  (`quantize_with_accuracy_control`) reverts the most harmful layers to
  floating point until the same gate holds (`ov_int8_accuracy_control`).
  Every attempt is recorded, as for `onnx_int8` (dinov2_triton.export.quant_search).
- `openvino_bf16`: the same IR without the precise marks, compiled with
  INFERENCE_PRECISION_HINT=bf16 (Triton's OpenVINO backend parameter
  HINT_BF16=YES, honoured by the local stand-in too): BF16 matrix multiplies
  on AMX or AVX-512 BF16, FP32 weights on disk. Built only on a CPU with
  avx512_bf16 or amx_bf16 (elsewhere SKIPPED with that reason: OpenVINO would
  silently run it in FP32), gated like FP16.

Each variant's manifest entry says which arithmetic its layers actually run
and on which unit, read from the compiled model (`runtime_arithmetic`):
the plain `openvino` variant says FP32 also on a BF16 CPU (its layers are
precise), the INT8 one says which layers stayed in floating point.

Runtime settings, in the served config and in the in-process runner alike:
PERFORMANCE_HINT=LATENCY, NUM_STREAMS=1 (one infer request per model
instance: more streams only split the threads of that one request) and
INFERENCE_NUM_THREADS unset (all cores) unless ``--set ov_threads=N``;
ENABLE_BATCH_PADDING=YES, because the native backend compiles the model
for exactly max_batch_size and refuses smaller batches without it (it pads
them: a batch of 1 costs a batch of max_batch_size there, and in the local
stand-in, serve/backends/openvino/model.py, which does the same).

Without the `openvino` (or, for INT8, `nncf`) package both variants are
SKIPPED with that reason.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from dinov2_triton.core.cpu_features import arithmetic_record, bf16_support, read_cpu_flags
from dinov2_triton.export.registry import SkipVariant, Variant, register
from dinov2_triton.export.registry import as_bool as _as_bool

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "embedding")
# The IR attribute that OpenVINO reads as DisablePrecisionConversion: the CPU
# plugin keeps such a layer in its original (FP32) precision under a BF16/FP16
# inference-precision default.
PRECISE_ATTRIBUTE = "precise"
PRECISE_RT_KEY = "DisablePrecisionConversion_0"
AC_MODES = ("auto", "never", "always")
#: OpenVINO CPU layer types that multiply matrices (what the arithmetic record counts)
MATMUL_LAYERS = ("FullyConnected", "MatMul", "Convolution", "GroupConvolution", "Deconvolution",
                 "ScaledDotProductAttention", "Gemm")
_OV_ARITHMETIC = {"f32": "FP32", "bf16": "BF16", "f16": "FP16", "i8": "INT8", "u8": "INT8", "f64": "FP64"}

DEFAULTS: dict[str, Any] = {
    "ov_performance_hint": "LATENCY",
    "ov_num_streams": "1",
    "ov_threads": 0,                     # 0: not set (the plugin uses every core)
    "ov_int8_accuracy_control": "auto",  # auto: only when plain PTQ misses the gate
    "ov_int8_max_iterations": 64,        # layers the accuracy-aware mode may revert
    "ov_int8_fast_bias_correction": True,
}


class OpenVinoError(RuntimeError):
    """An OpenVINO/NNCF build step failed; the message says which."""


def _option(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def _import_openvino():
    try:
        import openvino
    except ImportError as exc:
        raise SkipVariant(f"not built: OpenVINO is not installed here ({exc}); "
                          f"pip install openvino (requirements/lock-cpu.txt pins it)") from None
    return openvino


def _import_nncf():
    try:
        import nncf
    except ImportError as exc:
        raise SkipVariant(f"not built: NNCF is not installed here ({exc}); "
                          f"pip install nncf (requirements/lock-cpu.txt pins it)") from None
    return nncf


def runtime_parameters(options: Mapping[str, Any], *, bf16: bool = False) -> dict[str, str]:
    """The OpenVINO backend parameters of the served config (validated by
    dinov2_triton.export.triton_config.openvino_parameters, the one place that knows the
    backend's parameter names and values); `bf16`: HINT_BF16=YES."""
    from dinov2_triton.export.triton_config import openvino_parameters

    threads = int(_option(options, "ov_threads") or 0)
    return openvino_parameters(performance_hint=str(_option(options, "ov_performance_hint")),
                               num_streams=str(_option(options, "ov_num_streams")),
                               inference_num_threads=threads or None, batch_padding=True, hint_bf16=bf16)


def compile_properties(parameters: Mapping[str, str]) -> dict[str, Any]:
    """OpenVINO compile properties for the backend parameters, as the native
    backend maps them (and the local stand-in): PERFORMANCE_HINT,
    NUM_STREAMS, INFERENCE_NUM_THREADS, HINT_BF16=YES ->
    INFERENCE_PRECISION_HINT=bf16."""
    props: dict[str, Any] = {}
    if parameters.get("PERFORMANCE_HINT"):
        props["PERFORMANCE_HINT"] = parameters["PERFORMANCE_HINT"].upper()
    if parameters.get("NUM_STREAMS"):
        props["NUM_STREAMS"] = parameters["NUM_STREAMS"].upper()
    if parameters.get("INFERENCE_NUM_THREADS"):
        props["INFERENCE_NUM_THREADS"] = int(parameters["INFERENCE_NUM_THREADS"])
    if str(parameters.get("HINT_BF16") or "").lower() == "yes":
        props["INFERENCE_PRECISION_HINT"] = "bf16"
    return props


def ov_runner(path: Path, parameters: Mapping[str, str] | None = None):
    """A runner for an IR with the contract's I/O, compiled for CPU with the
    served config's settings. One infer request per calling thread: the
    in-process benchmark shares one runner between client threads, and an
    InferRequest is not thread-safe (requests of one compiled model are)."""
    ov = _import_openvino()

    params = dict(parameters) if parameters is not None else runtime_parameters({})
    core = ov.Core()
    compiled = core.compile_model(str(path), "CPU", compile_properties(params))
    local = threading.local()

    def run(x: np.ndarray):
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        out = request.infer({INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        by_name = {k.get_any_name(): v for k, v in out.items()}
        return np.array(by_name["logits"]), np.array(by_name["embedding"])
    run.compiled = compiled
    return run


def load_runner(path: Path):
    return ov_runner(path)


def load_runner_bf16(path: Path):
    """Compiled as the served BF16 config is (HINT_BF16=YES)."""
    return ov_runner(path, runtime_parameters({}, bf16=True))


def _rt(rt: Mapping[str, Any], key: str) -> str:
    value = rt[key] if key in rt else None
    if value is None:
        return ""
    return value.astype(str) if hasattr(value, "astype") else str(getattr(value, "value", value))


def runtime_arithmetic(compiled, *, flags) -> dict[str, Any]:
    """What the compiled model's matrix multiply / convolution layers run:
    their runtimePrecision and primitiveType in the runtime (execution)
    model (dinov2_triton.core.cpu_features.arithmetic_record). Read after the model ran
    once: before that a dynamic-shape layer's primitive is still "undef".
    The compiled INFERENCE_PRECISION_HINT is noted (BF16 asked for on a CPU
    without BF16 reads back as f32)."""
    layers = []
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        if _rt(rt, "layerType") not in MATMUL_LAYERS:
            continue
        precision = _rt(rt, "runtimePrecision")
        layers.append((_OV_ARITHMETIC.get(precision, precision.upper() or "?"), _rt(rt, "primitiveType") or None))
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        hint = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    except Exception:  # noqa: BLE001 - a property an OpenVINO version lacks is left out, not fatal
        hint = None
    return arithmetic_record(layers, flags=flags,
                             source="engine: OpenVINO compiled runtime model (runtimePrecision and primitiveType "
                                    f"of {len(layers)} matrix multiply / convolution layers)",
                             note=f"compiled INFERENCE_PRECISION_HINT {hint}" if hint else None)


def bf16_gate(flags) -> None:
    """Raise SkipVariant (with the reason) on a CPU without BF16 arithmetic:
    there OpenVINO accepts the BF16 hint and silently runs FP32."""
    ok, why = bf16_support(flags)
    if not ok:
        raise SkipVariant(f"not built: {why}")


def device_facts(ov) -> dict[str, Any]:
    """What decides OpenVINO's speed and numerics on this CPU."""
    core = ov.Core()
    facts: dict[str, Any] = {"openvino": ov.get_version()}
    for key in ("FULL_DEVICE_NAME", "OPTIMIZATION_CAPABILITIES", "INFERENCE_PRECISION_HINT"):
        try:
            value = core.get_property("CPU", key)
        except Exception as exc:  # noqa: BLE001 - a property a plugin version lacks is reported, not fatal
            value = f"unavailable ({type(exc).__name__})"
        if hasattr(value, "get_type_name"):   # an ov.Type, e.g. bf16
            value = value.get_type_name()
        facts[key.lower()] = value if isinstance(value, (str, int, float)) else (
            [str(v) for v in value] if isinstance(value, (list, tuple)) else str(value))
    facts["default_inference_precision"] = facts.pop("inference_precision_hint")
    return facts


def check_ir_io(model, *, image_size: int, num_classes: int, embed_dim: int) -> dict[str, str]:
    """The IR keeps the serving contract: pixel_values -> logits, embedding,
    FP32, dynamic batch. Returns {name: partial shape}; raises OpenVinoError."""
    ins = [i.get_any_name() for i in model.inputs]
    outs = [o.get_any_name() for o in model.outputs]
    problems = []
    if ins != [INPUT_NAME]:
        problems.append(f"inputs are {ins}, expected [{INPUT_NAME!r}]")
    if sorted(outs) != sorted(OUTPUT_NAMES):
        problems.append(f"outputs are {outs}, expected {list(OUTPUT_NAMES)}")
    want = {INPUT_NAME: [3, image_size, image_size], "logits": [num_classes], "embedding": [embed_dim]}
    shapes = {}
    for port in list(model.inputs) + list(model.outputs):
        name = port.get_any_name()
        shape = port.get_partial_shape()
        shapes[name] = str(shape)
        if port.get_element_type().get_type_name() != "f32":
            problems.append(f"{name}: element type {port.get_element_type()}, expected f32")
        if name in want:
            dims = [shape[i] for i in range(shape.rank.get_length())]
            if not dims or dims[0].is_static:
                problems.append(f"{name}: batch axis {shape}, expected a dynamic first dimension")
            tail = [d.get_length() if d.is_static else None for d in dims[1:]]
            if tail != want[name]:
                problems.append(f"{name}: shape {shape}, expected [?, {', '.join(map(str, want[name]))}]")
    if problems:
        raise OpenVinoError("OpenVINO IR breaks the serving contract: " + "; ".join(problems))
    return shapes


def mark_precise(xml_path: Path) -> int:
    """Add the `precise` attribute to every layer of an IR file (in place);
    returns the number of layers. No Python API writes this attribute, so
    the XML is edited; the result is read back and checked by the caller."""
    tree = ET.parse(xml_path)
    layers = list(tree.getroot().iter("layer"))
    for layer in layers:
        rt = layer.find("rt_info")
        if rt is None:
            rt = ET.Element("rt_info")
            layer.insert(0, rt)
        if not any(a.get("name") == PRECISE_ATTRIBUTE for a in rt.findall("attribute")):
            ET.SubElement(rt, "attribute", {"name": PRECISE_ATTRIBUTE, "version": "0"})
    tree.write(xml_path, encoding="utf-8", xml_declaration=True)
    return len(layers)


def strip_precise(model) -> int:
    """Remove the precise marks (in memory) so the layers NNCF leaves in
    floating point run at the plugin's default precision; returns how many."""
    n = 0
    for op in model.get_ops():
        rt = op.get_rt_info()
        if PRECISE_RT_KEY in rt:
            del rt[PRECISE_RT_KEY]
            n += 1
    return n


def copy_ir(src_xml: Path, dst_xml: Path) -> None:
    """model.xml and its model.bin, to the destination name."""
    shutil.copyfile(src_xml, dst_xml)
    shutil.copyfile(Path(src_xml).with_suffix(".bin"), Path(dst_xml).with_suffix(".bin"))


def max_opset(xml_path: Path) -> int:
    """The newest operation set the IR uses (an older OpenVINO reads the IR
    only when it knows that opset; e.g. opset13 needs OpenVINO >= 2024.0)."""
    versions = [int(v[len("opset"):]) for v in
                (layer.get("version", "") for layer in ET.parse(xml_path).getroot().iter("layer"))
                if v.startswith("opset") and v[len("opset"):].isdigit()]
    return max(versions, default=0)


def _op_counts(model) -> dict[str, int]:
    ops: dict[str, int] = {}
    for op in model.get_ops():
        ops[op.get_type_name()] = ops.get(op.get_type_name(), 0) + 1
    return dict(sorted(ops.items()))


# ---------------------------------------------------------------------------
# openvino (FP32)
# ---------------------------------------------------------------------------
def build_fp32(ctx, path: Path) -> dict:
    ov = _import_openvino()

    onnx_path = ctx.artifacts.get("onnx")
    if onnx_path is None or not Path(onnx_path).is_file():
        raise OpenVinoError("the FP32 `onnx` artifact is missing: build the onnx variant first")
    t = time.perf_counter()
    model = ov.convert_model(str(onnx_path))
    shapes = check_ir_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    ov.save_model(model, str(path), compress_to_fp16=False)   # FP32 weights (the default would halve them)
    n_layers = mark_precise(path)
    back = ov.Core().read_model(str(path))
    marked = sum(PRECISE_RT_KEY in op.get_rt_info() for op in back.get_ops())
    if marked != len(back.get_ops()):
        raise OpenVinoError(f"{path}: {marked} of {len(back.get_ops())} layers read back as precise; "
                            f"this OpenVINO may run the FP32 model in reduced precision")
    check_ir_io(back, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    params = runtime_parameters(ctx.options)
    return {"tool": "openvino.convert_model (ONNX frontend) + save_model(compress_to_fp16=False)",
            **device_facts(ov), "source": str(onnx_path), "convert_seconds": round(time.perf_counter() - t, 2),
            "compute_precision": "f32: every layer marked precise, so BF16/FP16-capable CPUs keep FP32",
            "precise_layers": n_layers, "io": shapes, "op_types": _op_counts(back), "max_opset": max_opset(path),
            "config_parameters": params}


# ---------------------------------------------------------------------------
# openvino_bf16
# ---------------------------------------------------------------------------
def build_bf16(ctx, path: Path) -> dict:
    flags = read_cpu_flags()
    bf16_gate(flags)
    ov = _import_openvino()

    parent_xml = ctx.artifacts.get("openvino")
    if parent_xml is None or not Path(parent_xml).is_file():
        raise OpenVinoError("the FP32 `openvino` artifact is missing: build the openvino variant first")
    core = ov.Core()
    model = core.read_model(str(parent_xml))
    stripped = strip_precise(model)
    ov.save_model(model, str(path), compress_to_fp16=False)   # FP32 weights; BF16 is the compute precision
    back = core.read_model(str(path))
    left = sum(PRECISE_RT_KEY in op.get_rt_info() for op in back.get_ops())
    if left:
        raise OpenVinoError(f"{path}: {left} layers still read back as precise (they would stay FP32)")
    shapes = check_ir_io(back, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    params = runtime_parameters(ctx.options, bf16=True)
    runner = ov_runner(path, params)
    runner(np.ascontiguousarray(ctx.eval_set().pixel_values[:1]))   # kernels are chosen at the first run
    arithmetic = runtime_arithmetic(runner.compiled, flags=flags)
    if not arithmetic["shares"].get("BF16"):
        raise SkipVariant(f"not built: OpenVINO {ov.get_version()} compiled no layer in BF16 on this CPU "
                          f"({', '.join(f for f in sorted(flags) if 'bf16' in f)}): {arithmetic['note']}")
    return {"tool": "openvino.save_model (precise marks removed), INFERENCE_PRECISION_HINT=bf16",
            **device_facts(ov), "source": str(parent_xml), "precise_marks_removed": stripped,
            "compute_precision": "bf16 (backend parameter HINT_BF16=YES), FP32 weights and I/O",
            "cpu_bf16_flags": [f for f in sorted(flags) if "bf16" in f], "runtime_check": arithmetic,
            "io": shapes, "op_types": _op_counts(back), "max_opset": max_opset(path), "config_parameters": params}


# ---------------------------------------------------------------------------
# openvino_int8 (NNCF)
# ---------------------------------------------------------------------------
def _validation(ctx, purpose: str = "search"):
    """NNCF's validation data and function for the accuracy-aware mode: the
    metric is top-1 agreement with eager FP32 on the val split (the split
    the search chooses on; the verification reports on test)."""
    es = ctx.eval_set(purpose)
    ref_logits, _ = ctx.reference_outputs(purpose)
    ref_top1 = ref_logits.argmax(1)
    items = [(i, np.ascontiguousarray(es.pixel_values[i:i + 1])) for i in range(len(es))]

    def validate(compiled_model, data) -> tuple[float, list[float]]:
        logits_port = compiled_model.output("logits")
        values = []
        for i, x in data:
            pred = int(np.asarray(compiled_model(x)[logits_port]).argmax(1)[0])
            values.append(float(pred == int(ref_top1[i])))
        return (float(np.mean(values)) if values else 0.0), values
    return items, validate


def _max_drop(gate) -> float:
    """The accuracy-aware mode's allowed absolute drop of top-1 agreement:
    the gate's agreement margin, or its accuracy budget when that is tighter
    (each flipped prediction moves accuracy by at most one image)."""
    drops = []
    if gate.min_top1_agreement is not None:
        drops.append(1.0 - gate.min_top1_agreement)
    if gate.max_accuracy_drop is not None:
        drops.append(gate.max_accuracy_drop)
    return max(0.0, min(drops)) if drops else 0.01


def build_int8(ctx, path: Path) -> dict:
    ov = _import_openvino()
    nncf = _import_nncf()
    from dinov2_triton.export.quant_search import Candidate, run_search, search_gate

    opts = ctx.options
    mode = str(_option(opts, "ov_int8_accuracy_control")).lower()
    if mode not in AC_MODES:
        raise ValueError(f"ov_int8_accuracy_control={mode!r}: choose from {AC_MODES}")
    parent_xml = ctx.artifacts.get("openvino")
    if parent_xml is None or not Path(parent_xml).is_file():
        raise OpenVinoError("the FP32 `openvino` artifact is missing: build the openvino variant first")
    core = ov.Core()
    work = Path(ctx.work_dir) / _INT8.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)

    t = time.perf_counter()
    calib = ctx.calibration_images(int(opts.get("calib_size") or 512), seed=0)
    calib_ds = nncf.Dataset([np.ascontiguousarray(calib[i:i + 1]) for i in range(len(calib))])
    calib_load_s = time.perf_counter() - t
    fast_bc = _as_bool(_option(opts, "ov_int8_fast_bias_correction"), "ov_int8_fast_bias_correction")
    common = dict(model_type=nncf.ModelType.TRANSFORMER, target_device=nncf.TargetDevice.CPU,
                  subset_size=len(calib), fast_bias_correction=fast_bc)
    gate = search_gate(_INT8, opts)

    def fresh_model():
        model = core.read_model(str(parent_xml))
        strip_precise(model)
        return model

    def make_ptq(p: Path):
        ov.save_model(nncf.quantize(fresh_model(), calib_ds, **common), str(p.with_suffix(".xml")),
                      compress_to_fp16=False)

    ac_info: dict[str, Any] = {}

    def make_ac(p: Path):
        from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

        items, validate = _validation(ctx)
        max_drop = _max_drop(gate)
        restorer = AdvancedAccuracyRestorerParameters(max_num_iterations=int(_option(opts, "ov_int8_max_iterations")))
        t0 = time.perf_counter()
        model = nncf.quantize_with_accuracy_control(
            fresh_model(), calib_ds, nncf.Dataset(items), validate, max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE, advanced_accuracy_restorer_parameters=restorer, **common)
        ac_info.update(max_drop=max_drop, metric="top-1 agreement with eager FP32 (val split)",
                       validation_images=len(items), seconds=round(time.perf_counter() - t0, 2))
        ov.save_model(model, str(p.with_suffix(".xml")), compress_to_fp16=False)

    def candidates():
        if mode != "always":
            yield Candidate("nncf ptq (transformer preset)", {"method": "nncf.quantize", "preset": "transformer"},
                            make_ptq, key="ptq")
        if mode != "never":
            yield Candidate("nncf accuracy control", {"method": "nncf.quantize_with_accuracy_control",
                                                      "preset": "transformer", "drop_type": "absolute"},
                            make_ac, key="ac")

    t = time.perf_counter()
    result = run_search(candidates(), evaluate=lambda p: ctx.evaluate(ov_runner(p.with_suffix(".xml")),
                                                                      purpose="search"),
                        gate=gate, work_dir=work / "attempts")
    search_s = time.perf_counter() - t
    chosen = result.chosen_attempt
    if chosen is None:
        errors = "; ".join(f"{a['label']}: {a.get('error')}" for a in result.attempts)
        raise OpenVinoError(f"NNCF produced no model that could be evaluated ({errors or 'no attempts'})")
    if not result.passed:
        log.warning("openvino_int8: no attempt met gate %s; shipping the best one (%s) for the pipeline to "
                    "mark GATE_FAILED", gate.name, chosen["label"])
    copy_ir(Path(chosen["path"]).with_suffix(".xml"), path)
    model = core.read_model(str(path))
    shapes = check_ir_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    ops = _op_counts(model)
    if not ops.get("FakeQuantize"):
        raise OpenVinoError(f"{path}: NNCF left no FakeQuantize in the model (nothing is INT8)")
    import nncf as _nncf

    return {"tool": "nncf", "nncf": _nncf.__version__, **device_facts(ov), "source": str(parent_xml),
            "scheme": "NNCF ModelType.TRANSFORMER (mixed preset: symmetric int8 weights, asymmetric activations), "
                      f"target CPU, fast bias correction {fast_bc}",
            "compute_precision": "int8 where quantized; the rest at the plugin's default precision "
                                 "(default_inference_precision)",
            "calibration": {"images": int(len(calib)), "split": ",".join(sorted(ctx.calibration_splits)),
                            "load_seconds": round(calib_load_s, 2)},
            "accuracy_control": {"mode": mode, **ac_info},
            "search": {**result.to_dict(), "seconds": round(search_s, 2)},
            "fake_quantize": ops.get("FakeQuantize", 0), "io": shapes, "op_types": ops, "max_opset": max_opset(path),
            "config_parameters": runtime_parameters(opts)}


_FP32 = register(Variant(
    name="openvino", platform="openvino", filename="model.xml", precision="fp32",
    build=build_fp32, load_runner=load_runner, parent="onnx", gate="fp32",
    description="OpenVINO IR FP32 (from the onnx graph, every layer kept FP32), Triton OpenVINO backend"))

_BF16 = register(Variant(
    name="openvino_bf16", platform="openvino", filename="model.xml", precision="bf16",
    build=build_bf16, load_runner=load_runner_bf16, parent="openvino", gate="bf16",
    description="OpenVINO IR run in BF16 (INFERENCE_PRECISION_HINT=bf16: backend parameter HINT_BF16=YES) on "
                "CPUs with AMX-BF16 or AVX-512 BF16; SKIPPED elsewhere, Triton OpenVINO backend"))

_INT8 = register(Variant(
    name="openvino_int8", platform="openvino", filename="model.xml", precision="int8",
    build=build_int8, load_runner=load_runner, parent="openvino", gate="int8",
    description="OpenVINO IR INT8 (NNCF PTQ, transformer preset, train-split calibration; accuracy-aware "
                "mode when PTQ misses the gate), Triton OpenVINO backend"))
