"""TensorRT engine build logic against a recording fake of the `tensorrt`
module (TensorRT cannot be installed on the CPU machines), the version pin,
the GPU stamping, and the SKIPPED path of the TensorRT variants without
TensorRT. The fake lives only in this file. A real build runs where a GPU
and TensorRT are present (marker `gpu`)."""
from __future__ import annotations

import enum
import json
import sys
import types
from pathlib import Path

import pytest

from export import trt_build_main as tbm
from export.registry import SkipVariant

IMG = 28


# --------------------------------------------------------------------------- the fake tensorrt
class LayerType(enum.Enum):
    CONVOLUTION = 1
    NORMALIZATION = 2
    MATRIX_MULTIPLY = 3
    SOFTMAX = 4
    ELEMENTWISE = 5
    ACTIVATION = 6
    REDUCE = 7
    CONCATENATION = 8
    CONSTANT = 9
    SHUFFLE = 10
    QUANTIZE = 11
    DEQUANTIZE = 12


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"
    INT32 = "int32"


class BuilderFlag(enum.Enum):
    FP16 = 1
    INT8 = 2
    FP8 = 3
    OBEY_PRECISION_CONSTRAINTS = 4
    PREFER_PRECISION_CONSTRAINTS = 5
    VERSION_COMPATIBLE = 6


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.Enum):
    EXPLICIT_BATCH = 0


class Tensor:
    def __init__(self, name, dtype=DataType.FLOAT, shape=None):
        self.name, self.dtype, self.shape = name, dtype, shape


class Layer:
    def __init__(self, name, type_, inputs, outputs):
        self.name, self.type = name, type_
        self._inputs, self._outputs = inputs, outputs
        self.output_types = {}
        self._precision = None
        self.precision_set = False

    @property
    def precision(self):
        return self._precision

    @precision.setter
    def precision(self, value):
        self._precision = value
        self.precision_set = True

    @property
    def num_inputs(self):
        return len(self._inputs)

    @property
    def num_outputs(self):
        return len(self._outputs)

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]

    def set_output_type(self, i, dtype):
        self.output_types[i] = dtype


class Network:
    def __init__(self, flags):
        self.flags = flags
        self.layers, self.inputs, self.outputs = [], [], []

    num_layers = property(lambda self: len(self.layers))
    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_layer(self, i):
        return self.layers[i]

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def add(self, name, type_, inputs, n_out=1, dtype=DataType.FLOAT):
        outs = [Tensor(f"{name}_out{j}", dtype) for j in range(n_out)]
        self.layers.append(Layer(name, type_, inputs, outs))
        return outs[0]


def vit_like(network: Network, *, qdq: bool = False, input_name="pixel_values", dims=(-1, 3, IMG, IMG)):
    """What the ONNX parser would produce for the DINOv2 export (one block)."""
    x = Tensor(input_name, shape=dims)
    network.inputs.append(x)
    w = network.add("patch_w", LayerType.CONSTANT, [])
    h = network.add("patch_embed", LayerType.CONVOLUTION, [x, w])
    n1 = network.add("norm1", LayerType.NORMALIZATION, [h])
    if qdq:
        q = network.add("q_act", LayerType.QUANTIZE, [n1], dtype=DataType.INT8)
        n1 = network.add("dq_act", LayerType.DEQUANTIZE, [q])
    qkv_w = network.add("qkv_w", LayerType.CONSTANT, [])
    qkv = network.add("qkv", LayerType.MATRIX_MULTIPLY, [n1, qkv_w])
    att = network.add("attn_qk", LayerType.MATRIX_MULTIPLY, [qkv, qkv])
    sm = network.add("softmax", LayerType.SOFTMAX, [att])
    av = network.add("attn_v", LayerType.MATRIX_MULTIPLY, [sm, qkv])
    res = network.add("residual", LayerType.ELEMENTWISE, [h, av])
    n2 = network.add("norm_final", LayerType.NORMALIZATION, [res])
    mean = network.add("patch_mean", LayerType.REDUCE, [n2])
    emb = network.add("concat", LayerType.CONCATENATION, [n2, mean])
    head_w = network.add("head_w", LayerType.CONSTANT, [])
    mm = network.add("head_matmul", LayerType.MATRIX_MULTIPLY, [emb, head_w])
    bias = network.add("head_bias", LayerType.CONSTANT, [])
    logits = network.add("head_add", LayerType.ELEMENTWISE, [mm, bias])
    logits.name = "logits"
    emb.name = "embedding"
    network.outputs += [logits, emb]


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        text = Path(path).read_text()
        if "BROKEN" in text:
            self.errors = ["node 7 (Foo): unsupported op"]
            return False
        vit_like(self.network, qdq="QDQ" in text, input_name="images" if "WRONGNAME" in text else "pixel_values")
        return True

    @property
    def num_errors(self):
        return len(self.errors)

    def get_error(self, i):
        return self.errors[i]


class Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 - TensorRT's parameter names
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))


class TimingCache:
    def __init__(self, blob):
        self.blob = blob

    def serialize(self):
        return b"CACHE" + self.blob


class Config:
    def __init__(self):
        self.flags, self.pools, self.profiles = [], {}, []
        self.builder_optimization_level = 3
        self.timing_cache = None

    def set_flag(self, flag):
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool, size):
        self.pools[pool] = size

    def add_optimization_profile(self, profile):
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, blob):
        return TimingCache(bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch):
        self.timing_cache = cache
        return True

    def get_timing_cache(self):
        return self.timing_cache


class Builder:
    instances = []

    def __init__(self, logger):
        self.logger = logger
        self.network = self.config = None
        self.fail = False
        Builder.instances.append(self)

    def create_network(self, flags=0):
        self.network = Network(flags)
        return self.network

    def create_builder_config(self):
        self.config = Config()
        return self.config

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        if self.fail or FAKE_STATE["fail_build"]:
            return None
        return memoryview(b"PLAN:" + ",".join(f.name for f in config.flags).encode())


class Logger:
    WARNING = 2

    def __init__(self, level=2):
        self.level = level


FAKE_STATE = {"fail_build": False}


def fake_trt(version="10.5.0.18"):
    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, LayerType=LayerType,
        BuilderFlag=BuilderFlag, MemoryPoolType=MemoryPoolType,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        float32=DataType.FLOAT, float16=DataType.HALF, int8=DataType.INT8, int32=DataType.INT32)


@pytest.fixture(autouse=True)
def _reset():
    Builder.instances.clear()
    FAKE_STATE["fail_build"] = False


def _onnx(tmp_path, text="GRAPH") -> Path:
    p = tmp_path / "model.onnx"
    p.write_text(text)
    return p


def _layers(builder) -> dict:
    return {layer.name: layer for layer in builder.network.layers}


