"""Serving stage: the real local Triton server, its CPU stand-in backends, the
one Triton access layer (serve/triton_access.py) and the CLI.

Tests marked ``triton`` start tritonserver (fixtures in tests/fixtures/triton.py);
its test repository is written by export/triton_config.py, the generator the
export stage publishes with.
"""
from __future__ import annotations

import json
import shutil
import socket
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from dinov2_triton.serve import install, model_plan
from dinov2_triton.serve import local_server as ls
from dinov2_triton.serve import triton_access as ta
from dinov2_triton.serve.install import STANDIN_BACKENDS
from tests.fixtures import fake_docker
from tests.fixtures.standin import FakeRequest, load_standin
from tests.fixtures.triton import TINY_IMAGE, tiny_config, tiny_config_message, tiny_reference, write_model

ROOT = Path(__file__).resolve().parents[1]
GOOD_MODELS = ["tiny_onnx", "tiny_torchscript"]
ATOL = 1e-5


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *TINY_IMAGE)).astype(np.float32)


def _infer(conn, model, array, name="pixel_values", datatype="FP32"):
    outputs = [conn.requested_output(n) for n in ("logits", "embedding")]
    result = conn.infer(model, [conn.tensor_input(name, array, datatype)], outputs)
    return result.as_numpy("logits"), result.as_numpy("embedding")


