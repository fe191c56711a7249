"""TensorRT engine build and run logic against a fake of the `tensorrt`
module (TensorRT cannot be installed on the CPU machines), the version pin,
the GPU stamping, and the SKIPPED path of the TensorRT variants without
TensorRT. The fake lives only in this file and behaves like TensorRT 10
and 11 where the code has been wrong before or could be: a strongly typed
network (STRONGLY_TYPED, flag bit 1 in 10 and 0 in 11, where it is ignored)
refuses layer precisions and output types and fails to build with a
precision builder flag; TensorRT 11 has no weakly typed builder flags; the
parsed graph's types are the ONNX file's (FP32, FP16 AutoCast, INT8 or FP8
Q/DQ); a version-compatible plan deserializes only with
`engine_host_code_allowed`, `set_input_shape` returns False outside the
profile, and the stream handle of every execution is recorded (0 = the
legacy default stream). A real build runs where a GPU and TensorRT are
present (marker `gpu`)."""
from __future__ import annotations

import enum
import json
import os
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.export import trt_build_main as tbm
from dinov2_triton.export.registry import SkipVariant

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
    CAST = 13


class DataType(enum.Enum):
    FLOAT = "float32"
    HALF = "float16"
    INT8 = "int8"
    INT32 = "int32"
    FP8 = "fp8"


class BuilderFlag(enum.Enum):
    FP16 = 1
    INT8 = 2
    FP8 = 3
    OBEY_PRECISION_CONSTRAINTS = 4
    PREFER_PRECISION_CONSTRAINTS = 5
    VERSION_COMPATIBLE = 6


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0


class NetworkDefinitionCreationFlag(enum.IntEnum):   # pybind11 enums convert with int()
    """TensorRT 10: EXPLICIT_BATCH (deprecated, the default) is bit 0, STRONGLY_TYPED bit 1."""
    EXPLICIT_BATCH = 0
    STRONGLY_TYPED = 1


class NetworkDefinitionCreationFlag11(enum.IntEnum):
    """TensorRT 11: STRONGLY_TYPED (bit 0) is kept for compatibility and ignored."""
    STRONGLY_TYPED = 0


class Tensor:
    def __init__(self, name, dtype=DataType.FLOAT, shape=None):
        self.name, self.dtype, self.shape = name, dtype, shape


class Layer:
    def __init__(self, name, type_, inputs, outputs):
        self.name, self.type = name, type_
        self._inputs, self._outputs = inputs, outputs

    @property
    def precision(self):
        return DataType.FLOAT

    @precision.setter
    def precision(self, value):   # strongly typed: TensorRT 10 refuses it, 11 has no such thing
        raise RuntimeError(f"{self.name}: layer precision cannot be set in a strongly typed network")

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
        raise RuntimeError(f"{self.name}: output types cannot be set in a strongly typed network")


class Network:
    def __init__(self, flags, strongly_typed):
        self.flags, self.strongly_typed = flags, strongly_typed
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


def vit_like(network: Network, *, graph: str = "fp32", input_name="pixel_values", dims=(-1, 3, IMG, IMG)):
    """What the ONNX parser makes of the DINOv2 export (one block), typed as
    the ONNX file is: `graph` fp32 (the onnx variant), fp16 (onnx_fp16:
    AutoCast with LayerNorm, Softmax, patch embedding and head FP32, FP32
    I/O), int8 / fp8 (Q/DQ before the weight MatMul, FP32 elsewhere)."""
    F32, F16 = DataType.FLOAT, DataType.HALF
    low = F16 if graph == "fp16" else F32
    x = Tensor(input_name, shape=dims)
    network.inputs.append(x)

    def cast(name, t, dtype):
        return t if t.dtype == dtype else network.add(name, LayerType.CAST, [t], dtype=dtype)

    w = network.add("patch_w", LayerType.CONSTANT, [])
    h = cast("cast_h", network.add("patch_embed", LayerType.CONVOLUTION, [x, w]), low)
    n1 = cast("cast_n1", network.add("norm1", LayerType.NORMALIZATION, [cast("cast_h32", h, F32)]), low)
    if graph in ("int8", "fp8"):
        q = network.add("q_act", LayerType.QUANTIZE, [n1], dtype=DataType.INT8 if graph == "int8" else DataType.FP8)
        n1 = network.add("dq_act", LayerType.DEQUANTIZE, [q])
    qkv_w = network.add("qkv_w", LayerType.CONSTANT, [], dtype=low)
    qkv = network.add("qkv", LayerType.MATRIX_MULTIPLY, [n1, qkv_w], dtype=low)
    att = network.add("attn_qk", LayerType.MATRIX_MULTIPLY, [qkv, qkv], dtype=low)
    sm = cast("cast_sm", network.add("softmax", LayerType.SOFTMAX, [cast("cast_att", att, F32)]), low)
    av = network.add("attn_v", LayerType.MATRIX_MULTIPLY, [sm, qkv], dtype=low)
    res = network.add("residual", LayerType.ELEMENTWISE, [h, av], dtype=low)
    n2 = network.add("norm_final", LayerType.NORMALIZATION, [cast("cast_res", res, F32)])
    mean = network.add("patch_mean", LayerType.REDUCE, [n2])
    emb = network.add("concat", LayerType.CONCATENATION, [n2, mean])
    head_w = network.add("head_w", LayerType.CONSTANT, [])
    mm = network.add("head_matmul", LayerType.MATRIX_MULTIPLY, [emb, head_w])
    bias = network.add("head_bias", LayerType.CONSTANT, [])
    logits = network.add("head_add", LayerType.ELEMENTWISE, [mm, bias])
    logits.name = "logits"
    emb.name = "embedding"
    network.outputs += [logits, emb]


