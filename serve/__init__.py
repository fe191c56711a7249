"""Serving stage: the local Triton server on CPU and its stand-in backends.

- ``serve.local_server``: start/stop/inspect the real tritonserver shipped in
  nvidia-pytriton, with Python-based stand-ins for the onnxruntime and
  pytorch backends (``serve/backends/``), so the model repository loads
  unchanged here and in the NVIDIA container (scripts/triton_version.sh).
- ``python -m serve start|stop|status``: its command line (scripts/serve.sh).
"""
