"""Helpers shared by the CPU stand-in backends (``onnxruntime/model.py``,
``pytorch/model.py``, ``openvino/model.py``): config parsing, per-request
validation, batching of the valid requests into one run (into reused arrays,
:class:`FeedBuffers`), splitting the outputs back per request, error
responses, the threads an instance gets when the config names none
(:func:`default_threads`: the cores shared by the model's instances), and
:class:`StandinModel`, the ``TritonPythonModel`` base they build on (they add
only loading the model file and running it).

Profiling (off by default): the model parameter ``STANDIN_PROFILE_FILE`` (a
file path on the server machine) makes every ``execute`` append one JSON
line there with where its time went (see :class:`Profile`); native backends
ignore the parameter. ``dinov2_triton.bench.standin_overhead`` reads it.

Each ``model.py`` loads this file by path, one folder above its own
(``serve/backends/`` here; ``<backend_dir>/`` once
:func:`dinov2_triton.serve.install.build_backend_dir` has copied it there): Triton's
Python backend stub runs a Python-based backend in isolation (PYTHONPATH is
ignored), so this file cannot be found as a package module.
"""
from __future__ import annotations

import json
import os
import time
from typing import NamedTuple

import numpy as np
import triton_python_backend_utils as pb_utils


def usable_cores() -> int:
    """Physical cores this process may run on (its CPU affinity, SMT siblings
    counted once, as ONNX Runtime's own default counts them)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def instance_count(config: dict) -> int:
    """Instances of this model (the sum of its instance groups' counts)."""
    groups = config.get("instance_group") or []
    return max(1, sum(int(g.get("count", 1) or 1) for g in groups)) if groups else 1


def default_threads(config: dict) -> int:
    """Intra-op threads of one instance when the config sets none: the cores
    shared by the model's instances, so that two instances on two cores run
    one thread each instead of two each (oversubscribed)."""
    return max(1, usable_cores() // instance_count(config))


class FeedBuffers:
    """Arrays reused to join several requests into one batch: a copy per
    batch, not a fresh allocation (and its page faults) each time.

    One array per (input, shape without the batch axis, dtype), with room for
    ``capacity`` rows; at most ``limit`` are kept. A runtime must not keep
    its input after the call (ONNX Runtime, TorchScript and OpenVINO's
    synchronous infer do not), and a buffer is used by one group per execute
    (groups differ in shape), so a response built from a batch never sees
    the next batch's data: Triton copies each response out before the next
    execute.
    """

    def __init__(self, capacity: int, limit: int = 8):
        self.capacity, self.limit = max(1, int(capacity)), limit
        self._arrays = {}

    def take(self, name: str, rows: int, inner: tuple, dtype) -> np.ndarray:
        key = (name, tuple(inner), np.dtype(dtype))
        array = self._arrays.get(key)
        if array is None or array.shape[0] < rows:
            if len(self._arrays) >= self.limit:
                self._arrays.clear()
            array = self._arrays[key] = np.empty((max(rows, self.capacity),) + tuple(inner), dtype)
        return array[:rows]

    def join(self, name: str, parts) -> np.ndarray:
        """``np.concatenate(parts)`` (on the batch axis) into a reused array."""
        first = parts[0]
        rows = sum(p.shape[0] for p in parts)
        return np.concatenate(parts, out=self.take(name, rows, first.shape[1:], first.dtype))


class TensorSpec(NamedTuple):
    name: str
    triton_type: str  # e.g. "TYPE_FP32"
    dtype: np.dtype
    dims: tuple  # without the batch dimension; -1 = any


#: model parameter: a file to append one JSON line of timings per execute to (unset: off)
PROFILE_PARAMETER = "STANDIN_PROFILE_FILE"
#: run_batched's phases, in order (nanoseconds each, summed over the groups of one execute)
PHASES = ("parse", "feed", "run", "respond")


class Profile:
    """Where one instance's ``execute`` calls spend their time, one JSON line each.

    A line: ``{"model", "instance", "pid", "start_ns"/"end_ns"`` (time.time_ns
    at entry and exit), ``"requests"``, ``"batch"`` (images run),
    ``"runs"`` (runtime calls), ``"parse_ns"`` (inputs fetched and checked),
    ``"feed_ns"`` (requests joined into the runtime's feed), ``"run_ns"`` (the
    runtime call), ``"respond_ns"`` (outputs checked, split and turned into
    responses), ``"execute_ns"`` (entry to exit)}``. Time outside ``execute``
    (Triton moving the requests to this process through shared memory and the
    responses back) is in Triton's own statistics, not here.
    """

    def __init__(self, path: str, model_name: str, instance: str):
        self.model_name, self.instance = model_name, instance
        try:
            self._file = open(path, "a", buffering=1)  # line-buffered: one write per execute
        except OSError as exc:
            raise pb_utils.TritonModelException(
                f"model '{model_name}': parameter {PROFILE_PARAMETER}: cannot open {path}: {exc}") from None

    def write(self, start_ns: int, timings: dict) -> None:
        record = {"model": self.model_name, "instance": self.instance, "pid": os.getpid(),
                  "start_ns": start_ns, "end_ns": time.time_ns(), **timings}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()


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


def run_batched(requests, in_specs, out_specs, max_batch_size, model_name, run, timings=None, buffers=None):
    """Validate each request, run valid ones in groups of equal shapes, split results.

    ``run(feed: {name: array}) -> [array per out_spec]``. A group of one
    request runs on the request's own arrays (no copy); several are joined
    into ``buffers`` (a :class:`FeedBuffers`; None: fresh arrays).
    ``timings``: a dict that receives the nanoseconds of each of
    :data:`PHASES` (``<phase>_ns``) and the counts of :class:`Profile`;
    None: nothing is timed.
    """
    clock = time.perf_counter_ns
    t_start = clock()
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
    t_parsed = clock()
    feed_ns = run_ns = images = runs = 0

    for members in groups.values():
        t0 = clock()
        if max_batch_size > 0 and len(members) > 1:
            if buffers is not None:
                feed = {s.name: buffers.join(s.name, [m[1][s.name] for m in members]) for s in in_specs}
            else:
                feed = {s.name: np.concatenate([m[1][s.name] for m in members]) for s in in_specs}
        else:
            feed = {s.name: np.ascontiguousarray(members[0][1][s.name]) for s in in_specs}
        total = sum(m[2] for m in members)
        t1 = clock()
        feed_ns += t1 - t0
        try:
            runs += 1
            images += total
            try:
                outputs = run(feed)
            finally:
                run_ns += clock() - t1
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
    if timings is not None:
        total_ns = clock() - t_start
        timings.update(requests=len(requests), batch=images, runs=runs, parse_ns=t_parsed - t_start,
                       feed_ns=feed_ns, run_ns=run_ns,
                       respond_ns=total_ns - (t_parsed - t_start) - feed_ns - run_ns, execute_ns=total_ns)
    return responses


class StandinModel:
    """What both stand-ins do around their runtime.

    ``initialize`` parses the config, finds ``<model>/<version>/<default_model_filename
    or DEFAULT_FILENAME>`` and hands it to ``load(path, config)``; ``execute`` runs
    the requests through :func:`run_batched` with ``_run(feed)`` (and writes a
    :class:`Profile` line when the ``STANDIN_PROFILE_FILE`` parameter is set).
    Subclasses set ``DEFAULT_FILENAME`` and write ``load`` and ``_run``.
    """
    DEFAULT_FILENAME = None
    profile = None
    buffers = None

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        self.max_batch_size = int(config.get("max_batch_size", 0))
        self.inputs = tensor_specs(config, "input")
        self.outputs = tensor_specs(config, "output")
        filename = config.get("default_model_filename") or self.DEFAULT_FILENAME
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        if not os.path.isfile(path):
            raise pb_utils.TritonModelException(f"model '{self.model_name}': {path} not found")
        self.buffers = FeedBuffers(self.max_batch_size)
        self.load(path, config)
        profile_path = config_parameter(config, PROFILE_PARAMETER)
        if profile_path:
            self.profile = Profile(profile_path, self.model_name,
                                   args.get("model_instance_name", self.model_name))

    def load(self, path: str, config: dict):
        raise NotImplementedError

    def _run(self, feed):
        raise NotImplementedError

    def execute(self, requests):
        if self.profile is None:
            return run_batched(requests, self.inputs, self.outputs, self.max_batch_size,
                               self.model_name, self._run, buffers=self.buffers)
        start_ns, timings = time.time_ns(), {}
        responses = run_batched(requests, self.inputs, self.outputs, self.max_batch_size,
                                self.model_name, self._run, timings, buffers=self.buffers)
        self.profile.write(start_ns, timings)
        return responses

    def close_profile(self):
        if self.profile is not None:
            self.profile.close()
            self.profile = None