GRAPHS = {"FP16": "fp16", "FP8": "fp8", "QDQ": "int8"}   # the first word found in the fake ONNX file -> its types


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, []

    def parse_from_file(self, path):
        text = Path(path).read_text()
        if "BROKEN" in text:
            self.errors = ["node 7 (Foo): unsupported op"]
            return False
        graph = next((g for word, g in GRAPHS.items() if word in text), "fp32")
        vit_like(self.network, graph=graph, input_name="images" if "WRONGNAME" in text else "pixel_values")
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


PRECISION_FLAGS = {"FP16", "BF16", "INT8", "FP8", "INT4", "FP4", "OBEY_PRECISION_CONSTRAINTS",
                   "PREFER_PRECISION_CONSTRAINTS"}


class Builder:
    """TensorRT 10: strongly typed when create_network gets the STRONGLY_TYPED
    bit; a strongly typed network does not build with a precision flag."""
    instances = []
    always_strongly_typed = False

    def __init__(self, logger):
        self.logger = logger
        self.network = self.config = None
        self.fail = False
        Builder.instances.append(self)

    def create_network(self, flags=0):
        typed = self.always_strongly_typed or bool(flags & (1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED.value))
        self.network = Network(flags, typed)
        return self.network

    def create_builder_config(self):
        self.config = Config()
        return self.config

    def create_optimization_profile(self):
        return Profile()

    def build_serialized_network(self, network, config):
        if self.fail or FAKE_STATE["fail_build"]:
            return None
        if network.strongly_typed and PRECISION_FLAGS & {f.name for f in config.flags}:
            return None   # TensorRT 10 logs: precision flags are not allowed in a strongly typed network
        max_batch = config.profiles[0].shapes["pixel_values"][2][0]
        return memoryview(b"PLAN:" + ",".join(f.name for f in config.flags).encode() + f";max={max_batch}".encode())


class Logger:
    WARNING = 2

    def __init__(self, level=2):
        self.level = level


FAKE_STATE = {"fail_build": False, "reject_shapes": False}
NUM_CLASSES, EMBED = 3, 4


class Runtime:
    """TensorRT 10 semantics: a version-compatible plan embeds host code
    (the lean runtime) and deserializes only when engine_host_code_allowed
    was set to True first (default False); otherwise None (TensorRT logs)."""

    def __init__(self, logger):
        self.engine_host_code_allowed = False

    def deserialize_cuda_engine(self, blob):
        blob = bytes(blob)
        if not blob.startswith(b"PLAN:"):
            return None
        flags, _, max_part = blob[5:].partition(b";max=")
        if b"VERSION_COMPATIBLE" in flags and not self.engine_host_code_allowed:
            return None
        return Engine(int(max_part or 8))


class Engine:
    def __init__(self, max_batch):
        self.max_batch = max_batch
        self.names = ["pixel_values", "logits", "embedding"]
        self.contexts = []

    num_io_tensors = property(lambda self: len(self.names))

    def get_tensor_name(self, i):
        return self.names[i]

    def get_tensor_dtype(self, name):
        return DataType.FLOAT

    def get_tensor_profile_shape(self, name, profile):
        assert name == "pixel_values" and profile == 0
        return (1, 3, IMG, IMG), (self.max_batch, 3, IMG, IMG), (self.max_batch, 3, IMG, IMG)

    def create_execution_context(self):
        self.contexts.append(Context(self))
        return self.contexts[-1]


def fake_outputs(x):
    """What the fake engine computes: per-image channel means (logits) and
    [mean, std, min, max] (embedding)."""
    flat = x.reshape(len(x), 3, -1)
    return flat.mean(2), np.stack([x.reshape(len(x), -1).mean(1), x.reshape(len(x), -1).std(1),
                                   x.reshape(len(x), -1).min(1), x.reshape(len(x), -1).max(1)], 1)


class Context:
    def __init__(self, engine):
        self.engine, self.shape, self.addresses = engine, None, {}
        self.streams, self.shapes_seen = [], []

    def set_input_shape(self, name, shape):
        if FAKE_STATE["reject_shapes"] or not 1 <= shape[0] <= self.engine.max_batch:
            return False          # TensorRT: outside the profile -> False, state unchanged
        self.shape = tuple(shape)
        self.shapes_seen.append(self.shape)
        return True

    def infer_shapes(self):
        return [] if self.shape else ["pixel_values"]

    def get_tensor_shape(self, name):
        b = self.shape[0] if self.shape else -1
        return {"pixel_values": self.shape, "logits": (b, NUM_CLASSES), "embedding": (b, EMBED)}[name]

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr

    def execute_async_v3(self, stream_handle):
        self.streams.append(stream_handle)
        x = FakeDevice.buffers[self.addresses["pixel_values"]]
        logits, emb = fake_outputs(x)
        FakeDevice.buffers[self.addresses["logits"]][...] = logits
        FakeDevice.buffers[self.addresses["embedding"]][...] = emb
        return True


