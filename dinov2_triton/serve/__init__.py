"""Serving stage: the local Triton server on CPU, its stand-in backends, the
pinned NVIDIA container, Kubernetes, and the one Triton client layer the
whole project uses.

- ``dinov2_triton.serve.triton_access``: connect to any Triton over HTTP or gRPC (API-key
  headers, one model-config shape, typed errors); every client goes through it.
- ``dinov2_triton.serve.local_server``: start/stop/inspect the real tritonserver shipped in
  nvidia-pytriton; ``dinov2_triton.serve.install`` finds it and builds the backend directory
  with Python-based stand-ins for the onnxruntime and pytorch backends
  (``serve/resources/backends/``), so the model repository loads unchanged here and in
  the NVIDIA container; ``dinov2_triton.serve.model_plan``
  decides which models can load on this machine and why not.
- ``dinov2_triton.serve.container``: the pinned NVIDIA Triton container's
  ``docker build`` / ``docker run`` on a GPU host (dinov2_triton.core.release_pin).
- ``dinov2-triton serve start|stop|status|reload|rollback|container|kubernetes``:
  its command line (dinov2_triton.serve.cli).
"""
