"""Serving stage: the real local Triton server, its CPU stand-in backends, the CLI.

Tests marked ``triton`` start tritonserver (fixtures in tests/fixtures/triton.py).
"""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from serve import local_server as ls
from tests.fixtures.triton import TINY_IMAGE, tiny_config, tiny_reference


ROOT = Path(__file__).resolve().parents[1]
GOOD_MODELS = ["tiny_onnx", "tiny_torchscript"]
ATOL = 1e-5


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_IMAGE)).astype(np.float32)


def _client(protocol: str, server):
    if protocol == "http":
        import tritonclient.http as module

        return module, module.InferenceServerClient(server.url_http)
    import tritonclient.grpc as module

    return module, module.InferenceServerClient(server.url_grpc)


def _infer(module, client, model, array, name="pixel_values", datatype="FP32"):
    inp = module.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array)
    outputs = [module.InferRequestedOutput(n) for n in ("logits", "embedding")]
    result = client.infer(model, [inp], outputs=outputs)
    return result.as_numpy("logits"), result.as_numpy("embedding")


def _wait_model_ready(client, model, ready: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while client.is_model_ready(model) != ready:
        assert time.monotonic() < deadline, f"{model} ready={not ready} after {timeout} s"
        time.sleep(0.1)


# --------------------------------------------------------------------------- no server
def test_plan_models_loads_what_runs_here_and_says_why_not(tmp_path):
    def write(name, text):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(text)

    write("onnx", tiny_config("onnx", "onnxruntime_onnx"))
    write("trt", tiny_config("trt", "tensorrt_plan"))
    write("gpu_only", tiny_config("gpu_only", "onnxruntime_onnx", instances="KIND_GPU"))
    ensemble = ('name: "{n}"\nplatform: "ensemble"\nmax_batch_size: 4\n'
                'ensemble_scheduling {{ step [ {{ model_name: "{step}" model_version: -1 }} ] }}\n')
    write("ens_trt", ensemble.format(n="ens_trt", step="trt"))
    write("ens_nested", ensemble.format(n="ens_nested", step="ens_trt"))
    write("ens_ok", ensemble.format(n="ens_ok", step="onnx"))
    write("garbled", "name: \"garbled\"\nplatform: onnxruntime_onnx\n{{{")
    (tmp_path / "not_a_model").mkdir()

    plan = ls.plan_models(tmp_path)
    assert plan.load == ["ens_ok", "onnx"]
    assert plan.skipped["trt"] == "needs an NVIDIA GPU and TensorRT"
    assert "KIND_GPU" in plan.skipped["gpu_only"]
    assert "'trt'" in plan.skipped["ens_trt"] and "TensorRT" in plan.skipped["ens_trt"]
    assert "'ens_trt'" in plan.skipped["ens_nested"]
    assert "cannot be parsed" in plan.skipped["garbled"]

    assert ls.plan_models(tmp_path, ["onnx", "trt"]).load == ["onnx"]
    with pytest.raises(ValueError, match="nope.*available"):
        ls.plan_models(tmp_path, ["onnx", "nope"])


def test_api_key_file_is_private(tmp_path):
    key_file = tmp_path / "keys" / "triton.api_key"
    key_file.parent.mkdir()
    key_file.write_text("old")
    key_file.chmod(0o644)
    key = ls.write_api_key(key_file)
    assert len(key) >= 32 and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ls.write_api_key(key_file, "given") == "given" == ls.read_api_key(key_file)


def test_ports_in_use_and_find_free_ports():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = listener.getsockname()[1]
        free = ls.find_free_ports(3)
        assert len(set(free)) == 3 and busy not in free
        assert ls.ports_in_use([busy, *free]) == [busy]
        assert ls.ports_in_use({"http": busy}) == [busy]
        with pytest.raises(ls.PortsBusyError, match=f"port {busy} \\(http\\) already in use"):
            ls._check_ports({"http": busy, "grpc": free[0], "metrics": free[1]}, "127.0.0.1")


def test_container_release_is_pinned_in_one_place():
    versions = ls.container_versions()
    tag = versions["TRITON_CONTAINER_TAG"]
    assert versions["TRITON_CONTAINER_IMAGE"] == f"nvcr.io/nvidia/tritonserver:{tag}-py3"
    for key in ("TRITON_SERVER_VERSION", "TRITON_TENSORRT_VERSION", "TRITON_CUDA_VERSION",
                "TRITON_ONNXRUNTIME_VERSION"):
        assert versions[key]
    serve_sh = (ROOT / "scripts" / "serve.sh").read_text()
    assert "source scripts/triton_version.sh" in serve_sh and tag not in serve_sh


def _run_serve_sh(args, path_dir: Path):
    env = {"PATH": str(path_dir), "HOME": os.environ.get("HOME", "/root")}
    return subprocess.run(["/bin/bash", str(ROOT / "scripts" / "serve.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=30)


def test_serve_sh_container_fails_clearly_without_docker(tmp_path):
    (tmp_path / "dirname").symlink_to(subprocess.check_output(["which", "dirname"], text=True)
                                      .strip())
    result = _run_serve_sh(["container"], tmp_path)  # no docker on PATH
    assert result.returncode == 1
    assert "docker not found" in result.stderr and "scripts/serve.sh local" in result.stderr

    (tmp_path / "docker").write_text("#!/bin/sh\nexit 1\n")  # a docker whose daemon is down
    (tmp_path / "docker").chmod(0o755)
    result = _run_serve_sh(["container"], tmp_path)
    assert result.returncode == 1 and "daemon is not reachable" in result.stderr


# --------------------------------------------------------------------------- stand-ins in-process
class _FakeTensor:
    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array


class _FakeRequest:
    def __init__(self, **inputs):
        self._inputs = [_FakeTensor(k, v) for k, v in inputs.items()]

    def inputs(self):
        return self._inputs


class _FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self._message, self.code = message, code

    def message(self):
        return self._message


class _FakeResponse:
    def __init__(self, output_tensors, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors}
        self.error = error


@pytest.fixture
def pb_utils(monkeypatch):
    """The real triton_python_backend_utils.py, plus fakes for what the C++ stub adds."""
    path = ls.find_triton().python_backend / "triton_python_backend_utils.py"
    spec = importlib.util.spec_from_file_location("triton_python_backend_utils", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.Tensor, module.InferenceResponse, module.TritonError = (
        _FakeTensor, _FakeResponse, _FakeError)
    module.TritonModelException = type("TritonModelException", (Exception,), {})
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    return module


def _load_standin(backend: str, model_dir: Path, model_name: str):
    from google.protobuf import json_format

    spec = importlib.util.spec_from_file_location(
        f"standin_{backend}", ROOT / "serve" / "backends" / backend / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = json_format.MessageToDict(ls.read_model_config(model_dir / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": model_name,
                      "model_repository": str(model_dir), "model_version": "1"})
    return model


@pytest.mark.parametrize("backend,model_name", [("onnxruntime", "tiny_onnx"),
                                                ("pytorch", "tiny_torchscript")])
def test_standin_batches_good_requests_and_rejects_bad_ones_alone(
        pb_utils, tiny_model_repository, tiny_classifier, backend, model_name):
    model = _load_standin(backend, tiny_model_repository / model_name, model_name)
    runs = []
    real_run = model._run
    model._run = lambda feed: runs.append(feed["pixel_values"].shape[0]) or real_run(feed)

    good = [_images(2, 1), _images(1, 2), _images(1, 3)]
    requests = [
        _FakeRequest(pixel_values=good[0]),
        _FakeRequest(image=good[1]),  # wrong name
        _FakeRequest(pixel_values=good[1]),
        _FakeRequest(pixel_values=np.zeros((1, 3, 9, 8), np.float32)),  # wrong shape
        _FakeRequest(pixel_values=good[2].astype(np.float64)),  # wrong dtype
        _FakeRequest(pixel_values=_images(5)),  # batch above max_batch_size
        _FakeRequest(),  # no input at all
        _FakeRequest(pixel_values=good[2]),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert runs == [4], "the valid requests must run as ONE batch"
    for i, batch in zip((0, 2, 7), good):
        assert responses[i].error is None
        logits, embedding = tiny_reference(tiny_classifier, batch)
        np.testing.assert_allclose(responses[i].outputs["logits"], logits, atol=ATOL)
        np.testing.assert_allclose(responses[i].outputs["embedding"], embedding, atol=ATOL)

    def error(i):
        assert responses[i].error is not None and responses[i].error.code == "INVALID_ARG"
        return responses[i].error.message()

    assert "unexpected input(s) ['image']" in error(1) and "pixel_values" in error(1)
    assert "'pixel_values' has shape [1, 3, 9, 8], expected [batch 1..4, 3, 8, 8]" in error(3)
    assert "'pixel_values' has data type float64, expected FP32" in error(4)
    assert "batch size 5, expected 1..4" in error(5)
    assert "missing input 'pixel_values'" in error(6)


def test_standin_failing_run_only_fails_its_requests(pb_utils, tiny_model_repository):
    model = _load_standin("onnxruntime", tiny_model_repository / "tiny_onnx", "tiny_onnx")
    model._run = lambda feed: (_ for _ in ()).throw(RuntimeError("boom"))
    responses = model.execute([_FakeRequest(pixel_values=_images(1)),
                               _FakeRequest(image=_images(1))])
    assert "inference failed: boom" in responses[0].error.message()
    assert responses[0].error.code == "INTERNAL"
    assert "unexpected input" in responses[1].error.message()


def test_standin_refuses_a_config_that_does_not_match_the_graph(pb_utils, tiny_model_repository,
                                                                tmp_path):
    model_dir = tmp_path / "renamed"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(
        (tiny_model_repository / "tiny_onnx" / "1" / "model.onnx").read_bytes())
    config = tiny_config("renamed", "onnxruntime_onnx").replace('"logits"', '"scores"')
    (model_dir / "config.pbtxt").write_text(config)
    with pytest.raises(pb_utils.TritonModelException, match="config output 'scores' is not in"):
        _load_standin("onnxruntime", model_dir, "renamed")


def test_standin_backends_share_one_helper_module(tmp_path):
    common = ROOT / "serve" / "backends" / "standin_common.py"
    for backend in ("onnxruntime", "pytorch"):
        text = (ROOT / "serve" / "backends" / backend / "model.py").read_text()
        assert "common.StandinModel" in text and "def run_batched" not in text
    # the stub loads it from one folder above model.py: the backend dir must carry it there
    backend_dir = ls.build_backend_dir(cache_dir=tmp_path)
    assert (backend_dir / "standin_common.py").read_bytes() == common.read_bytes()
    assert (backend_dir / "onnxruntime" / "model.py").is_file()


# --------------------------------------------------------------------------- real server
@pytest.mark.triton
def test_server_loads_what_it_can_and_logs_why_not(triton_server):
    states = triton_server.model_states()
    assert states["tiny_onnx"] == states["tiny_torchscript"] == "READY"
    assert states["tiny_broken_onnx"].startswith("UNAVAILABLE")
    assert "onnxruntime cannot load" in states["tiny_broken_onnx"]
    assert triton_server.plan.skipped == {"tiny_trt_plan": "needs an NVIDIA GPU and TensorRT"}
    log_text = triton_server.log_file.read_text()
    assert "tiny_trt_plan: not loaded: needs an NVIDIA GPU and TensorRT" in log_text
    assert triton_server.api_key not in log_text
    version = triton_server.server_metadata()["version"]
    assert version == ls.container_versions()["TRITON_SERVER_VERSION"]


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", GOOD_MODELS)
def test_inference_matches_torch(triton_server, tiny_classifier, protocol, model):
    module, client = _client(protocol, triton_server)
    batch = _images(3, seed=7)
    logits, embedding = _infer(module, client, model, batch)
    ref_logits, ref_embedding = tiny_reference(tiny_classifier, batch)
    assert logits.dtype == np.float32 and logits.shape == (3, 4) and embedding.shape == (3, 6)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL)
    np.testing.assert_allclose(embedding, ref_embedding, atol=ATOL)


@pytest.mark.triton
@pytest.mark.parametrize("model", GOOD_MODELS)
def test_dynamic_batching_groups_concurrent_requests(triton_server, tiny_classifier, model):
    import tritonclient.http as th

    stats_client = th.InferenceServerClient(triton_server.url_http)

    def counts():
        stats = stats_client.get_inference_statistics(model)["model_stats"][0]
        return stats["inference_count"], stats["execution_count"]

    images = _images(8, seed=11)
    before = counts()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(
            lambda i: _infer(th, th.InferenceServerClient(triton_server.url_http), model,
                             images[i:i + 1]), range(8)))
    deadline = time.monotonic() + 10  # statistics are recorded just after the responses
    while (after := counts())[0] - before[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    ref_logits, ref_embedding = tiny_reference(tiny_classifier, images)
    for i, (logits, embedding) in enumerate(results):  # each answer went back to its caller
        np.testing.assert_allclose(logits[0], ref_logits[i], atol=ATOL)
        np.testing.assert_allclose(embedding[0], ref_embedding[i], atol=ATOL)
    inferences, executions = after[0] - before[0], after[1] - before[1]
    assert inferences == 8
    assert executions < inferences, f"8 concurrent requests ran in {executions} executions"


BAD_REQUESTS = {
    "wrong_name": (dict(name="image"), ["unexpected inference input 'image'"]),
    "wrong_shape": (dict(array=np.zeros((2, 3, 9, 8), np.float32)),
                    ["unexpected shape for input 'pixel_values'",
                     "Expected [-1,3,8,8], got [2,3,9,8]"]),
    "wrong_dtype": (dict(array=np.zeros((2, *TINY_IMAGE)), datatype="FP64"),
                    ["input 'pixel_values' data-type is 'FP64'", "expects 'FP32'"]),
    "batch_too_big": (dict(array=np.zeros((5, *TINY_IMAGE), np.float32)),
                      ["batch-size must be <= 4"]),
}


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_request_is_refused_and_server_keeps_serving(triton_server, tiny_classifier,
                                                         protocol, case):
    from tritonclient.utils import InferenceServerException

    module, client = _client(protocol, triton_server)
    kwargs, expected = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    array = kwargs.pop("array", _images(2))
    with pytest.raises(InferenceServerException) as excinfo:
        _infer(module, client, "tiny_onnx", array, **kwargs)
    for text in expected:
        assert text in excinfo.value.message()

    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny_onnx")
    logits, _ = _infer(module, client, "tiny_onnx", _images(1, seed=3))
    np.testing.assert_allclose(logits, tiny_reference(tiny_classifier, _images(1, seed=3))[0],
                               atol=ATOL)


@pytest.mark.triton
def test_broken_model_does_not_block_the_others(triton_server):
    from tritonclient.utils import InferenceServerException

    module, client = _client("http", triton_server)
    assert not client.is_model_ready("tiny_broken_onnx")
    with pytest.raises(InferenceServerException, match="tiny_broken_onnx"):
        _infer(module, client, "tiny_broken_onnx", _images(1))
    for model in GOOD_MODELS:
        assert _infer(module, client, model, _images(1))[0].shape == (1, 4)


@pytest.mark.triton
def test_repository_api_needs_the_api_key(triton_server):
    from tritonclient.utils import InferenceServerException

    import tritonclient.grpc as tg
    import tritonclient.http as th

    assert stat.S_IMODE(triton_server.api_key_file.stat().st_mode) == 0o600
    assert ls.read_api_key(triton_server.api_key_file) == triton_server.api_key
    http = th.InferenceServerClient(triton_server.url_http)
    grpc = tg.InferenceServerClient(triton_server.url_grpc)
    model = "tiny_torchscript"

    refused = [
        lambda: http.unload_model(model),
        lambda: http.load_model(model),
        lambda: http.get_model_repository_index(),
        lambda: http.unload_model(model, headers={ls.API_KEY_HEADER: "wrong"}),
        lambda: grpc.unload_model(model),
        lambda: grpc.get_model_repository_index(),
        lambda: grpc.unload_model(model, headers={ls.GRPC_API_KEY_HEADER: "wrong"}),
    ]
    for call in refused:
        with pytest.raises(InferenceServerException, match="restricted"):
            call()
    assert http.is_model_ready(model)

    try:
        http.unload_model(model, headers=triton_server.api_key_headers)
        _wait_model_ready(http, model, False)
        grpc.load_model(model, headers=triton_server.grpc_api_key_headers)
        _wait_model_ready(http, model, True)
        index = http.get_model_repository_index(headers=triton_server.api_key_headers)
        assert {m["name"] for m in index} >= set(GOOD_MODELS)
    finally:
        if not http.is_model_ready(model):
            http.load_model(model, headers=triton_server.api_key_headers)
    assert _infer(th, http, model, _images(1))[0].shape == (1, 4)


@pytest.mark.triton
def test_second_server_on_the_same_ports_is_refused(triton_server, tmp_path):
    with pytest.raises(ls.PortsBusyError) as excinfo:
        ls.start_server(triton_server.repository, http_port=triton_server.http_port,
                        grpc_port=triton_server.grpc_port,
                        metrics_port=triton_server.metrics_port, log_file=tmp_path / "t.log")
    message = str(excinfo.value)
    assert f"port {triton_server.http_port} (http)" in message and "already in use" in message
    assert "scripts/serve.sh stop" in message
    assert not (tmp_path / "t.log").exists()
    assert _client("http", triton_server)[1].is_server_ready()


@pytest.mark.triton
def test_metrics_endpoint_answers(triton_server):
    import urllib.request

    _infer(*_client("http", triton_server), "tiny_onnx", _images(1))
    with urllib.request.urlopen(triton_server.url_metrics, timeout=10) as resp:
        text = resp.read().decode()
    assert resp.status == 200
    assert 'nv_inference_request_success{model="tiny_onnx",version="1"}' in text


@pytest.mark.triton
def test_cli_start_status_stop(tiny_model_repository, tmp_path):
    pid_file, log_file = tmp_path / "triton.pid", tmp_path / "triton.log"
    http, grpc, metrics = ls.find_free_ports(3)

    def cli(*args, timeout=180):
        return subprocess.run([sys.executable, "-m", "serve", *args], cwd=ROOT, timeout=timeout,
                              capture_output=True, text=True)

    start = ["start", "--repository", str(tiny_model_repository),
             "--models", "tiny_onnx,tiny_trt_plan",
             "--http-port", str(http), "--grpc-port", str(grpc), "--metrics-port", str(metrics)]
    try:
        result = cli(*start, "--pid-file", str(pid_file), "--log-file", str(log_file))
        assert result.returncode == 0, result.stderr + log_file.read_text()
        assert "ready" in result.stdout and "model tiny_onnx: READY" in result.stdout
        assert "tiny_trt_plan: not loaded: needs an NVIDIA GPU and TensorRT" in result.stdout

        again = cli(*start, "--pid-file", str(tmp_path / "b.pid"),
                    "--log-file", str(tmp_path / "b.log"))
        assert again.returncode == 1 and "already in use" in again.stderr

        status = cli("status", "--json", "--pid-file", str(pid_file))
        assert status.returncode == 0, status.stdout
        info = json.loads(status.stdout)
        assert info["running"] and info["ready"] and info["models"]["tiny_onnx"] == "READY"
        assert info["models"]["tiny_trt_plan"].endswith("needs an NVIDIA GPU and TensorRT")
        pid = info["pid"]

        stop = cli("stop", "--pid-file", str(pid_file))
        assert stop.returncode == 0 and f"stopped tritonserver (pid {pid})" in stop.stdout
        assert not ls._is_our_server(pid) and not pid_file.exists()
        assert cli("status", "--pid-file", str(pid_file)).returncode == 1
        assert ls.ports_in_use([http, grpc, metrics]) == []
    finally:
        ls.stop_server(pid_file, timeout=10)


@pytest.mark.triton
def test_oversize_body_is_refused_with_4xx_and_server_keeps_serving(triton_server, tiny_classifier):
    """A body carrying far more data than its declared shape (8 MB for a
    [1,3,8,8] tensor) is refused with HTTP 400 / gRPC INVALID_ARGUMENT that
    names the input; the server stays live and keeps answering."""
    import json
    import urllib.error
    import urllib.request

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    declared = [1, *TINY_IMAGE]
    payload = np.zeros(2_000_000, np.float32).tobytes()          # 8 MB, declared 192 values
    header = json.dumps({"inputs": [{"name": "pixel_values", "shape": declared, "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(payload)}}]}).encode()
    req = urllib.request.Request(f"http://{triton_server.url_http}/v2/models/tiny_onnx/infer",
                                 data=header + payload, method="POST",
                                 headers={"Inference-Header-Content-Length": str(len(header)),
                                          "Content-Type": "application/octet-stream"})
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(req, timeout=30)
    assert 400 <= excinfo.value.code < 500
    body = excinfo.value.read().decode()
    assert "pixel_values" in body, body

    client = grpcclient.InferenceServerClient(triton_server.url_grpc)
    inp = grpcclient.InferInput("pixel_values", declared, "FP32")
    inp.set_data_from_numpy(_images(1))
    inp._raw_content = payload  # what a buggy or hostile client sends: more bytes than the shape
    with pytest.raises(InferenceServerException) as gexc:
        client.infer("tiny_onnx", [inp])
    assert "INVALID_ARGUMENT" in str(gexc.value.status()) and "pixel_values" in gexc.value.message()

    assert client.is_server_live() and client.is_server_ready()
    logits, _ = _infer(grpcclient, client, "tiny_onnx", _images(1, seed=3))
    np.testing.assert_allclose(logits, tiny_reference(tiny_classifier, _images(1, seed=3))[0], atol=ATOL)
