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
  set the thread pools; without them, intra-op = this process's physical
  cores divided by the model's instance count (ONNX Runtime's own default
  is every core for each instance: two instances on two cores would run
  four threads) and inter-op = 1;
- the intra-op threads sleep when they have no work instead of spinning
  (ONNX Runtime's ``session.intra_op.allow_spinning`` = 0; the model
  parameter of that name set to "1" restores ONNX Runtime's default). A
  spinning thread holds a core the server's other threads, the client and
  other instances need: on 2 shared cores, ViT-S/14 INT8 at 56 px batch 8
  served 114 img/s without spinning vs 67 with it, 7.3 vs 12.3 CPU ms per
  image (measured with dinov2_triton.bench.standin_overhead);
- checks at load time that the config's inputs/outputs exist in the graph
  with the same element type and rank, and fails the load otherwise;
- ``execute`` receives the requests the dynamic batcher grouped, validates
  each one on its own (name, dtype, non-batch dims, batch size), runs all
  valid requests of the same shape as ONE session run (one request: its
  own array, no copy; several: joined on the batch axis into an array reused
  from batch to batch) and splits the outputs back per request (views, no
  copy). A bad request gets
  its own ``TritonError``; the other requests of the batch are answered.

Not supported (the load fails with a message): ``reshape`` in the config.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import triton_python_backend_utils as pb_utils

DEFAULT_FILENAME = "model.onnx"
DEFAULT_INTER_OP_THREADS = 1
#: ONNX Runtime's session option, taken as a model parameter of the same name ("0" or "1")
SPINNING_PARAMETER = "session.intra_op.allow_spinning"

_ORT_TYPES = {
    "tensor(float)": np.float32, "tensor(float16)": np.float16,
    "tensor(double)": np.float64, "tensor(int8)": np.int8,
    "tensor(int16)": np.int16, "tensor(int32)": np.int32,
    "tensor(int64)": np.int64, "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16, "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64, "tensor(bool)": np.bool_,
}


# Loaded by path (the stub ignores PYTHONPATH): one folder up, in serve/backends/
# and in the <backend_dir> that serve/install.py builds.
_spec = importlib.util.spec_from_file_location("standin_common", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "standin_common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


class TritonPythonModel(common.StandinModel):
    DEFAULT_FILENAME = DEFAULT_FILENAME

    def load(self, path, config):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(common.config_parameter(
            config, "intra_op_thread_count", default=0)) or common.default_threads(config)
        options.inter_op_num_threads = int(common.config_parameter(
            config, "inter_op_thread_count", default=DEFAULT_INTER_OP_THREADS))
        spinning = str(common.config_parameter(config, SPINNING_PARAMETER, default="0")).strip()
        if spinning not in ("0", "1"):
            raise pb_utils.TritonModelException(
                f"model '{self.model_name}': parameter {SPINNING_PARAMETER} is {spinning!r}, expected 0 or 1")
        options.add_session_config_entry(SPINNING_PARAMETER, spinning)
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

    def finalize(self):
        self.close_profile()
        self.session = None