class FakeDevice:
    """Host arrays standing in for CUDA buffers; pointers are dict keys."""

    buffers: dict = {}
    stream_handle = 0x5EED        # a stream of the runner's own, not 0 (the legacy default stream)

    def __init__(self):
        self.syncs = 0

    def _register(self, array):
        ptr = 0x1000 + len(FakeDevice.buffers)
        FakeDevice.buffers[ptr] = array
        return ptr, array

    def upload(self, array):
        return self._register(np.array(array, copy=True))

    def empty(self, shape, dtype):
        return self._register(np.full(shape, np.nan, dtype=dtype))

    def pointer(self, buffer):
        return buffer[0]

    def synchronize(self):
        self.syncs += 1

    def download(self, buffer):
        return buffer[1].astype(np.float32)


def fake_trt(version="10.5.0.18"):
    return types.SimpleNamespace(
        __version__=version, Logger=Logger, Builder=Builder, OnnxParser=OnnxParser, LayerType=LayerType,
        BuilderFlag=BuilderFlag, MemoryPoolType=MemoryPoolType, Runtime=Runtime,
        NetworkDefinitionCreationFlag=NetworkDefinitionCreationFlag,
        float32=DataType.FLOAT, float16=DataType.HALF, int8=DataType.INT8, int32=DataType.INT32, fp8=DataType.FP8)


class BuilderFlag11(enum.Enum):
    """TensorRT 11: the weak-typing flags are gone."""
    VERSION_COMPATIBLE = 12


class Builder11(Builder):
    """TensorRT 11: every network is strongly typed, the flag is ignored."""
    always_strongly_typed = True


def fake_trt11(version="11.3.0.99", *, with_flag=True):
    trt = fake_trt(version)
    trt.BuilderFlag = BuilderFlag11
    trt.Builder = Builder11
    trt.NetworkDefinitionCreationFlag = NetworkDefinitionCreationFlag11 if with_flag else types.SimpleNamespace()
    return trt


@pytest.fixture(autouse=True)
def _reset():
    Builder.instances.clear()
    FakeDevice.buffers.clear()
    FAKE_STATE["fail_build"] = False
    FAKE_STATE["reject_shapes"] = False


def _onnx(tmp_path, text="GRAPH") -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    p = tmp_path / "model.onnx"
    p.write_text(text)
    return p


def _layers(builder) -> dict:
    return {layer.name: layer for layer in builder.network.layers}


# --------------------------------------------------------------------------- build_engine
def test_fp16_engine_is_strongly_typed_from_the_fp16_graph(tmp_path):
    plan = tmp_path / "out" / "model.plan"
    info = tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), plan, trt_module=fake_trt(), precision="fp16",
                            max_batch=8, workspace_bytes=2 << 30, builder_optimization_level=4)
    b = Builder.instances[-1]
    cfg = b.config
    # TensorRT 10: the STRONGLY_TYPED bit (1 << 1), nothing else
    assert b.network.flags == 1 << NetworkDefinitionCreationFlag.STRONGLY_TYPED.value and b.network.strongly_typed
    assert info["strongly_typed"] is True and info["network_flags"] == ["STRONGLY_TYPED"]
    # no precision flag (the graph's types are the precision) and no precision constraint
    assert cfg.flags == [] and info["builder_flags"] == []
    # one profile: min 1, opt = max = max_batch_size (docs/field-notes.md #7)
    assert len(cfg.profiles) == 1
    assert cfg.profiles[0].shapes == {"pixel_values": ((1, 3, IMG, IMG), (8, 3, IMG, IMG), (8, 3, IMG, IMG))}
    assert info["profile"] == {"min": [1, 3, IMG, IMG], "opt": [8, 3, IMG, IMG], "max": [8, 3, IMG, IMG]}
    assert cfg.pools == {MemoryPoolType.WORKSPACE: 2 << 30}
    assert cfg.builder_optimization_level == 4
    # the FP32 islands are the graph's: LayerNorm, Softmax, patch embedding and head
    layers = _layers(b)
    for name in ("norm1", "norm_final", "softmax", "patch_embed", "head_matmul", "head_add"):
        assert layers[name].get_output(0).dtype == DataType.FLOAT, name
    for name in ("qkv", "attn_qk", "attn_v", "residual"):
        assert layers[name].get_output(0).dtype == DataType.HALF, name
    assert info["tensor_types"] == {"float16": 8, "float32": 14}
    assert plan.read_bytes() == b"PLAN:;max=8"
    assert info["plan_bytes"] == plan.stat().st_size and info["tensorrt_version"] == "10.5.0.18"
    assert not list(plan.parent.glob("*.tmp"))


def test_int8_engine_explicit_quantization(tmp_path):
    plan = tmp_path / "model.plan"
    info = tbm.build_engine(_onnx(tmp_path, "QDQ GRAPH"), plan, trt_module=fake_trt(), precision="int8",
                            max_batch=16, opt_batch=4, version_compatible=True)
    b = Builder.instances[-1]
    assert b.network.strongly_typed and b.config.flags == [BuilderFlag.VERSION_COMPATIBLE]
    assert b.config.profiles[0].shapes["pixel_values"] == ((1, 3, IMG, IMG), (4, 3, IMG, IMG), (16, 3, IMG, IMG))
    assert info["builder_flags"] == ["VERSION_COMPATIBLE"] and info["tensor_types"]["int8"] == 1
    assert "float16" not in info["tensor_types"]      # FP32 outside the Q/DQ, as the onnx_int8 graph has it


