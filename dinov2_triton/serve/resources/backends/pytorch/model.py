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
set torch's thread pools; without them, intra-op = this process's physical
cores divided by the model's instance count, inter-op = 1. ``execute`` validates each request
on its own, runs all valid requests of the same shape as ONE forward pass
(joined on the batch axis into a reused array) and splits the outputs back per request;
a bad request gets its own ``TritonError`` without failing the others.
"""
from __future__ import annotations

import importlib.util
import os
import re
import warnings

import triton_python_backend_utils as pb_utils

DEFAULT_FILENAME = "model.pt"
DEFAULT_INTER_OP_THREADS = 1
_INDEXED = re.compile(r"^.+__(\d+)$")


# Loaded by path (the stub ignores PYTHONPATH): one folder up, in serve/backends/
# and in the <backend_dir> that serve/install.py builds.
_spec = importlib.util.spec_from_file_location("standin_common", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "standin_common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _indices(specs):
    """Indices from the ``<name>__<index>`` convention, or None if not all use it."""
    found = [_INDEXED.match(s.name) for s in specs]
    if specs and all(found):
        return [int(m.group(1)) for m in found]
    return None


class TritonPythonModel(common.StandinModel):
    DEFAULT_FILENAME = DEFAULT_FILENAME

    def load(self, path, config):
        import torch

        self.torch = torch
        torch.set_num_threads(int(common.config_parameter(
            config, "INTRA_OP_THREAD_COUNT", "intra_op_thread_count", default=0))
            or common.default_threads(config))
        try:  # allowed once per process, before any inter-op work
            torch.set_num_interop_threads(int(common.config_parameter(
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

    def finalize(self):
        self.close_profile()
        self.module = None
