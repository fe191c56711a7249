"""Python client for the served DINOv2 classifier (tritonclient HTTP or gRPC).

Two ways in, both following the serving contract (docs/architecture.md):

- the ensemble ``dinov2``: input ``image`` BYTES [-1,1], i.e. the encoded
  file bytes; the server decodes and preprocesses them (``dinov2_preprocess``);
- a bare variant (``dinov2_onnx``, ``dinov2_trt_fp16``, ...): input
  ``pixel_values`` FP32 [-1,3,H,W]; the client preprocesses with the stored
  record (``--variant-preprocess client``, the default, via
  ``train.preprocessing.preprocess_source``) or asks the server's
  preprocessing model for the tensor first (``--variant-preprocess server``).

The client reads the model's configuration from the server to learn which of
the two it talks to and its ``max_batch_size``: larger inputs are split into
requests no bigger than that. Top-k labels come from Triton's classification
extension (``class_count=k`` on ``logits`` -> ``"score:index:label"``
strings). A batch the server rejects is retried image by image, so one bad
file gets its own error and the others still get answers.

Errors are typed (:class:`ServerUnreachable`, :class:`ModelNotReady`,
:class:`RequestError`) and carry one readable line; the CLI prints one line
per failed file and exits 1, or 0 when every file was classified.

Library use::

    with TritonClassifier("localhost:8001", "grpc", "dinov2") as clf:
        for p in clf.classify_paths(["photos/"], top_k=5):
            print(p.path, p.top if p.ok else p.error)
        logits, embedding = clf.infer_images([open("a.jpg", "rb").read()])
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
DEFAULT_MODEL = "dinov2"
DEFAULT_PREPROCESS_MODEL = "dinov2_preprocess"
PIXEL_INPUT = "pixel_values"
IMAGE_INPUT = "image"
LOGITS = "logits"
EMBEDDING = "embedding"
#: model names of the serving contract, probed when the repository index is
#: restricted (the local server guards it with an API key)
CONTRACT_MODELS = ("dinov2", "dinov2_preprocess", "dinov2_torchscript", "dinov2_onnx",
                   "dinov2_onnx_fp16", "dinov2_onnx_int8", "dinov2_trt_fp16", "dinov2_trt_int8")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})
API_KEY_HEADER = "triton-api-key"  # serve/local_server.py restricts the repository API with it
GRPC_RESTRICTED_PREFIX = "triton-grpc-protocol-"
SERVE_HINT = "is the server running? scripts/serve.sh local"


# --------------------------------------------------------------------------- errors
class ClientError(RuntimeError):
    """A one-line, user-facing failure of a Triton call."""


class ServerUnreachable(ClientError):
    """Nothing answers at the URL."""


class ModelNotReady(ClientError):
    """The model is unknown to the server or not loaded; the message lists the ready ones."""


class RequestError(ClientError):
    """The server rejected or failed one request; the message is the server's."""


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _is_unreachable(exc: BaseException) -> bool:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, InferenceServerException):
        status = str(exc.status() or "")
        if "restricted" in str(exc.message() or ""):
            return False  # Triton answers a restricted gRPC API with UNAVAILABLE too
        return status.endswith("UNAVAILABLE") or status.endswith("DEADLINE_EXCEEDED")
    if isinstance(exc, OSError):  # socket errors from geventhttpclient (DNS, refused, reset)
        return True
    return False


