"""The GPU stack agrees with itself: the release pin (package data
core/resources/triton_release.env, one reader: dinov2_triton.core.release_pin),
requirements/lock-gpu.txt, the `gpu` extra, environment.yml, the serving
Dockerfile and its Pillow, and the commands that start the NVIDIA containers
(dinov2_triton.serve.container, dinov2_triton.export.container).

No network: the pin parses and marks what it could not confirm, the lock has
one CUDA major, the containers' Python and the pinned TensorRT, nothing in
the package or the scripts repeats the pin, and the docker command lines are
built from the pin and the repository (checked as argv lists, and end to end
with stand-in `docker` and `nvidia-smi` that record their arguments).
Every generated config.pbtxt parses with the model-config protobuf of the
local server's release and of the pinned container's release (their tritonclient
wheels, downloaded by scripts/setup_env.sh). The package index (marked network,
run with -m network): pip resolves the lock for the containers' Python and
platform from wheels alone."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2_triton.core.release_pin import PIN_FILE, PinError, load_pin, read_pin
from dinov2_triton.export import container as trt_box
from dinov2_triton.serve import container as box
from tests.fixtures import fake_docker
from tests.fixtures import gpu_stack as gs

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dinov2_triton"


# --------------------------------------------------------------------------- the pin
def _block(text: str, key: str) -> str:
    """The comment block (and the assignments) right above ``key=`` in the pin file."""
    return text[:text.index(f"\n{key}=")].rsplit("\n\n", 1)[-1]


def test_pin_parses_and_marks_every_unconfirmed_figure():
    pin = load_pin()
    assert pin.triton_image == f"nvcr.io/nvidia/tritonserver:{pin.container_tag}-py3"
    assert pin.tensorrt_image == f"nvcr.io/nvidia/tensorrt:{pin.container_tag}-py3"
    assert len(pin.tensorrt.split(".")) == 4
    assert pin.local_triton_server == "2.51.0"     # the binary in nvidia-pytriton 0.7.0
    text = PIN_FILE.read_text()
    assert pin.unverified, "figures not read from NVIDIA's text are listed in UNVERIFIED_KEYS"
    for key in pin.unverified:
        # the comment block right above the key says UNVERIFIED and gives the command that confirms it
        block = _block(text, key)
        assert "UNVERIFIED" in block and "docker run" in block, key
    # every other figure says where it was read: NVIDIA's documentation or the server's own release
    for key in ("TRITON_SERVER_VERSION", "TRITON_CUDA_VERSION", "TRITON_MIN_DRIVER",
                "TRITON_MIN_COMPUTE_CAPABILITY", "TRITON_TENSORRT_VERSION", "TRITON_ONNXRUNTIME_VERSION",
                "TRITON_OPENVINO_VERSION", "TRITON_PYTHON_VERSION"):
        if key not in pin.unverified:
            block = _block(text, key)
            assert "Verified" in block and re.search(r"docs\.nvidia\.com|github\.com/triton-inference-server",
                                                     block), key


def test_pin_knows_which_release_has_ensemble_backpressure():
    """ENSEMBLE_MAX_INFLIGHT_SINCE agrees with the model-config protobuf of both
    releases of the pin (their tritonclient wheels): the pinned container's
    ModelEnsembling has max_inflight_requests exactly when the pin says so, the
    local server's never."""
    from dinov2_triton.core.release_pin import has_ensemble_max_inflight

    pin = load_pin()
    assert not has_ensemble_max_inflight("2.62.0") and has_ensemble_max_inflight("2.63.0")
    assert not has_ensemble_max_inflight(pin.local_triton_server)
    for release in (pin.local_triton_server, pin.triton_server):
        ensembling = gs.model_config_class(release).DESCRIPTOR.fields_by_name["ensemble_scheduling"].message_type
        assert ("max_inflight_requests" in ensembling.fields_by_name) is has_ensemble_max_inflight(release), release
    assert pin.ensemble_max_inflight, "the pin moved to a release with ensemble back-pressure (issue #20)"


@pytest.mark.parametrize("text, message", [
    ("TRITON_CONTAINER_TAG=25.10\n", "TRITON_CONTAINER_IMAGE missing"),
    ("A=${B}\n", "refers to undefined B"),
    ("echo hello\n", "not a KEY=VALUE line"),
    ('A="x\n', "unbalanced quotes"),
    ("A=two words\n", "must be quoted"),
])
def test_pin_errors_name_the_file_and_line(tmp_path, text, message):
    f = tmp_path / "pin.sh"
    f.write_text(text)
    with pytest.raises(PinError, match=re.escape(message)) as exc:
        load_pin(f)
    assert str(f) in str(exc.value)


def test_pin_needs_the_full_tensorrt_version(tmp_path):
    trt = load_pin().tensorrt
    short = trt.rsplit(".", 1)[0]
    text = PIN_FILE.read_text().replace(f"TRITON_TENSORRT_VERSION={trt}", f"TRITON_TENSORRT_VERSION={short}")
    assert short in text
    (tmp_path / "pin.sh").write_text(text)
    with pytest.raises(PinError, match="full 4-part version"):
        load_pin(tmp_path / "pin.sh")


def _code_strings(path: Path) -> list[str]:
    """The string constants of a module's code (docstrings and comments left out)."""
    tree = ast.parse(path.read_text())
    docs = {id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs]


