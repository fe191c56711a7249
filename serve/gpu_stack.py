"""The GPU environment: one CUDA major, the containers' Python, the pinned TensorRT.

requirements/lock-gpu.txt is the exact Python environment for GPU hosts and
for the NVIDIA TensorRT container (scripts/build_engines.sh installs it
there; environment.yml includes it). It must agree with the release pin
(scripts/triton_version.sh, serve.release_pin) and with the `gpu` extra of
pyproject.toml:

- `check_lock(...)` (no network; CI runs it through tests/test_gpu_stack.py):
  the lock's Python is the containers' Python and every package's
  Requires-Python (recorded in the lock) admits it; every CUDA-major-bearing
  package (nvidia-*-cuNN, nvidia-cuda-runtime, cuda-toolkit, cuda-bindings,
  tensorrt-cuNN) has the container's CUDA major; the TensorRT wheel is the
  container's full TensorRT version; tritonclient is the container's release;
  the `gpu` extra pins exactly what the lock pins.
- `resolve_lock(...)` (PyPI only): pip resolves the lock for the containers'
  Python and platform from wheels alone (`pip install --dry-run
  --python-version ... --platform manylinux_... --only-binary=:all:`), and
  `check_resolution(...)` compares the result with the lock (nothing missing,
  nothing extra, the recorded Requires-Python true) and reads the CUDA major
  that torch and onnxruntime-gpu declare in their own metadata.
- `python -m serve.gpu_stack lock` regenerates the lock from pyproject.toml
  (dependencies + gpu + dev extras); `check` and `resolve` run the checks.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from serve.release_pin import PIN_FILE, ReleasePin, load_pin

ROOT = Path(__file__).resolve().parents[1]
LOCK_FILE = ROOT / "requirements" / "lock-gpu.txt"
PYPROJECT = ROOT / "pyproject.toml"
# The TensorRT wheels (tensorrt-cuNN-libs) are on NVIDIA's index only; PyPI
# has the installer sdist and the -bindings wheels.
NVIDIA_INDEX = "https://pypi.nvidia.com"
# Pure-Python packages published only as sdists (pip cannot resolve them with
# --only-binary=:all:); their Requires-Python is read from the sdist's PKG-INFO.
SDIST_ONLY = ("cppimport",)
OLDEST_GLIBC, NEWEST_GLIBC = 17, 39   # manylinux tags a Ubuntu 24.04 container (glibc 2.39) accepts
_PIN_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;#]+)\s*(?:#\s*(.*))?$")
_CU_SUFFIX = re.compile(r"-cu(\d+)(?:-|$)")


class LockError(ValueError):
    """A malformed lock file; str() names the file and line."""


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class LockedPackage:
    name: str
    version: str
    extras: str = ""
    requires_python: str | None = None   # None: not recorded; "": the package declares none ("any")
    source: str = "pypi"          # "pypi" (wheel), "sdist" or "nvidia" (NVIDIA's index)


@dataclass
class Lock:
    path: str
    python: str
    platform: str
    options: list[str] = field(default_factory=list)
    packages: dict[str, LockedPackage] = field(default_factory=dict)   # normalized name ->

    def get(self, name: str) -> LockedPackage | None:
        return self.packages.get(normalize(name))


def read_lock(path: str | Path = LOCK_FILE) -> Lock:
    """Parse lock-gpu.txt: `# python: X.Y` and `# platform: ...` header
    lines, pip option lines, and `name[extras]==version  # requires-python: SPEC; source: S`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise LockError(f"{path}: cannot read ({exc.strerror or exc})") from None
    header, options, packages = {}, [], {}
    for n, raw in enumerate(lines, 1):
        line = raw.strip()
        m = re.match(r"^#\s*(python|platform):\s*(\S+)\s*$", line)
        if m:
            header[m.group(1)] = m.group(2)
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            options.append(line)
            continue
        m = _PIN_LINE.match(line)
        if not m:
            raise LockError(f"{path}:{n}: not an exact pin (name==version): {line[:80]!r}")
        meta = dict(kv.split(":", 1) for kv in (m.group(4) or "").split(";") if ":" in kv)
        meta = {k.strip(): v.strip() for k, v in meta.items()}
        rp = meta.get("requires-python")
        pkg = LockedPackage(m.group(1), m.group(3), (m.group(2) or "").strip("[]"),
                            None if rp is None else ("" if rp == "any" else rp),
                            (meta.get("source") or "pypi").split()[0])
        if normalize(pkg.name) in packages:
            raise LockError(f"{path}:{n}: {pkg.name} pinned twice")
        packages[normalize(pkg.name)] = pkg
    for key in ("python", "platform"):
        if key not in header:
            raise LockError(f"{path}: header line '# {key}: ...' missing")
    return Lock(str(path), header["python"], header["platform"], options, packages)


