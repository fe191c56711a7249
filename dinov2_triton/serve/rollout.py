"""Zero-downtime rollout and rollback of a served model.

``reload``: after the export stage publishes a new version folder into the
live repository, :func:`reload_model` asks the server to load the model
again through the (key-protected) model-repository API. Triton loads the new
version next to the old one, switches traffic when it is ready and unloads
the old one once its in-flight requests are answered: no request fails
(measured under load by tests/test_rollout.py and dinov2_triton.qa.reliability).
Responses carry ``model_version``, so clients see the switch.

``rollback``: the export keeps the previous versions on disk
(``--keep-versions``). :func:`rollback_model` loads the model with a config
override whose ``version_policy`` is ``specific: [previous]``: the same
zero-downtime switch, back. The override lasts until the next ``reload``,
which sends config.pbtxt itself (Triton keeps an override across a plain
load of an unchanged model folder).

The ensemble ``dinov2`` calls its classifier with version -1 (the newest
*loaded* version), so it follows a rollout or a rollback of its classifier
without being reloaded itself.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from dinov2_triton.serve.triton_access import TritonConnection, TritonError, connect


class RolloutError(RuntimeError):
    """A reload or rollback that cannot be done or did not take effect; one line."""


@dataclass(frozen=True)
class Rollout:
    """What one reload or rollback did: READY versions before and after."""

    model: str
    action: str              # "reload" | "rollback"
    before: tuple[int, ...]
    after: tuple[int, ...]
    seconds: float

    def describe(self) -> str:
        def fmt(versions: tuple[int, ...]) -> str:
            return ",".join(map(str, versions)) or "none"

        return (f"{self.model}: {self.action}: serving version {fmt(self.after)} (was {fmt(self.before)}), "
                f"{self.seconds:.1f} s")


def served_versions(conn: TritonConnection, model: str) -> tuple[int, ...]:
    """Versions of ``model`` the server has READY (repository index: needs the API key)."""
    return tuple(sorted(int(m["version"]) for m in conn.repository_index()
                        if m["name"] == model and m["state"] == "READY" and m["version"].isdigit()))


def disk_versions(repository: str | Path, model: str) -> tuple[int, ...]:
    """Numbered version folders of ``model`` in a local repository."""
    folder = Path(repository) / model
    if not folder.is_dir():
        raise RolloutError(f"{folder}: no such model folder in the repository")
    return tuple(sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()))


def _load(conn: TritonConnection, model: str, action: str, config: dict[str, Any] | None,
          expect: int | None) -> Rollout:
    before = served_versions(conn, model)
    t0 = time.perf_counter()
    try:
        conn.load_model(model, config=json.dumps(config) if config is not None else None)
    except TritonError as exc:
        raise RolloutError(f"{model}: {action} failed, the server keeps serving version(s) "
                           f"{','.join(map(str, before)) or 'none'}: {exc}") from None
    after = served_versions(conn, model)
    result = Rollout(model, action, before, after, time.perf_counter() - t0)
    if expect is not None and expect not in after:
        raise RolloutError(f"{model}: {action} loaded, but version {expect} is not READY "
                           f"(READY: {','.join(map(str, after)) or 'none'}); see the server log")
    return result


def repository_config(repository: str | Path, model: str) -> dict[str, Any]:
    """``<repository>/<model>/config.pbtxt`` as the JSON dict a load override takes."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    path = Path(repository) / model / "config.pbtxt"
    try:
        message = text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())
    except (OSError, text_format.ParseError) as exc:
        raise RolloutError(f"{path}: cannot read the model config ({exc})") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def reload_model(conn: TritonConnection, model: str, *, repository: str | Path | None = None) -> Rollout:
    """Load ``model`` again so that its config.pbtxt (and so its newest version
    folder) takes the traffic.

    With ``repository`` (the local folder the server reads) the file's config
    is sent along and the newest folder there must end up READY. Why send it:
    Triton 2.51 keeps serving the config of the last override (a rollback,
    or a changed limit) when a plain load finds the model folder unchanged
    (measured: tests/test_rollout.py). Without ``repository`` a plain load is
    sent; when the served config is a rollback (a ``specific`` version
    policy) it is replaced by "latest 1"."""
    if repository is not None:
        return _load(conn, model, "reload", repository_config(repository, model),
                     disk_versions(repository, model)[-1])
    served = conn.model_config(model)
    if "specific" in (served.get("version_policy") or {}):
        served["version_policy"] = {"latest": {"num_versions": 1}}
        return _load(conn, model, "reload", served, None)
    return _load(conn, model, "reload", None, None)