def test_the_pin_is_data_with_one_reader():
    """The pin is package data (KEY=VALUE, no shell), read only through
    dinov2_triton.core.release_pin; no module or script repeats its figures."""
    pin = load_pin()
    assert PIN_FILE.parent.name == "resources" and PIN_FILE.suffix == ".env"
    assert read_pin()["TRITON_CONTAINER_IMAGE"] == pin.triton_image
    text = PIN_FILE.read_text()
    assert "shellcheck" not in text and "source " not in text and not re.search(r"^export ", text, re.M)
    literals = (pin.triton_image, pin.tensorrt_image, pin.tensorrt, pin.triton_server, f"{pin.container_tag}-py3",
                "nvcr.io/", "triton_release.env")
    for module in sorted(PACKAGE.rglob("*.py")):
        if module.name == "release_pin.py" or "resources" in module.parts:
            continue
        for value in _code_strings(module):
            for literal in literals:
                assert literal not in value, f"{module.relative_to(ROOT)} repeats {literal!r}: read the pin"
    for script in sorted((ROOT / "scripts").glob("*.sh")):
        code = "\n".join(ln for ln in script.read_text().splitlines() if not ln.lstrip().startswith("#"))
        for literal in (*literals, pin.container_tag, "triton_version.sh"):
            assert literal not in code, f"{script.name} repeats {literal!r}"


# --------------------------------------------------------------------------- the lock (offline)
def test_lock_agrees_with_the_pin_and_the_gpu_extra():
    assert gs.check_lock(load_pin(), gs.read_lock()) == []


def _mutated(tmp_path, old: str, new: str) -> gs.Lock:
    text = gs.LOCK_FILE.read_text()
    assert old in text, old
    (tmp_path / "lock.txt").write_text(text.replace(old, new))
    return gs.read_lock(tmp_path / "lock.txt")


def test_a_cuda_12_package_in_the_lock_is_caught(tmp_path):
    lock = _mutated(tmp_path, "onnxruntime-gpu[cuda,cudnn]==1.31.1  # requires-python: >=3.11",
                    "onnxruntime-gpu[cuda,cudnn]==1.31.1  # requires-python: >=3.11\n"
                    "nvidia-cuda-runtime-cu12==12.9.79  # requires-python: >=3")
    problems = gs.check_lock(load_pin(), lock)
    assert any("nvidia-cuda-runtime-cu12==12.9.79 is a CUDA 12 package" in p for p in problems), problems


def test_the_old_24_10_stack_is_caught(tmp_path):
    """Python 3.10 (24.10's) against pillow 13 / scikit-learn 1.9 / matplotlib 3.11,
    and a TensorRT pin that is not the container's full version."""
    text = PIN_FILE.read_text().replace("TRITON_PYTHON_VERSION=3.12", "TRITON_PYTHON_VERSION=3.10")
    (tmp_path / "pin.sh").write_text(text)
    problems = gs.check_lock(load_pin(tmp_path / "pin.sh"), gs.read_lock())
    for name in ("pillow==13.0.0", "scikit-learn==1.9.1", "matplotlib==3.11.2"):
        assert any(name in p and "the containers have 3.10" in p for p in problems), name
    assert any("python 3.12 but the containers have Python 3.10" in p for p in problems)
    trt = load_pin().tensorrt
    lock = _mutated(tmp_path, f"tensorrt-cu13=={trt}", "tensorrt-cu13==10.13.2.6")
    assert any(f"container has TensorRT {trt}" in p for p in gs.check_lock(load_pin(), lock))


def test_tritonclient_and_gpu_extra_must_match(tmp_path):
    pin, locked = load_pin(), gs.read_lock().get("tritonclient")
    assert locked.version == pin.triton_server
    line = f"tritonclient[{locked.extras}]=={pin.triton_server}"
    lock = _mutated(tmp_path, line, line.replace(pin.triton_server, "2.50.0"))
    problems = gs.check_lock(pin, lock)
    assert any(f"tritonclient==2.50.0 but the container is Triton {pin.triton_server}" in p for p in problems)
    assert any(f"gpu extra tritonclient=={pin.triton_server}" in p for p in problems)
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(gs.PYPROJECT.read_text().replace('"torch==2.14.1",            # CUDA 13.0',
                                                          '"torch==2.13.0",            # CUDA 13.0'))
    assert any("gpu extra torch==2.13.0 but" in p
               for p in gs.check_lock(load_pin(), gs.read_lock(), pyproject=pyproject))


def test_environment_yml_and_dockerfile_read_the_lock():
    pin = load_pin()
    env = (ROOT / "environment.yml").read_text()
    assert re.search(rf"^\s*- python={re.escape(pin.python)}\s*$", env, re.M)
    pip_lines = [ln.strip()[2:] for ln in env.split("- pip:", 1)[1].splitlines() if ln.strip().startswith("- ")]
    assert pip_lines == ["-r requirements/lock-gpu.txt"], "environment.yml pins nothing of its own"
    docker = box.dockerfile().read_text()
    assert "FROM ${TRITON_IMAGE}" in docker and "${PILLOW_REQUIREMENT}" in docker
    assert not re.search(r"pillow\s*[=<>]", docker, re.I) and "nvcr.io" not in docker


def test_the_containers_pillow_is_the_locks():
    """The Pillow the serving image installs is a constant of the package (an
    installed package has no requirements/): it must be the lock's, and the
    one the package itself depends on."""
    pillow = gs.read_lock().get("pillow")
    assert pillow is not None, "lock-gpu.txt pins no pillow"
    assert box.PILLOW_REQUIREMENT == f"pillow=={pillow.version}"
    assert f'"{box.PILLOW_REQUIREMENT}"' in gs.PYPROJECT.read_text()
    build = box.build_argv(load_pin())
    assert f"PILLOW_REQUIREMENT={box.PILLOW_REQUIREMENT}" in build