def test_the_graph_types_must_be_the_precision_asked_for(tmp_path):
    """A strongly typed build of the FP32 graph is an FP32 engine: never
    published under an fp16 (or int8, fp8) name; nothing is written."""
    trt = fake_trt()
    plan = tmp_path / "model.plan"
    cases = [("GRAPH", "fp16", r"no float16 tensor.*float32 16.*onnx_fp16 graph"),
             ("FP16 GRAPH", "int8", r"no int8 tensor.*Q/DQ onnx_int8 graph"),
             ("QDQ GRAPH", "fp8", r"no fp8 tensor.*FP8 Q/DQ graph"),
             ("FP16 GRAPH", "fp32", r"holds float16 tensors.*FP32 onnx graph"),
             ("QDQ GRAPH", "fp32", r"holds int8 tensors")]
    for text, precision, match in cases:
        with pytest.raises(tbm.EngineBuildError, match=match):
            tbm.build_engine(_onnx(tmp_path, text), plan, trt_module=trt, precision=precision, max_batch=8)
        assert Builder.instances[-1].config is None, "refused before any build"
    assert not plan.exists()
    info = tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="fp32", max_batch=8)
    assert info["tensor_types"] == {"float32": 16} and plan.is_file()


def test_timing_cache_is_loaded_and_saved(tmp_path):
    cache = tmp_path / "cache" / "timing.cache"
    info = tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), tmp_path / "a.plan", trt_module=fake_trt(),
                            precision="fp16", max_batch=4, timing_cache=cache)
    assert cache.read_bytes() == b"CACHE" and info["timing_cache"]["loaded_bytes"] == 0
    # a second build starts from the saved cache
    tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), tmp_path / "b.plan", trt_module=fake_trt(), precision="fp16",
                     max_batch=4, timing_cache=cache)
    assert Builder.instances[-1].config.timing_cache.blob == b"CACHE"


def test_build_errors_write_nothing(tmp_path):
    trt = fake_trt()
    plan = tmp_path / "model.plan"
    with pytest.raises(tbm.EngineBuildError, match="could not parse.*unsupported op"):
        tbm.build_engine(_onnx(tmp_path, "BROKEN"), plan, trt_module=trt, precision="fp16", max_batch=8)
    with pytest.raises(tbm.EngineBuildError, match=r"inputs are \['images'\]"):
        tbm.build_engine(_onnx(tmp_path, "FP16 WRONGNAME"), plan, trt_module=trt, precision="fp16", max_batch=8)
    FAKE_STATE["fail_build"] = True
    with pytest.raises(tbm.EngineBuildError, match="failed to build the fp16 engine"):
        tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), plan, trt_module=trt, precision="fp16", max_batch=8)
    with pytest.raises(ValueError, match="opt batch 9"):
        tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="fp16", max_batch=8, opt_batch=9)
    with pytest.raises(ValueError, match="precision"):
        tbm.build_engine(_onnx(tmp_path), plan, trt_module=trt, precision="int4", max_batch=8)
    assert not plan.exists()


# --------------------------------------------------------------------------- version pin + stamping
def test_versions_match_needs_the_full_version_for_standard_plans():
    # A standard plan loads only in the exact TensorRT that built it: "10.5.0"
    # does not prove it is 10.5.0.18.
    assert tbm.versions_match("10.5.0.18", "10.5.0.18")
    assert not tbm.versions_match("10.5.0", "10.5.0.18")
    assert not tbm.versions_match("10.5.0.17", "10.5.0.18") and not tbm.versions_match("10.6.0.26", "10.5.0.18")
    assert not tbm.versions_match("10.5.0.18.post1x", "10.5.0.19")
    # version-compatible: same major, built by the same or an older TensorRT than the runtime's
    assert tbm.versions_match("10.4.0.26", "10.5.0.18", version_compatible=True)
    assert tbm.versions_match("10.5.0.18", "10.5.0.18", version_compatible=True)
    assert not tbm.versions_match("10.6.0.26", "10.5.0.18", version_compatible=True)
    assert not tbm.versions_match("9.9.0.1", "10.5.0.18", version_compatible=True)


PIN_TEXT = """TRITON_CONTAINER_TAG=24.10
TRITON_CONTAINER_IMAGE="nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER_TAG}-py3"
TENSORRT_CONTAINER_IMAGE="nvcr.io/nvidia/tensorrt:${TRITON_CONTAINER_TAG}-py3"
TRITON_SERVER_VERSION=2.51.0
TRITON_CUDA_VERSION=12.6.2
TRITON_MIN_DRIVER=560
TRITON_MIN_COMPUTE_CAPABILITY=6.0
TRITON_TENSORRT_VERSION=10.5.0.18
TRITON_ONNXRUNTIME_VERSION=1.19.2
TRITON_PYTHON_VERSION=3.10
LOCAL_TRITON_SERVER_VERSION=2.51.0
"""
H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cc": (9, 0), "source": "test",
        "device": 0, "compatible_gpu_ids": [0, 1]}


