"""Classify images with a DINOv2 model served by Triton (HTTP or gRPC).

Two ways in, both following the serving contract (docs/architecture.md):

- the ensemble ``dinov2``: input ``image`` BYTES [-1,1], i.e. the encoded
  file bytes; the server decodes and preprocesses them (``dinov2_preprocess``);
- a bare variant (``dinov2_onnx``, ``dinov2_trt_fp16``, ...): input
  ``pixel_values`` FP32 [-1,3,H,W]; the client preprocesses with the stored
  record (``variant_preprocess="client"``, the default, via
  ``dinov2_triton.core.preprocessing.preprocess_source``) or asks the server's
  preprocessing model for the tensor first (``variant_preprocess="server"``).

The classifier reads the model's configuration from the server to learn
which of the two it talks to and its ``max_batch_size``: larger inputs are
split into requests no bigger than that. Top-k labels come from Triton's
classification extension (``class_count=k`` on ``logits`` ->
``"score:index:label"`` strings). A batch the server rejects is retried image
by image, so one bad file gets its own error and the others still get answers.

All server calls go through :mod:`dinov2_triton.serve.triton_access` (API key, one config
shape, typed one-line errors: ServerUnreachable, ModelNotReady, RequestError).
A request the server sheds (Overloaded: its queue policy answered gRPC
UNAVAILABLE / HTTP 503) is sent again up to ``retries`` times after a
bounded, jittered exponential back-off (:class:`Backoff`); ``stats`` counts
requests sent, shed answers and retries, so callers report shed load apart
from failures.

Library use::

    with TritonClassifier("localhost:8001", "grpc", "dinov2") as clf:
        for p in clf.classify_paths(["photos/"], top_k=5):
            print(p.path, p.top if p.ok else p.error)
        logits, embedding = clf.infer_images([open("a.jpg", "rb").read()])
"""
from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from dinov2_triton.client.inputs import find_images
from dinov2_triton.export.triton_config import ENSEMBLE_MODEL, PREPROCESS_MODEL
from dinov2_triton.export.triton_config import INPUT as PIXEL_INPUT
from dinov2_triton.serve.triton_access import (
    AccessDenied,
    ModelNotReady,
    Overloaded,
    RequestError,
    TritonError,
    connect,
    one_line,
)

DEFAULT_MODEL = ENSEMBLE_MODEL
DEFAULT_PREPROCESS_MODEL = PREPROCESS_MODEL
LOGITS = "logits"
EMBEDDING = "embedding"


# --------------------------------------------------------------------------- results
@dataclass
class Prediction:
    """The answer for one image: top-k (label, class index, logit) or an error."""

    path: str
    top: list[tuple[str, int, float]] = field(default_factory=list)
    embedding: np.ndarray | None = None
    error: str | None = None
    model_version: str | None = None   # the version that answered (Triton's response field)

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
            if self.model_version is not None:
                out["model_version"] = self.model_version
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


def response_model_version(result: Any) -> str | None:
    """``model_version`` of an InferResult (gRPC protobuf or HTTP JSON response)."""
    response = result.get_response()
    version = response.get("model_version") if isinstance(response, Mapping) else getattr(
        response, "model_version", None)
    return str(version) if version not in (None, "") else None


@dataclass(frozen=True)
class Backoff:
    """Retry policy for shed requests: at most ``retries`` more attempts, the
    n-th after a random wait in [0, min(cap_s, base_s * 2**n)] ("full jitter":
    clients shed together do not come back together)."""

    retries: int = 0
    base_s: float = 0.05
    cap_s: float = 2.0

    def __post_init__(self) -> None:
        if self.retries < 0 or self.base_s < 0 or self.cap_s < 0:
            raise ValueError(f"retries={self.retries}, base_s={self.base_s}, cap_s={self.cap_s}: "
                             f"must be >= 0")

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0.0, min(self.cap_s, self.base_s * (2 ** attempt)))