def cuda_major_of(name: str, version: str) -> int | None:
    """The CUDA major a package is built for, from its name or version;
    None for packages without one."""
    n = normalize(name)
    m = _CU_SUFFIX.search(n)
    if m:
        return int(m.group(1))
    if n in ("nvidia-cuda-runtime", "nvidia-cuda-nvrtc", "cuda-toolkit", "cuda-bindings", "cuda-python"):
        head = version.split(".")[0]
        return int(head) if head.isdigit() else None
    return None


def _specifier(spec: str):
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(spec)


def admits(spec: str | None, python: str) -> bool:
    """Does Requires-Python `spec` admit Python `python` (X.Y, checked as X.Y.0 and X.Y.99)?"""
    if not spec:
        return True
    s = _specifier(spec)
    return any(s.contains(f"{python}.{patch}", prereleases=True) for patch in (0, 99))


def pyproject_requirements(path: str | Path = PYPROJECT, extras: Sequence[str] = ("gpu", "dev"),
                           base: bool = True) -> list[str]:
    import tomllib

    project = tomllib.loads(Path(path).read_text())["project"]
    reqs = list(project.get("dependencies", [])) if base else []
    for extra in extras:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    return reqs


def _req_pin(req: str) -> tuple[str, str | None]:
    m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(==\s*([^\s;,]+))?", req)
    if not m:
        raise LockError(f"unparsable requirement {req!r}")
    return m.group(1), m.group(3)


def check_lock(pin: ReleasePin, lock: Lock, *, pyproject: str | Path = PYPROJECT) -> list[str]:
    """Everything that must agree without a network; returns the problems (one line each)."""
    problems = []
    where = lock.path
    if lock.python != pin.python:
        problems.append(f"{where}: python {lock.python} but the containers have Python {pin.python} ({pin.file})")
    for pkg in lock.packages.values():
        if pkg.source != "nvidia" and pkg.requires_python is None:
            problems.append(f"{where}: {pkg.name}=={pkg.version} has no recorded requires-python")
        elif not admits(pkg.requires_python, pin.python):
            problems.append(f"{where}: {pkg.name}=={pkg.version} requires Python {pkg.requires_python}, "
                            f"the containers have {pin.python}")
        major = cuda_major_of(pkg.name, pkg.version)
        if major is not None and major != pin.cuda_major:
            problems.append(f"{where}: {pkg.name}=={pkg.version} is a CUDA {major} package; the container is "
                            f"CUDA {pin.cuda} (one CUDA major per process)")
    trt = [p for p in lock.packages.values() if re.fullmatch(r"tensorrt(-cu\d+)?", normalize(p.name))]
    if len(trt) != 1:
        problems.append(f"{where}: expected exactly one tensorrt-cuNN pin, found {[p.name for p in trt]}")
    else:
        if trt[0].version != pin.tensorrt:
            problems.append(f"{where}: {trt[0].name}=={trt[0].version} but the container has TensorRT "
                            f"{pin.tensorrt} (a plan loads only in the TensorRT that built it)")
        if cuda_major_of(trt[0].name, trt[0].version) is None:
            problems.append(f"{where}: {trt[0].name} does not name its CUDA major (use tensorrt-cu{pin.cuda_major})")
        if not any(NVIDIA_INDEX in o for o in lock.options):
            problems.append(f"{where}: the TensorRT wheels need '--extra-index-url {NVIDIA_INDEX}'")
    for name, want in (("torch", None), ("onnxruntime-gpu", None), ("tritonclient", pin.triton_server)):
        pkg = lock.get(name)
        if pkg is None:
            problems.append(f"{where}: {name} is not pinned")
        elif want and pkg.version != want:
            problems.append(f"{where}: {name}=={pkg.version} but the container is Triton {want}")
    if lock.get("onnxruntime"):
        problems.append(f"{where}: CPU onnxruntime beside onnxruntime-gpu: both install the `onnxruntime` module")
    if not re.fullmatch(r"manylinux_2_(\d+)_x86_64", lock.platform):
        problems.append(f"{where}: platform {lock.platform!r}: expected manylinux_2_NN_x86_64")
    # pyproject.toml: requires-python admits the containers' Python; the gpu extra pins what the lock pins.
    import tomllib

    project = tomllib.loads(Path(pyproject).read_text())["project"]
    if not admits(project.get("requires-python"), pin.python):
        problems.append(f"{pyproject}: requires-python {project.get('requires-python')} excludes {pin.python}")
    for req in project.get("optional-dependencies", {}).get("gpu", []):
        name, version = _req_pin(req)
        locked = lock.get(name)
        if version is None:
            problems.append(f"{pyproject}: gpu extra {req!r} is not an exact pin")
        elif locked is None or locked.version != version:
            problems.append(f"{pyproject}: gpu extra {name}=={version} but {where} has "
                            f"{locked.version if locked else 'nothing'}")
    return problems


