# shellcheck shell=bash
# The ONE place that pins the NVIDIA Triton release used on GPU hosts.
# Sourced by scripts/serve.sh; Python reads it with
# serve.local_server.container_versions(). Keep plain KEY=VALUE lines.
#
# The local CPU server is the tritonserver binary shipped in
# nvidia-pytriton==0.7.0; the container below is the same server release,
# so one model repository behaves the same in both places.

# Triton server release. Verified: the local binary answers GET /v2 with
# "version": "2.51.0" (and pytriton's changelog: "Triton Inference Server
# embedded in wheel: 2.51.0").
TRITON_SERVER_VERSION=2.51.0
# NGC container tag of that release (Triton 2.N.0 ships as container
# YY.MM; 2.51.0 -> 24.10). Consistent with the numbering, not confirmed
# from NVIDIA's text here.
TRITON_CONTAINER_TAG=24.10
TRITON_CONTAINER_IMAGE="nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER_TAG}-py3"

# What that container carries. Export TensorRT engines with the SAME
# TensorRT version (a plan only loads in the TensorRT that built it).
# Verified: Triton release notes 24.10, "Release 24.10 is based on CUDA 12.6.2".
TRITON_CUDA_VERSION=12.6.2
# UNVERIFIED (not confirmed from the 24.10 release notes / frameworks
# support matrix here; check `docker run ... ls /usr/lib/x86_64-linux-gnu/libnvinfer*`).
TRITON_TENSORRT_VERSION=10.5.0.18
# UNVERIFIED (onnxruntime backend of r24.10).
TRITON_ONNXRUNTIME_VERSION=1.19.2
# UNVERIFIED (libtorch of the pytorch backend of r24.10).
TRITON_PYTORCH_VERSION=2.5.0a0+e000cf0
