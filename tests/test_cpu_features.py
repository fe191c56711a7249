"""dinov2_triton.core.cpu_features and dinov2_triton.export.arithmetic: which
arithmetic a CPU has and which unit runs it (flags injected, so every kind
of host is asked here), and what ONNX Runtime's kernels really compute in
(read from its profile of a tiny graph). OpenVINO's side is in
tests/test_cpu_variants.py (its own process)."""
from __future__ import annotations

import numpy as np
import pytest

from dinov2_triton.core.cpu_features import (
    NO_BF16_REASON,
    arithmetic_record,
    bf16_support,
    compute_unit,
    read_cpu_flags,
    unit_of_kernel,
)

EPYC_AVX2 = {"sse4_2", "avx", "avx2", "fma"}
XEON_VNNI = EPYC_AVX2 | {"avx512f", "avx512bw", "avx512_vnni"}
XEON_AMX = XEON_VNNI | {"avx512_bf16", "amx_tile", "amx_int8", "amx_bf16"}


def test_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse avx2 fma avx512_bf16\n\nprocessor\t: 1\n"
    assert read_cpu_flags(text) == {"fpu", "sse", "avx2", "fma", "avx512_bf16"}
    assert read_cpu_flags("no flags line here") == frozenset()


@pytest.mark.parametrize("flags, has", [(EPYC_AVX2, False), (XEON_VNNI, False), (XEON_VNNI | {"avx512_bf16"}, True),
                                        (XEON_AMX, True)])
def test_bf16_support(flags, has):
    assert bf16_support(flags) == ((True, None) if has else (False, NO_BF16_REASON))
    assert NO_BF16_REASON == "this CPU has no BF16 arithmetic (no avx512_bf16 / amx_bf16)"


@pytest.mark.parametrize("arithmetic, flags, unit, instructions", [
    ("INT8", XEON_AMX, "AMX", ["amx_int8"]),
    ("INT8", XEON_VNNI, "VNNI", ["avx512_vnni"]),
    ("INT8", EPYC_AVX2 | {"avx_vnni"}, "VNNI", ["avx_vnni"]),
    ("INT8", EPYC_AVX2, "AVX2", ["avx2"]),
    ("BF16", XEON_AMX, "AMX", ["amx_bf16"]),
    ("BF16", XEON_VNNI | {"avx512_bf16"}, "AVX-512", ["avx512_bf16"]),
    ("BF16", EPYC_AVX2, "AVX2", ["avx2"]),            # no BF16 arithmetic: converted, FP32 unit
    ("FP16", XEON_VNNI, "AVX-512", ["avx512f"]),      # no FP16 arithmetic: FP32 unit
    ("FP32", XEON_AMX, "AVX-512", ["avx512f"]),
    ("fp32", EPYC_AVX2, "AVX2", ["avx2"]),
    ("FP32", {"sse4_2"}, "SSE", []),
])
def test_compute_unit(arithmetic, flags, unit, instructions):
    assert compute_unit(arithmetic, flags) == (unit, instructions)


def test_unit_of_kernel_names():
    assert unit_of_kernel("brgemm_avx512_amx_bf16") == "AMX"
    assert unit_of_kernel("jit_avx512_core_vnni_I8") == "VNNI"
    assert unit_of_kernel("brgemm_avx512_f32") == "AVX-512"
    assert unit_of_kernel("brgemm_avx2_f32") == "AVX2"
    assert unit_of_kernel("gemm_mlas_f32") is None and unit_of_kernel("undef_f32") is None


def test_record_takes_the_largest_share_and_the_unit_its_kernels_name():
    record = arithmetic_record
    layers = [("INT8", "brgemm_avx512_amx_int8")] * 3 + [("BF16", "brgemm_avx512_amx_bf16")]
    r = record(layers, flags=XEON_AMX, source="engine: test")
    assert (r["arithmetic"], r["unit"], r["instructions"]) == ("INT8", "AMX", ["amx_int8"])
    assert r["shares"] == {"INT8": 0.75, "BF16": 0.25} and r["source"].endswith("unit from the kernel names")
    # kernels that do not say: the CPU flags decide
    r = record([("INT8", "jit_gemm_i8"), ("FP32", None)], flags=XEON_VNNI, source="engine: test")
    assert (r["arithmetic"], r["unit"]) == ("INT8", "VNNI") and r["source"].endswith("unit from the CPU flags")
    from dinov2_triton.export.manifest import Arithmetic

    assert Arithmetic.model_validate(r).label() == "INT8 on VNNI (INT8 50%, FP32 50%)"
    with pytest.raises(ValueError, match="no matrix multiply"):
        record([], flags=XEON_VNNI, source="x")


def _matmul_model(path, dtype):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    elem = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}[dtype]
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(dtype), "w")
    nodes = [helper.make_node("Cast", ["x"], ["xc"], to=elem), helper.make_node("MatMul", ["xc", "w"], ["y"]),
             helper.make_node("Cast", ["y"], ["z"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, [None, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, path)
    return path


def test_onnx_runtime_profile_says_what_its_kernels_computed(tmp_path):
    """FP16 matmuls on a CPU run in FP32 in ONNX Runtime (it inserts casts);
    dynamic INT8 runs an integer kernel; the profile of one batch shows both."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dinov2_triton.export.arithmetic import ort_profile_arithmetic

    x = np.ones((4, 16), np.float32)
    fp32 = ort_profile_arithmetic(_matmul_model(tmp_path / "fp32.onnx", np.float32), x, flags=XEON_VNNI)
    assert (fp32["arithmetic"], fp32["unit"], fp32["shares"]) == ("FP32", "AVX-512", {"FP32": 1.0})
    assert fp32["source"].startswith("engine: ONNX Runtime profile of one batch (kernels MatMul x1)")
    fp16 = ort_profile_arithmetic(_matmul_model(tmp_path / "fp16.onnx", np.float16), x, flags=EPYC_AVX2)
    if fp16["arithmetic"] == "FP32":    # no FP16 GEMM kernel in this ONNX Runtime build for this CPU
        assert "FP16 graph" in fp16["note"] and fp16["unit"] == "AVX2"
    else:
        assert fp16["arithmetic"] == "FP16" and fp16["note"] is None
    quantize_dynamic(str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx"), weight_type=QuantType.QInt8)
    int8 = ort_profile_arithmetic(tmp_path / "int8.onnx", x, flags=XEON_AMX)
    assert (int8["arithmetic"], int8["unit"], int8["instructions"]) == ("INT8", "AMX", ["amx_int8"])