# ----------------------------------------------------------------------------- resolution (PyPI)
def platform_tags(newest: str) -> list[str]:
    """manylinux_2_NN_x86_64 for NN from the lock's platform down to 2_17
    (pip takes --platform literally, it does not add the older ones)."""
    top = int(re.fullmatch(r"manylinux_2_(\d+)_x86_64", newest).group(1))
    return [f"manylinux_2_{g}_x86_64" for g in range(top, OLDEST_GLIBC - 1, -1)] + ["manylinux2014_x86_64"]


def _pip_report(requirements: Sequence[str], *, python: str, platform: str, pip: Sequence[str],
                timeout: float, no_deps: bool = False) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="gpu-stack-") as tmp:
        req_file = Path(tmp) / "requirements.txt"
        req_file.write_text("\n".join(requirements) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [*pip, "install", "--dry-run", "--ignore-installed", "--quiet", "--disable-pip-version-check",
               "--report", str(report), "--python-version", python, "--only-binary=:all:",
               "--target", str(Path(tmp) / "target"), "-r", str(req_file)]
        for tag in platform_tags(platform):
            cmd += ["--platform", tag]
        if no_deps:
            cmd.append("--no-deps")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            err = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.startswith("ERROR")]
            raise LockError(f"pip could not resolve for Python {python} / {platform}: "
                            + " | ".join(err[:4] or [(proc.stderr or proc.stdout)[-400:]]))
        return json.loads(report.read_text())["install"]


def _sdist_requires_python(name: str, version: str, *, pip: Sequence[str], timeout: float) -> str | None:
    """Requires-Python from the PKG-INFO of a pure-Python sdist (no build)."""
    with tempfile.TemporaryDirectory(prefix="gpu-stack-sdist-") as tmp:
        proc = subprocess.run([*pip, "download", "--no-deps", "--no-binary=:all:",
                               "--quiet", "--disable-pip-version-check", "-d", tmp, f"{name}=={version}"],
                              capture_output=True, text=True, timeout=timeout)
        archives = list(Path(tmp).glob("*.tar.gz"))
        if proc.returncode != 0 or not archives:
            raise LockError(f"pip could not download the {name}=={version} sdist: {(proc.stderr or '')[-300:]}")
        with tarfile.open(archives[0]) as tar:
            info = next((m for m in tar.getmembers() if m.name.count("/") == 1 and m.name.endswith("/PKG-INFO")),
                        None)
            if info is None:
                raise LockError(f"{archives[0].name}: no PKG-INFO")
            text = tar.extractfile(info).read().decode("utf-8", "replace")
    m = re.search(r"^Requires-Python:\s*(.+)$", text, re.M)
    return m.group(1).strip() if m else None


@dataclass
class Resolution:
    python: str
    platform: str
    packages: dict[str, dict]            # normalized name -> {"name","version","requires_python","requires_dist"}
    sdists: dict[str, str | None]        # normalized name -> Requires-Python
    tensorrt_bindings: dict | None       # the tensorrt-cuNN-bindings wheel for this Python, from PyPI


