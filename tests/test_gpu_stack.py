"""The GPU stack agrees with itself: the release pin (scripts/triton_version.sh),
requirements/lock-gpu.txt, the `gpu` extra, environment.yml, serve/Dockerfile
and the scripts that start the NVIDIA containers.

No network: the pin parses and marks what it could not confirm, the lock has
one CUDA major, the containers' Python and the pinned TensorRT, and the
scripts read the pin instead of repeating it (the scripts run here with a
fake `docker` and `nvidia-smi` that record their arguments).
PyPI (marked slow): pip resolves the lock for the containers' Python and
platform from wheels alone, and every generated config.pbtxt parses with the
model-config protobuf of the local server's release and of the pinned
container's release (their tritonclient wheels)."""
from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dinov2_triton.core.release_pin import PIN_FILE, PinError, load_pin, read_pin
from tests.fixtures import gpu_stack as gs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("scripts/serve.sh", "scripts/build_engines.sh", "scripts/gpu_acceptance.sh")


# --------------------------------------------------------------------------- the pin
def test_pin_parses_and_marks_every_unconfirmed_figure():
    pin = load_pin()
    assert pin.triton_image == f"nvcr.io/nvidia/tritonserver:{pin.container_tag}-py3"
    assert pin.tensorrt_image == f"nvcr.io/nvidia/tensorrt:{pin.container_tag}-py3"
    assert len(pin.tensorrt.split(".")) == 4 and pin.tensorrt_major == 10
    assert pin.local_triton_server == "2.51.0"     # the binary in nvidia-pytriton 0.7.0
    text = PIN_FILE.read_text()
    assert pin.unverified, "figures not read from NVIDIA's text are listed in UNVERIFIED_KEYS"
    for key in pin.unverified:
        # the comment block right above the key says UNVERIFIED and gives the command that confirms it
        block = text[:text.index(f"\n{key}=")].rsplit("\n\n", 1)[-1]
        assert "UNVERIFIED" in block and "docker run" in block, key
    for key in ("TRITON_CUDA_VERSION", "TRITON_ONNXRUNTIME_VERSION"):
        block = text[:text.index(f"\n{key}=")].rsplit("\n\n", 1)[-1]
        assert "Verified" in block and "docs.nvidia.com" in block, key


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
    text = PIN_FILE.read_text().replace("TRITON_TENSORRT_VERSION=10.13.3.9", "TRITON_TENSORRT_VERSION=10.13.3")
    (tmp_path / "pin.sh").write_text(text)
    with pytest.raises(PinError, match="full 4-part version"):
        load_pin(tmp_path / "pin.sh")