def rollback_model(conn: TritonConnection, model: str, *, repository: str | Path | None = None,
                   version: int | None = None) -> Rollout:
    """Serve an older version of ``model``: ``version``, or the newest version
    kept in ``repository`` below the one served now. The served config is
    loaded back as an override with ``version_policy {specific [version]}``."""
    current = served_versions(conn, model)
    if not current:
        raise RolloutError(f"{model}: not loaded on the server, nothing to roll back")
    if version is None:
        if repository is None:
            raise RolloutError(f"{model}: give --version N, or --repository so the previous "
                               f"version can be found on disk")
        older = [v for v in disk_versions(repository, model) if v < max(current)]
        if not older:
            raise RolloutError(f"{model}: no version older than {max(current)} is kept in "
                               f"{Path(repository) / model} (export --keep-versions)")
        version = older[-1]
    elif repository is not None and version not in disk_versions(repository, model):
        raise RolloutError(f"{model}: version {version} is not in {Path(repository) / model}")
    config = conn.model_config(model)
    config["version_policy"] = {"specific": {"versions": [int(version)]}}
    return _load(conn, model, "rollback", config, int(version))


def published_models(manifest) -> list[str]:
    """Model names an ExportManifest says this run published, in load order:
    the classifier variants, then dinov2_preprocess, then the ensemble."""
    names = [v.model_name for v in manifest.published().values()]
    for entry in (manifest.preprocess, manifest.ensemble):
        if entry is not None and entry.status == "OK" and entry.model_name:
            names.append(entry.model_name)
    return names


def reload_models(url: str, models: Sequence[str] | Iterable[str], *, api_key: str | None,
                  protocol: str = "http", repository: str | Path | None = None) -> list[str]:
    """Reload each of ``models`` on the server at ``url``; one line per model.
    Stops at the first failure (RolloutError)."""
    lines = []
    with connect(url, protocol, api_key=api_key, timeout_s=300.0) as conn:
        conn.check_live()
        for model in models:
            lines.append(reload_model(conn, model, repository=repository).describe())
    return lines


@dataclass(frozen=True)
class Target:
    """Where a reload/rollback goes: a server URL, its API key, and the
    repository folder it reads (None when unknown, e.g. a remote server)."""

    url: str
    protocol: str
    api_key: str | None
    repository: Path | None


def resolve_target(*, url: str | None, protocol: str, api_key_file: str | None, pid_file: str,
                   repository: str | None) -> Target:
    """``url`` (+ ``api_key_file`` or $TRITON_API_KEY) when given, else the local
    server recorded in ``pid_file`` (its URL, key and repository)."""
    from dinov2_triton.serve.local_server import handle_from_pid_file
    from dinov2_triton.serve.triton_access import read_api_key

    if url:
        return Target(url, protocol, read_api_key(file=api_key_file),
                      Path(repository) if repository else None)
    handle = handle_from_pid_file(pid_file)
    if handle is None:
        raise RolloutError(f"no local server recorded in {pid_file}; start one (dinov2-triton serve "
                           f"start) or give --url HOST:PORT and --api-key-file")
    key = read_api_key(file=api_key_file) if api_key_file else (handle.api_key or None)
    return Target(handle.url(protocol), protocol, key, Path(repository) if repository else handle.repository)