# --------------------------------------------------------------------------- the containers' command lines
def _repo(tmp_path, *, version_compatible: bool | None) -> Path:
    repo = tmp_path / "repo"
    (repo / "dinov2_onnx" / "1").mkdir(parents=True)
    (repo / "dinov2_onnx" / "config.pbtxt").write_text('name: "dinov2_onnx"\nplatform: "onnxruntime_onnx"\n')
    if version_compatible is not None:
        (repo / "dinov2_trt_fp16" / "1").mkdir(parents=True)
        (repo / "dinov2_trt_fp16" / "config.pbtxt").write_text(
            'name: "dinov2_trt_fp16"\nplatform: "tensorrt_plan"\nparameters {\n  key: "version_compatible"\n'
            f'  value {{\n    string_value: "{str(version_compatible).lower()}"\n  }}\n}}\n')
    return repo


@pytest.mark.parametrize("version_compatible", [None, False, True])
def test_serve_container_uses_the_pin_and_enables_version_compatible_plans(tmp_path, version_compatible):
    pin = load_pin()
    repo = _repo(tmp_path, version_compatible=version_compatible)
    launch = box.plan_container(repo, api_key="k" * 43)
    assert launch.build_argv[:2] == ["docker", "build"]
    assert f"TRITON_IMAGE={pin.triton_image}" in launch.build_argv
    assert launch.build_argv[launch.build_argv.index("-t") + 1] == f"{box.IMAGE_NAME}:{pin.container_tag}"
    assert launch.build_argv[-1] == str(box.dockerfile().parent)
    run = launch.run_argv
    assert run[:3] == ["docker", "run", "--rm"] and run[run.index("--gpus") + 1] == "all"
    assert run[run.index("tritonserver") - 1] == launch.image == f"{box.IMAGE_NAME}:{pin.container_tag}"
    assert f"{repo.resolve()}:/models:ro" in run and "--load-model=*" in run
    assert (box.VERSION_COMPATIBLE_FLAG in run) is bool(version_compatible)
    assert launch.version_compatible == (("dinov2_trt_fp16",) if version_compatible else ())
    if version_compatible:       # only the selected models decide
        only_onnx = box.plan_container(repo, api_key="k" * 43, models=["dinov2_onnx"])
        assert box.VERSION_COMPATIBLE_FLAG not in only_onnx.run_argv
        assert "--load-model=dinov2_onnx" in only_onnx.run_argv and "--load-model=*" not in only_onnx.run_argv
        assert any("version-compatible TensorRT plans (dinov2_trt_fp16)" in line
                   for line in box.describe(launch, "key"))


def test_serve_container_refuses_bad_input_naming_it(tmp_path):
    repo = _repo(tmp_path, version_compatible=None)
    (repo / "broken").mkdir()
    (repo / "broken" / "config.pbtxt").write_text("name: \"broken\"\nplatform: [\n")
    cases = [
        (dict(repository=tmp_path / "none"), "does not exist"),
        (dict(models=["dinov2_onnx", "nope"]), "--models: nope not in"),
        (dict(models=["broken"]), f"{repo / 'broken' / 'config.pbtxt'}: cannot be parsed"),
        (dict(exit_timeout_s=-1), "--exit-timeout-secs -1"),
        (dict(http_port=8000, grpc_port=8000), "must differ"),
        (dict(host="0.0.0.0 x"), "--host"),
        (dict(name="a b"), "--name 'a b'"),
    ]
    for kwargs, message in cases:
        kwargs = {"repository": repo, "models": ["dinov2_onnx"], **kwargs}
        with pytest.raises(box.ContainerError, match=re.escape(message)):
            box.plan_container(kwargs.pop("repository"), api_key="k" * 43, **kwargs)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(box.ContainerError, match="holds no model"):
        box.plan_container(empty, api_key="k" * 43)


# --------------------------------------------------------------------------- ensemble back-pressure
def _serving_repository(tmp_path, *, queue_timeout_ms: float = 0, instances: int = 2) -> Path:
    """dinov2_preprocess (2 instances), dinov2_onnx and the dinov2 ensemble, their
    config.pbtxt written by the export's own generators (no model files: nothing
    loads here); ``queue_timeout_ms`` 0: no queue policy on either step."""
    from dinov2_triton.export.registry import get_variant, load_builtin_variants
    from dinov2_triton.export.triton_config import (
        classifier_config,
        ensemble_config,
        preprocess_config,
        validate_config,
    )

    load_builtin_variants()
    repo = tmp_path / "model_repository"
    cfgs = [classifier_config(get_variant("onnx"), image_size=56, num_classes=10, embed_dim=384, max_batch_size=8,
                              instances=instances, queue_timeout_ms=queue_timeout_ms),
            preprocess_config(image_size=56, max_batch_size=8, instances=2, queue_timeout_ms=queue_timeout_ms),
            ensemble_config("dinov2_onnx", num_classes=10, embed_dim=384, image_size=56, max_batch_size=8)]
    for cfg in cfgs:
        (repo / cfg.name / "1").mkdir(parents=True)
        (repo / cfg.name / "config.pbtxt").write_text(validate_config(cfg))
    return repo