# --------------------------------------------------------------------------- config helpers
def _dims(tensor: Mapping[str, Any]) -> list[int]:
    return [int(d) for d in tensor.get("dims", [])]


def _data_type(tensor: Mapping[str, Any]) -> str:
    return str(tensor.get("data_type", "TYPE_INVALID"))


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
    url, protocol : ``host:port`` (no scheme; None: localhost and the
        protocol's default port) and ``"grpc"`` or ``"http"``.
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
    api_key : the server's API key; lets error messages list every ready
        model through the (restricted) repository index.
    timeout_s : per-request client timeout.
    retries : extra attempts for a request the server shed (Overloaded), with
        :class:`Backoff` (``backoff`` overrides the whole policy); 0: none.
    """

    def __init__(self, url: str | None = None, protocol: str = "grpc",
                 model: str | None = DEFAULT_MODEL, *,
                 preprocessing=None, variant_preprocess: str = "client",
                 preprocess_model: str = DEFAULT_PREPROCESS_MODEL,
                 labels: Sequence[str] | None = None, batch_size: int | None = None,
                 concurrency: int = 1, api_key: str | None = None,
                 timeout_s: float = 120.0, verbose: bool = False, retries: int = 0,
                 backoff: Backoff | None = None, seed: int | None = None) -> None:
        if variant_preprocess not in ("client", "server"):
            raise ValueError(f"variant_preprocess {variant_preprocess!r}: choose client or server")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if concurrency < 1:
            raise ValueError(f"concurrency={concurrency}: must be >= 1")
        self.connection = connect(url, protocol, api_key=api_key, timeout_s=timeout_s,
                                  concurrency=concurrency, verbose=verbose)
        self.url, self.protocol = self.connection.url, protocol
        self.model = model
        self.preprocessing = preprocessing
        self.variant_preprocess = variant_preprocess
        self.preprocess_model = preprocess_model
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.backoff = backoff or Backoff(retries=retries)
        self._rng = random.Random(seed)
        #: requests sent (retries included), shed answers (Overloaded), retries made
        self.stats = {"requests": 0, "shed": 0, "retries": 0}
        self._labels = list(labels) if labels is not None else None
        self._config: dict[str, Any] = {}
        self.kind: str | None = None
        self._pre_config = None
        self.batch_size = 1
        try:
            self.connection.check_live()
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
    def ready_models(self) -> tuple[list[str], str]:
        """(names of READY models, how they were found). Without the API key
        the local server refuses the repository index: then none are listed
        and the second item says how to list them."""
        try:
            return self.connection.ready_models(), "repository index"
        except AccessDenied:
            return [], ("not listed: the repository index needs the server's API key "
                        "(--api-key-file)")

    def is_ready(self, name: str) -> bool:
        return self.connection.model_ready(name)

    def _model_config(self, name: str) -> dict[str, Any]:
        try:
            return self.connection.model_config(name)
        except ModelNotReady as exc:
            names, how = self.ready_models()
            listing = ", ".join(names) if names else "none"
            raise ModelNotReady(f"{exc}; ready models: {listing} ({how})") from None

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
        return self.connection.bytes_input(name, blobs)

    def _pixel_input(self, pixels: np.ndarray):
        return self.connection.tensor_input(PIXEL_INPUT, np.asarray(pixels, dtype=np.float32))

    def _requested(self, name: str, class_count: int = 0):
        return self.connection.requested_output(name, class_count=class_count)

    def _infer_many(self, model: str, jobs: Sequence[tuple[list, list]]) -> list[Any]:
        """Per job an InferResult or its typed error (ServerUnreachable is raised).
        Jobs the server shed are sent again after the back-off, at most
        ``backoff.retries`` times; a job still shed then keeps its Overloaded."""
        results = self.connection.infer_many(model, jobs, self.concurrency)
        self.stats["requests"] += len(jobs)
        for attempt in range(self.backoff.retries + 1):
            shed = [i for i, r in enumerate(results) if isinstance(r, Overloaded)]
            self.stats["shed"] += len(shed)
            if not shed or attempt == self.backoff.retries:
                break
            time.sleep(self.backoff.delay(attempt, self._rng))
            again = self.connection.infer_many(model, [jobs[i] for i in shed], self.concurrency)
            self.stats["requests"] += len(shed)
            self.stats["retries"] += len(shed)
            for i, r in zip(shed, again):
                results[i] = r
        return results

    @staticmethod
    def _raise_if_error(result: Any) -> Any:
        if isinstance(result, TritonError):
            raise result
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
                parts.append(self._raise_if_error(r).as_numpy(out_name))
            return np.concatenate(parts).astype(np.float32, copy=False)
        from dinov2_triton.core.preprocessing import preprocess_source

        return np.stack([preprocess_source(bytes(b), self.preprocessing,
                                           name=(names[i] if names else None))
                         for i, b in enumerate(images)])

    def _input_name(self) -> str:
        return self._config["input"][0]["name"]

    def _collect(self, results: list[Any], embedding: bool) -> tuple[np.ndarray, np.ndarray | None]:
        results = [self._raise_if_error(r) for r in results]
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
            if isinstance(r, TritonError) and len(g) > 1 and not isinstance(r, Overloaded):
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
            from dinov2_triton.core.preprocessing import preprocess_source

            for i, (name, data) in enumerate(items):
                try:
                    tensors[i] = preprocess_source(bytes(data), self.preprocessing, name=name)
                    ok.append(i)
                except ValueError as exc:  # ImageDecodeError is a ValueError
                    preds[i].error = one_line(exc)
            return ok
        mbs = int(self._pre_config.get("max_batch_size", 0)) or 1
        pending = [list(range(len(items)))[s] for s in self._chunks(len(items), mbs)]
        while pending:
            group = pending.pop(0)
            try:
                arr = self.preprocess([items[i][1] for i in group])
            except RequestError as exc:
                if len(group) > 1 and not isinstance(exc, Overloaded):
                    pending[:0] = [[i] for i in group]  # find the culprit: one request each
                else:  # a shed request (after its retries) is no image's fault: say so for each
                    for i in group:
                        preds[i].error = str(exc)
                continue
            for j, i in enumerate(group):
                tensors[i] = arr[j]
                ok.append(i)
        return sorted(ok)

    def _fill(self, preds: list[Prediction], idx: Sequence[int], result: Any, embeddings: bool) -> None:
        if isinstance(result, TritonError):  # already "model '<name>': <the server's words>"
            for i in idx:
                preds[i].error = str(result)
            return
        rows = parse_classification(result.as_numpy(LOGITS), self._labels)
        emb = result.as_numpy(EMBEDDING) if embeddings else None
        version = response_model_version(result)
        for j, i in enumerate(idx):
            preds[i].top = rows[j]
            preds[i].model_version = version
            if emb is not None:
                preds[i].embedding = emb[j]

    def classify_paths(self, paths: Iterable[str | os.PathLike], top_k: int = 5, *,
                       embeddings: bool = False) -> list[Prediction]:
        """Classify files and folders (recursively); unreadable paths and images
        the server rejects come back as Predictions with ``error`` set."""
        files, missing = find_images(paths)
        problems = [Prediction(path, error=why) for path, why in missing]
        items, unreadable = [], []
        for f in files:
            try:
                items.append((str(f), f.read_bytes()))
            except OSError as exc:
                unreadable.append(Prediction(str(f), error=f"cannot read ({exc.strerror or exc})"))
        preds = self.classify_bytes(items, top_k, embeddings=embeddings) if items else []
        return problems + unreadable + preds

    # ----------------------------------------------------------------- lifetime
    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        conn = getattr(self, "connection", None)
        if conn is not None:
            conn.close()

    def __enter__(self) -> "TritonClassifier":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
