"""CPU stand-in for Triton's OpenVINO backend (a Python-based backend).

A model whose config.pbtxt says ``backend: "openvino"`` makes Triton look
for ``<backend_dir>/openvino/``; the local server's backend directory
(serve/install.py) holds this file there, so the repository the export
publishes loads here unchanged. In the NVIDIA Triton container the native
OpenVINO backend (C++, triton-inference-server/openvino_backend) serves the
same repository.

It behaves like the native backend where that decides speed or errors:
- reads ``<model>/<version>/<default_model_filename or model.xml>`` (IR;
  the .bin beside it) with the ``openvino`` Python package;
- the model parameters the native backend reads, with its values and its
  error for a bad value: PERFORMANCE_HINT (LATENCY / THROUGHPUT /
  CUMULATIVE_THROUGHPUT), NUM_STREAMS (AUTO / NUMA / n),
  INFERENCE_NUM_THREADS, COMPILATION_NUM_THREADS (n), HINT_BF16 (YES: compiled
  with INFERENCE_PRECISION_HINT=bf16, the export's openvino_bf16 variant; on a
  CPU without BF16 arithmetic OpenVINO then still runs FP32),
  ENABLE_BATCH_PADDING (YES); other parameters are ignored, as there;
- without INFERENCE_NUM_THREADS, a model with several instances gets this
  process's physical cores divided by its instance count per instance
  (OpenVINO's own default is every core for each: oversubscribed); one
  instance keeps OpenVINO's default;
- with max_batch_size > 0 the model is compiled for exactly that batch (the
  native backend calls ov::set_batch(max_batch_size)), and a smaller batch
  is refused with the native message unless ENABLE_BATCH_PADDING is YES, in
  which case it is zero-padded to max_batch_size (in an array reused from
  batch to batch) and the padding's outputs dropped: a batch of 1 costs a
  batch of max_batch_size, as in the container;
- inputs are handed to OpenVINO without a copy (``share_inputs``; OpenVINO
  copies what it cannot share, e.g. a read-only array);
- one infer request per model instance (the native backend has one), so
  instances, not streams, run batches in parallel;
- checks at load time that the config's inputs/outputs exist in the IR with
  FP32/INT types and a compatible shape; ``execute`` validates each request
  on its own (standin_common), so one bad request does not fail the others.

Not supported (the load fails with a message): ``reshape`` in the config,
RESHAPE_IO_LAYERS=YES, CPU_EXTENSION_PATH.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_FILENAME = "model.xml"
HINTS = ("LATENCY", "THROUGHPUT", "CUMULATIVE_THROUGHPUT")
_OV_TYPES = {"f32": np.float32, "f16": np.float16, "f64": np.float64, "i8": np.int8, "i16": np.int16,
             "i32": np.int32, "i64": np.int64, "u8": np.uint8, "u16": np.uint16, "u32": np.uint32,
             "u64": np.uint64, "boolean": np.bool_}

_spec = importlib.util.spec_from_file_location("standin_common", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "standin_common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _yes(config, key: str) -> bool:
    return str(common.config_parameter(config, key, default="") or "").strip().lower() == "yes"


def compile_properties(config: dict, model_name: str) -> dict:
    """Model parameters -> OpenVINO properties, validated as the native backend does."""
    props = {}

    def bad(key, value, expected):
        raise pb_utils.TritonModelException(
            f"model '{model_name}': expected the parameter '{key}' to be {expected}, got {value}")

    for key in ("INFERENCE_NUM_THREADS", "COMPILATION_NUM_THREADS"):
        value = common.config_parameter(config, key)
        if value not in (None, ""):
            if not str(value).isdigit():
                bad(key, value, "a non-negative number")
            props[key] = int(value)
    value = common.config_parameter(config, "HINT_BF16")
    if value not in (None, ""):
        if str(value).lower() != "yes":
            bad("HINT_BF16", value, "YES")
        props["INFERENCE_PRECISION_HINT"] = "bf16"
    value = common.config_parameter(config, "NUM_STREAMS")
    if value not in (None, ""):
        v = str(value).upper()
        if v not in ("AUTO", "NUMA") and not v.isdigit():
            bad("NUM_STREAMS", value, "either AUTO/NUMA/<int_value>")
        props["NUM_STREAMS"] = v if not v.isdigit() else int(v)
    value = common.config_parameter(config, "PERFORMANCE_HINT")
    if value not in (None, ""):
        if str(value).upper() not in HINTS:
            bad("PERFORMANCE_HINT", value, "LATENCY/THROUGHPUT/CUMULATIVE_THROUGHPUT")
        props["PERFORMANCE_HINT"] = str(value).upper()
    if "INFERENCE_NUM_THREADS" not in props and common.instance_count(config) > 1:
        props["INFERENCE_NUM_THREADS"] = common.default_threads(config)
    for key in ("RESHAPE_IO_LAYERS",):
        if _yes(config, key):
            raise pb_utils.TritonModelException(
                f"model '{model_name}': {key}=YES is not supported by the CPU stand-in backend")
    if common.config_parameter(config, "CPU_EXTENSION_PATH"):
        raise pb_utils.TritonModelException(
            f"model '{model_name}': CPU_EXTENSION_PATH is not supported by the CPU stand-in backend")
    return props


class TritonPythonModel(common.StandinModel):
    DEFAULT_FILENAME = DEFAULT_FILENAME

    def load(self, path, config):
        import openvino as ov

        self.padding = _yes(config, "ENABLE_BATCH_PADDING")
        props = compile_properties(config, self.model_name)
        core = ov.Core()
        try:
            model = core.read_model(path)
        except Exception as exc:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': OpenVINO cannot read {path}: {exc}") from exc
        self._check_io(model)
        if self.max_batch_size > 0:
            # the native backend's ov::set_batch(model, max_batch_size): one static batch size
            model.reshape({p.get_any_name(): [self.max_batch_size] + [d.get_length() for d in
                                                                       list(p.get_partial_shape())[1:]]
                           for p in model.inputs})
        try:
            self.compiled = core.compile_model(model, "CPU", props)
        except Exception as exc:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': OpenVINO cannot compile {path} with {props}: {exc}") from exc
        self.request = self.compiled.create_infer_request()
        self.output_names = [s.name for s in self.outputs]
        self._pad = common.FeedBuffers(self.max_batch_size)

    def _check_io(self, model):
        problems = []
        batch_rank = 1 if self.max_batch_size > 0 else 0
        for kind, specs, ports in (("input", self.inputs, model.inputs), ("output", self.outputs, model.outputs)):
            by_name = {}
            for p in ports:
                for n in p.get_names():
                    by_name[n] = p
            for spec in specs:
                p = by_name.get(spec.name)
                if p is None:
                    problems.append(f"config {kind} '{spec.name}' is not in the OpenVINO model "
                                    f"({kind}s: {sorted(by_name)})")
                    continue
                dtype = _OV_TYPES.get(p.get_element_type().get_type_name())
                if dtype != spec.dtype.type:
                    problems.append(f"{kind} '{spec.name}': model type {p.get_element_type().get_type_name()}, "
                                    f"config {spec.triton_type}")
                shape = list(p.get_partial_shape())
                if len(shape) != len(spec.dims) + batch_rank:
                    problems.append(f"{kind} '{spec.name}': model shape {p.get_partial_shape()}, config dims "
                                    f"{list(spec.dims)} (max_batch_size {self.max_batch_size})")
                    continue
                for want, got in zip(spec.dims, shape[batch_rank:]):
                    if want != -1 and got.is_static and got.get_length() != want:
                        problems.append(f"{kind} '{spec.name}': model shape {p.get_partial_shape()}, "
                                        f"config dims {list(spec.dims)}")
                        break
                    if want != -1 and not got.is_static:
                        problems.append(f"{kind} '{spec.name}': dynamic model dimension where the config "
                                        f"says {want} (the stand-in does not reshape)")
                        break
            if kind == "input" and len(ports) != len(specs):
                problems.append(f"the model has {len(ports)} inputs, the config {len(specs)}")
        if problems:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt does not match the OpenVINO model: " + "; ".join(problems))

    def _run(self, feed):
        total = next(iter(feed.values())).shape[0] if self.max_batch_size > 0 else None
        pad = 0
        if self.max_batch_size > 0 and total != self.max_batch_size:
            if not self.padding:
                raise RuntimeError(f"expected requests with batch size '{self.max_batch_size}', got '{total}'"
                                   f"... this error can be avoided by setting 'ENABLE_BATCH_PADDING' parameter "
                                   f"in model configuration to 'YES' at a performance cost.")
            pad = self.max_batch_size - total
            padded = {}
            for k, v in feed.items():
                full = self._pad.take(k, self.max_batch_size, v.shape[1:], v.dtype)
                full[:total] = v
                full[total:] = 0
                padded[k] = full
            feed = padded
        out = self.request.infer(feed, share_inputs=True)
        by_name = {}
        for port, value in out.items():
            for n in port.get_names():
                by_name[n] = value
        results = [by_name[n] for n in self.output_names]  # arrays of their own (share_outputs=False)
        if pad:
            results = [r[:total] for r in results]
        return results

    def finalize(self):
        self.close_profile()
        self.request = None
        self.compiled = None