def _expected_limit(repo: Path) -> int:
    """2 full batches per instance of the busiest step + its queue-policy cap (the rule, by hand)."""
    from dinov2_triton.serve.model_plan import read_model_config

    out = 0
    for step in ("dinov2_preprocess", "dinov2_onnx"):
        cfg = read_model_config(repo / step / "config.pbtxt")
        instances = sum(g.count for g in cfg.instance_group)
        out = max(out, 2 * cfg.max_batch_size * instances + cfg.dynamic_batching.default_queue_policy.max_queue_size)
    return out


def test_container_deployment_carries_ensemble_backpressure_and_the_repository_does_not(tmp_path):
    """`serve container`: the ensemble's per-deployment copy sets
    max_inflight_requests and parses with the pinned release's model config;
    the repository's own config.pbtxt (what the local 2.51 server reads) does not
    carry it, and the copy would not even parse with 2.51's."""
    from google.protobuf import text_format

    pin = load_pin()
    repo = _serving_repository(tmp_path)
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    launch = box.plan_container(repo, api_key="k" * 43)
    (copy,) = launch.ensemble_copies
    name = box.config_name(pin)
    assert copy.model == "dinov2" and copy.path == repo.resolve() / "dinov2" / "configs" / f"{name}.pbtxt"
    assert copy.max_inflight_requests == _expected_limit(repo) == 2 * 8 * 2    # no queue policy: 2 batches x 2
    assert f"--model-config-name={name}" in launch.run_argv
    assert any(f"max_inflight_requests {copy.max_inflight_requests}" in line for line in box.describe(launch, "k"))
    # planning writes nothing
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before and not copy.path.exists()

    container = gs.model_config_class(pin.triton_server)
    container_cfg = text_format.Parse(copy.text, container())
    assert container_cfg.ensemble_scheduling.max_inflight_requests == copy.max_inflight_requests
    original = text_format.Parse((repo / "dinov2" / "config.pbtxt").read_text(), container())
    container_cfg.ensemble_scheduling.max_inflight_requests = 0
    assert container_cfg == original, "the copy is config.pbtxt plus the limit, nothing else"
    local = gs.model_config_class(pin.local_triton_server)
    text_format.Parse((repo / "dinov2" / "config.pbtxt").read_text(), local())   # the local server's file
    assert "max_inflight_requests" not in (repo / "dinov2" / "config.pbtxt").read_text()
    with pytest.raises(text_format.ParseError, match="max_inflight_requests"):
        text_format.Parse(copy.text, local())

    # explicit limits, none, and a release without the field
    assert box.plan_container(repo, api_key="k" * 43, max_inflight=5).ensemble_copies[0].max_inflight_requests == 5
    off = box.plan_container(repo, api_key="k" * 43, max_inflight=0)
    assert off.ensemble_copies == () and not any(a.startswith("--model-config-name") for a in off.run_argv)
    old = tmp_path / "pin.env"
    old.write_text(PIN_FILE.read_text().replace(f"TRITON_SERVER_VERSION={pin.triton_server}",
                                                "TRITON_SERVER_VERSION=2.62.0"))
    older = box.plan_container(repo, api_key="k" * 43, pin=load_pin(old))
    assert older.ensemble_copies == () and not any(a.startswith("--model-config-name") for a in older.run_argv)
    # only the selected models decide
    only_onnx = box.plan_container(repo, api_key="k" * 43, models=["dinov2_onnx"])
    assert only_onnx.ensemble_copies == () and "--model-config-name" not in " ".join(only_onnx.run_argv)
    with pytest.raises(box.ContainerError, match="max_inflight_requests -1"):
        box.plan_container(repo, api_key="k" * 43, max_inflight=-1)


def test_the_limit_leaves_room_for_the_steps_queue_policy(tmp_path):
    """With a queue policy the limit never holds back a request the step's queue
    would accept: 2 batches per instance + max_queue_size of the busiest step."""
    repo = _serving_repository(tmp_path, queue_timeout_ms=2000, instances=3)
    (copy,) = box.plan_container(repo, api_key="k" * 43).ensemble_copies
    from dinov2_triton.serve.model_plan import read_model_config

    onnx = read_model_config(repo / "dinov2_onnx" / "config.pbtxt")
    assert onnx.dynamic_batching.default_queue_policy.max_queue_size > 0
    assert copy.max_inflight_requests == _expected_limit(repo) == (
        2 * 8 * 3 + onnx.dynamic_batching.default_queue_policy.max_queue_size)


def test_a_missing_ensemble_step_is_named(tmp_path):
    import shutil

    repo = _serving_repository(tmp_path)
    shutil.rmtree(repo / "dinov2_onnx")
    with pytest.raises(box.ContainerError, match=r"dinov2_onnx/config\.pbtxt not found"):
        box.plan_container(repo, api_key="k" * 43, models=["dinov2"])


def test_serve_container_writes_the_copy_before_docker_run(tmp_path, monkeypatch):
    """start_container writes the copy from the CURRENT config.pbtxt (a stale one from
    an earlier export is replaced), then runs the argv with the flag."""
    log = tmp_path / "calls.log"
    monkeypatch.setenv("PATH", f"{fake_docker.install(tmp_path / 'bin', log)}:/usr/bin:/bin")
    repo = _serving_repository(tmp_path)
    stale = repo / "dinov2" / "configs" / f"{box.config_name(load_pin())}.pbtxt"
    stale.parent.mkdir()
    stale.write_text("# from an earlier export\n")
    launch = box.plan_container(repo, api_key="k" * 43)
    proc = box.start_container(launch, tmp_path / "server.log")
    assert proc.wait(timeout=60) == 0
    assert stale.read_text() == launch.ensemble_copies[0].text
    (run,) = fake_docker.subcommand(log, "run")
    assert run == launch.run_argv[1:] and f"--model-config-name={box.config_name(load_pin())}" in run