def _build_plan(tmp_path, *, version="10.5.0.18", cc=(9, 0), precision="fp16", trt=None, graph="FP16 GRAPH",
                pinned="10.5.0.18", **kw):
    pins = tmp_path / "triton_version.sh"
    pins.write_text(PIN_TEXT.replace("TRITON_TENSORRT_VERSION=10.5.0.18", f"TRITON_TENSORRT_VERSION={pinned}"))
    gpu = {**H100, "compute_capability": f"{cc[0]}.{cc[1]}", "cc": cc}
    return tbm.build_plan(_onnx(tmp_path, graph), tmp_path / "model.plan", precision=precision, max_batch=8,
                          timing_cache=None, versions_file=pins, import_trt=lambda: trt or fake_trt(version),
                          get_gpu=lambda: gpu, **kw)


def test_build_plan_stamps_version_gpu_and_compute_capability(tmp_path):
    info = _build_plan(tmp_path)
    assert info["config_parameters"] == {"tensorrt_version": "10.5.0.18", "gpu_name": "NVIDIA H100 80GB HBM3",
                                         "compute_capability": "9.0", "version_compatible": "false",
                                         "triton_container_tag": "24.10"}
    assert info["gpu_name"] == "NVIDIA H100 80GB HBM3" and info["compute_capability"] == "9.0"
    assert info["version_check"]["match"] is True and len(info["onnx_sha256"]) == 64
    assert info["instance_gpus"] == [0, 1]     # the GPUs of the build GPU's kind only
    json.dumps(info)   # goes into the manifest


def test_version_mismatch_refused_unless_allowed(tmp_path):
    with pytest.raises(tbm.VersionMismatch,
                       match=r"10\.6\.0\.26 cannot build a plan for TensorRT 10\.5\.0\.18.*24\.10"):
        _build_plan(tmp_path, version="10.6.0.26")
    with pytest.raises(tbm.VersionMismatch, match="exact TensorRT"):
        _build_plan(tmp_path, version="10.5.0")
    assert not (tmp_path / "model.plan").exists()
    info = _build_plan(tmp_path, version="10.6.0.26", allow_version_mismatch=True)
    assert info["version_check"]["match"] is False and "MISMATCH allowed" in info["version_check"]["note"]
    assert (tmp_path / "model.plan").is_file()


def test_version_compatible_plan_from_an_older_tensorrt(tmp_path):
    with pytest.raises(tbm.VersionMismatch):
        _build_plan(tmp_path, version="10.4.0.26")
    info = _build_plan(tmp_path, version="10.4.0.26", version_compatible=True)
    assert info["version_check"]["match"] is True and "VERSION_COMPATIBLE" in info["builder_flags"]
    assert info["config_parameters"]["version_compatible"] == "true"
    with pytest.raises(tbm.VersionMismatch, match="same TensorRT major"):
        _build_plan(tmp_path, version="10.6.0.26", version_compatible=True)


def test_tensorrt_11_builds_the_same_strongly_typed_network(tmp_path):
    """One code path for TensorRT 10 and 11: no attribute TensorRT 11 removed
    is touched (its BuilderFlag has no FP16/INT8/FP8/precision constraints),
    the STRONGLY_TYPED flag is passed where the enum still has it (11 ignores
    it) and left out where it does not."""
    for precision, graph in (("fp16", "FP16 GRAPH"), ("int8", "QDQ GRAPH"), ("fp8", "FP8 QDQ GRAPH")):
        plan = tmp_path / f"{precision}.plan"
        info = tbm.build_engine(_onnx(tmp_path, graph), plan, trt_module=fake_trt11(), precision=precision,
                                max_batch=8, version_compatible=True)
        b = Builder.instances[-1]
        assert b.network.flags == 1 << NetworkDefinitionCreationFlag11.STRONGLY_TYPED.value
        assert info["network_flags"] == ["STRONGLY_TYPED"] and info["builder_flags"] == ["VERSION_COMPATIBLE"]
        assert b.config.flags == [BuilderFlag11.VERSION_COMPATIBLE] and plan.is_file()
        assert info["tensorrt_version"] == "11.3.0.99"
    info = tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), tmp_path / "m.plan", trt_module=fake_trt11(with_flag=False),
                            precision="fp16", max_batch=8)
    assert Builder.instances[-1].network.flags == 0 and info["network_flags"] == [] and info["strongly_typed"]


def test_tensorrt_older_than_10_is_refused(tmp_path):
    old = fake_trt("8.6.1.6")
    old.NetworkDefinitionCreationFlag = types.SimpleNamespace(EXPLICIT_BATCH=0)   # 8.6: no STRONGLY_TYPED
    with pytest.raises(tbm.EngineBuildError, match=r"8\.6\.1\.6: this builder builds strongly typed networks with "
                                                    r"TensorRT >= 10"):
        tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), tmp_path / "m.plan", trt_module=old, precision="fp16",
                         max_batch=8)
    assert not (tmp_path / "m.plan").exists() and not Builder.instances


def test_build_plan_accepts_the_pinned_tensorrt_11(tmp_path):
    info = _build_plan(tmp_path, version="11.3.0.99", pinned="11.3.0.99", trt=fake_trt11())
    assert info["version_check"]["match"] is True and info["config_parameters"]["tensorrt_version"] == "11.3.0.99"
    assert (tmp_path / "model.plan").read_bytes() == b"PLAN:;max=8"
    # the exact-version rule holds in 11 as in 10
    with pytest.raises(tbm.VersionMismatch, match=r"11\.3\.0\.99 cannot build a plan for TensorRT 10\.5\.0\.18"):
        _build_plan(tmp_path, version="11.3.0.99", trt=fake_trt11())
    with pytest.raises(tbm.VersionMismatch, match="same TensorRT major"):
        _build_plan(tmp_path, version="10.5.0.18", pinned="11.3.0.99", version_compatible=True)


