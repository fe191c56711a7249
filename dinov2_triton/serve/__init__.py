"""Serving stage: the local Triton server on CPU, its stand-in backends, and
the one Triton client layer the whole project uses.

- ``dinov2_triton.serve.triton_access``: connect to any Triton over HTTP or gRPC (API-key
  headers, one model-config shape, typed errors); every client goes through it.
- ``dinov2_triton.serve.local_server``: start/stop/inspect the real tritonserver shipped in
  nvidia-pytriton; ``dinov2_triton.serve.install`` finds it and builds the backend directory
  with Python-based stand-ins for the onnxruntime and pytorch backends
  (``serve/backends/``), so the model repository loads unchanged here and in
  the NVIDIA container (scripts/triton_version.sh); ``dinov2_triton.serve.model_plan``
  decides which models can load on this machine and why not.
- ``python -m serve start|stop|status``: its command line (scripts/serve.sh).
"""
