"""The pinned NVIDIA GPU release (package data core/resources/triton_release.env): the one reader.

Everything reads it here and nowhere else (dinov2_triton.export.trt_build_main,
dinov2_triton.serve.container, dinov2_triton.serve.local_server.container_versions, the GPU-stack
checks, dinov2_triton.qa.gpu_acceptance). Standard library only: it also runs inside the
NVIDIA TensorRT container, which has none of this project's dependencies.

``read_pin(path)`` returns the raw ``KEY=VALUE`` strings (``${KEY}`` expanded);
``load_pin(path)`` returns a :class:`ReleasePin` with the keys every consumer
needs, or raises :class:`PinError` naming the file and the key.
:func:`has_ensemble_max_inflight` says whether a Triton release's model
configuration knows ensemble back-pressure (``ModelEnsembling.max_inflight_requests``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PIN_FILE = Path(__file__).with_name("resources") / "triton_release.env"  # package data beside this module

_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_REF = re.compile(r"\$\{(\w+)\}|\$(\w+)")
REQUIRED = ("TRITON_CONTAINER_TAG", "TRITON_CONTAINER_IMAGE", "TENSORRT_CONTAINER_IMAGE", "TRITON_SERVER_VERSION",
            "TRITON_CUDA_VERSION", "TRITON_MIN_DRIVER", "TRITON_MIN_COMPUTE_CAPABILITY",
            "TRITON_TENSORRT_VERSION", "TRITON_ONNXRUNTIME_VERSION", "TRITON_PYTHON_VERSION",
            "LOCAL_TRITON_SERVER_VERSION")
#: The first Triton release whose ModelConfig has ``ModelEnsembling.max_inflight_requests``
#: (field 2, uint32; ensemble back-pressure): read in the model_config_pb2 of the tritonclient
#: 2.63.0 wheel (NGC 25.11); 2.62.0 (25.10) and 2.51.0 (the local server) have only ``step``.
#: triton-inference-server/core#482 (merged 2026-03) made it one limit shared by all requests of
#: the ensemble; releases before apply it per request.
ENSEMBLE_MAX_INFLIGHT_SINCE = (2, 63, 0)


class PinError(ValueError):
    """The pin file is missing, malformed or lacks a key; str() is one line naming the file."""


def _unquote(value: str, where: str) -> str:
    """The shell value of the right-hand side: one quoted word or one bare
    word, optionally followed by a ``# comment``."""
    value = value.strip()
    if value[:1] in ("'", '"'):
        end = value.find(value[0], 1)
        rest = value[end + 1:].strip() if end > 0 else "?"
        if end < 0 or (rest and not rest.startswith("#")):
            raise PinError(f"{where}: unbalanced quotes or text after the value: {value[:80]!r}")
        return value[1:end]
    word, _, rest = value.partition(" ")
    if rest.strip() and not rest.strip().startswith("#"):
        raise PinError(f"{where}: a value with spaces must be quoted: {value[:80]!r}")
    return word