def test_a_pinned_tensorrt_11_goes_on_to_the_container(tmp_path, monkeypatch, capsys):
    """The builder and the pin agree on the first TensorRT without weakly typed
    builds, and such a pin no longer stops `--in-container` plan builds
    before docker, nor warns a whole export that its TensorRT variants fail:
    both reach docker (missing here)."""
    from dinov2_triton.core import release_pin
    from dinov2_triton.export import container as trt_box
    from dinov2_triton.serve.container import ContainerError

    eleven = tmp_path / "pin11.env"
    eleven.write_text(PIN_TEXT.replace("TRITON_TENSORRT_VERSION=10.5.0.18", "TRITON_TENSORRT_VERSION=11.3.0.99"))
    pin11 = release_pin.load_pin(eleven)
    assert pin11.tensorrt_major == 11
    monkeypatch.setenv("PATH", str(tmp_path / "no-bin"))     # no docker here
    monkeypatch.chdir(tmp_path)
    lock = tmp_path / "lock.txt"
    lock.write_text("# python: 3.10\n")
    for pin in (pin11, release_pin.load_pin()):          # a TensorRT 11 pin and the real one (NGC 26.09)
        capsys.readouterr()
        with pytest.raises(ContainerError, match="docker not found"):
            trt_box.run_in_container(["--onnx", "x.onnx"], mode="plans", pin=pin)
        if pin is pin11:
            with pytest.raises(ContainerError, match="docker not found"):
                trt_box.run_in_container(["--variants", "onnx,trt_fp16"], mode="export", pin=pin, lock_file=lock)
        assert "WARNING" not in capsys.readouterr().err


def test_fp8_needs_ada_or_hopper(tmp_path):
    with pytest.raises(tbm.TensorRTUnavailable, match=r"FP8 needs compute capability >= 8\.9.*8\.0"):
        _build_plan(tmp_path, cc=(8, 0), precision="fp8", graph="FP8 QDQ GRAPH")
    info = _build_plan(tmp_path, cc=(9, 0), precision="fp8", graph="FP8 QDQ GRAPH")
    assert info["tensor_types"]["fp8"] == 1 and info["builder_flags"] == []


# --------------------------------------------------------------------------- GPU discovery
NVIDIA_SMI_OUT = ("0, NVIDIA A10G, 8.6, 575.57.08, 23028\n1, NVIDIA A10G, 8.6, 575.57.08, 23028\n"
                  "2, Tesla T4, 7.5, 575.57.08, 15360\n")


@pytest.fixture
def only_nvidia_smi(tmp_path, monkeypatch):
    """Neither torch nor cuda-python importable (as in the TensorRT
    container), a working nvidia-smi on PATH."""
    for name in ("torch", "cuda", "cuda.bindings"):
        monkeypatch.setitem(sys.modules, name, None)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text("#!/bin/sh\n"
                   "case \"$*\" in *--query-gpu=index,name,compute_cap,driver_version,memory.total*) ;; "
                   "*) echo bad args >&2; exit 9 ;; esac\n"
                   f"printf '{NVIDIA_SMI_OUT}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return smi


def test_gpu_info_falls_back_to_nvidia_smi(only_nvidia_smi):
    info = tbm.gpu_info()
    assert info["source"] == "nvidia-smi" and info["gpu_name"] == "NVIDIA A10G"
    assert info["cc"] == (8, 6) and info["compute_capability"] == "8.6" and info["driver_version"] == "575.57.08"
    assert info["compatible_gpu_ids"] == [0, 1] and len(info["gpus"]) == 3
    assert info["total_memory_bytes"] == 23028 << 20
    t4 = tbm.gpu_info(2)
    assert t4["cc"] == (7, 5) and t4["compatible_gpu_ids"] == [2]


def test_gpu_info_reports_every_failed_source(only_nvidia_smi):
    only_nvidia_smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the "
                               "NVIDIA driver' >&2\nexit 9\n")
    with pytest.raises(tbm.TensorRTUnavailable) as exc:
        tbm.gpu_info()
    msg = str(exc.value)
    assert msg.startswith("not built: needs an NVIDIA GPU and TensorRT (no CUDA GPU visible:")
    assert "torch not installed" in msg and "cuda-python not installed" in msg
    assert "could not communicate with the NVIDIA driver" in msg


# --------------------------------------------------------------------------- the engine runner
def _plan(tmp_path, *, max_batch=4, version_compatible=False, name="model.plan"):
    plan = tmp_path / name
    tbm.build_engine(_onnx(tmp_path, "FP16 GRAPH"), plan, trt_module=fake_trt(), precision="fp16",
                     max_batch=max_batch, version_compatible=version_compatible)
    return plan