def test_shell_and_python_read_the_same_values():
    out = subprocess.run(["bash", "-c", "source scripts/triton_version.sh && set -o posix && set"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    shell = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    for key, value in read_pin().items():
        assert shell[key].strip("'") == value, key


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
    lock = _mutated(tmp_path, "tensorrt-cu13==10.13.3.9", "tensorrt-cu13==10.13.2.6")
    assert any("container has TensorRT 10.13.3.9" in p for p in gs.check_lock(load_pin(), lock))


def test_tritonclient_and_gpu_extra_must_match(tmp_path):
    lock = _mutated(tmp_path, "tritonclient[grpc,http]==2.62.0", "tritonclient[grpc,http]==2.50.0")
    problems = gs.check_lock(load_pin(), lock)
    assert any("tritonclient==2.50.0 but the container is Triton 2.62.0" in p for p in problems)
    assert any("gpu extra tritonclient==2.62.0" in p for p in problems)
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
    docker = (ROOT / "serve" / "Dockerfile").read_text()
    assert "${PILLOW_REQUIREMENT}" in docker and not re.search(r"pillow\s*[=<>]", docker, re.I)


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_source_the_pin_instead_of_repeating_it(script):
    pin = load_pin()
    text = (ROOT / script).read_text()
    assert "source scripts/triton_version.sh" in text
    code = "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    for literal in (pin.container_tag, pin.tensorrt, pin.triton_server, "nvcr.io/", "torch=="):
        assert literal not in code, f"{script} repeats {literal!r}: read it from the pin or the lock"


# --------------------------------------------------------------------------- the scripts, with a fake docker
def _fake_bin(tmp_path) -> Path:
    """docker and nvidia-smi that succeed and append their argv to $FAKE_LOG
    (NUL-separated words, a \\036 word ends each call)."""
    bin_dir = tmp_path / "bin"
    if bin_dir.is_dir():
        return bin_dir
    bin_dir.mkdir()
    for name in ("docker", "nvidia-smi"):
        f = bin_dir / name
        f.write_text('#!/bin/bash\n{ printf "%s\\0" "$(basename "$0")" "$@"; printf "\\036\\0"; } >>"$FAKE_LOG"\n')
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    for tool in ("bash", "env", "dirname", "basename", "cat", "grep", "od", "tr", "mkdir", "sha256sum", "cut",
                 "awk", "id", "pwd", "printf", "sed", "head"):
        path = shutil.which(tool)
        if path and not (bin_dir / tool).exists():
            (bin_dir / tool).symlink_to(path)
    return bin_dir


def _calls(log: Path, program: str) -> list[list[str]]:
    out, words = [], []
    for word in log.read_text().split("\0")[:-1]:
        if word == "\036":            # end of one call
            if words and words[0] == program:
                out.append(words[1:])
            words = []
        else:
            words.append(word)
    return out


def _checkout(tmp_path) -> Path:
    """A copy of what the scripts read (serve.sh writes logs/ under its checkout)."""
    root = tmp_path / "checkout"
    if not root.is_dir():
        for folder in ("scripts", "serve", "requirements"):
            shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _run(script: str, args, tmp_path, **env):
    bin_dir = _fake_bin(tmp_path)
    log = tmp_path / "calls.log"
    log.write_text("")
    root = _checkout(tmp_path)
    full_env = {"PATH": str(bin_dir), "HOME": str(tmp_path), "FAKE_LOG": str(log), **env}
    proc = subprocess.run([str(root / script), *args], cwd=root, env=full_env, capture_output=True, text=True,
                          timeout=60)
    return proc, log


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
    proc, log = _run("scripts/serve.sh", ["container", "--repository", str(repo)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    builds = [c for c in _calls(log, "docker") if c[:1] == ["build"]]
    runs = [c for c in _calls(log, "docker") if c[:1] == ["run"]]
    assert len(builds) == 1 and len(runs) == 1
    assert f"TRITON_IMAGE={pin.triton_image}" in builds[0]
    assert "PILLOW_REQUIREMENT=pillow==13.0.0" in builds[0]          # the lock's Pillow
    flag = "--backend-config=tensorrt,version-compatible=true"
    assert (flag in runs[0]) is bool(version_compatible)
    if version_compatible:
        assert "version-compatible TensorRT plans (dinov2_trt_fp16)" in proc.stdout


def test_build_engines_keeps_the_cache_and_installs_the_lock(tmp_path):
    pin = load_pin()
    cache = tmp_path / "cache"
    proc, log = _run("scripts/build_engines.sh", ["--", "--model_path", "m.pth"], tmp_path,
                     DINOV2_TRITON_CACHE=str(cache))
    assert proc.returncode == 0, proc.stderr
    run = [c for c in _calls(log, "docker") if c[:1] == ["run"]][0]
    assert pin.tensorrt_image in run and "--gpus" in run
    assert f"{cache}:{cache}" in run, "the cache (timing caches, packages) must outlive `docker run --rm`"
    assert f"DINOV2_TRITON_CACHE={cache}" in run and f"PIN_PYTHON={pin.python}" in run and "MODE=export" in run
    inner = run[run.index("-c") + 1]
    assert "requirements/lock-gpu.txt" in inner and '--target "$deps.partial"' in inner
    assert 'grep -vE "^(tensorrt|--extra-index-url)"' in inner       # the container's TensorRT is used
    assert run[run.index("build_engines.sh") + 1:] == ["-m", "export", "--variants", "trt_fp16,trt_int8",
                                                        "--model_path", "m.pth"]
    proc, log = _run("scripts/build_engines.sh", ["--plans-only", "--", "--onnx", "x.onnx"], tmp_path,
                     DINOV2_TRITON_CACHE=str(cache))
    run = [c for c in _calls(log, "docker") if c[:1] == ["run"]][0]
    assert "MODE=plans" in run and run[-3:] == ["dinov2_triton.export.trt_build_main", "--onnx", "x.onnx"]


def test_container_inner_script_refuses_another_python(tmp_path):
    """The in-container part, run here with python3 = this interpreter: a
    Python other than the pin's stops before installing anything."""
    proc, log = _run("scripts/build_engines.sh", ["--plans-only", "--", "--help"], tmp_path,
                     DINOV2_TRITON_CACHE=str(tmp_path / "cache"))
    run = [c for c in _calls(log, "docker") if c[:1] == ["run"]][0]
    inner = run[run.index("-c") + 1]
    py_dir = tmp_path / "py"
    py_dir.mkdir()
    (py_dir / "python3").symlink_to(sys.executable)
    env = {"PATH": f"{py_dir}{os.pathsep}{os.environ['PATH']}", "PIN_PYTHON": "2.7", "MODE": "plans",
           "IMAGE": "test-image", "DINOV2_TRITON_CACHE": str(tmp_path / "cache"), "LOCK_ID": "x",
           "PIP_EXTRA_ARGS": ""}
    proc = subprocess.run(["bash", "-c", inner, "build_engines.sh", "-c", "print('ran')"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is for Python 2.7" in proc.stderr and "ran" not in proc.stdout
    env["PIN_PYTHON"] = f"{sys.version_info[0]}.{sys.version_info[1]}"
    proc = subprocess.run(["bash", "-c", inner, "build_engines.sh", "-c", "print('ran')"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ran", proc.stderr


# --------------------------------------------------------------------------- PyPI
@pytest.mark.slow
def test_lock_resolves_for_the_containers_python_from_wheels():
    pin, lock = load_pin(), gs.read_lock()
    reqs = [f"{p.name}{'[' + p.extras + ']' if p.extras else ''}=={p.version}" for p in lock.packages.values()]
    res = gs.resolve(reqs, python=lock.python, platform=lock.platform, tensorrt=(str(pin.cuda_major), pin.tensorrt))
    assert gs.check_resolution(pin, lock, res) == []
    assert res.tensorrt_bindings["url"].endswith(f"-cp{pin.python.replace('.', '')}-none-manylinux_2_28_x86_64.whl")


@pytest.mark.slow
def test_resolution_sees_the_cuda_major_and_python_of_the_old_stack():
    # onnxruntime-gpu 1.22 (the old pin) declares CUDA 12 libraries; torch 2.14.1 declares CUDA 13.
    res = gs.resolve(["onnxruntime-gpu[cuda,cudnn]==1.22.0"], python="3.12", platform="manylinux_2_39_x86_64")
    ort = res.packages["onnxruntime-gpu"]
    assert gs.declared_cuda_majors(ort["requires_dist"], ("cuda", "cudnn")) == {12}
    # pillow 13 has no wheel for Python 3.10 (the 24.10 containers' Python)
    with pytest.raises(gs.LockError, match="pillow"):
        gs.resolve(["pillow==13.0.0"], python="3.10", platform="manylinux_2_39_x86_64")


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
            params |= {"tensorrt_version": "10.13.3.9", "gpu_name": "NVIDIA H100 80GB HBM3",
                       "compute_capability": "9.0", "version_compatible": "true", "triton_container_tag": "25.10"}
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


@pytest.mark.slow
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


# --------------------------------------------------------------------------- scripts/gpu_acceptance.sh here
def test_gpu_acceptance_on_a_host_without_gpu_skips_every_step_with_a_reason(tmp_path):
    env = {**os.environ, "PATH": "/usr/bin:/bin"}        # no nvidia-smi, no docker
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_acceptance.sh"), "--out", str(tmp_path)], cwd=ROOT,
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