def test_kubernetes_manifests_carry_the_same_backpressure(tmp_path):
    """`serve kubernetes`: the Deployment and the InferenceService get the flag,
    the copy is written into the repository the pods read."""
    import json

    import yaml

    from dinov2_triton.serve import kubernetes as k8s

    pin = load_pin()
    repo = _serving_repository(tmp_path)
    info = k8s.write_kubernetes(repo, image="registry.example/dinov2-triton-serve", out=tmp_path / "k8s")
    name = box.config_name(pin)
    copy = repo / "dinov2" / "configs" / f"{name}.pbtxt"
    assert info["ensemble_max_inflight"] == {"dinov2": _expected_limit(repo)} and str(copy) in info["files"]
    assert box.plan_container(repo, api_key="k" * 43).ensemble_copies[0].text == copy.read_text()
    for kustomization in (tmp_path / "k8s" / "kustomization.yaml", tmp_path / "k8s" / "kserve" / "kustomization.yaml"):
        doc = yaml.safe_load(kustomization.read_text())
        ops = [op for patch in doc["patches"] for op in json.loads(patch["patch"]) if op["op"] == "add"]
        assert {"op": "add", "path": ops[0]["path"], "value": f"--model-config-name={name}"} in ops, kustomization
        assert f"max_inflight_requests {_expected_limit(repo)}" in kustomization.read_text()
    none = k8s.write_kubernetes(repo, image="registry.example/dinov2-triton-serve", out=tmp_path / "k8s-off",
                                max_inflight=0)
    assert none["ensemble_max_inflight"] == {}
    assert "--model-config-name" not in (tmp_path / "k8s-off" / "kustomization.yaml").read_text()


@pytest.mark.triton
def test_the_local_server_ignores_the_containers_copy(tmp_path, triton_server_factory, tiny_classifier):
    """The real local Triton 2.51 serves a repository that holds the container's
    copy (configs/<name>.pbtxt with max_inflight_requests): it reads config.pbtxt,
    loads the ensemble and answers through it."""
    import numpy as np
    from tritonclient.grpc import model_config_pb2 as pb

    from dinov2_triton.serve.model_plan import read_model_config
    from tests.fixtures.triton import TINY_CLASSES, TINY_EMBED, TINY_IMAGE, make_tiny_repository, tiny_reference

    repo = make_tiny_repository(tmp_path / "repo", tiny_classifier, broken=False, tensorrt=False)
    onnx = read_model_config(repo / "tiny_onnx" / "config.pbtxt")
    ens = pb.ModelConfig(name="tiny_ensemble", platform="ensemble", max_batch_size=onnx.max_batch_size)
    ens.input.add(name="pixel_values", data_type=pb.TYPE_FP32, dims=list(TINY_IMAGE))
    ens.output.add(name="logits", data_type=pb.TYPE_FP32, dims=[TINY_CLASSES])
    ens.output.add(name="embedding", data_type=pb.TYPE_FP32, dims=[TINY_EMBED])
    step = ens.ensemble_scheduling.step.add(model_name="tiny_onnx", model_version=-1)
    step.input_map["pixel_values"] = "pixel_values"
    step.output_map.update({"logits": "logits", "embedding": "embedding"})
    (repo / "tiny_ensemble" / "1").mkdir(parents=True)
    (repo / "tiny_ensemble" / "config.pbtxt").write_text(str(ens))
    (copy,) = box.ensemble_backpressure(repo, pin=load_pin())
    assert copy.max_inflight_requests == (2 * onnx.max_batch_size * sum(g.count for g in onnx.instance_group)
                                          + onnx.dynamic_batching.default_queue_policy.max_queue_size)
    assert box.write_ensemble_copies([copy]) == [copy.path] and "max_inflight_requests" in copy.path.read_text()

    server = triton_server_factory(repo, load_models=["tiny_onnx", "tiny_ensemble"])
    batch = np.random.default_rng(0).standard_normal((2, *TINY_IMAGE)).astype(np.float32)
    with server.connect("grpc") as conn:
        assert conn.model_ready("tiny_ensemble")
        result = conn.infer("tiny_ensemble", [conn.tensor_input("pixel_values", batch)],
                            [conn.requested_output("logits")])
    np.testing.assert_allclose(result.as_numpy("logits"), tiny_reference(tiny_classifier, batch)[0], atol=1e-5)


def _trt_argv(tmp_path, mode, args):
    return trt_box.docker_argv(args, mode=mode, pin=load_pin(), workdir=tmp_path, cache=tmp_path / "cache",
                               package_dir=PACKAGE, lock_file=gs.LOCK_FILE if mode == "export" else None,
                               user="1000:1000", environ={"PIP_INDEX_URL": "https://mirror/simple", "HOME": "/x"})


