"""CPU stand-in for Triton's PyTorch (libtorch) backend (a Python-based backend).

Triton maps ``platform: "pytorch_libtorch"`` to the backend name ``pytorch``.
The local server (serve/local_server.py) points ``--backend-directory`` at a
folder holding ``python/`` (the Python backend) and ``pytorch/model.py``
(this file), so Triton runs this class for every TorchScript model of the
repository, unchanged. In the NVIDIA Triton container the native libtorch
backend serves the very same repository; nothing here is needed there.

Binding rules follow the native backend:
- inputs: by ``forward`` argument name when the config's input names are the
  argument names (our contract: ``pixel_values``), else by the
  ``<name>__<index>`` convention, else positionally for a single input;
- outputs: by the ``<name>__<index>`` convention when every output uses it,
  else by order: the config's output order is the order of the tuple the
  traced module returns (``logits`` then ``embedding``).

Per model instance it loads ``<model>/<version>/<default_model_filename or
model.pt>`` with ``torch.jit.load`` on the CPU; the ``INTRA_OP_THREAD_COUNT``
/ ``INTER_OP_THREAD_COUNT`` model parameters (the native backend's names)
set torch's thread pools, default 2 / 1. ``execute`` validates each request
on its own, runs all valid requests of the same shape as ONE forward pass
(concatenated on the batch axis) and splits the outputs back per request;
a bad request gets its own ``TritonError`` without failing the others.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_FILENAME = "model.pt"
DEFAULT_INTRA_OP_THREADS = 2
DEFAULT_INTER_OP_THREADS = 1
_INDEXED = re.compile(r"^.+__(\d+)$")


# --- shared with serve/backends/onnxruntime/model.py (each backend folder must
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


def _indices(specs):
    """Indices from the ``<name>__<index>`` convention, or None if not all use it."""
    found = [_INDEXED.match(s.name) for s in specs]
    if specs and all(found):
        return [int(m.group(1)) for m in found]
    return None


class TritonPythonModel:
    def initialize(self, args):
        import torch

        self.torch = torch
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = tensor_specs(config, "input")
        self.outputs = tensor_specs(config, "output")
        filename = config.get("default_model_filename") or DEFAULT_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model '{self.model_name}': {path} not found")

        torch.set_num_threads(int(config_parameter(
            config, "INTRA_OP_THREAD_COUNT", "intra_op_thread_count",
            default=DEFAULT_INTRA_OP_THREADS)))
        try:  # allowed once per process, before any inter-op work
            torch.set_num_interop_threads(int(config_parameter(
                config, "INTER_OP_THREAD_COUNT", "inter_op_thread_count",
                default=DEFAULT_INTER_OP_THREADS)))
        except RuntimeError:
            pass
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated" on every load
                warnings.simplefilter("ignore", FutureWarning)
                self.module = torch.jit.load(path, map_location="cpu").eval()
        except Exception as exc:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': torch.jit.load cannot load {path}: {exc}") from exc
        self._bind_io()

    def _bind_io(self):
        schema = self.module.forward.schema
        arg_names = [a.name for a in schema.arguments[1:]]  # [0] is self
        names = [s.name for s in self.inputs]
        if set(names) == set(arg_names):
            self.input_mode = "keyword"
        elif _indices(self.inputs) is not None:
            order = _indices(self.inputs)
            if sorted(order) != list(range(len(arg_names))):
                raise pb_utils.TritonModelException(
                    f"model '{self.model_name}': inputs {names} do not cover "
                    f"forward{tuple(arg_names)}")
            self.input_mode = "indexed"
            self.input_order = [names[order.index(k)] for k in range(len(arg_names))]
        elif len(names) == 1 and len(arg_names) == 1:
            self.input_mode = "positional"
            self.input_order = names
        else:
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': config inputs {names} do not match the TorchScript "
                f"forward arguments {arg_names}; name them like the arguments or NAME__<index>")
        out_idx = _indices(self.outputs)
        self.output_index = out_idx if out_idx is not None else list(range(len(self.outputs)))

    def _run(self, feed):
        torch = self.torch
        # torch warns on read-only buffers (a single request's input is not copied)
        tensors = {k: torch.from_numpy(v if v.flags.writeable else v.copy())
                   for k, v in feed.items()}
        with torch.inference_mode():
            if self.input_mode == "keyword":
                result = self.module(**tensors)
            else:
                result = self.module(*[tensors[n] for n in self.input_order])
        if isinstance(result, torch.Tensor):
            result = (result,)
        result = list(result)
        if max(self.output_index) >= len(result):
            raise RuntimeError(f"the module returned {len(result)} output(s), the config lists "
                               f"{[s.name for s in self.outputs]}")
        return [result[k].detach().cpu().numpy() for k in self.output_index]

    def execute(self, requests):
        return run_batched(requests, self.inputs, self.outputs, self.max_batch_size,
                           self.model_name, self._run)

    def finalize(self):
        self.module = None