# --------------------------------------------------------------------------- build_engine
def test_fp16_engine_profile_flags_and_fp32_pins(tmp_path):
    plan = tmp_path / "out" / "model.plan"
    info = tbm.build_engine(_onnx(tmp_path), plan, trt_module=fake_trt(), precision="fp16", max_batch=8,
                            workspace_bytes=2 << 30, builder_optimization_level=4)
    b = Builder.instances[-1]
    cfg = b.config
    # one profile: min 1, opt = max = max_batch_size (FIELD_NOTES 7)
    assert len(cfg.profiles) == 1
    assert cfg.profiles[0].shapes == {"pixel_values": ((1, 3, IMG, IMG), (8, 3, IMG, IMG), (8, 3, IMG, IMG))}
    assert info["profile"] == {"min": [1, 3, IMG, IMG], "opt": [8, 3, IMG, IMG], "max": [8, 3, IMG, IMG]}
    assert BuilderFlag.FP16 in cfg.flags and BuilderFlag.OBEY_PRECISION_CONSTRAINTS in cfg.flags
    assert BuilderFlag.INT8 not in cfg.flags and BuilderFlag.VERSION_COMPATIBLE not in cfg.flags
    assert cfg.pools == {MemoryPoolType.WORKSPACE: 2 << 30}
    assert cfg.builder_optimization_level == 4
    assert b.network.flags == 0   # TensorRT 10: explicit batch is the default, no flag
    layers = _layers(b)
    pinned = {"norm1", "norm_final", "softmax", "patch_mean", "head_matmul", "head_add"}
    for name in pinned:
        assert layers[name].precision == DataType.FLOAT, name
        assert layers[name].output_types == {0: DataType.FLOAT}, name
    for name in ("qkv", "attn_qk", "attn_v", "patch_embed", "residual", "concat"):
        assert not layers[name].precision_set, f"{name} must stay free to run in FP16"
    assert set(info["fp32_pinned_layer_names"]) == pinned and info["fp32_pinned_layers"] == 6
    assert plan.read_bytes() == b"PLAN:FP16,OBEY_PRECISION_CONSTRAINTS"
    assert info["plan_bytes"] == plan.stat().st_size and info["tensorrt_version"] == "10.5.0.18"
    assert not list(plan.parent.glob("*.tmp"))


def test_int8_engine_explicit_quantization(tmp_path):
    plan = tmp_path / "model.plan"
    info = tbm.build_engine(_onnx(tmp_path, "QDQ GRAPH"), plan, trt_module=fake_trt(), precision="int8",
                            max_batch=16, opt_batch=4, version_compatible=True)
    cfg = Builder.instances[-1].config
    assert {BuilderFlag.INT8, BuilderFlag.FP16, BuilderFlag.OBEY_PRECISION_CONSTRAINTS,
            BuilderFlag.VERSION_COMPATIBLE} <= set(cfg.flags)
    assert cfg.profiles[0].shapes["pixel_values"] == ((1, 3, IMG, IMG), (4, 3, IMG, IMG), (16, 3, IMG, IMG))
    layers = _layers(Builder.instances[-1])
    # Q/DQ layers are left alone (their int8 output must not be forced to FP32)
    assert not layers["q_act"].precision_set and not layers["dq_act"].precision_set
    assert layers["softmax"].precision == DataType.FLOAT
    assert info["builder_flags"] == ["FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "VERSION_COMPATIBLE"]


def test_no_pins_no_constraint_flag_and_timing_cache(tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    info = tbm.build_engine(_onnx(tmp_path), tmp_path / "a.plan", trt_module=fake_trt(), precision="fp16",
                            max_batch=4, fp32_layers=(), timing_cache=cache)
    cfg = Builder.instances[-1].config
    assert BuilderFlag.OBEY_PRECISION_CONSTRAINTS not in cfg.flags
    assert not any(layer.precision_set for layer in Builder.instances[-1].network.layers)
    assert cache.read_bytes() == b"CACHE" and info["timing_cache"]["loaded_bytes"] == 0
    # a second build starts from the saved cache
    tbm.build_engine(_onnx(tmp_path), tmp_path / "b.plan", trt_module=fake_trt(), precision="fp16",
                     max_batch=4, fp32_layers=(), timing_cache=cache)
    assert Builder.instances[-1].config.timing_cache.blob == b"CACHE"


def test_build_errors_write_nothing(tmp_path):
    trt = fake_trt()
    plan = tmp_path / "model.plan"
    with pytest.raises(tbm.EngineBuildError, match="could not parse.*unsupported op"):
        tbm.build_engine(_onnx(tmp_path, "BROKEN"), plan, trt_module=trt, precision="fp16", max_batch=8)
    with pytest.raises(tbm.EngineBuildError, match=r"inputs are \['images'\]"):
        tbm.build_engine(_onnx(tmp_path, "WRONGNAME"), plan, trt_module=trt, precision="fp16", max_batch=8)
    FAKE_STATE["fail_build"] = True
    with pytest.raises(tbm.EngineBuildError, match="failed to build the fp16 engine"):
        tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="fp16", max_batch=8)
    with pytest.raises(ValueError, match="opt batch 9"):
        tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="fp16", max_batch=8, opt_batch=9)
    with pytest.raises(ValueError, match="precision"):
        tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="int4", max_batch=8)
    assert not plan.exists()
    with pytest.raises(ValueError, match="unknown layer kind"):
        tbm.parse_fp32_layers("normalization,layernorm", trt)
    assert tbm.parse_fp32_layers("Normalization, softmax,head", trt) == ("normalization", "softmax", "head")