def test_build_engines_keeps_the_cache_and_installs_the_lock(tmp_path):
    pin = load_pin()
    cache = (tmp_path / "cache").resolve()
    run = _trt_argv(tmp_path, "export", ["--variants", "trt_fp16,trt_int8", "--model-path", "m.pth"])
    image = run.index(pin.tensorrt_image)
    docker, inner = run[:image], run[image + 1:]
    assert docker[:3] == ["docker", "run", "--rm"] and docker[docker.index("--gpus") + 1] == "all"
    assert f"{cache}:{cache}" in docker, "the cache (timing caches, packages) must outlive `docker run --rm`"
    assert f"DINOV2_TRITON_CACHE={cache}" in docker and docker[docker.index("--user") + 1] == "1000:1000"
    assert f"{tmp_path.resolve()}:{tmp_path.resolve()}" in docker and docker[docker.index("-w") + 1] == str(
        tmp_path.resolve())
    assert f"{PACKAGE}:{trt_box.PACKAGE_MOUNT}/dinov2_triton:ro" in docker
    assert f"PYTHONPATH={trt_box.PACKAGE_MOUNT}" in docker
    assert docker[docker.index("PIP_INDEX_URL") - 1] == "-e" and "HOME" not in docker, "pip's own settings pass"
    assert f"{gs.LOCK_FILE}:{gs.LOCK_FILE}:ro" in docker
    assert inner[:3] == ["python3", "-m", "dinov2_triton.export.container"]
    assert inner[inner.index("--python") + 1] == pin.python and inner[inner.index("--mode") + 1] == "export"
    assert inner[inner.index("--lock-file") + 1] == str(gs.LOCK_FILE)
    assert inner[inner.index("--") + 1:] == ["--variants", "trt_fp16,trt_int8", "--model-path", "m.pth"]
    plans = _trt_argv(tmp_path, "plans", ["--onnx", "x.onnx"])
    assert plans[plans.index("--mode") + 1] == "plans" and "--lock-file" not in plans
    assert plans[-3:] == ["--", "--onnx", "x.onnx"]
    # what is installed in the container: the lock without TensorRT (the container's own) and NVIDIA's index
    lock = gs.LOCK_FILE.read_text()
    req = trt_box.requirements_without_tensorrt(lock)
    assert "--extra-index-url" in lock and "--extra-index-url" not in req
    assert re.search(r"^tensorrt", lock, re.M | re.I) and not re.search(r"^tensorrt", req, re.M | re.I)
    kept = [ln for ln in lock.splitlines() if ln and not ln.startswith("#") and not ln.startswith("-")
            and not ln.lower().startswith("tensorrt")]
    assert kept and all(ln in req.splitlines() for ln in kept)