def test_runner_uses_its_own_stream_and_splits_large_inputs(tmp_path):
    from dinov2_triton.export.variants.tensorrt import engine_runner

    dev = FakeDevice()
    run = engine_runner(_plan(tmp_path, max_batch=4), trt_module=fake_trt(), device=dev)
    x = np.random.default_rng(0).standard_normal((6, 3, IMG, IMG)).astype(np.float32)
    logits, emb = run(x)
    ref_logits, ref_emb = fake_outputs(x)
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-6)
    np.testing.assert_allclose(emb, ref_emb, rtol=1e-5)
    ctx = run.context
    assert ctx.shapes_seen == [(4, 3, IMG, IMG), (2, 3, IMG, IMG)]
    # every execution on the runner's stream, never the legacy default stream (handle 0)
    assert ctx.streams == [FakeDevice.stream_handle] * 2 and 0 not in ctx.streams
    assert dev.syncs == 2


def test_runner_stops_when_tensorrt_rejects_the_shape(tmp_path):
    from dinov2_triton.export.variants.tensorrt import engine_runner

    run = engine_runner(_plan(tmp_path), trt_module=fake_trt(), device=FakeDevice())
    FAKE_STATE["reject_shapes"] = True
    with pytest.raises(RuntimeError, match=r"rejected input shape \(2, 3, 28, 28\).*profile batch 1\.\.4"):
        run(np.zeros((2, 3, IMG, IMG), np.float32))
    assert run.context.streams == [], "nothing may run on a rejected shape"


def test_version_compatible_plans_deserialize_with_host_code_allowed(tmp_path):
    from dinov2_triton.export.variants.tensorrt import engine_runner, plan_is_version_compatible

    trt = fake_trt()
    model_dir = tmp_path / "dinov2_trt_fp16"
    (model_dir / "1").mkdir(parents=True)
    vc = _plan(model_dir / "1", version_compatible=True)
    # without host code TensorRT refuses a version-compatible plan
    with pytest.raises(tbm.EngineBuildError, match="could not deserialize"):
        engine_runner(vc, trt_module=trt, device=FakeDevice(), allow_host_code=False)
    assert engine_runner(vc, trt_module=trt, device=FakeDevice(), allow_host_code=True)
    # a published plan: its config.pbtxt says it is version-compatible
    assert not plan_is_version_compatible(vc)
    (model_dir / "config.pbtxt").write_text('name: "dinov2_trt_fp16"\nparameters {\n  key: "version_compatible"\n'
                                            '  value {\n    string_value: "true"\n  }\n}\n')
    assert plan_is_version_compatible(vc)
    run = engine_runner(vc, trt_module=trt, device=FakeDevice())
    assert run(np.ones((1, 3, IMG, IMG), np.float32))[0].shape == (1, NUM_CLASSES)
    # a standard plan never gets host code
    std = _plan(tmp_path, name="std.plan")
    assert not plan_is_version_compatible(std)
    assert engine_runner(std, trt_module=trt, device=FakeDevice())


def test_variant_build_records_version_compatibility_for_its_runner(tmp_path, monkeypatch):
    from dinov2_triton.export.variants import tensorrt as te

    pins = tmp_path / "triton_version.sh"
    pins.write_text(PIN_TEXT)
    monkeypatch.setattr(te, "import_tensorrt", lambda: fake_trt())
    monkeypatch.setattr(te, "gpu_info", lambda: dict(H100))
    ctx = types.SimpleNamespace(options={"trt_version_compatible": "true", "trt_versions_file": str(pins),
                                         "trt_timing_cache": ""},
                                max_batch_size=4, work_dir=tmp_path / "work",
                                artifacts={"onnx": _onnx(tmp_path), "onnx_fp16": _onnx(tmp_path / "staged", "FP16")})
    out = tmp_path / "staged" / "1" / "model.plan"
    out.parent.mkdir(parents=True)
    real_build_plan = te.build_plan
    monkeypatch.setattr(te, "build_plan", lambda *a, **kw: real_build_plan(
        *a, **kw, import_trt=lambda: fake_trt(), get_gpu=lambda: dict(H100)))
    info = te.build_trt_fp16(ctx, out)
    assert info["version_compatible"] is True and out.is_file()
    # built from the onnx_fp16 graph (the FP32 one would be refused as not fp16)
    assert info["source_variant"] == "onnx_fp16" and info["onnx"] == str(ctx.artifacts["onnx_fp16"])
    assert te.plan_is_version_compatible(out)
    assert te.engine_runner(out, trt_module=fake_trt(), device=FakeDevice())


def test_missing_parent_artifact_is_a_clear_error(tmp_path, monkeypatch):
    from dinov2_triton.export.variants import tensorrt as te

    monkeypatch.setattr(te, "import_tensorrt", lambda: fake_trt())
    monkeypatch.setattr(te, "gpu_info", lambda: dict(H100))
    ctx = types.SimpleNamespace(options={}, max_batch_size=8, work_dir=tmp_path / "work", artifacts={})
    for build, parent in ((te.build_trt_fp16, "onnx_fp16"), (te.build_trt_int8, "onnx_int8"),
                          (te.build_trt_fp8, "onnx")):
        with pytest.raises(tbm.EngineBuildError, match=f"`{parent}` artifact is missing"):
            build(ctx, tmp_path / "model.plan")


# --------------------------------------------------------------------------- no TensorRT here: SKIPPED
@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)   # `import tensorrt` raises ImportError