# --------------------------------------------------------------------------- version pin + stamping
def test_versions_file_parsing(tmp_path, repo_root):
    f = tmp_path / "triton_version.sh"
    f.write_text('# comment\nTRITON_CONTAINER_TAG=24.10\nexport TRITON_TENSORRT_VERSION="10.5.0.18"  # note\n'
                 'TRITON_CONTAINER_IMAGE="nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER_TAG}-py3"\n')
    v = tbm.read_versions_file(f)
    assert v["TRITON_TENSORRT_VERSION"] == "10.5.0.18"
    assert v["TRITON_CONTAINER_IMAGE"] == "nvcr.io/nvidia/tritonserver:24.10-py3"
    assert tbm.read_versions_file(tmp_path / "missing.sh") == {}
    real = tbm.pinned_versions(repo_root / "scripts" / "triton_version.sh")
    assert real["found"] and real["tensorrt"] and real["container_tag"]
    assert tbm.versions_match("10.5.0", "10.5.0.18") and tbm.versions_match("10.5.0.18", "10.5.0.18")
    assert not tbm.versions_match("10.6.0.26", "10.5.0.18") and not tbm.versions_match("10.5.0.17", "10.5.0.18")


def _build_plan(tmp_path, *, version="10.5.0.18", cc=(9, 0), precision="fp16", **kw):
    pins = tmp_path / "triton_version.sh"
    pins.write_text("TRITON_CONTAINER_TAG=24.10\nTRITON_TENSORRT_VERSION=10.5.0.18\n")
    gpu = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": f"{cc[0]}.{cc[1]}", "cc": cc,
           "source": "test"}
    return tbm.build_plan(_onnx(tmp_path), tmp_path / "model.plan", precision=precision, max_batch=8,
                          timing_cache=None, versions_file=pins, import_trt=lambda: fake_trt(version),
                          get_gpu=lambda: gpu, **kw)


def test_build_plan_stamps_version_gpu_and_compute_capability(tmp_path):
    info = _build_plan(tmp_path)
    assert info["config_parameters"] == {"tensorrt_version": "10.5.0.18", "gpu_name": "NVIDIA H100 80GB HBM3",
                                         "compute_capability": "9.0", "version_compatible": "false",
                                         "triton_container_tag": "24.10"}
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["compute_capability"] == "9.0"
    assert info["version_check"]["match"] is True and len(info["onnx_sha256"]) == 64
    json.dumps(info)   # goes into the manifest


def test_version_mismatch_refused_unless_allowed(tmp_path):
    with pytest.raises(tbm.VersionMismatch, match=r"10\.6\.0\.26 differs from TensorRT 10\.5\.0\.18.*24\.10"):
        _build_plan(tmp_path, version="10.6.0.26")
    assert not (tmp_path / "model.plan").exists()
    info = _build_plan(tmp_path, version="10.6.0.26", allow_version_mismatch=True)
    assert info["version_check"]["match"] is False and "MISMATCH allowed" in info["version_check"]["note"]
    assert (tmp_path / "model.plan").is_file()


def test_fp8_needs_ada_or_hopper(tmp_path):
    with pytest.raises(tbm.TensorRTUnavailable, match=r"FP8 needs compute capability >= 8\.9.*8\.0"):
        _build_plan(tmp_path, cc=(8, 0), precision="fp8")
    info = _build_plan(tmp_path, cc=(9, 0), precision="fp8")
    assert "FP8" in info["builder_flags"]