def test_export_in_container_runs_the_same_command_in_the_tensorrt_container(tmp_path, monkeypatch, capsys):
    """`dinov2-triton export --in-container ...` with stand-in docker and nvidia-smi:
    one `docker run` of the pinned TensorRT image with the same arguments, minus
    the container flags; a path outside the current folder is refused first."""
    from dinov2_triton.export.cli import main as export_main

    log = tmp_path / "calls.log"
    bin_dir = fake_docker.install(tmp_path / "bin", log)
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("DINOV2_TRITON_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work"
    (work / "models").mkdir(parents=True)
    (work / "models" / "m.pth").write_bytes(b"x")
    monkeypatch.chdir(work)
    lock = os.path.relpath(gs.LOCK_FILE, work)
    code = export_main(["--in-container", "--lock-file", lock, "--variants", "trt_fp16", "--model-path",
                        "models/m.pth"])
    assert code == 0, capsys.readouterr().err
    runs = fake_docker.subcommand(log, "run")
    assert len(runs) == 1 and load_pin().tensorrt_image in runs[0]
    assert runs[0][runs[0].index("--") + 1:] == ["--variants", "trt_fp16", "--model-path", "models/m.pth"]
    assert (tmp_path / "cache").is_dir()
    outside = tmp_path / "elsewhere.pth"
    outside.write_bytes(b"x")
    assert export_main(["--in-container", "--model-path", str(outside), "--lock-file", lock]) == 2
    assert f"{outside} is outside the current folder" in capsys.readouterr().err
    assert export_main(["--in-container", "--model-path", "models/m.pth", "--lock-file", "no-lock.txt"]) == 2
    assert "--lock-file no-lock.txt: not found" in capsys.readouterr().err
    assert len(fake_docker.subcommand(log, "run")) == 1


def test_container_boot_refuses_another_python_and_reuses_an_installed_lock(tmp_path):
    """The in-container entry, run here with this interpreter: a Python other
    than the pin's stops before installing anything; a lock installed once is
    reused without pip (no network here: pip would fail)."""
    def boot(*args):
        return subprocess.run([sys.executable, "-m", "dinov2_triton.export.container", "--boot", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    cache = tmp_path / "cache"
    proc = boot("--mode", "plans", "--python", "2.7", "--cache", str(cache), "--", "--help")
    assert proc.returncode == 2 and f"has Python {here}; the lock is for Python 2.7" in proc.stderr
    assert "usage:" not in proc.stdout
    proc = boot("--mode", "plans", "--python", here, "--cache", str(cache), "--", "--help")
    assert proc.returncode == 0 and "--onnx" in proc.stdout, proc.stderr
    lock = tmp_path / "lock.txt"
    lock.write_text("# python: 3.12\n--extra-index-url https://pypi.nvidia.com\nno-such-package==1.0\n")
    deps = cache / f"pydeps-py{here}-{trt_box.lock_id(lock.read_text())}"
    (deps / ".complete").parent.mkdir(parents=True)
    (deps / ".complete").touch()
    proc = boot("--mode", "export", "--python", here, "--cache", str(cache), "--lock-file", str(lock), "--",
                "--help")
    assert proc.returncode == 0 and "--model-path" in proc.stdout, proc.stderr
    assert "installing" not in proc.stderr


# --------------------------------------------------------------------------- the package index (-m network)
@pytest.mark.network
def test_lock_resolves_for_the_containers_python_from_wheels():
    pin, lock = load_pin(), gs.read_lock()
    reqs = [f"{p.name}{'[' + p.extras + ']' if p.extras else ''}=={p.version}" for p in lock.packages.values()]
    res = gs.resolve(reqs, python=lock.python, platform=lock.platform, tensorrt=(str(pin.cuda_major), pin.tensorrt))
    assert gs.check_resolution(pin, lock, res) == []
    assert res.tensorrt_bindings["url"].endswith(f"-cp{pin.python.replace('.', '')}-none-manylinux_2_28_x86_64.whl")


@pytest.mark.network
def test_resolution_sees_the_cuda_major_and_python_of_the_old_stack():
    # onnxruntime-gpu 1.22 (the old pin) declares CUDA 12 libraries; torch 2.14.1 declares CUDA 13.
    res = gs.resolve(["onnxruntime-gpu[cuda,cudnn]==1.22.0"], python="3.12", platform="manylinux_2_39_x86_64")
    ort = res.packages["onnxruntime-gpu"]
    assert gs.declared_cuda_majors(ort["requires_dist"], ("cuda", "cudnn")) == {12}
    # pillow 13 has no wheel for Python 3.10 (the 24.10 containers' Python)
    with pytest.raises(gs.LockError, match="pillow"):
        gs.resolve(["pillow==13.0.0"], python="3.10", platform="manylinux_2_39_x86_64")


# --------------------------------------------------------------------------- both releases' model config
def _generated_configs() -> dict[str, str]:
    """The config.pbtxt of every model the export can publish, TensorRT
    stamping and instance GPUs included (export/pipeline.py does the same)."""
    from dinov2_triton.export.registry import get_variant, load_builtin_variants
    from dinov2_triton.export.triton_config import (
        classifier_config,
        ensemble_config,
        preprocess_config,
        validate_config,
    )

    texts = {}
    for name in load_builtin_variants():
        variant = get_variant(name)
        trt = variant.platform == "tensorrt_plan"
        params = {"source_checkpoint_sha256": "0" * 64, "export_run_id": "test", "image_size": 56}
        if trt:
            pin = load_pin()
            params |= {"tensorrt_version": pin.tensorrt, "gpu_name": "NVIDIA H100 80GB HBM3",
                       "compute_capability": "9.0", "version_compatible": "true",
                       "triton_container_tag": pin.container_tag}
        cfg = classifier_config(variant, image_size=56, num_classes=10, embed_dim=384, max_batch_size=8,
                                device="gpu" if trt else "cpu", parameters=params)
        if trt:
            for group in cfg.instance_group:
                group.gpus.extend([0, 1])
        texts[variant.model_name] = validate_config(cfg)
    texts["dinov2_preprocess"] = validate_config(preprocess_config(image_size=56, max_batch_size=8))
    texts["dinov2"] = validate_config(ensemble_config("dinov2_onnx", num_classes=10, embed_dim=384, image_size=56,
                                                      max_batch_size=8))
    return texts


def test_every_generated_config_parses_with_both_releases_model_config():
    from google.protobuf import text_format

    pin = load_pin()
    texts = _generated_configs()
    assert any("tensorrt_plan" in t and "gpus: 0" in t for t in texts.values())
    for release in (pin.local_triton_server, pin.triton_server):
        cls = gs.model_config_class(release)
        for model, text in texts.items():
            msg = text_format.Parse(text, cls())     # unknown fields or enum values raise ParseError
            assert msg.name == model, (release, model)


# --------------------------------------------------------------------------- dinov2_triton.qa.gpu_check decisions
class _FakeCuda:
    """torch.cuda of a compute capability 7.5 GPU: BF16 only by emulation."""

    @staticmethod
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return including_emulation


def _fake_torch():
    import types

    return types.SimpleNamespace(cuda=_FakeCuda, bfloat16="torch.bfloat16", float16="torch.float16")


def test_amp_dtype_ignores_emulated_bf16():
    from dinov2_triton.qa.gpu_check import choose_amp_dtype, native_bf16

    torch = _fake_torch()
    assert torch.cuda.is_bf16_supported() is True        # what the old check asked
    assert not native_bf16(torch) and choose_amp_dtype(torch) == "torch.float16"


def test_xformers_that_cannot_run_the_dtype_falls_back_to_sdpa(monkeypatch):
    import types

    from dinov2_triton.qa.gpu_check import choose_attention

    torch = _fake_torch()
    monkeypatch.setitem(sys.modules, "xformers", None)
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert choose_attention(torch, torch.bfloat16) == ("sdpa", "xformers not installed")
    fake = types.ModuleType("xformers.ops")
    monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
    monkeypatch.setitem(sys.modules, "xformers.ops", fake)
    sys.modules["xformers"].ops = fake

    def a100_only(dtype):
        raise NotImplementedError("bf16 is only supported on A100+ GPUs")
    attention, why = choose_attention(torch, torch.bfloat16, probe=a100_only)
    assert attention == "sdpa" and "A100+" in why and "SDPA instead" in why
    assert choose_attention(torch, torch.float16, probe=lambda dtype: None)[0] == "xformers"


def test_a_failing_row_does_not_stop_the_check():
    from dinov2_triton.qa.gpu_check import SkipRow, _row, format_table

    rows = []

    def xformers_bf16():
        raise NotImplementedError("bf16 is only supported on A100+")     # a RuntimeError subclass

    def emulated():
        raise SkipRow("BF16 is emulated on compute capability 7.5: not measured")
    _row(rows, "fine-tune step (AMP)", xformers_bf16)
    _row(rows, "inference eager BF16 (autocast)", emulated)
    _row(rows, "inference eager FP32", lambda: {"latency_ms_p50": 1.5, "images_per_s": 900.0,
                                                "top1_agreement": 1.0, "cosine": 1.0})
    assert [r["status"] for r in rows] == ["FAILED", "SKIPPED", "OK"]
    assert rows[0]["note"] == "NotImplementedError: bf16 is only supported on A100+"
    table = format_table({"gpu": "Tesla T4", "compute_capability": "7.5", "torch": "2.14.1", "cuda": "13.0",
                          "arch": "vits14", "img_size": 224, "batch": 32, "amp_dtype": "float16",
                          "native_bf16": False, "rows": rows})
    assert "| inference eager BF16 (autocast) | SKIPPED | - |" in table and "| 100.00% |" in table


def test_gpu_check_without_a_gpu_says_so(capsys):
    from dinov2_triton.qa.gpu_check import main

    assert main([]) == 2
    assert "no CUDA GPU visible to PyTorch" in capsys.readouterr().err


# --------------------------------------------------------------------------- gpu acceptance here
def test_gpu_acceptance_script_is_setup_and_one_call():
    text = (ROOT / "scripts" / "gpu_acceptance.sh").read_text()
    assert len(text.splitlines()) < 20
    calls = re.findall(r"^\s*exec (.+)$", text, re.M)
    assert calls and all(c.endswith('qa gpu-acceptance "$@"') for c in calls)
    assert not (ROOT / "scripts" / "serve.sh").exists() and not (ROOT / "scripts" / "build_engines.sh").exists()


def test_gpu_acceptance_on_a_host_without_gpu_skips_every_step_with_a_reason(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}        # no nvidia-smi, no docker
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_acceptance.sh"), "--out", str(tmp_path)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr          # 2: no GPU
    table = (tmp_path / "acceptance.md").read_text()
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and not ln.startswith("| step")]
    assert len(rows) == 7
    for row in rows:
        status, result = row.split(" | ")[1], row.split(" | ")[3]
        assert status in ("OK", "SKIPPED") and result.strip(" |"), row
    assert "no docker" in table and "TensorRT not importable" in table and "no GPU" in table
    assert table in proc.stdout
    assert f"pin: Triton {load_pin().container_tag}" in proc.stderr


def test_gpu_acceptance_writes_under_the_current_folder_by_default(tmp_path):
    """No checkout lookup: run from any folder, the report lands in ./reports/."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "dinov2_triton.cli", "qa", "gpu-acceptance", "--time-limit", "240"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    (out,) = (tmp_path / "reports").glob("gpu-acceptance-*")
    assert (out / "acceptance.md").is_file() and (out / "acceptance.json").is_file()


def test_gpu_acceptance_reads_every_unverified_figure_from_the_containers():
    """Each UNVERIFIED key of the pin has a container check (the pinned image and
    how to read the answer); the backend folders' library names give the
    ONNX Runtime and OpenVINO versions."""
    from dinov2_triton.qa.gpu_acceptance import container_checks

    pin = load_pin()
    checks = container_checks(pin)
    assert set(checks) == set(pin.unverified)
    values = read_pin()
    for key, (want, cmd, _) in checks.items():
        assert want == values[key] and cmd[0] in (pin.triton_image, pin.tensorrt_image), key
    answers = {  # what the container prints -> the figure read from it
        "TRITON_ONNXRUNTIME_VERSION": ("libonnxruntime.so\nlibonnxruntime.so.1.27.0\nlibtriton_onnxruntime.so\n",
                                       "1.27.0"),
        "TRITON_OPENVINO_VERSION": ("libopenvino.so.2026.2.0\nlibopenvino.so.2620\nlibtriton_openvino.so\n",
                                    "2026.2.0"),
        "TRITON_TENSORRT_VERSION": ("a warning\n11.3.0.99\n", "11.3.0.99"),
        "TRITON_PYTHON_VERSION": ("3.12\n", "3.12"),
    }
    for key, (out, figure) in answers.items():
        if key in checks:
            assert checks[key][2](out) == figure, key
    if "TRITON_ONNXRUNTIME_VERSION" in checks:
        assert checks["TRITON_ONNXRUNTIME_VERSION"][2]("libtriton_onnxruntime.so\n") is None


def test_gpu_acceptance_builds_tensorrt_11_plans_from_the_typed_graphs(tmp_path):
    """On a GPU host with the lock's TensorRT 11 the plan steps go on to the
    build (strongly typed): trt_fp16 from the repository's dinov2_onnx_fp16,
    trt_int8 from dinov2_onnx_int8; without them the step is SKIPPED saying
    which export makes them."""
    import types

    from dinov2_triton.qa.gpu_acceptance import TRT_MODELS, Acceptance, step_trt_plan

    assert TRT_MODELS == {"trt_fp16": ("dinov2_onnx_fp16", "fp16"), "trt_int8": ("dinov2_onnx_int8", "int8")}
    acc = Acceptance(tmp_path)
    acc.facts.update(tensorrt="11.3.0.99", gpu={"gpu_name": "stand-in", "cc": (9, 0)})
    args = types.SimpleNamespace(repository=tmp_path / "model_repository", max_batch=8, parity_inputs=8)
    acc.step("trt_fp16 plan + parity", lambda: step_trt_plan(acc, args, "trt_fp16", load_pin()))
    (row,) = acc.rows
    assert row["status"] == "SKIPPED" and "no CPU-built dinov2_onnx_fp16" in row["result"], row
    assert "--variants onnx,onnx_fp16,onnx_int8" in row["result"]