def _wait_model_ready(conn, model, ready: bool, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while conn.model_ready(model) != ready:
        assert time.monotonic() < deadline, f"{model} ready={not ready} after {timeout} s"
        time.sleep(0.1)


# --------------------------------------------------------------------------- no server
def test_plan_models_loads_what_runs_here_and_says_why_not(tmp_path):
    from dinov2_triton.export.triton_config import ensemble_config, preprocess_config, to_text

    def ensemble(name, step):
        cfg = ensemble_config(step, num_classes=4, embed_dim=6, image_size=8, max_batch_size=4)
        cfg.name = name
        return to_text(cfg)

    write_model(tmp_path, "onnx", tiny_config("onnx", "onnxruntime_onnx"))
    write_model(tmp_path, "trt", tiny_config("trt", "tensorrt_plan"))
    write_model(tmp_path, "gpu_only", tiny_config("gpu_only", "onnxruntime_onnx", device="gpu"))
    write_model(tmp_path, "dinov2_preprocess",
                to_text(preprocess_config(image_size=8, max_batch_size=4, warmup_file=False)))
    write_model(tmp_path, "ens_trt", ensemble("ens_trt", "trt"))
    write_model(tmp_path, "ens_nested", ensemble("ens_nested", "ens_trt"))
    write_model(tmp_path, "ens_ok", ensemble("ens_ok", "onnx"))
    write_model(tmp_path, "garbled", "name: \"garbled\"\nplatform: onnxruntime_onnx\n{{{")
    (tmp_path / "not_a_model").mkdir()

    plan = model_plan.plan_models(tmp_path)
    assert plan.load == ["dinov2_preprocess", "ens_ok", "onnx"]
    assert plan.skipped["trt"] == "needs an NVIDIA GPU and TensorRT"
    assert "KIND_GPU" in plan.skipped["gpu_only"]
    assert "'trt'" in plan.skipped["ens_trt"] and "TensorRT" in plan.skipped["ens_trt"]
    assert "'ens_trt'" in plan.skipped["ens_nested"]
    assert "cannot be parsed" in plan.skipped["garbled"]

    assert model_plan.plan_models(tmp_path, ["onnx", "trt"]).load == ["onnx"]
    with pytest.raises(ValueError, match="nope.*available"):
        model_plan.plan_models(tmp_path, ["onnx", "nope"])
    shutil.rmtree(tmp_path / "dinov2_preprocess")  # an ensemble step missing from the repository
    assert "not in the repository" in model_plan.plan_models(tmp_path).skipped["ens_ok"]


def test_api_key_file_is_private(tmp_path):
    key_file = tmp_path / "keys" / "triton.api_key"
    key_file.parent.mkdir()
    key_file.write_text("old")
    key_file.chmod(0o644)
    key = ls.write_api_key(key_file)
    assert len(key) >= 32 and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert ls.write_api_key(key_file, "given") == "given" == ta.read_api_key(file=key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_read_api_key_sources_and_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(ta.API_KEY_ENV, raising=False)
    assert ta.read_api_key() is None
    monkeypatch.setenv(ta.API_KEY_ENV, "from-env")
    assert ta.read_api_key() == "from-env"
    key_file = tmp_path / "k"
    key_file.write_text("from-file\n")
    assert ta.read_api_key(file=key_file) == "from-file"  # a file wins over the environment
    assert ta.read_api_key("given") == "given"
    with pytest.raises(ValueError, match="not both"):
        ta.read_api_key("given", key_file)
    with pytest.raises(ValueError, match=f"API key file {tmp_path / 'missing'}: cannot read"):
        ta.read_api_key(file=tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match=f"API key file {tmp_path / 'empty'}: is empty"):
        ta.read_api_key(file=tmp_path / "empty")


def test_headers_for_each_protocol():
    # Triton reads a restricted gRPC protocol's header from prefixed metadata
    assert ta.headers_for("http", "k") == {"triton-api-key": "k"}
    assert ta.headers_for("grpc", "k") == {"triton-grpc-protocol-triton-api-key": "k"}
    assert ta.headers_for("grpc", None) == {} == ta.headers_for("http", "")
    with pytest.raises(ValueError, match="choose grpc or http"):
        ta.headers_for("https", "k")


def test_errors_are_typed_from_what_tritonclient_raises():
    from tritonclient.utils import InferenceServerException as E

    url = "h:1"

    def kind(exc, model=None):
        return type(ta.classify_error(exc, url, model=model))

    assert kind(ConnectionRefusedError(111, "Connection refused")) is ta.ServerUnreachable
    assert kind(E("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
                  "Failed to connect to remote host: Connection refused",
                  status="StatusCode.UNAVAILABLE")) is ta.ServerUnreachable
    assert kind(E("Deadline Exceeded", status="StatusCode.DEADLINE_EXCEEDED")) is ta.ServerUnreachable
    # the server itself says UNAVAILABLE / 503: up, but shedding load
    assert kind(E("Exceeds maximum queue size", status="StatusCode.UNAVAILABLE")) is ta.Overloaded
    assert kind(E("Exceeds maximum queue size", status="503")) is ta.Overloaded
    # a restricted API: gRPC answers UNAVAILABLE too, but it is a refusal
    denied = ta.classify_error(E("This protocol is restricted, expecting header "
                                 "'triton-grpc-protocol-triton-api-key'", status="StatusCode.UNAVAILABLE"), url)
    assert type(denied) is ta.AccessDenied and "--api-key-file" in str(denied)
    assert kind(E("This API is restricted, expecting header 'triton-api-key'", status="403")) is ta.AccessDenied
    assert kind(E("Request for unknown model: 'x' is not found", status="404")) is ta.ModelNotReady
    bad = ta.classify_error(E("inference request batch-size must be <= 4", status="400"), url, model="m")
    assert type(bad) is ta.RequestError and str(bad) == "model 'm': inference request batch-size must be <= 4"
    assert issubclass(ta.Overloaded, ta.RequestError) and issubclass(ta.AccessDenied, ta.RequestError)
    unreachable = str(ta.classify_error(ConnectionRefusedError(111, "Connection refused"), url))
    assert unreachable.startswith(f"cannot reach Triton at {url} (is the server running? dinov2-triton serve start)")


def test_model_config_has_one_shape_whatever_the_protocol():
    """gRPC hands over a protobuf (whose JSON form writes int64 as strings),
    HTTP a JSON dict: both normalise to the same dict, ints as ints."""
    from google.protobuf import json_format

    msg = tiny_config_message("tiny_onnx", "onnxruntime_onnx")
    from_grpc = ta.normalise_config(msg)
    as_json = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    assert as_json["input"][0]["dims"] == ["3", "8", "8"]  # what the old code had to patch by hand
    from_http = ta.normalise_config(json.loads(json.dumps(as_json).replace('"3", "8", "8"', '3, 8, 8')))
    assert from_grpc == from_http
    assert from_grpc["input"] == [{"name": "pixel_values", "data_type": "TYPE_FP32", "dims": [3, 8, 8]}]
    assert from_grpc["max_batch_size"] == 4 and from_grpc["backend"] == ""
    assert from_grpc["dynamic_batching"]["max_queue_delay_microseconds"] == 10000
    assert ta.config_parameter(from_grpc, "precision") == "fp32"


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


def _container_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "model_repository"
    (repo / "tiny_onnx" / "1").mkdir(parents=True, exist_ok=True)
    (repo / "tiny_onnx" / "config.pbtxt").write_text(tiny_config("tiny_onnx", "onnxruntime_onnx"))
    return repo


def test_container_runs_the_pinned_release_with_the_key_restricted(tmp_path, monkeypatch, capsys):
    """`dinov2-triton serve container` with stand-in docker/nvidia-smi: the image it
    builds on is the pinned release (container_versions()), and the container's
    repository API is restricted to the key it writes (0600) for HTTP and gRPC;
    the key is never printed."""
    from dinov2_triton.serve.cli import main as serve_main

    versions = ls.container_versions()
    tag = versions["TRITON_CONTAINER_TAG"]
    assert versions["TRITON_CONTAINER_IMAGE"] == f"nvcr.io/nvidia/tritonserver:{tag}-py3"
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", str(fake_docker.install(tmp_path / "bin", log)))
    key_file = tmp_path / "logs" / "container.api_key"
    code = serve_main(["container", "--repository", str(_container_repo(tmp_path)), "--api-key-file",
                       str(key_file), "--http-port", "18000", "--grpc-port", "18001", "--metrics-port", "18002"])
    out = capsys.readouterr()
    assert code == 0, out.err
    (build,), (run,) = fake_docker.subcommand(log, "build"), fake_docker.subcommand(log, "run")
    assert f"TRITON_IMAGE={versions['TRITON_CONTAINER_IMAGE']}" in build
    assert f"dinov2-triton-serve:{tag}" in build and f"dinov2-triton-serve:{tag}" in run
    key = ta.read_api_key(file=key_file)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) >= 32
    assert f"--http-restricted-api=model-repository:{ta.API_KEY_HEADER}={key}" in run
    assert f"--grpc-restricted-protocol=model-repository:{ta.API_KEY_HEADER}={key}" in run
    assert ["-p", "127.0.0.1:18000:8000"] == run[run.index("127.0.0.1:18000:8000") - 1:][:2]
    assert "--load-model=tiny_onnx" not in run and "--load-model=*" in run
    assert key not in out.out + out.err and str(key_file) in out.out
    # --dry-run prints the same commands, key elided, and needs no docker
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert serve_main(["container", "--repository", str(_container_repo(tmp_path)), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "docker build" in printed and "triton-api-key=<api-key>" in printed and key not in printed


def test_serve_container_fails_clearly_without_docker_daemon_or_gpu(tmp_path, monkeypatch, capsys):
    from dinov2_triton.serve.cli import main as serve_main

    repo = _container_repo(tmp_path)
    for name, kwargs, message in (("none", dict(docker=False), "docker not found"),
                                  ("down", dict(daemon=False), "daemon is not reachable"),
                                  ("nogpu", dict(gpu=False), "no NVIDIA GPU or driver found")):
        log = tmp_path / f"{name}.log"
        monkeypatch.setenv("PATH", str(fake_docker.install(tmp_path / name, log, **kwargs)))
        key_file = tmp_path / f"{name}.key"
        assert serve_main(["container", "--repository", str(repo), "--api-key-file", str(key_file)]) == 1
        err = capsys.readouterr().err
        assert message in err and "dinov2-triton serve start" in err, err
        assert not fake_docker.subcommand(log, "run") and not key_file.exists()
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    assert serve_main(["container", "--repository", str(tmp_path / "missing")]) == 1
    assert "model repository" in capsys.readouterr().err


# --------------------------------------------------------------------------- stand-ins in-process
def _load_standin(backend: str, model_dir: Path, model_name: str, backends: Path = STANDIN_BACKENDS):
    return load_standin(backend, model_dir, model_name=model_name, backends=backends)[0]


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
        FakeRequest(pixel_values=good[0]),
        FakeRequest(image=good[1]),  # wrong name
        FakeRequest(pixel_values=good[1]),
        FakeRequest(pixel_values=np.zeros((1, 3, 9, 8), np.float32)),  # wrong shape
        FakeRequest(pixel_values=good[2].astype(np.float64)),  # wrong dtype
        FakeRequest(pixel_values=_images(5)),  # batch above max_batch_size
        FakeRequest(),  # no input at all
        FakeRequest(pixel_values=good[2]),
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
    responses = model.execute([FakeRequest(pixel_values=_images(1)),
                               FakeRequest(image=_images(1))])
    assert "inference failed: boom" in responses[0].error.message()
    assert responses[0].error.code == "INTERNAL"
    assert "unexpected input" in responses[1].error.message()


def test_standin_refuses_a_config_that_does_not_match_the_graph(pb_utils, tiny_model_repository,
                                                                tmp_path):
    from dinov2_triton.export.triton_config import to_text

    cfg = tiny_config_message("renamed", "onnxruntime_onnx")
    cfg.output[0].name = "scores"  # the graph's output is 'logits'
    version = write_model(tmp_path, "renamed", to_text(cfg))
    (version / "model.onnx").write_bytes((tiny_model_repository / "tiny_onnx" / "1" / "model.onnx").read_bytes())
    model_dir = tmp_path / "renamed"
    with pytest.raises(pb_utils.TritonModelException, match="config output 'scores' is not in"):
        _load_standin("onnxruntime", model_dir, "renamed")


@pytest.mark.parametrize("backend,model_name", [("onnxruntime", "tiny_onnx"),
                                                ("pytorch", "tiny_torchscript")])
def test_standins_run_from_the_built_backend_dir(pb_utils, tiny_model_repository, tiny_classifier,
                                                 tmp_path, backend, model_name):
    """Each model.py loads its shared helpers from one folder up, as the stub
    runs it: the backend directory that dinov2_triton.serve.install builds must carry them."""
    backend_dir = install.build_backend_dir(cache_dir=tmp_path)
    assert backend_dir.parent == tmp_path and install.build_backend_dir(cache_dir=tmp_path) == backend_dir
    model = _load_standin(backend, tiny_model_repository / model_name, model_name, backends=backend_dir)
    batch = _images(2, seed=5)
    (response,) = model.execute([FakeRequest(pixel_values=batch)])
    assert response.error is None
    np.testing.assert_allclose(response.outputs["logits"], tiny_reference(tiny_classifier, batch)[0], atol=ATOL)


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
    # the local binary's release is pinned beside the container's (core/resources/triton_release.env)
    version = triton_server.server_metadata()["version"]
    assert version == ls.container_versions()["LOCAL_TRITON_SERVER_VERSION"]


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", GOOD_MODELS)
def test_inference_matches_torch(triton_server, tiny_classifier, protocol, model):
    with triton_server.connect(protocol, with_key=False) as conn:
        batch = _images(3, seed=7)
        logits, embedding = _infer(conn, model, batch)
    ref_logits, ref_embedding = tiny_reference(tiny_classifier, batch)
    assert logits.dtype == np.float32 and logits.shape == (3, 4) and embedding.shape == (3, 6)
    np.testing.assert_allclose(logits, ref_logits, atol=ATOL)
    np.testing.assert_allclose(embedding, ref_embedding, atol=ATOL)


@pytest.mark.triton
@pytest.mark.parametrize("model", GOOD_MODELS)
def test_dynamic_batching_groups_concurrent_requests(triton_server, tiny_classifier, model):
    stats = triton_server.connect("http", with_key=False)

    def counts():
        entry = stats.inference_statistics(model)
        return entry["inference_count"], entry["execution_count"]

    def one(i):
        with triton_server.connect("http", with_key=False) as conn:
            return _infer(conn, model, images[i:i + 1])

    images = _images(8, seed=11)
    before = counts()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    deadline = time.monotonic() + 10  # statistics are recorded just after the responses
    while (after := counts())[0] - before[0] < 8 and time.monotonic() < deadline:
        time.sleep(0.05)
    stats.close()
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
    kwargs, expected = BAD_REQUESTS[case]
    kwargs = dict(kwargs)
    array = kwargs.pop("array", _images(2))
    with triton_server.connect(protocol, with_key=False) as conn:
        with pytest.raises(ta.RequestError) as excinfo:
            _infer(conn, "tiny_onnx", array, **kwargs)
        assert type(excinfo.value) is ta.RequestError  # not Overloaded, not AccessDenied
        assert str(excinfo.value).startswith("model 'tiny_onnx': ")
        for text in expected:
            assert text in str(excinfo.value)

        assert conn.is_live() and conn.is_ready() and conn.model_ready("tiny_onnx")
        logits, _ = _infer(conn, "tiny_onnx", _images(1, seed=3))
    np.testing.assert_allclose(logits, tiny_reference(tiny_classifier, _images(1, seed=3))[0],
                               atol=ATOL)


@pytest.mark.triton
def test_broken_model_does_not_block_the_others(triton_server):
    with triton_server.connect("http", with_key=False) as conn:
        assert not conn.model_ready("tiny_broken_onnx")
        with pytest.raises(ta.TritonError, match="tiny_broken_onnx"):
            _infer(conn, "tiny_broken_onnx", _images(1))
        with pytest.raises(ta.ModelNotReady, match="'tiny_broken_onnx' is not ready"):
            conn.model_config("tiny_broken_onnx")
        for model in GOOD_MODELS:
            assert _infer(conn, model, _images(1))[0].shape == (1, 4)


@pytest.mark.triton
def test_served_config_is_the_same_over_http_and_grpc(triton_server):
    with triton_server.connect("http") as http, triton_server.connect("grpc") as grpc:
        for model in GOOD_MODELS:
            cfg = http.model_config(model)
            assert cfg == grpc.model_config(model)
            assert cfg["max_batch_size"] == 4 and cfg["input"][0]["dims"] == [3, 8, 8]
            assert [o["name"] for o in cfg["output"]] == ["logits", "embedding"]
            assert ta.config_parameter(cfg, "precision") == "fp32"
        assert http.server_metadata() == grpc.server_metadata()
        assert http.server_metadata()["version"] == ls.container_versions()["LOCAL_TRITON_SERVER_VERSION"]


@pytest.mark.triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_repository_api_needs_the_api_key(triton_server, protocol):
    """The key-protected repository API through the access layer, over each
    protocol: with the key, index, unload and load work; without it, or with a
    wrong one, they are refused. (Over gRPC the key must travel as
    `triton-grpc-protocol-triton-api-key`: a client sending the bare header
    name is refused as well.)"""
    assert stat.S_IMODE(triton_server.api_key_file.stat().st_mode) == 0o600
    assert ta.read_api_key(file=triton_server.api_key_file) == triton_server.api_key
    url = triton_server.url(protocol)
    model = "tiny_torchscript"
    keyed = ta.connect(url, protocol, api_key=triton_server.api_key, timeout_s=60)
    for conn in (ta.connect(url, protocol), ta.connect(url, protocol, api_key="wrong")):
        for call in (conn.repository_index, conn.ready_models,
                     lambda c=conn: c.unload_model(model), lambda c=conn: c.load_model(model)):
            with pytest.raises(ta.AccessDenied, match="restricted.*--api-key-file"):
                call()
        conn.close()
    if protocol == "grpc":  # the key under the HTTP header name does not unlock gRPC
        bare = ta.connect(url, protocol)
        bare.headers = {ta.API_KEY_HEADER: triton_server.api_key}
        with pytest.raises(ta.AccessDenied):
            bare.repository_index()
        bare.close()
    assert keyed.model_ready(model)

    index = {m["name"]: m for m in keyed.repository_index()}
    assert {index[m]["state"] for m in GOOD_MODELS} == {"READY"}
    assert index["tiny_broken_onnx"]["state"] == "UNAVAILABLE" and index["tiny_broken_onnx"]["reason"]
    assert keyed.ready_models() == sorted(GOOD_MODELS)
    assert keyed.ready_models(["tiny_torchscript", "nope", "tiny_broken_onnx"]) == ["tiny_torchscript"]
    try:
        keyed.unload_model(model)
        _wait_model_ready(keyed, model, False)
        assert model not in keyed.ready_models()
        keyed.load_model(model)
        _wait_model_ready(keyed, model, True)
    finally:
        if not keyed.model_ready(model):
            keyed.load_model(model)
    assert _infer(keyed, model, _images(1))[0].shape == (1, 4)
    keyed.close()


@pytest.mark.triton
def test_load_with_a_config_override_and_files(triton_server, tiny_model_repository):
    """load_model(config=..., files=...): Triton's override model folder, through
    the key-protected API (what a hot reload of a new artifact uses)."""
    from google.protobuf import json_format

    name = "tiny_torchscript"
    cfg = json_format.MessageToDict(tiny_config_message(name, "pytorch_libtorch", max_batch_size=2),
                                    preserving_proto_field_name=True)
    files = {f"1/{f}": (tiny_model_repository / name / "1" / f).read_bytes() for f in ("model.pt",)}
    files["labels.txt"] = (tiny_model_repository / name / "labels.txt").read_bytes()
    with triton_server.connect("grpc") as conn:
        with pytest.raises(ValueError, match="files need a config"):
            conn.load_model(name, files=files)
        try:
            conn.load_model(name, config=cfg, files=files)
            _wait_model_ready(conn, name, True)
            assert conn.model_config(name)["max_batch_size"] == 2
            with pytest.raises(ta.RequestError, match="batch-size must be <= 2"):
                _infer(conn, name, _images(3))
        finally:
            conn.load_model(name)  # back to the repository's own folder and config
            _wait_model_ready(conn, name, True)
        assert conn.model_config(name)["max_batch_size"] == 4


@pytest.mark.triton
def test_second_server_on_the_same_ports_is_refused(triton_server, tmp_path):
    with pytest.raises(ls.PortsBusyError) as excinfo:
        ls.start_server(triton_server.repository, http_port=triton_server.http_port,
                        grpc_port=triton_server.grpc_port,
                        metrics_port=triton_server.metrics_port, log_file=tmp_path / "t.log")
    message = str(excinfo.value)
    assert f"port {triton_server.http_port} (http)" in message and "already in use" in message
    assert "dinov2-triton serve stop" in message
    assert not (tmp_path / "t.log").exists()
    assert triton_server.is_ready()


@pytest.mark.triton
def test_metrics_endpoint_answers(triton_server):
    import urllib.request

    with triton_server.connect("http", with_key=False) as conn:
        _infer(conn, "tiny_onnx", _images(1))
    with urllib.request.urlopen(triton_server.url_metrics, timeout=10) as resp:
        text = resp.read().decode()
    assert resp.status == 200
    assert 'nv_inference_request_success{model="tiny_onnx",version="1"}' in text


@pytest.mark.triton
def test_cli_start_status_stop(tiny_model_repository, tmp_path):
    pid_file, log_file = tmp_path / "triton.pid", tmp_path / "triton.log"
    http, grpc, metrics = ls.find_free_ports(3)

    def cli(*args, timeout=180):
        return subprocess.run([sys.executable, "-m", "dinov2_triton.cli", "serve", *args], cwd=ROOT, timeout=timeout,
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
    with triton_server.connect("grpc", with_key=False) as conn:
        logits, _ = _infer(conn, "tiny_onnx", _images(1, seed=3))
    np.testing.assert_allclose(logits, tiny_reference(tiny_classifier, _images(1, seed=3))[0], atol=ATOL)