# --------------------------------------------------------------------------- no TensorRT here: SKIPPED
@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` raises ImportError


def test_variants_skip_without_tensorrt_and_write_nothing(no_tensorrt, tmp_path):
    from export import tensorrt_engine as te
    from export.registry import get_variant

    (tmp_path / "parent.onnx").write_bytes(b"x")
    ctx = types.SimpleNamespace(options={}, max_batch_size=8, work_dir=tmp_path / "work",
                                artifacts={"onnx": tmp_path / "parent.onnx", "onnx_int8": tmp_path / "parent.onnx"})
    for name in ("trt_fp16", "trt_int8", "trt_fp8"):
        v = get_variant(name)
        assert v.platform == "tensorrt_plan" and v.filename == "model.plan"
        out = tmp_path / name / "model.plan"
        out.parent.mkdir()
        with pytest.raises(SkipVariant) as exc:
            v.build(ctx, out)
        assert str(exc.value).startswith("not built: needs an NVIDIA GPU and TensorRT (tensorrt not importable:")
        assert not any(out.parent.iterdir()), "no placeholder file"
        with pytest.raises(SkipVariant, match="cannot run: needs an NVIDIA GPU and TensorRT"):
            v.load_runner(out)
    assert [get_variant(n).parent for n in ("trt_fp16", "trt_int8", "trt_fp8")] == ["onnx", "onnx_int8", "onnx"]
    assert [get_variant(n).gate for n in ("trt_fp16", "trt_int8", "trt_fp8")] == ["fp16", "int8", "fp8"]
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.plan"))


def test_cli_fails_clearly_without_tensorrt(no_tensorrt, tmp_path, capsys):
    rc = tbm.main(["--onnx", str(_onnx(tmp_path)), "--plan", str(tmp_path / "m.plan")])
    assert rc == 2 and not (tmp_path / "m.plan").exists()
    assert "tensorrt not importable" in capsys.readouterr().err
    assert tbm.main(["--onnx", str(tmp_path / "nope.onnx"), "--plan", str(tmp_path / "m.plan")]) == 2


def test_trt_build_main_imports_only_the_standard_library(repo_root):
    """It must run inside the TensorRT container, which lacks numpy/onnx/torch."""
    import subprocess

    code = ("import sys, export.trt_build_main; heavy = {'numpy', 'torch', 'onnx', 'onnxruntime'} & set(sys.modules); "
            "sys.exit(1 if heavy else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=repo_root).returncode == 0


# --------------------------------------------------------------------------- real TensorRT (GPU hosts)
@pytest.mark.gpu
def test_real_tensorrt_engine_from_tiny_onnx(tmp_path):
    trt = pytest.importorskip("tensorrt")
    try:
        tbm.gpu_info()
    except tbm.TensorRTUnavailable as exc:
        pytest.skip(str(exc))
    import numpy as np
    import torch

    from export.context import export_module
    from export.onnx_variant import export_onnx
    from export.tensorrt_engine import engine_runner
    from tests.fixtures.models import scale_head, tiny_model

    model = scale_head(tiny_model())
    onnx_path = tmp_path / "model.onnx"
    export_onnx(export_module(model), torch.randn(2, 3, IMG, IMG), onnx_path)
    info = tbm.build_engine(onnx_path, tmp_path / "model.plan", trt_module=trt, precision="fp16", max_batch=4)
    assert info["fp32_pinned_layers"] > 0
    run = engine_runner(tmp_path / "model.plan")
    x = np.random.default_rng(0).standard_normal((6, 3, IMG, IMG)).astype(np.float32)
    logits, emb = run(x)
    with torch.no_grad():
        ref, ref_emb = model.forward_with_embedding(torch.from_numpy(x))
    assert logits.shape == (6, 3) and emb.shape == ref_emb.shape
    assert np.abs(logits - ref.numpy()).max() < 0.05 * max(1.0, np.abs(ref.numpy()).max())
