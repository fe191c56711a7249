# shellcheck shell=bash
# shellcheck disable=SC2034  # read by the scripts that source this file
# The ONE pin of the NVIDIA GPU release this project targets. Sourced by
# scripts/serve.sh, scripts/build_engines.sh and scripts/gpu_acceptance.sh;
# Python reads it with serve.release_pin.load_pin() (the only parser).
# Plain KEY=VALUE lines; ${KEY} may refer to a key defined above it.
# The Python packages of the GPU environment are pinned in
# requirements/lock-gpu.txt; tests/test_gpu_stack.py fails when the two
# disagree (CUDA major, Python, TensorRT, tritonclient).
#
# Every figure carries its source. "UNVERIFIED" marks a figure that could
# not be read from NVIDIA's own text; the command after it confirms it on
# a GPU host with docker (scripts/gpu_acceptance.sh runs those commands and
# prints the result next to the pin).

# NGC release YY.MM of the Triton container (nvcr.io/nvidia/tritonserver) and
# of the TensorRT container the engines are built in (nvcr.io/nvidia/tensorrt):
# the same YY.MM ships the same TensorRT. 25.10: the newest release whose
# facts could be read here with TensorRT 10 (2026 releases may carry
# TensorRT 11, which removed the weakly typed builds export/trt_build_main.py
# uses; see README "GPU release").
TRITON_CONTAINER_TAG=25.10
TRITON_CONTAINER_IMAGE="nvcr.io/nvidia/tritonserver:${TRITON_CONTAINER_TAG}-py3"
TENSORRT_CONTAINER_IMAGE="nvcr.io/nvidia/tensorrt:${TRITON_CONTAINER_TAG}-py3"

# Triton server version in that container. UNVERIFIED: from the release
# numbering (24.10 = 2.51.0; no 25.07 release; 26.05 = 2.69.0) and the
# tritonclient 2.62.0 wheel on PyPI (built 2025-10-29). Confirm:
#   docker run --rm nvcr.io/nvidia/tritonserver:25.10-py3 cat /opt/tritonserver/TRITON_VERSION
TRITON_SERVER_VERSION=2.62.0

# CUDA of the container. Verified: Triton release notes 25.10
# (docs.nvidia.com/deeplearning/triton-inference-server/release-notes/rel-25-10.html):
# "Release 25.10 is based on CUDA 13.0.2.006 which requires NVIDIA Driver
# release 575 or later" (data center GPUs: R470/R525/R535/R545 forward
# compatibility), and "supports CUDA compute capability 7.5 and later"
# (Turing, Ampere, Hopper, Ada Lovelace, Blackwell).
TRITON_CUDA_VERSION=13.0.2.006
TRITON_MIN_DRIVER=575
TRITON_MIN_COMPUTE_CAPABILITY=7.5

# TensorRT of the container, full version (a standard plan loads only in the
# exact TensorRT that built it). UNVERIFIED: NVIDIA's Triton compatibility
# matrix lists TensorRT 10.13.3.9 for the CUDA 13.0.2.006 containers of that
# generation (tritonserver:25.11/25.12-trtllm-python-py3); the -py3 image is
# not listed there. Confirm:
#   docker run --rm nvcr.io/nvidia/tensorrt:25.10-py3 python3 -c "import tensorrt; print(tensorrt.__version__)"
#   docker run --rm nvcr.io/nvidia/tritonserver:25.10-py3 bash -c 'ls /usr/lib/x86_64-linux-gnu/libnvinfer.so.*'
TRITON_TENSORRT_VERSION=10.13.3.9

# ONNX Runtime of the container's onnxruntime backend. Verified: Triton
# compatibility matrix, "ONNX Runtime Versions": 25.10 -> 1.23.1
# (docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/introduction/compatibility.html).
TRITON_ONNXRUNTIME_VERSION=1.23.1

# OpenVINO of the container's openvino backend (the openvino / openvino_int8
# variants; export/openvino_variant.py). UNVERIFIED: the last figure read
# from NVIDIA's own text is server build.py's DEFAULT_TRITON_VERSION_MAP for
# 25.03 ("standalone_openvino_version": "2025.0.0"); 25.10 carries that or a
# newer release. The export writes IR v11 with OpenVINO 2026.4.1
# (requirements/lock-cpu.txt); a ViT uses operation sets up to opset13
# (ScaledDotProductAttention, OpenVINO >= 2024.0; the manifest's build_info
# records max_opset), which 2025.0 reads. Confirm:
#   docker run --rm nvcr.io/nvidia/tritonserver:25.10-py3 bash -c 'ls /opt/tritonserver/backends/openvino/'
TRITON_OPENVINO_VERSION=2025.0.0

# Python of the containers (major.minor). UNVERIFIED for the -py3 images:
# every 25.xx Triton container in the compatibility matrix (trtllm, vllm) has
# Python 3.12.3 (Ubuntu 24.04). Confirm:
#   docker run --rm nvcr.io/nvidia/tensorrt:25.10-py3 python3 --version
TRITON_PYTHON_VERSION=3.12

# The local CPU server is NOT this release: it is the tritonserver binary in
# nvidia-pytriton==0.7.0, the newest one pip can install. Verified: the local
# binary answers GET /v2 with "version": "2.51.0" (pytriton changelog: "Triton
# Inference Server embedded in wheel: 2.51.0").
LOCAL_TRITON_SERVER_VERSION=2.51.0

# Keys above that are UNVERIFIED (scripts/gpu_acceptance.sh checks them when
# docker is present).
UNVERIFIED_KEYS="TRITON_SERVER_VERSION TRITON_TENSORRT_VERSION TRITON_PYTHON_VERSION"
