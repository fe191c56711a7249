"""The one way this project talks to a Triton server, over HTTP or gRPC.

Every client in the project (dinov2_triton.client.classifier, dinov2_triton.qa.parity,
dinov2_triton.bench.perf_analyzer, dinov2_triton.pipeline.bench_stage, the local-server handle) goes
through :func:`connect`; no other
module creates a ``tritonclient`` client. One place therefore decides:

* **the API key**: the local server (serve/local_server.py) and the container
  (serve/container.py) restrict the model-repository API (index, load, unload)
  to requests carrying ``triton-api-key: <key>``. Over gRPC Triton reads that
  header from the metadata key ``triton-grpc-protocol-triton-api-key``: the
  prefix is easy to forget and then every restricted call fails with
  UNAVAILABLE. :func:`headers_for` adds it; a connection sends the headers on
  every call;
* **one model-config shape** for both protocols (:func:`normalise_config`):
  HTTP answers JSON with numbers, gRPC a protobuf whose JSON form writes
  int64 as strings; both become the same dict;
* **typed, one-line errors**: :class:`ServerUnreachable` (nothing answers),
  :class:`ModelNotReady`, :class:`RequestError` (the server refused or failed
  one request) with its subclasses :class:`AccessDenied` (a restricted API
  without the right key) and :class:`Overloaded` (UNAVAILABLE / HTTP 503:
  the server is up but sheds load; worth a retry later).

``tritonclient`` is imported when a connection is made, not at import time.

Usage::

    from dinov2_triton.serve.triton_access import connect, read_api_key

    with connect("localhost:8001", "grpc", api_key=read_api_key(file="logs/triton.api_key")) as conn:
        conn.check_live()
        print(conn.ready_models(), conn.model_config("dinov2")["max_batch_size"])
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

#: HTTP header that carries the API key (the name the server is started with)
API_KEY_HEADER = "triton-api-key"
#: Triton reads a restricted gRPC protocol's header from metadata with this prefix
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
GRPC_API_KEY_HEADER = GRPC_HEADER_PREFIX + API_KEY_HEADER
#: environment variable read when neither a key nor a key file is given
API_KEY_ENV = "TRITON_API_KEY"
PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
SERVE_HINT = "is the server running? dinov2-triton serve start"
KEY_HINT = ("pass the server's API key (--api-key-file; the local server writes it next to its "
            "log, e.g. logs/triton.api_key)")


# --------------------------------------------------------------------------- API key
def read_api_key(value: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """The API key: ``value``, else the content of ``file``, else $TRITON_API_KEY;
    None when there is none. An unreadable or empty file raises ValueError
    naming it."""
    if value and file:
        raise ValueError("give the API key or the file that holds it, not both")
    if value:
        return value.strip()
    if file:
        path = Path(file)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"API key file {path}: cannot read ({exc.strerror or exc})") from None
        if not key:
            raise ValueError(f"API key file {path}: is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def headers_for(protocol: str, api_key: str | None) -> dict[str, str]:
    """HTTP headers (``protocol="http"``) or gRPC metadata (``"grpc"``, with the
    ``triton-grpc-protocol-`` prefix) that carry ``api_key``; {} without a key."""
    _check_protocol(protocol)
    if not api_key:
        return {}
    return {GRPC_API_KEY_HEADER if protocol == "grpc" else API_KEY_HEADER: api_key}


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: choose grpc or http")


# --------------------------------------------------------------------------- errors
class TritonError(RuntimeError):
    """A one-line, user-facing failure of a Triton call."""


class ServerUnreachable(TritonError):
    """Nothing answers at the URL (or it does not speak Triton's protocol)."""


class ModelNotReady(TritonError):
    """The model is unknown to the server or not loaded."""


class RequestError(TritonError):
    """The server refused or failed one request; the message is the server's."""


class AccessDenied(RequestError):
    """A restricted API (the model repository) called without the right key."""


class Overloaded(RequestError):
    """The server is up but refused the request for now (gRPC UNAVAILABLE, HTTP 503)."""


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def server_message(exc: BaseException) -> str:
    """The server's words for a failed call, on one line."""
    from tritonclient.utils import InferenceServerException

    if isinstance(exc, InferenceServerException):
        return one_line(exc.message() or exc)
    return one_line(f"{type(exc).__name__}: {exc}")


# gRPC reports a connection failure as UNAVAILABLE too; these words tell it
# apart from a server that answered UNAVAILABLE itself (overload, shutdown).
_CONNECT_WORDS = ("failed to connect", "connection refused", "connect failed", "socket closed",
                  "dns resolution failed", "connection reset", "network is unreachable",
                  "no route to host", "name resolution")


def classify_error(exc: BaseException, url: str, *, model: str | None = None) -> TritonError:
    """The typed error for an exception raised by a tritonclient call."""
    from tritonclient.utils import InferenceServerException

    msg = server_message(exc)
    where = f"model '{model}': " if model else ""
    unreachable = ServerUnreachable(f"cannot reach Triton at {url} ({SERVE_HINT}): {msg}")
    if isinstance(exc, TritonError):
        return exc
    if not isinstance(exc, InferenceServerException):
        # socket errors of geventhttpclient (refused, reset, DNS), timeouts
        if isinstance(exc, (OSError, ConnectionError, TimeoutError)):
            return unreachable
        return RequestError(f"{where}{msg}")
    status = str(exc.status() or "")
    low = msg.lower()
    if status == "403" or "restricted" in low:
        return AccessDenied(f"{where}refused by Triton at {url}: {msg}; {KEY_HINT}")
    if status.endswith("DEADLINE_EXCEEDED"):
        return unreachable
    if status.endswith("UNAVAILABLE"):
        return unreachable if any(w in low for w in _CONNECT_WORDS) else Overloaded(f"{where}{msg}")
    if status == "503":
        return Overloaded(f"{where}{msg}")
    if status.endswith("NOT_FOUND") or status == "404":
        if "unknown model" in low:
            return ModelNotReady(f"{where}{msg}")
    return RequestError(f"{where}{msg}")


# --------------------------------------------------------------------------- model config
def normalise_config(config: Any) -> dict[str, Any]:
    """One dict shape for a model config, whichever protocol returned it.

    ``config``: a ``ModelConfig`` protobuf (gRPC), or the JSON dict HTTP
    returns. Result: the protobuf's JSON form with the config.pbtxt field
    names, int64 fields as ints, and ``name, platform, backend,
    max_batch_size, input, output, parameters`` always present (each input
    and output with ``name, data_type, dims``)."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    if isinstance(config, Mapping):
        msg = json_format.ParseDict(json.loads(json.dumps(config)), model_config_pb2.ModelConfig(),
                                    ignore_unknown_fields=True)
    else:
        msg = config
    out = _ints(json_format.MessageToDict(msg, preserving_proto_field_name=True), msg.DESCRIPTOR)
    for key, default in (("name", ""), ("platform", ""), ("backend", ""), ("max_batch_size", 0),
                         ("input", []), ("output", []), ("parameters", {})):
        out.setdefault(key, default)
    for tensor in out["input"] + out["output"]:
        tensor.setdefault("data_type", "TYPE_INVALID")
        tensor.setdefault("dims", [])
    return out


def _ints(data: dict[str, Any], descriptor) -> dict[str, Any]:
    """Turn the strings protobuf's JSON mapping writes for 64-bit integers back into ints."""
    from google.protobuf.descriptor import FieldDescriptor as F

    int64 = (F.CPPTYPE_INT64, F.CPPTYPE_UINT64)

    def value(field, v):
        if field.message_type is not None:
            return _ints(v, field.message_type) if isinstance(v, dict) else v
        if field.cpp_type in int64:
            return int(v)
        return v

    for key, v in list(data.items()):
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        entry = field.message_type
        if entry is not None and entry.GetOptions().map_entry:
            vfield = entry.fields_by_name["value"]
            data[key] = {k: value(vfield, x) for k, x in v.items()}
        elif field.label == F.LABEL_REPEATED:
            data[key] = [value(field, x) for x in v]
        else:
            data[key] = value(field, v)
    return data


def config_parameter(config: Mapping[str, Any], name: str) -> str | None:
    """A ``parameters { key: name value: { string_value: ... } }`` entry of a normalised config."""
    entry = (config.get("parameters") or {}).get(name)
    return entry.get("string_value") if isinstance(entry, Mapping) else None


# --------------------------------------------------------------------------- connection
class TritonConnection:
    """A client for one server and protocol that always sends the API-key
    headers and raises the typed errors above. Made by :func:`connect`."""

    def __init__(self, url: str | None, protocol: str = "grpc", *, api_key: str | None = None,
                 timeout_s: float = 60.0, concurrency: int = 1, verbose: bool = False) -> None:
        _check_protocol(protocol)
        self.url = url or DEFAULT_URLS[protocol]
        if "://" in self.url:
            raise ValueError(f"url {self.url!r}: give host:port without a scheme (e.g. localhost:8001)")
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.api_key = api_key or None
        self.headers = headers_for(protocol, self.api_key)
        if protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        try:
            if protocol == "grpc":
                self._client = module.InferenceServerClient(self.url, verbose=verbose)
            else:
                # geventhttpclient: `concurrency` connections for async requests
                self._client = module.InferenceServerClient(
                    self.url, verbose=verbose, concurrency=max(1, int(concurrency)),
                    connection_timeout=min(self.timeout_s, 10.0), network_timeout=self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - a malformed URL, mostly
            raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): "
                                    f"{server_message(exc)}") from None

    # ----------------------------------------------------------------- plumbing
    def _call(self, fn: Callable[..., Any], *args: Any, model: str | None = None,
              timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Call a tritonclient method with the headers (and, over gRPC, a
        deadline); any failure becomes a typed error."""
        kwargs["headers"] = self.headers or None
        if self.protocol == "grpc":
            kwargs["client_timeout"] = timeout_s or self.timeout_s
        try:
            return fn(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - tritonclient raises several types
            raise classify_error(exc, self.url, model=model) from None

    def _control_timeout(self) -> float:
        return min(self.timeout_s, 10.0)

    # ----------------------------------------------------------------- health
    def is_live(self) -> bool:
        return bool(self._call(self._client.is_server_live, timeout_s=self._control_timeout()))

    def is_ready(self) -> bool:
        return bool(self._call(self._client.is_server_ready, timeout_s=self._control_timeout()))

    def check_live(self) -> None:
        """Raise ServerUnreachable unless a live Triton answers at the URL."""
        try:
            live = self.is_live()
        except ServerUnreachable:
            raise
        except TritonError as exc:  # something else listens on the port
            raise ServerUnreachable(f"cannot reach Triton at {self.url} ({SERVE_HINT}): {exc}") from None
        if not live:
            raise ServerUnreachable(f"Triton at {self.url} is not live ({SERVE_HINT})")

    def server_metadata(self) -> dict[str, Any]:
        """``{"name", "version", "extensions"}`` of the server."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        md = self._call(self._client.get_server_metadata, timeout_s=self._control_timeout(), **kwargs)
        return {"name": md.get("name"), "version": md.get("version"),
                "extensions": list(md.get("extensions") or [])}

    # ----------------------------------------------------------------- models
    def model_ready(self, name: str) -> bool:
        """Is ``name`` loaded and ready? False for a model the server does not know."""
        try:
            return bool(self._call(self._client.is_model_ready, name, model=name,
                                   timeout_s=self._control_timeout()))
        except ServerUnreachable:
            raise
        except TritonError:  # an unknown model can raise instead of answering False
            return False

    def repository_index(self) -> list[dict[str, Any]]:
        """Every model of the repository: ``[{"name", "version", "state", "reason"}]``
        (state "" for a model never loaded). Restricted on the local server:
        AccessDenied without the API key."""
        if self.protocol == "grpc":
            index = self._call(self._client.get_model_repository_index, as_json=True).get("models", [])
        else:
            index = self._call(self._client.get_model_repository_index)
        return [{"name": m.get("name", ""), "version": str(m.get("version", "")),
                 "state": m.get("state", ""), "reason": m.get("reason", "")} for m in index or []]

    def ready_models(self, candidates: Sequence[str] | None = None) -> list[str]:
        """READY models: ``candidates`` that are ready (in their order), or,
        without candidates, the sorted READY entries of the repository index
        (which may need the API key: AccessDenied)."""
        if candidates is not None:
            return [name for name in candidates if self.model_ready(name)]
        return sorted({m["name"] for m in self.repository_index() if m["state"] == "READY"})

    def model_config(self, name: str) -> dict[str, Any]:
        """The served configuration of a READY model in the shape of
        :func:`normalise_config`; ModelNotReady when it is not ready."""
        if not self.model_ready(name):
            raise ModelNotReady(f"model '{name}' is not ready on Triton at {self.url} (unknown, or "
                                f"it failed to load: see the server log)")
        try:
            if self.protocol == "grpc":
                cfg = self._call(self._client.get_model_config, name, model=name,
                                 timeout_s=self._control_timeout()).config
            else:
                cfg = self._call(self._client.get_model_config, name, model=name)
        except (ServerUnreachable, AccessDenied):
            raise
        except TritonError as exc:
            raise ModelNotReady(f"model '{name}': cannot read its configuration: {exc}") from None
        return normalise_config(cfg)

    def load_model(self, name: str, *, config: Mapping[str, Any] | str | None = None,
                   files: Mapping[str, bytes] | None = None) -> None:
        """Load (or reload) ``name`` through the model-repository API (needs the
        API key on the local server). ``config``: a model config (JSON text or
        a dict in config.pbtxt field names) that overrides the repository's;
        ``files``: ``{"1/model.onnx": bytes, ...}`` forming an override model
        folder (Triton then needs ``config`` too)."""
        if files and config is None:
            raise ValueError(f"load_model({name!r}): files need a config (Triton's rule for "
                             f"override model folders)")
        kwargs: dict[str, Any] = {}
        if config is not None:
            kwargs["config"] = config if isinstance(config, str) else json.dumps(dict(config))
        if files:
            kwargs["files"] = {(p if p.startswith("file:") else f"file:{p}"): bytes(b)
                               for p, b in files.items()}
        self._call(self._client.load_model, name, model=name, **kwargs)

    def unload_model(self, name: str, *, unload_dependents: bool = False) -> None:
        """Unload ``name`` (model-repository API: needs the API key on the local server)."""
        self._call(self._client.unload_model, name, model=name, unload_dependents=unload_dependents)

    def inference_statistics(self, name: str) -> dict[str, Any]:
        """Triton's statistics of ``name`` (``inference_count``, ``execution_count``, ...) as ints."""
        kwargs = {"as_json": True} if self.protocol == "grpc" else {}
        stats = self._call(self._client.get_inference_statistics, name, model=name, **kwargs)
        entry = (stats.get("model_stats") or [{}])[0]
        return {k: (int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v)
                for k, v in entry.items()}

    # ----------------------------------------------------------------- inference
    def bytes_input(self, name: str, blobs: Sequence[bytes]):
        """A BYTES input [N,1]: one encoded file per row."""
        import numpy as np

        arr = np.empty((len(blobs), 1), dtype=object)
        for i, b in enumerate(blobs):
            arr[i, 0] = bytes(b)
        inp = self.module.InferInput(name, list(arr.shape), "BYTES")
        inp.set_data_from_numpy(arr)
        return inp

    def tensor_input(self, name: str, array, datatype: str = "FP32"):
        import numpy as np
        from tritonclient.utils import triton_to_np_dtype

        arr = np.ascontiguousarray(array, dtype=triton_to_np_dtype(datatype))
        inp = self.module.InferInput(name, list(arr.shape), datatype)
        inp.set_data_from_numpy(arr)
        return inp

    def requested_output(self, name: str, class_count: int = 0):
        """An output to return (``class_count=k``: Triton's top-k classification strings)."""
        if self.protocol == "http":
            return self.module.InferRequestedOutput(name, binary_data=True, class_count=class_count)
        return self.module.InferRequestedOutput(name, class_count=class_count)

    def infer(self, model: str, inputs: list, outputs: list | None = None) -> Any:
        """One inference request; typed errors naming ``model``."""
        return self._call(self._client.infer, model, inputs, outputs=outputs, model=model)

    def infer_many(self, model: str, jobs: Sequence[tuple[list, list]], concurrency: int = 1
                   ) -> list[Any]:
        """Send every ``(inputs, outputs)`` job with at most ``concurrency`` in
        flight; return per job the InferResult or its typed error
        (RequestError, Overloaded, ...). ServerUnreachable is raised at once:
        there is no point sending the rest."""
        results: list[Any] = [None] * len(jobs)
        if concurrency <= 1 or len(jobs) <= 1:
            for i, (inputs, outputs) in enumerate(jobs):
                try:
                    results[i] = self.infer(model, inputs, outputs)
                except ServerUnreachable:
                    raise
                except TritonError as exc:
                    results[i] = exc
            return results
        if self.protocol == "http":
            for start in range(0, len(jobs), concurrency):
                window = range(start, min(start + concurrency, len(jobs)))
                pending = {i: self._call(self._client.async_infer, model, jobs[i][0],
                                         outputs=jobs[i][1], model=model) for i in window}
                for i, request in pending.items():
                    try:
                        results[i] = request.get_result()
                    except Exception as exc:  # noqa: BLE001 - per-request verdict
                        results[i] = classify_error(exc, self.url, model=model)
        else:
            slots = threading.BoundedSemaphore(concurrency)
            done = threading.Event()
            remaining = [len(jobs)]
            lock = threading.Lock()

            def callback(i: int, result: Any, error: Any) -> None:
                results[i] = classify_error(error, self.url, model=model) if error is not None else result
                slots.release()
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            for i, (inputs, outputs) in enumerate(jobs):
                slots.acquire()
                self._call(self._client.async_infer, model, inputs,
                           lambda result, error, i=i: callback(i, result, error),
                           outputs=outputs, model=model)
            done.wait()
        for r in results:
            if isinstance(r, ServerUnreachable):
                raise r
        return results

    # ----------------------------------------------------------------- lifetime
    def close(self) -> None:
        client = getattr(self, "_client", None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken channel must not mask errors
                pass
            self._client = None

    def __enter__(self) -> "TritonConnection":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def connect(url: str | None, protocol: str = "grpc", *, api_key: str | None = None,
            timeout_s: float = 60.0, concurrency: int = 1, verbose: bool = False) -> TritonConnection:
    """A :class:`TritonConnection` to ``url`` (``host:port``, no scheme; None:
    the protocol's default port on localhost). Nothing is sent yet: call
    ``check_live()`` to fail early with ServerUnreachable."""
    return TritonConnection(url, protocol, api_key=api_key, timeout_s=timeout_s,
                            concurrency=concurrency, verbose=verbose)