def resolve(requirements: Iterable[str], *, python: str, platform: str, pip: Sequence[str] | None = None,
            timeout: float = 600, tensorrt: tuple[str, str] | None = None) -> Resolution:
    """pip's resolution of `requirements` (exact pins) from wheels only, for
    `python` on `platform`; sdist-only packages and the TensorRT pins are
    looked up separately (see SDIST_ONLY, NVIDIA_INDEX)."""
    pip = list(pip or [sys.executable, "-m", "pip"])
    binary, sdists = [], {}
    for req in requirements:
        name, version = _req_pin(req)
        if normalize(name) in SDIST_ONLY:
            sdists[normalize(name)] = _sdist_requires_python(name, version, pip=pip, timeout=timeout)
        elif not re.fullmatch(r"tensorrt(-cu\d+)?", normalize(name)):
            binary.append(req)
    packages = {}
    for item in _pip_report(binary, python=python, platform=platform, pip=pip, timeout=timeout):
        meta = item["metadata"]
        packages[normalize(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                            "requires_python": meta.get("requires_python"),
                                            "requires_dist": meta.get("requires_dist", [])}
    bindings = None
    if tensorrt:
        major, version = tensorrt
        item = _pip_report([f"tensorrt-cu{major}-bindings=={version}"], python=python, platform=platform,
                           pip=pip, timeout=timeout, no_deps=True)[0]
        bindings = {"name": item["metadata"]["name"], "version": item["metadata"]["version"],
                    "url": item["download_info"]["url"]}
    return Resolution(python, platform, packages, sdists, bindings)


def declared_cuda_majors(requires_dist: Iterable[str], extras: Iterable[str] = ()) -> set[int]:
    """CUDA majors named by a package's own dependencies (with `extras` on)."""
    extras = set(extras)
    out = set()
    for dep in requires_dist:
        req, _, marker = dep.partition(";")
        m_extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if m_extra and m_extra.group(1) not in extras:
            continue
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?\s*(?:\(?\s*(?:==|~=|>=)\s*([\d.]+))?", req)
        if not m:
            continue
        major = cuda_major_of(m.group(1), m.group(2) or "")
        if major is not None:
            out.add(major)
    return out


def check_resolution(pin: ReleasePin, lock: Lock, res: Resolution) -> list[str]:
    """The lock is exactly pip's resolution, its recorded facts are true, and
    torch / onnxruntime-gpu declare the container's CUDA major themselves."""
    problems = []
    locked = {n: p for n, p in lock.packages.items() if p.source == "pypi"}
    for n, p in locked.items():
        got = res.packages.get(n)
        if got is None:
            problems.append(f"{lock.path}: {p.name}=={p.version} is not part of pip's resolution (stale pin?)")
        elif got["version"] != p.version:
            problems.append(f"{lock.path}: {p.name}=={p.version} but pip resolved {got['version']}")
        elif (got["requires_python"] or "") != (p.requires_python or ""):
            problems.append(f"{lock.path}: {p.name}=={p.version} records requires-python {p.requires_python!r}, "
                            f"its metadata says {got['requires_python']!r}")
    for n, got in res.packages.items():
        if n not in locked:
            problems.append(f"{lock.path}: pip also installs {got['name']}=={got['version']}, which the lock omits")
    for n, spec in res.sdists.items():
        p = lock.packages.get(n)
        if p is None or p.source != "sdist":
            problems.append(f"{lock.path}: {n} is an sdist-only package and must be marked 'source: sdist'")
        elif (spec or "") != (p.requires_python or ""):
            problems.append(f"{lock.path}: {p.name} records requires-python {p.requires_python!r}, its sdist says "
                            f"{spec!r}")
    for name, extras in (("torch", ()), ("onnxruntime-gpu", ("cuda", "cudnn"))):
        got = res.packages.get(name)
        majors = declared_cuda_majors(got["requires_dist"], extras) if got else set()
        if majors != {pin.cuda_major}:
            problems.append(f"{name} {got['version'] if got else '?'} declares CUDA major(s) {sorted(majors)} "
                            f"in its metadata; the container is CUDA {pin.cuda}")
    if res.tensorrt_bindings is None or res.tensorrt_bindings["version"] != pin.tensorrt:
        problems.append(f"no tensorrt-cu{pin.cuda_major}-bindings=={pin.tensorrt} wheel for Python {pin.python}")
    return problems


def write_lock(res: Resolution, pin: ReleasePin, path: str | Path = LOCK_FILE, *,
               requirements: Sequence[str]) -> Path:
    """lock-gpu.txt from a resolution: header, options, one pin per line with
    its Requires-Python and source."""
    from train.artifact_io import atomic_write_text

    extras = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?", req)
        if m and m.group(2):
            extras[normalize(m.group(1))] = m.group(2)
    lines = ["# Exact Python environment for GPU hosts and the NVIDIA TensorRT container of the release pinned",
             "# in scripts/triton_version.sh. Generated by `python -m serve.gpu_stack lock` from pyproject.toml",
             "# (dependencies + gpu + dev); checked by tests/test_gpu_stack.py. Edit pyproject.toml, then regenerate.",
             "# `source: sdist`: a pure-Python sdist (no wheel exists). `source: nvidia`: from NVIDIA's index; the",
             "# TensorRT container ships that package, so scripts/build_engines.sh does not install it there.",
             f"# python: {res.python}", f"# platform: {res.platform}",
             f"--extra-index-url {NVIDIA_INDEX}"]
    rows = []
    for n, p in res.packages.items():
        rows.append((p["name"].lower(), f"{p['name']}{extras.get(n, '')}=={p['version']}  "
                                        f"# requires-python: {p['requires_python'] or 'any'}"))
    for req in requirements:
        name, version = _req_pin(req)
        n = normalize(name)
        if n in res.sdists:
            spec = res.sdists[n] or "any"
            rows.append((name.lower(), f"{name}=={version}  # requires-python: {spec}; source: sdist"))
        elif re.fullmatch(r"tensorrt(-cu\d+)?", n):
            rows.append((name.lower(), f"{name}=={version}  # source: nvidia"))
    lines += [r for _, r in sorted(rows)]
    return atomic_write_text(path, "\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- model config of a release
def wheel_cache_dir() -> Path:
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dinov2-triton" / "wheels"


def tritonclient_wheel(version: str, *, cache: Path | None = None, pip: Sequence[str] | None = None,
                       timeout: float = 300) -> Path:
    """The tritonclient wheel of Triton release `version` (pure Python),
    downloaded once from PyPI into the cache."""
    cache = Path(cache or wheel_cache_dir())
    found = sorted(cache.glob(f"tritonclient-{version}-*.whl"))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    pip = list(pip or [sys.executable, "-m", "pip"])
    proc = subprocess.run([*pip, "download", "--no-deps", "--only-binary=:all:", "--quiet",
                           "--disable-pip-version-check", "-d", str(cache), f"tritonclient=={version}"],
                          capture_output=True, text=True, timeout=timeout)
    found = sorted(cache.glob(f"tritonclient-{version}-*.whl"))
    if proc.returncode != 0 or not found:
        raise LockError(f"pip could not download tritonclient=={version}: {(proc.stderr or '')[-300:]}")
    return found[0]


def model_config_class(version: str, **kw):
    """`inference.ModelConfig` exactly as Triton `version` defines it: the
    serialized model_config.proto descriptor from that release's tritonclient
    wheel, loaded into a descriptor pool of its own (so two releases coexist
    with the installed tritonclient in one process)."""
    import ast
    import zipfile

    from google.protobuf import descriptor_pool, message_factory

    wheel = tritonclient_wheel(version, **kw)
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith("tritonclient/grpc/model_config_pb2.py")), None)
        if member is None:
            raise LockError(f"{wheel.name}: no tritonclient/grpc/model_config_pb2.py")
        source = z.read(member).decode("utf-8")
    blob = next((node.args[0].value for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile"
                 and node.args and isinstance(node.args[0], ast.Constant)), None)
    if not isinstance(blob, bytes):
        raise LockError(f"{wheel.name}: {member} holds no serialized descriptor")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(blob)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


# ----------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m serve.gpu_stack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=("check", "resolve", "lock"))
    p.add_argument("--pin", default=str(PIN_FILE))
    p.add_argument("--lock", default=str(LOCK_FILE))
    p.add_argument("--pyproject", default=str(PYPROJECT))
    p.add_argument("--platform", default="manylinux_2_39_x86_64",
                   help="newest manylinux tag of the container (lock: taken from its header)")
    a = p.parse_args(argv)
    try:
        pin = load_pin(a.pin)
        if a.command == "lock":
            reqs = pyproject_requirements(a.pyproject)
            res = resolve(reqs, python=pin.python, platform=a.platform, tensorrt=(str(pin.cuda_major), pin.tensorrt))
            print(f"wrote {write_lock(res, pin, a.lock, requirements=reqs)}")
            return 0
        lock = read_lock(a.lock)
        problems = check_lock(pin, lock, pyproject=a.pyproject)
        if a.command == "resolve":
            reqs = [f"{q.name}{'[' + q.extras + ']' if q.extras else ''}=={q.version}"
                    for q in lock.packages.values()]
            res = resolve(reqs, python=lock.python, platform=lock.platform,
                          tensorrt=(str(pin.cuda_major), pin.tensorrt))
            problems += check_resolution(pin, lock, res)
    except (ValueError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"gpu_stack: {exc}", file=sys.stderr)
        return 2
    for line in problems:
        print(f"gpu_stack: {line}", file=sys.stderr)
    if not problems:
        print(f"gpu_stack: {a.command}: OK ({a.lock} agrees with {a.pin})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
