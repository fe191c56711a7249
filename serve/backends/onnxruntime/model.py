"""CPU stand-in for Triton's ONNX Runtime backend (a Python-based backend).

Triton maps ``platform: "onnxruntime_onnx"`` to the backend name
``onnxruntime``. The local server (serve/local_server.py) points
``--backend-directory`` at a folder holding ``python/`` (the Python backend)
and ``onnxruntime/model.py`` (this file), so Triton runs this class for every
ONNX model of the repository, unchanged. In the NVIDIA Triton container the
native ONNX Runtime backend (C++, CUDA/TensorRT execution providers) serves
the very same repository; nothing here is needed there.

What it does, per model instance:
- opens ``<model>/<version>/<default_model_filename or model.onnx>`` with
  onnxruntime's CPUExecutionProvider; ``intra_op_thread_count`` /
  ``inter_op_thread_count`` model parameters (the native backend's names)
  set the thread pools, default 2 / 1;
- checks at load time that the config's inputs/outputs exist in the graph
  with the same element type and rank, and fails the load otherwise;
- ``execute`` receives the requests the dynamic batcher grouped, validates
  each one on its own (name, dtype, non-batch dims, batch size), runs all
  valid requests of the same shape as ONE session run (concatenated on the
  batch axis) and splits the outputs back per request. A bad request gets
  its own ``TritonError``; the other requests of the batch are answered.

Not supported (the load fails with a message): ``reshape`` in the config.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_FILENAME = "model.onnx"
DEFAULT_INTRA_OP_THREADS = 2
DEFAULT_INTER_OP_THREADS = 1

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16,
    "tensor(double)": np.float64, "tensor(int8)": np.int8,
    "tensor(int16)": np.int16, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


# --- shared with serve/backends/pytorch/model.py (each backend folder must
# --- be self-contained: only model.py is looked up there) -------------------
class TensorSpec(NamedTuple):
    name: str
    triton_type: str  # e.g. "TYPE_FP32"
    dtype: np.dtype
    dims: tuple  # without the batch dimension; -1 = any


class BadRequest(Exception):
    """A request that does not match the model configuration."""


def tensor_specs(config: dict, key: str) -> list:
    specs = []
    for t in config.get(key, []):
        if t.get("reshape"):
            raise pb_utils.TritonModelException(
                f"{key} '{t['name']}': 'reshape' is not supported by the CPU stand-in backend")
        dtype = pb_utils.triton_string_to_numpy(t["data_type"])
        specs.append(TensorSpec(t["name"], t["data_type"], np.dtype(dtype),
                                tuple(int(d) for d in t.get("dims", []))))
    return specs


def config_parameter(config: dict, *names: str, default=None):
    params = config.get("parameters") or {}
    for name in names:
        if name in params:
            return params[name].get("string_value", default)
    return default


def fmt_shape(dims, max_batch_size: int) -> str:
    body = ", ".join(str(d) for d in dims)
    if max_batch_size > 0:
        return f"[batch 1..{max_batch_size}{', ' if body else ''}{body}]"
    return f"[{body}]"


def dims_match(expected, actual) -> bool:
    return len(expected) == len(actual) and all(e == -1 or e == a for e, a in zip(expected, actual))


def parse_request(request, specs, max_batch_size: int, model_name: str):
    """Return ({name: array}, batch) for a valid request, raise BadRequest otherwise."""
    expected = [s.name for s in specs]
    received = [t.name() for t in request.inputs()]
    unexpected = [n for n in received if n not in expected]
    if unexpected:
        raise BadRequest(f"model '{model_name}': unexpected input(s) {unexpected}; "
                         f"expected inputs {expected}")
    arrays, batch = {}, None
    for spec in specs:
        tensor = pb_utils.get_input_tensor_by_name(request, spec.name)
        if tensor is None:
            raise BadRequest(f"model '{model_name}': missing input '{spec.name}'; "
                             f"expected inputs {expected}, received {received}")
        arr = tensor.as_numpy()
        if arr.dtype != spec.dtype:
            raise BadRequest(
                f"model '{model_name}': input '{spec.name}' has data type {arr.dtype}, "
                f"expected {spec.triton_type[5:]} ({spec.dtype})")
        inner = arr.shape[1:] if max_batch_size > 0 else arr.shape
        if (max_batch_size > 0 and arr.ndim == 0) or not dims_match(spec.dims, inner):
            raise BadRequest(
                f"model '{model_name}': input '{spec.name}' has shape {list(arr.shape)}, "
                f"expected {fmt_shape(spec.dims, max_batch_size)}")
        if max_batch_size > 0:
            n = arr.shape[0]
            if not 1 <= n <= max_batch_size:
                raise BadRequest(
                    f"model '{model_name}': input '{spec.name}' has batch size {n}, "
                    f"expected 1..{max_batch_size} (max_batch_size)")
            if batch is not None and n != batch:
                raise BadRequest(f"model '{model_name}': inputs have different batch sizes")
            batch = n
        arrays[spec.name] = arr
    return arrays, (batch or 1)


def error_response(message: str, invalid_argument: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_argument else "INTERNAL", None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def run_batched(requests, in_specs, out_specs, max_batch_size, model_name, run):
    """Validate each request, run valid ones in groups of equal shapes, split results.

    ``run(feed: {name: array}) -> [array per out_spec]``.
    """
    responses = [None] * len(requests)
    groups = {}
    for i, request in enumerate(requests):
        try:
            arrays, batch = parse_request(request, in_specs, max_batch_size, model_name)
        except BadRequest as exc:
            responses[i] = error_response(str(exc))
            continue
        if max_batch_size > 0:
            key = tuple(arrays[s.name].shape[1:] for s in in_specs)
        else:
            key = ("request", i)  # no batch axis: one run per request
        groups.setdefault(key, []).append((i, arrays, batch))

    for members in groups.values():
        if max_batch_size > 0 and len(members) > 1:
            feed = {s.name: np.concatenate([m[1][s.name] for m in members]) for s in in_specs}
        else:
            feed = {s.name: np.ascontiguousarray(members[0][1][s.name]) for s in in_specs}
        total = sum(m[2] for m in members)
        try:
            outputs = run(feed)
            for spec, out in zip(out_specs, outputs):
                inner = out.shape[1:] if max_batch_size > 0 else out.shape
                if max_batch_size > 0 and (out.ndim == 0 or out.shape[0] != total):
                    raise RuntimeError(f"output '{spec.name}' has shape {list(out.shape)}, "
                                       f"expected batch {total} first")
                if not dims_match(spec.dims, inner) or out.dtype != spec.dtype:
                    raise RuntimeError(
                        f"output '{spec.name}' is {out.dtype} {list(out.shape)}, config says "
                        f"{spec.triton_type[5:]} {fmt_shape(spec.dims, max_batch_size)}")
        except Exception as exc:  # one failing run must not take down the other groups
            for i, _, _ in members:
                responses[i] = error_response(f"model '{model_name}': inference failed: {exc}",
                                              invalid_argument=False)
            continue
        start = 0
        for i, _, batch in members:
            stop = start + batch if max_batch_size > 0 else None
            tensors = [pb_utils.Tensor(s.name, np.ascontiguousarray(o[start:stop]))
                       for s, o in zip(out_specs, outputs)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start = stop or 0
    return responses
# --- end of shared part ----------------------------------------------------


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = tensor_specs(config, "input")
        self.outputs = tensor_specs(config, "output")
        filename = config.get("default_model_filename") or DEFAULT_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model '{self.model_name}': {path} not found")

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(config_parameter(
            config, "intra_op_thread_count", default=DEFAULT_INTRA_OP_THREADS))
        options.inter_op_num_threads = int(config_parameter(
            config, "inter_op_thread_count", default=DEFAULT_INTER_OP_THREADS))
        try:
            self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': onnxruntime cannot load {path}: {exc}") from exc
        self._check_io()
        self.output_names = [s.name for s in self.outputs]

    def _check_io(self):
        problems = []
        batch_rank = 1 if self.max_batch_size > 0 else 0
        for kind, specs, graph in (("input", self.inputs, self.session.get_inputs()),
                                   ("output", self.outputs, self.session.get_outputs())):
            by_name = {g.name: g for g in graph}
            for spec in specs:
                g = by_name.get(spec.name)
                if g is None:
                    problems.append(f"config {kind} '{spec.name}' is not in the ONNX graph "
                                    f"(graph {kind}s: {sorted(by_name)})")
                    continue
                if _ORT_TYPES.get(g.type) != spec.dtype.type:
                    problems.append(f"{kind} '{spec.name}': graph type {g.type}, "
                                    f"config {spec.triton_type}")
                if len(g.shape) != len(spec.dims) + batch_rank:
                    problems.append(f"{kind} '{spec.name}': graph shape {g.shape}, config dims "
                                    f"{list(spec.dims)} (max_batch_size {self.max_batch_size})")
            if kind == "input":
                missing = sorted(set(by_name) - {s.name for s in specs})
                if missing:
                    problems.append(f"graph inputs {missing} are missing from the config")
        if problems:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config.pbtxt does not match the ONNX graph: "
                + "; ".join(problems))

    def _run(self, feed):
        return self.session.run(self.output_names, feed)

    def execute(self, requests):
        return run_batched(requests, self.inputs, self.outputs, self.max_batch_size,
                           self.model_name, self._run)

    def finalize(self):
        self.session = None