def test_variants_skip_without_tensorrt_and_write_nothing(no_tensorrt, tmp_path):
    import dinov2_triton.export.variants.tensorrt  # noqa: F401 - registers the TensorRT variants
    from dinov2_triton.export.registry import get_variant

    (tmp_path / "parent.onnx").write_bytes(b"x")
    ctx = types.SimpleNamespace(options={}, max_batch_size=8, work_dir=tmp_path / "work",
                                artifacts={n: tmp_path / "parent.onnx" for n in ("onnx", "onnx_fp16", "onnx_int8")})
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
    assert [get_variant(n).gate for n in ("trt_fp16", "trt_int8", "trt_fp8")] == ["fp16", "int8", "fp8"]
    assert not (tmp_path / "work").exists() or not any((tmp_path / "work").rglob("*.plan"))


def test_each_plan_is_built_from_the_graph_whose_types_it_has():
    """Strongly typed: the parent graph is the precision. trt_fp16 comes from
    onnx_fp16 (AutoCast), trt_int8 from the Q/DQ onnx_int8, trt_fp8 from an
    FP8 Q/DQ graph it makes of onnx; the build order puts each parent first."""
    import dinov2_triton.export.variants.tensorrt  # noqa: F401 - registers the TensorRT variants
    from dinov2_triton.export.registry import build_order, get_variant

    assert {n: get_variant(n).parent for n in ("trt_fp16", "trt_int8", "trt_fp8")} == {
        "trt_fp16": "onnx_fp16", "trt_int8": "onnx_int8", "trt_fp8": "onnx"}
    assert build_order(["trt_fp16"]) == ["onnx", "onnx_fp16", "trt_fp16"]
    assert build_order(["trt_int8"]) == ["onnx", "onnx_int8", "trt_int8"]
    order = build_order(["trt_fp8", "trt_int8", "trt_fp16"])
    assert set(order) == {"onnx", "onnx_fp16", "onnx_int8", "trt_fp16", "trt_int8", "trt_fp8"}
    assert all(order.index(get_variant(n).parent) < order.index(n) for n in order if get_variant(n).parent)


def test_the_removed_fp32_layers_option_is_refused(tmp_path, monkeypatch):
    from dinov2_triton.export.variants import tensorrt as te

    monkeypatch.setattr(te, "import_tensorrt", lambda: fake_trt())
    monkeypatch.setattr(te, "gpu_info", lambda: dict(H100))
    ctx = types.SimpleNamespace(options={"trt_fp32_layers": "normalization,softmax"}, max_batch_size=8,
                                work_dir=tmp_path / "work", artifacts={"onnx_fp16": _onnx(tmp_path, "FP16")})
    with pytest.raises(tbm.EngineBuildError, match="trt_fp32_layers: no longer an option.*fp16_keep_fp32"):
        te.build_trt_fp16(ctx, tmp_path / "model.plan")
    assert not (tmp_path / "model.plan").exists() and not Builder.instances


def test_cli_fails_clearly_without_tensorrt(no_tensorrt, tmp_path, capsys):
    rc = tbm.main(["--onnx", str(_onnx(tmp_path)), "--plan", str(tmp_path / "m.plan")])
    assert rc == 2 and not (tmp_path / "m.plan").exists()
    assert "tensorrt not importable" in capsys.readouterr().err
    assert tbm.main(["--onnx", str(tmp_path / "nope.onnx"), "--plan", str(tmp_path / "m.plan")]) == 2


def test_trt_build_main_imports_only_the_standard_library(repo_root):
    """It must run inside the TensorRT container, which has none of this
    project's dependencies: nothing outside the standard library and the
    project's own packages is imported."""
    import subprocess

    code = ("import sys; before = set(sys.modules); import dinov2_triton.export.trt_build_main; "
            "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
            "print(sorted(new - set(sys.stdlib_module_names) - {'dinov2_triton'}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


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

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import export_onnx
    from dinov2_triton.export.variants.tensorrt import engine_runner
    from tests.fixtures.models import scale_head, tiny_model

    model = scale_head(tiny_model())
    onnx_path = tmp_path / "model.onnx"
    export_onnx(export_module(model), torch.randn(2, 3, IMG, IMG), onnx_path)
    # strongly typed: the FP32 graph is no fp16 engine, the AutoCast graph (as onnx_fp16 makes it) is
    with pytest.raises(tbm.EngineBuildError, match="no float16 tensor"):
        tbm.build_engine(onnx_path, tmp_path / "model.plan", trt_module=trt, precision="fp16", max_batch=4)
    pytest.importorskip("modelopt")
    from dinov2_triton.export.variants.onnx_fp16 import run_convert

    fp16_path = tmp_path / "model_fp16.onnx"
    run_convert(onnx_path, fp16_path, keep_ops=["LayerNormalization", "Softmax"], keep_nodes=[], data_max=512.0,
                range_data=None)
    info = tbm.build_engine(fp16_path, tmp_path / "model.plan", trt_module=trt, precision="fp16", max_batch=4)
    assert info["tensor_types"].get("float16") and info["tensor_types"].get("float32")
    assert info["builder_flags"] == [] and info["strongly_typed"]
    run = engine_runner(tmp_path / "model.plan")
    x = np.random.default_rng(0).standard_normal((6, 3, IMG, IMG)).astype(np.float32)
    logits, emb = run(x)
    with torch.no_grad():
        ref, ref_emb = model.forward_with_embedding(torch.from_numpy(x))
    assert logits.shape == (6, 3) and emb.shape == ref_emb.shape
    assert np.abs(logits - ref.numpy()).max() < 0.05 * max(1.0, np.abs(ref.numpy()).max())