def _server_message(exc: BaseException) -> str:
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return _one_line(exc.message() or exc)
    return _one_line(f"{type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """The answer for one image: top-k (label, class index, logit) or an error."""

    path: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def label(self) -> str | None:
        return self.top[0][0] if self.top else None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        if self.ok:
            out["top"] = [{"label": lab, "index": idx, "score": score} for lab, idx, score in self.top]
        else:
            out["error"] = self.error
        return out


def parse_classification(entries: np.ndarray, labels: Sequence[str] | None = None
                         ) -> list[list[tuple[str, int, float]]]:
    """Decode Triton classification strings ``"score:index[:label]"`` per row.

    ``entries``: the [N, k] BYTES array the server returns for an output
    requested with ``class_count=k``. Where the model has no label file the
    label comes from ``labels`` (or is the index as text). Labels may
    themselves contain ':' (only the first two separate fields).
    """
    arr = np.asarray(entries, dtype=object)
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    rows = []
    for row in arr:
        parsed = []
        for item in row:
            text = item.decode("utf-8") if isinstance(item, (bytes, bytearray)) else str(item)
            parts = text.split(":", 2)
            if len(parts) < 2:
                raise ValueError(f"classification entry {text!r} is not 'score:index[:label]'")
            score, index = float(parts[0]), int(parts[1])
            if len(parts) == 3 and parts[2]:
                label = parts[2]
            elif labels is not None and 0 <= index < len(labels):
                label = labels[index]
            else:
                label = str(index)
            parsed.append((label, index, score))
        rows.append(parsed)
    return rows


def topk_from_logits(logits: np.ndarray, k: int, labels: Sequence[str] | None = None
                     ) -> list[list[tuple[str, int, float]]]:
    """Local equivalent of the classification extension (for tests and fallbacks)."""
    logits = np.asarray(logits)
    k = min(k, logits.shape[1])
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return [[(labels[i] if labels is not None else str(i), int(i), float(row[i])) for i in idx]
            for row, idx in zip(logits, order)]


# --------------------------------------------------------------------------- inputs
def find_images(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[Prediction]]:
    """Expand files and folders (recursively, image suffixes only, sorted).

    Returns (files, problems): a path that does not exist, or a folder with no
    image, becomes a :class:`Prediction` carrying the error. A file named
    explicitly is kept whatever its suffix (the server judges its content).
    """
    files: list[Path] = []
    problems: list[Prediction] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                problems.append(Prediction(str(p), error=f"folder has no image files "
                                                         f"({', '.join(sorted(IMAGE_SUFFIXES))})"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            problems.append(Prediction(str(p), error="no such file or folder"))
    return files, problems


def load_preprocessing(*, model_path: str | os.PathLike | None = None,
                       preprocessing: str | os.PathLike | None = None,
                       repository: str | os.PathLike | None = None,
                       preprocess_model: str = DEFAULT_PREPROCESS_MODEL):
    """The stored preprocessing record as a ``PreprocessConfig``.

    From the first source given: a JSON file (``preprocessing.json``, or any
    JSON with a ``"preprocessing"`` entry such as ``export_manifest.json``); a
    model repository (``<preprocess_model>/<version>/preprocessing.json``,
    then ``export_manifest.json``); a checkpoint's ``preprocessing`` entry.
    Raises ValueError naming the file at fault.
    """
    from train.preprocessing import PreprocessConfig

    def from_json(path: Path) -> PreprocessConfig:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"{path}: preprocessing file not found") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: not readable JSON ({exc})") from None
        if isinstance(data, Mapping) and isinstance(data.get("preprocessing"), Mapping):
            data = data["preprocessing"]
        if not isinstance(data, Mapping):
            raise ValueError(f"{path}: expected a preprocessing record (a JSON object)")
        try:
            return PreprocessConfig.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from None

    if preprocessing is not None:
        return from_json(Path(preprocessing))
    if repository is not None:
        repo = Path(repository)
        if not repo.is_dir():
            raise ValueError(f"--repository {repo}: not a folder")
        model_dir = repo / preprocess_model
        candidates = sorted(model_dir.glob("*/preprocessing.json"),
                            key=lambda p: (not p.parent.name.isdigit(),
                                           -int(p.parent.name) if p.parent.name.isdigit() else 0))
        candidates += [model_dir / "preprocessing.json", repo / "export_manifest.json"]
        for cand in candidates:
            if cand.is_file():
                return from_json(cand)
        raise ValueError(f"--repository {repo}: neither {model_dir}/<version>/preprocessing.json "
                         f"nor {repo / 'export_manifest.json'} exists; was it written by "
                         f"`python -m export`?")
    if model_path is not None:
        from train.model import read_checkpoint

        record = read_checkpoint(model_path)
        try:
            return PreprocessConfig.from_dict(record["preprocessing"])
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{model_path}: checkpoint field 'preprocessing': {exc}") from None
    raise ValueError("client-side preprocessing needs the stored record: pass --model-path "
                     "model_final.pth, --preprocessing preprocessing.json or --repository "
                     "./model_repository")


def read_repository_labels(repository: str | os.PathLike, model: str) -> list[str] | None:
    """labels.txt of ``model`` in a local repository (None when it has none)."""
    for name in ("labels.txt",):
        f = Path(repository) / model / name
        if f.is_file():
            return [line for line in f.read_text(encoding="utf-8").split("\n") if line]
    return None


# --------------------------------------------------------------------------- config helpers
def _dims(tensor: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]


def _data_type(tensor: Mapping[str, Any]) -> str:
    return str(tensor.get("data_type", "TYPE_INVALID"))


def config_parameter(config: Mapping[str, Any], name: str) -> str | None:
    """A ``parameters { key: name value: { string_value: ... } }`` entry of a model config."""
    entry = (config.get("parameters") or {}).get(name)
    if isinstance(entry, Mapping):
        return entry.get("string_value")
    return None


def input_kind(config: Mapping[str, Any]) -> str:
    """'bytes' (encoded images, e.g. the ensemble) or 'pixels' (pixel_values FP32)."""
    inputs = config.get("input") or []
    if len(inputs) == 1 and _data_type(inputs[0]) == "TYPE_STRING":
        return "bytes"
    if any(t.get("name") == PIXEL_INPUT and _data_type(t) == "TYPE_FP32" for t in inputs):
        return "pixels"
    desc = ", ".join(f"{t.get('name')} {_data_type(t)} {_dims(t)}" for t in inputs) or "none"
    raise ValueError(f"model '{config.get('name')}' has inputs [{desc}]; expected one BYTES input "
                     f"(encoded images, like the ensemble) or '{PIXEL_INPUT}' FP32 [3,H,W]")


# --------------------------------------------------------------------------- client
class TritonClassifier:
    """Classify images with a DINOv2 model served by Triton.

    Parameters
    ----------
    url, protocol : ``host:port`` (no scheme) and ``"grpc"`` or ``"http"``.
    model : the served model: the ensemble (encoded images in) or a variant
        (``pixel_values`` in); found out from the server's configuration.
        None connects without a model (for ``ready_models``/``model_config(name)``).
    preprocessing : a ``PreprocessConfig`` for client-side preprocessing
        (needed only for a variant with ``variant_preprocess="client"``).
    variant_preprocess : ``"client"`` or ``"server"`` (run ``preprocess_model``
        on the server, then the variant) for a variant; ignored for the ensemble.
    labels : class names, used when the server's classification strings carry
        no label (a model without ``label_filename``).
    batch_size : largest request; default and upper bound the model's
        ``max_batch_size`` (1 for a model without batching).
    concurrency : requests in flight at once (async requests); 1 = sequential.
    headers : extra request headers / gRPC metadata (e.g. the API key that
        unlocks the repository index on the local server).
    timeout_s : per-request client timeout.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc",
                 model: str | None = DEFAULT_MODEL, *,
                 preprocessing=None, variant_preprocess: str = "client",
                 preprocess_model: str = DEFAULT_PREPROCESS_MODEL,
                 labels: Sequence[str] | None = None, batch_size: int | None = None,
                 concurrency: int = 1, headers: Mapping[str, str] | None = None,
                 timeout_s: float = 120.0, verbose: bool = False) -> None:
        if protocol not in ("grpc", "http"):
            raise ValueError(f"protocol {protocol!r}: choose grpc or http")
        if variant_preprocess not in ("client", "server"):
            raise ValueError(f"variant_preprocess {variant_preprocess!r}: choose client or server")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: must be >= 1")
        self.url = url or DEFAULT_URLS[protocol]
        if "://" in self.url:
            raise ValueError(f"url {self.url!r}: give host:port without a scheme (e.g. localhost:8001)")
        self.protocol = protocol
        self.model = model
        self.preprocessing = preprocessing
        self.variant_preprocess = variant_preprocess
        self.preprocess_model = preprocess_model
        self.concurrency = concurrency
        self.headers = dict(headers or {})
        if protocol == "grpc":
            # Triton expects a restricted gRPC protocol's key under this prefix
            # (`--grpc-restricted-protocol=...:triton-api-key=K` -> metadata
            # `triton-grpc-protocol-triton-api-key: K`).
            for key, value in list(self.headers.items()):
                if not key.startswith(GRPC_RESTRICTED_PREFIX):
                    self.headers.setdefault(GRPC_RESTRICTED_PREFIX + key, value)
        self.timeout_s = timeout_s
        self._labels = list(labels) if labels is not None else None

        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        try:
            if protocol == "grpc":
                self._client = tc.InferenceServerClient(self.url, verbose=verbose)
            else:
                self._client = tc.InferenceServerClient(
                    self.url, verbose=verbose, concurrency=max(1, concurrency),
                    connection_timeout=min(timeout_s, 10.0), network_timeout=timeout_s)
        except Exception as exc:  # noqa: BLE001 - a malformed URL, mostly
            raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): "
                                    f"{_server_message(exc)}") from None
        self._config: dict[str, Any] = {}
        self.kind: str | None = None
        self._pre_config = None
        self.batch_size = 1
        try:
            self._check_server()
            if model is None:  # connected only: discovery (ready_models, model_config(name))
                return
            self._config = self._model_config(model)
            self.kind = input_kind(self._config)
            if self.kind == "pixels" and variant_preprocess == "server":
                self._pre_config = self._model_config(preprocess_model)
            elif self.kind == "pixels" and preprocessing is None:
                raise ValueError(f"model '{model}' takes preprocessed '{PIXEL_INPUT}': client-side "
                                 f"preprocessing needs the stored record (--model-path, "
                                 f"--preprocessing or --repository), or use "
                                 f"--variant-preprocess server")
            if self.kind == "pixels" and preprocessing is not None:
                self._check_pixel_shape()
        except BaseException:
            self.close()
            raise
        limit = self.max_batch_size if self.max_batch_size > 0 else 1
        self.batch_size = min(batch_size or limit, limit)

    # ----------------------------------------------------------------- server calls
    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run a client call; connection failures become ServerUnreachable."""
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001
            if _is_unreachable(exc):
                raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): "
                                        f"{_server_message(exc)}") from None
            raise

    def _check_server(self) -> None:
        kwargs = {"client_timeout": min(self.timeout_s, 10.0)} if self.protocol == "grpc" else {}
        try:
            live = self._call(self._client.is_server_live, headers=self.headers or None, **kwargs)
        except ServerUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - e.g. something else listens on the port
            raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): "
                                    f"{_server_message(exc)}") from None
        if not live:
            raise ServerUnreachable(f"Triton at {self.url} is not live ({SERVE_HINT})")

    def ready_models(self) -> tuple[list[str], str]:
        """(names of READY models, how they were found). The repository index
        may be restricted (API key); then the contract's names are probed."""
        try:
            if self.protocol == "grpc":
                index = self._call(self._client.get_model_repository_index,
                                   headers=self.headers or None, as_json=True).get("models", [])
            else:
                index = self._call(self._client.get_model_repository_index,
                                   headers=self.headers or None)
            names = sorted({m["name"] for m in index if m.get("state") == "READY"})
            return names, "repository index"
        except ServerUnreachable:
            raise
        except Exception:  # noqa: BLE001 - restricted or unsupported: probe instead
            pass
        names = []
        for name in CONTRACT_MODELS:
            try:
                if self._call(self._client.is_model_ready, name, headers=self.headers or None):
                    names.append(name)
            except ServerUnreachable:
                raise
            except Exception:  # noqa: BLE001
                continue
        return sorted(names), "probed the contract's model names; pass the API key to list all"

    def _model_config(self, name: str) -> dict[str, Any]:
        try:
            ready = self._call(self._client.is_model_ready, name, headers=self.headers or None)
        except ServerUnreachable:
            raise
        except Exception:  # noqa: BLE001 - an unknown model can raise instead of False
            ready = False
        if not ready:
            names, how = self.ready_models()
            listing = ", ".join(names) if names else "none"
            raise ModelNotReady(f"model '{name}' is not ready on Triton at {self.url} "
                                f"(unknown, or it failed to load: see the server log); "
                                f"ready models: {listing} ({how})")
        try:
            if self.protocol == "grpc":
                cfg = self._call(self._client.get_model_config, name, headers=self.headers or None,
                                 as_json=True)
                cfg = cfg.get("config", cfg)
            else:
                cfg = self._call(self._client.get_model_config, name, headers=self.headers or None)
        except ClientError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ModelNotReady(f"model '{name}': cannot read its configuration: "
                                f"{_server_message(exc)}") from None
        return _normalise_config(cfg)

    # ----------------------------------------------------------------- properties
    def model_config(self, name: str | None = None) -> dict[str, Any]:
        """The served configuration (JSON form, ints normalised) of ``model`` or ``name``."""
        if name is None or name == self.model:
            return self._config
        return self._model_config(name)

    @property
    def max_batch_size(self) -> int:
        return int(self._config.get("max_batch_size", 0))

    @property
    def num_classes(self) -> int | None:
        out = self._output(LOGITS)
        dims = _dims(out) if out else []
        return dims[-1] if dims and dims[-1] > 0 else None

    @property
    def labels(self) -> list[str] | None:
        return self._labels

    def _output(self, name: str) -> dict[str, Any] | None:
        return next((o for o in self._config.get("output", []) if o.get("name") == name), None)

    def _check_pixel_shape(self) -> None:
        spec = next(t for t in self._config["input"] if t.get("name") == PIXEL_INPUT)
        want = _dims(spec)[-3:]
        size = self.preprocessing.image_size
        got = [3, size, size]
        if len(want) == 3 and any(w not in (-1, g) for w, g in zip(want, got)):
            raise ValueError(f"model '{self.model}' expects {PIXEL_INPUT} {want} but the "
                             f"preprocessing record gives {got} (image_size={size}); the record "
                             f"does not belong to this model")

    # ----------------------------------------------------------------- requests
    def _bytes_input(self, name: str, blobs: Sequence[bytes]):
        arr = np.empty((len(blobs), 1), dtype=object)
        for i, b in enumerate(blobs):
            arr[i, 0] = bytes(b)
        inp = self._tc.InferInput(name, list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        return inp

    def _pixel_input(self, pixels: np.ndarray):
        arr = np.ascontiguousarray(pixels, dtype=np.float32)
        inp = self._tc.InferInput(PIXEL_INPUT, list(arr.shape), "FP32")
        inp.set_data_from_numpy(arr)
        return inp

    def _requested(self, name: str, class_count: int = 0):
        if self.protocol == "http":
            return self._tc.InferRequestedOutput(name, binary_data=True, class_count=class_count)
        return self._tc.InferRequestedOutput(name, class_count=class_count)

    def _infer_many(self, model: str, jobs: Sequence[tuple[list, list]]) -> list[Any]:
        """Send every (inputs, outputs) job; return per job an InferResult or the
        exception. Unreachable servers raise at once (no point going on)."""
        results: list[Any] = [None] * len(jobs)
        if self.concurrency <= 1 or len(jobs) <= 1:
            for i, (inputs, outputs) in enumerate(jobs):
                results[i] = self._infer_one(model, inputs, outputs)
        elif self.protocol == "http":
            for start in range(0, len(jobs), self.concurrency):
                window = range(start, min(start + self.concurrency, len(jobs)))
                pending = {i: self._call(self._client.async_infer, model, jobs[i][0],
                                         outputs=jobs[i][1], headers=self.headers or None)
                           for i in window}
                for i, req in pending.items():
                    try:
                        results[i] = self._call(req.get_result)
                    except ServerUnreachable:
                        raise
                    except Exception as exc:  # noqa: BLE001 - per-request error
                        results[i] = exc
        else:
            slots = threading.BoundedSemaphore(self.concurrency)
            done = threading.Event()
            remaining = [len(jobs)]
            lock = threading.Lock()

            def callback(i, result, error):
                results[i] = error if error is not None else result
                slots.release()
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            for i, (inputs, outputs) in enumerate(jobs):
                slots.acquire()
                self._call(self._client.async_infer, model, inputs,
                           lambda result, error, i=i: callback(i, result, error),
                           outputs=outputs, headers=self.headers or None,
                           client_timeout=self.timeout_s)
            done.wait()
        for r in results:
            if isinstance(r, Exception) and _is_unreachable(r):
                raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): "
                                        f"{_server_message(r)}")
        return results

    def _infer_one(self, model: str, inputs: list, outputs: list) -> Any:
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            return self._call(self._client.infer, model, inputs, outputs=outputs,
                              headers=self.headers or None, **kwargs)
        except ServerUnreachable:
            raise
        except Exception as exc:  # noqa: BLE001 - the server's verdict on this request
            return exc

    @staticmethod
    def _raise_if_error(result: Any, model: str) -> Any:
        if isinstance(result, Exception):
            raise RequestError(f"model '{model}': {_server_message(result)}") from None
        return result

    def _chunks(self, n: int, size: int | None = None) -> list[slice]:
        size = size or self.batch_size
        return [slice(i, min(i + size, n)) for i in range(0, n, size)]

    # ----------------------------------------------------------------- public inference
    def infer_pixels(self, pixels: np.ndarray, *, embedding: bool = True
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Preprocessed [N,3,H,W] float32 -> (logits [N,C], embedding [N,D]).

        Only for a variant (``pixel_values`` input). Split into requests of at
        most ``batch_size``; raises RequestError with the server's message.
        """
        if self.kind != "pixels":
            raise ValueError(f"model '{self.model}' takes encoded images, not {PIXEL_INPUT}; "
                             f"use infer_images")
        pixels = np.asarray(pixels, dtype=np.float32)
        if pixels.ndim != 4:
            raise ValueError(f"pixels: expected [N,3,H,W], got shape {list(pixels.shape)}")
        outs = [self._requested(LOGITS)] + ([self._requested(EMBEDDING)] if embedding else [])
        jobs = [([self._pixel_input(pixels[s])], outs) for s in self._chunks(len(pixels))]
        return self._collect(self._infer_many(self.model, jobs), embedding)

    def infer_images(self, images: Sequence[bytes], *, embedding: bool = True
                     ) -> tuple[np.ndarray, np.ndarray | None]:
        """Encoded images -> (logits [N,C], embedding [N,D]) through this model.

        The ensemble gets the bytes as they are; a variant gets them
        preprocessed on this side (or by the server's preprocessing model).
        Raises RequestError (server) or ImageDecodeError (client-side decode).
        """
        if not images:
            raise ValueError("infer_images: no images given")
        if self.kind == "pixels":
            return self.infer_pixels(self.preprocess(images), embedding=embedding)
        outs = [self._requested(LOGITS)] + ([self._requested(EMBEDDING)] if embedding else [])
        jobs = [([self._bytes_input(self._input_name(), images[s])], outs)
                for s in self._chunks(len(images))]
        return self._collect(self._infer_many(self.model, jobs), embedding)

    def preprocess(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> np.ndarray:
        """Encoded images -> pixel_values [N,3,H,W] the way this client is set up:
        the stored record locally, or the server's preprocessing model."""
        if self.variant_preprocess == "server" and self._pre_config is not None:
            out_name = next((o["name"] for o in self._pre_config.get("output", [])), PIXEL_INPUT)
            in_name = self._pre_config["input"][0]["name"]
            mbs = int(self._pre_config.get("max_batch_size", 0)) or 1
            jobs = [([self._bytes_input(in_name, images[s])], [self._requested(out_name)])
                    for s in self._chunks(len(images), mbs)]
            parts = []
            for r in self._infer_many(self.preprocess_model, jobs):
                parts.append(self._raise_if_error(r, self.preprocess_model).as_numpy(out_name))
            return np.concatenate(parts).astype(np.float32, copy=False)
        from train.preprocessing import preprocess_source

        return np.stack([preprocess_source(bytes(b), self.preprocessing,
                                           name=(names[i] if names else None))
                         for i, b in enumerate(images)])

    def _input_name(self) -> str:
        return self._config["input"][0]["name"]

    def _collect(self, results: list[Any], embedding: bool) -> tuple[np.ndarray, np.ndarray | None]:
        results = [self._raise_if_error(r, self.model) for r in results]
        logits = np.concatenate([r.as_numpy(LOGITS) for r in results])
        emb = np.concatenate([r.as_numpy(EMBEDDING) for r in results]) if embedding else None
        return logits, emb

    # ----------------------------------------------------------------- classification
    def classify_bytes(self, items: Sequence[tuple[str, bytes]], top_k: int = 5, *,
                       embeddings: bool = False) -> list[Prediction]:
        """Top-k labels (Triton's classification extension) for named encoded
        images; one Prediction per item, in order, errors included."""
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: must be >= 1")
        k = min(top_k, self.num_classes or top_k)
        preds = [Prediction(name) for name, _ in items]
        # A variant needs tensors: make them first, so an undecodable image is
        # known (and named) before anything is sent to the model.
        tensors: dict[int, np.ndarray] = {}
        todo = list(range(len(items)))
        if self.kind == "pixels":
            todo = self._preprocess_each(items, preds, tensors)
        outs = [self._requested(LOGITS, class_count=k)]
        if embeddings:
            outs.append(self._requested(EMBEDDING))

        def make_inputs(idx: Sequence[int]) -> list:
            if self.kind == "bytes":
                return [self._bytes_input(self._input_name(), [items[i][1] for i in idx])]
            return [self._pixel_input(np.stack([tensors[i] for i in idx]))]

        groups = [todo[s] for s in self._chunks(len(todo))]
        results = self._infer_many(self.model, [(make_inputs(g), outs) for g in groups])
        retry = []
        for g, r in zip(groups, results):
            if isinstance(r, Exception) and len(g) > 1:
                retry.extend(g)  # one bad image fails its whole request: ask one by one
            else:
                self._fill(preds, g, r, embeddings)
        if retry:
            single = self._infer_many(self.model, [(make_inputs([i]), outs) for i in retry])
            for i, r in zip(retry, single):
                self._fill(preds, [i], r, embeddings)
        return preds

    def _preprocess_each(self, items: Sequence[tuple[str, bytes]], preds: list[Prediction],
                         tensors: dict[int, np.ndarray]) -> list[int]:
        """Fill ``tensors`` (index -> [3,H,W]); set the error of the items that
        cannot be preprocessed; return the indices that can go on."""
        ok: list[int] = []
        if self.variant_preprocess == "client":
            from train.preprocessing import preprocess_source

            for i, (name, data) in enumerate(items):
                try:
                    tensors[i] = preprocess_source(bytes(data), self.preprocessing, name=name)
                    ok.append(i)
                except ValueError as exc:  # ImageDecodeError is a ValueError
                    preds[i].error = _one_line(exc)
            return ok
        mbs = int(self._pre_config.get("max_batch_size", 0)) or 1
        pending = [list(range(len(items)))[s] for s in self._chunks(len(items), mbs)]
        while pending:
            group = pending.pop(0)
            try:
                arr = self.preprocess([items[i][1] for i in group])
            except RequestError as exc:
                if len(group) > 1:
                    pending[:0] = [[i] for i in group]  # find the culprit: one request each
                else:
                    preds[group[0]].error = str(exc)
                continue
            for j, i in enumerate(group):
                tensors[i] = arr[j]
                ok.append(i)
        return sorted(ok)

    def _fill(self, preds: list[Prediction], idx: Sequence[int], result: Any, embeddings: bool) -> None:
        if isinstance(result, Exception):
            for i in idx:
                preds[i].error = f"model '{self.model}': {_server_message(result)}"
            return
        rows = parse_classification(result.as_numpy(LOGITS), self._labels)
        emb = result.as_numpy(EMBEDDING) if embeddings else None
        for j, i in enumerate(idx):
            preds[i].top = rows[j]
            if emb is not None:
                preds[i].embedding = emb[j]

    def classify_paths(self, paths: Iterable[str | os.PathLike], top_k: int = 5, *,
                       embeddings: bool = False) -> list[Prediction]:
        """Classify files and folders (recursively); unreadable paths and images
        the server rejects come back as Predictions with ``error`` set."""
        files, problems = find_images(paths)
        items, unreadable = [], []
        for f in files:
            try:
                items.append((str(f), f.read_bytes()))
            except OSError as exc:
                unreadable.append(Prediction(str(f), error=f"cannot read ({exc.strerror or exc})"))
        preds = self.classify_bytes(items, top_k, embeddings=embeddings) if items else []
        return problems + unreadable + preds

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel must not mask errors
                pass
            self._client = None

    def __enter__(self) -> "TritonClassifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _normalise_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """gRPC's JSON form writes int64 as strings ('-1'); make dims and sizes ints."""
    cfg = json.loads(json.dumps(cfg))
    cfg["max_batch_size"] = int(cfg.get("max_batch_size", 0) or 0)
    for key in ("input", "output"):
        for t in cfg.get(key, []) or []:
            t["dims"] = [int(d) for d in t.get("dims", [])]
    return cfg


def read_api_key(value: str | None, file: str | os.PathLike | None) -> dict[str, str]:
    """Headers carrying the local server's API key (flag, file or $TRITON_API_KEY)."""
    key = value or os.environ.get("TRITON_API_KEY")
    if file:
        try:
            key = Path(file).read_text().strip()
        except OSError as exc:
            raise ValueError(f"--api-key-file {file}: cannot read ({exc.strerror or exc})") from None
    return {API_KEY_HEADER: key} if key else {}


# --------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m perf.client",
        description="Classify image files or folders with a DINOv2 model served by Triton "
                    "(top-k labels through the classification extension, optional embeddings).")
    req = p.add_argument_group("Required (one of)")
    req.add_argument("paths", nargs="*", metavar="PATH", help="image files or folders (recursive)")
    req.add_argument("--data_path", "--data-path", dest="data_path",
                     help="a prepared data folder: classify its --split and print the accuracy "
                          "against the manifest's labels")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--split", default="test", choices=("train", "val", "test"),
                     help="with --data_path: which split (default: %(default)s)")
    opt.add_argument("--quiet", action="store_true", help="no line per image, only the summary")
    opt.add_argument("--url", default=None,
                     help="Triton address host:port (default localhost:8001 for grpc, "
                          "localhost:8000 for http)")
    opt.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    opt.add_argument("--model", default=DEFAULT_MODEL,
                     help="served model: the ensemble 'dinov2' (encoded images) or a variant "
                          "such as dinov2_onnx (pixel_values) (default: %(default)s)")
    opt.add_argument("--variant-preprocess", choices=("client", "server"), default="client",
                     help="for a variant: preprocess here with the stored record (client) or "
                          "with the server's preprocessing model (server)")
    opt.add_argument("--preprocess-model", default=DEFAULT_PREPROCESS_MODEL,
                     help="server preprocessing model (default: %(default)s)")
    src = opt.add_mutually_exclusive_group()
    src.add_argument("--model-path", "--model_path", dest="model_path",
                     help="checkpoint whose 'preprocessing' record (and class names) to use")
    src.add_argument("--preprocessing", help="preprocessing.json (or export_manifest.json)")
    src.add_argument("--repository", help="local model repository: reads "
                                           "<preprocess-model>/<version>/preprocessing.json")
    opt.add_argument("--top-k", type=int, default=5, help="labels per image (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="images per request (default and maximum: the model's max_batch_size)")
    opt.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    opt.add_argument("--embeddings", metavar="OUT.npy",
                     help="also save the embeddings of the classified images [N,D] here; "
                          "the file names go to OUT.files.txt in the same order")
    opt.add_argument("--json", action="store_true", help="print one JSON object per image")
    opt.add_argument("--api-key-file", help="file holding the local server's API key (lets the "
                                            "error for an unknown model list every model)")
    opt.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    return p


def _format(pred: Prediction) -> str:
    tops = ", ".join(f"{label} ({score:.4g})" for label, _, score in pred.top)
    return f"{pred.path}: {tops}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k {args.top_k}: must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    if args.concurrency < 1:
        parser.error(f"--concurrency {args.concurrency}: must be >= 1")
    if bool(args.paths) == bool(args.data_path):
        parser.error("give image PATHs or --data_path (not both)")
    try:
        headers = read_api_key(None, args.api_key_file)
        pre = labels = None
        if args.model_path or args.preprocessing or args.repository:
            pre = load_preprocessing(model_path=args.model_path, preprocessing=args.preprocessing,
                                     repository=args.repository,
                                     preprocess_model=args.preprocess_model)
        if args.model_path:
            from train.model import read_checkpoint

            labels = list(read_checkpoint(args.model_path).get("class_names") or []) or None
        elif args.repository:
            labels = read_repository_labels(args.repository, args.model)
    except Exception as exc:  # noqa: BLE001 - bad flags or files: one line, exit 2
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2

    try:
        clf = TritonClassifier(args.url, args.protocol, args.model, preprocessing=pre,
                               variant_preprocess=args.variant_preprocess,
                               preprocess_model=args.preprocess_model, labels=labels,
                               batch_size=args.batch_size, concurrency=args.concurrency,
                               headers=headers, timeout_s=args.timeout)
    except ValueError as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    truth: dict[str, int] = {}
    paths = list(args.paths)
    if args.data_path:
        from train.datasets import read_manifest

        try:
            records = read_manifest(args.data_path, split=args.split)
        except Exception as exc:  # noqa: BLE001 - bad data folder: one line, exit 2
            print(f"error: {_one_line(exc)}", file=sys.stderr)
            return 2
        paths = [str(r.file(args.data_path)) for r in records]
        truth = {path: r.label for path, r in zip(paths, records)}
    try:
        with clf:
            preds = clf.classify_paths(paths, args.top_k, embeddings=bool(args.embeddings))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1

    failed = 0
    for pred in preds:
        if pred.ok:
            if not args.quiet:
                print(json.dumps(pred.to_dict()) if args.json else _format(pred))
        else:
            failed += 1
            print(f"error: {pred.path}: {pred.error}", file=sys.stderr)
    if args.embeddings:
        good = [p for p in preds if p.ok and p.embedding is not None]
        out = Path(args.embeddings)
        out.parent.mkdir(parents=True, exist_ok=True)
        dim = good[0].embedding.shape[-1] if good else 0
        np.save(out, np.stack([p.embedding for p in good]) if good else np.zeros((0, dim), np.float32))
        names = out.with_name(out.name.removesuffix(".npy") + ".files.txt")
        names.write_text("".join(p.path + "\n" for p in good), encoding="utf-8")
        print(f"saved {len(good)} embeddings to {out} (file names: {names})", file=sys.stderr)
    if truth:
        scored = [p for p in preds if p.ok and p.path in truth]
        correct = sum(p.top[0][1] == truth[p.path] for p in scored)
        acc = correct / len(scored) if scored else float("nan")
        print(f"{args.model} over {args.protocol} at {clf.url}: accuracy "
              f"{acc:.2%} ({correct}/{len(scored)}) on the {args.split} split of {args.data_path}")
    if failed:
        print(f"{failed} of {len(preds)} image(s) failed", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