def read_pin(path: str | os.PathLike = PIN_FILE) -> dict[str, str]:
    """All ``KEY=VALUE`` assignments of the pin file, in order, with
    ``${KEY}`` references to earlier keys expanded (as the shell does)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise PinError(f"{path}: cannot read the release pin ({exc.strerror or exc})") from None
    values: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if not m:
            raise PinError(f"{path}:{lineno}: not a KEY=VALUE line: {line[:80]!r}")
        value = _unquote(m.group(2), f"{path}:{lineno}")
        missing = [g.group(1) or g.group(2) for g in _REF.finditer(value)
                   if (g.group(1) or g.group(2)) not in values]
        if missing:
            raise PinError(f"{path}:{lineno}: {m.group(1)} refers to undefined {missing[0]}")
        values[m.group(1)] = _REF.sub(lambda g: values[g.group(1) or g.group(2)], value)
    return values


def _version_tuple(text: str, key: str, path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        raise PinError(f"{path}: {key}={text!r} is not a dotted number") from None


@dataclass(frozen=True)
class ReleasePin:
    """The facts of the pinned release that code acts on (see the file for sources)."""

    file: str
    container_tag: str
    triton_image: str
    tensorrt_image: str
    triton_server: str
    cuda: str
    min_driver: int
    min_compute_capability: tuple[int, ...]
    tensorrt: str
    onnxruntime: str
    python: str
    local_triton_server: str
    unverified: tuple[str, ...]
    openvino: str | None = None


    @property
    def ensemble_max_inflight(self) -> bool:
        """Does the pinned container's Triton know ``ModelEnsembling.max_inflight_requests``?"""
        return has_ensemble_max_inflight(self.triton_server)

    @property
    def cuda_major(self) -> int:
        return int(self.cuda.split(".")[0])

    @property
    def tensorrt_major(self) -> int:
        return int(self.tensorrt.split(".")[0])

    def is_unverified(self, key: str) -> bool:
        return key in self.unverified


def has_ensemble_max_inflight(version: str) -> bool:
    """Triton ``version`` ("2.73.0") has ensemble back-pressure (:data:`ENSEMBLE_MAX_INFLIGHT_SINCE`)."""
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    return parts >= ENSEMBLE_MAX_INFLIGHT_SINCE


def load_pin(path: str | os.PathLike = PIN_FILE) -> ReleasePin:
    path = Path(path)
    v = read_pin(path)
    missing = [k for k in REQUIRED if not v.get(k)]
    if missing:
        raise PinError(f"{path}: {missing[0]} missing or empty (needed: {', '.join(REQUIRED)})")
    for key in ("TRITON_SERVER_VERSION", "TRITON_CUDA_VERSION", "TRITON_TENSORRT_VERSION", "TRITON_PYTHON_VERSION",
                "TRITON_MIN_COMPUTE_CAPABILITY", "LOCAL_TRITON_SERVER_VERSION", "TRITON_ONNXRUNTIME_VERSION",
                "TRITON_OPENVINO_VERSION"):
        if key in v:
            _version_tuple(v[key], key, path)
    if len(v["TRITON_TENSORRT_VERSION"].split(".")) != 4:
        raise PinError(f"{path}: TRITON_TENSORRT_VERSION={v['TRITON_TENSORRT_VERSION']!r}: give the full "
                       f"4-part version (a standard plan loads only in that exact TensorRT)")
    if not v["TRITON_MIN_DRIVER"].isdigit():
        raise PinError(f"{path}: TRITON_MIN_DRIVER={v['TRITON_MIN_DRIVER']!r}: a driver branch number, e.g. 575")
    unverified = tuple(v.get("UNVERIFIED_KEYS", "").split())
    unknown = [k for k in unverified if k not in v]
    if unknown:
        raise PinError(f"{path}: UNVERIFIED_KEYS names {unknown[0]}, which the file does not define")
    return ReleasePin(
        file=str(path), container_tag=v["TRITON_CONTAINER_TAG"], triton_image=v["TRITON_CONTAINER_IMAGE"],
        tensorrt_image=v["TENSORRT_CONTAINER_IMAGE"], triton_server=v["TRITON_SERVER_VERSION"],
        cuda=v["TRITON_CUDA_VERSION"], min_driver=int(v["TRITON_MIN_DRIVER"]),
        min_compute_capability=_version_tuple(v["TRITON_MIN_COMPUTE_CAPABILITY"], "TRITON_MIN_COMPUTE_CAPABILITY",
                                              path),
        tensorrt=v["TRITON_TENSORRT_VERSION"], onnxruntime=v["TRITON_ONNXRUNTIME_VERSION"],
        python=v["TRITON_PYTHON_VERSION"], local_triton_server=v["LOCAL_TRITON_SERVER_VERSION"],
        unverified=unverified, openvino=v.get("TRITON_OPENVINO_VERSION"))
