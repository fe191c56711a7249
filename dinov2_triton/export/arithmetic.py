"""Which arithmetic a variant actually runs, and on which unit: the
manifest's ``arithmetic`` record (dinov2_triton.export.manifest.Arithmetic).

A variant's declared precision is not what its kernels compute: ONNX
Runtime's CPU kernels run an FP16 graph's matrix multiplies in FP32 (it
inserts casts), OpenVINO runs an unmarked FP32 IR in BF16 on a CPU with BF16,
and the layers NNCF leaves unquantized run at the plugin's default precision.
So the engine is asked where it can tell:

* OpenVINO: the compiled model's runtime model (``get_runtime_model()``):
  every matrix multiply / convolution layer's ``runtimePrecision`` and its
  oneDNN ``primitiveType`` (e.g. ``brgemm_avx512_amx_bf16``), read after the
  runner has run (dinov2_triton.export.variants.openvino.runtime_arithmetic);
* ONNX Runtime: a profile of one batch (``SessionOptions.enable_profiling``):
  the kernels that ran and their input element types (MatMulInteger /
  DynamicQuantizeMatMul / QLinearMatMul ... are INT8; MatMul on ``float`` is
  FP32). MLAS does not name its kernels, so the unit comes from the CPU
  flags (it dispatches on the same extensions: core.cpu_features);
* TorchScript: FP32 ATen/oneDNN kernels, the unit from the CPU flags;
* TensorRT: the build precision on the GPU (not inspected here).

    describe_arithmetic(variant, runner, artifact, sample, flags=None) -> dict (Arithmetic)

(The record itself is built by dinov2_triton.core.cpu_features.arithmetic_record.)
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from dinov2_triton.core.cpu_features import arithmetic_record, compute_unit, read_cpu_flags

#: ONNX Runtime kernels that multiply integers (their inputs are u8/i8, the accumulation int32)
ORT_INT8_OPS = frozenset({"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm", "QLinearConv",
                          "ConvInteger", "MatMulIntegerToFloat", "QAttention", "DynamicQuantizeLSTM"})
#: ONNX Runtime kernels whose first input's element type is the arithmetic
ORT_FLOAT_OPS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Conv", "FusedConv", "NhwcConv",
                           "Attention", "MultiHeadAttention", "GroupQueryAttention", "ConvTranspose"})
_ORT_TYPES = {"float": "FP32", "float16": "FP16", "bfloat16": "BF16", "double": "FP64",
              "uint8": "INT8", "int8": "INT8"}
#: declared precision -> arithmetic, where the engine cannot be asked
DECLARED = {"fp32": "FP32", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "fp8": "FP8"}


def ort_profile_arithmetic(path: str | Path, sample, *, flags: Iterable[str]) -> dict[str, Any]:
    """Run one batch through a profiling ONNX Runtime CPU session of the
    artifact and count its matrix multiply / convolution kernels by the
    element type they ran on."""
    import numpy as np
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="ort-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(tmp) / "profile")
        opts.log_severity_level = 3
        session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: np.ascontiguousarray(sample, dtype=np.float32)})
        events = json.loads(Path(session.end_profiling()).read_text())
    layers: list[tuple[str, None]] = []
    ops: Counter = Counter()
    for e in events:
        args = e.get("args") or {}
        op = args.get("op_name")
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or not op:
            continue
        if op in ORT_INT8_OPS:
            layers.append(("INT8", None))
        elif op in ORT_FLOAT_OPS:
            types = [next(iter(t)) for t in args.get("input_type_shape") or [] if isinstance(t, dict) and t]
            layers.append((_ORT_TYPES.get(types[0], types[0].upper()) if types else "FP32", None))
        else:
            continue
        ops[op] += 1
    note = None
    if "FP16" not in {a for a, _ in layers} and _has_fp16_weights(path):
        note = "FP16 graph: ONNX Runtime's CPU kernels ran its matrix multiplies in FP32 (inserted casts)"
    return arithmetic_record(layers, flags=flags, note=note,
                  source="engine: ONNX Runtime profile of one batch (kernels "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(ops.items())) + ")")


def _has_fp16_weights(path: str | Path) -> bool:
    """Whether the ONNX file stores FP16 initializers (an FP16 graph)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)


def describe_arithmetic(variant, runner, artifact: str | Path, sample, flags: Iterable[str] | None = None
                        ) -> dict[str, Any]:
    """The Arithmetic record of a built variant. `runner` is its in-process
    runner after it has run (OpenVINO: its compiled model is read); `sample`
    a float32 batch (ONNX Runtime: profiled once); `flags` the CPU's
    (default: this host's)."""
    flags = read_cpu_flags() if flags is None else frozenset(flags)
    if variant.platform == "openvino":
        from dinov2_triton.export.variants.openvino import runtime_arithmetic

        return runtime_arithmetic(runner.compiled, flags=flags)
    if variant.platform == "onnxruntime_onnx":
        return ort_profile_arithmetic(artifact, sample, flags=flags)
    declared = DECLARED.get(variant.precision, variant.precision.upper())
    if variant.platform == "tensorrt_plan":
        return {"arithmetic": declared, "unit": "GPU", "instructions": [], "shares": {declared: 1.0},
                "kernels": [], "source": "build precision (TensorRT picks each layer's kernel on the GPU; "
                                         "not inspected)", "note": None}
    # TorchScript on the CPU: ATen / oneDNN FP32 kernels
    unit, instructions = compute_unit(declared, flags)
    return {"arithmetic": declared, "unit": unit, "instructions": instructions, "shares": {declared: 1.0},
            "kernels": [], "source": f"declared precision ({variant.platform}); unit from the CPU flags",
            "note": None}
