"""What a measurement points at, and the facts recorded beside its numbers.

The server's address (host and port, whether it runs on this machine), the
model names a repository offers, and what results.json records about the
model and the server measured: the checkpoint or the export manifest's
model facts, the manifest's verdicts, the server's metadata. Shared by the
measurement stage (``dinov2-triton bench``) and the configuration search
(``dinov2-triton tune``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dinov2_triton.export.manifest import ExportManifest

#: host names of a server on this machine (its process can be found and sampled)
LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "::1", "[::1]")


def host_port(url: str) -> tuple[str, int | None]:
    """(host, port) of ``host:port``, ``scheme://host:port/path`` or a bare host (port None)."""
    u = url.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = u.rpartition(":")
    try:
        return (host or u), int(port)
    except ValueError:
        return u, None


def default_metrics_url(url: str) -> str:
    """Triton's metrics endpoint on the host of ``url`` (its default port, 8002)."""
    host, _ = host_port(url)
    return f"{host}:8002/metrics"


def candidate_models(repository: str | os.PathLike | None, manifest: "ExportManifest | None"
                     ) -> list[str] | None:
    """Model names the repository offers: its config.pbtxt folders, plus the
    manifest's published variants, preprocess and ensemble models."""
    names: list[str] = []
    if manifest is not None:
        names += [e.model_name for e in manifest.variants.values() if e.published and e.model_name]
        for e in (manifest.preprocess, manifest.ensemble):
            if e is not None and e.status == "OK" and e.model_name:
                names.append(e.model_name)
    if repository and Path(repository).is_dir():
        names += sorted(p.parent.name for p in Path(repository).glob("*/config.pbtxt"))
    return list(dict.fromkeys(names)) or None


def export_summary(manifest: "ExportManifest | None") -> dict[str, Any] | None:
    """The manifest's verdicts (dinov2_triton.bench.results.ExportSummary)."""
    if manifest is None:
        return None
    keep = {"model_name", "platform", "precision", "parent", "gate", "status", "reason", "published", "version",
            "size_bytes", "headline", "gate_passed", "gate_failures", "slower_than_parent", "speed",
            "arithmetic"}
    out = manifest.model_dump(include={"run_id", "created", "weights_source", "img_size", "eval_set", "reference",
                                       "versions", "preprocess", "ensemble"})
    # exclude_none: a SKIPPED variant has no headline/speed; the section's
    # defaults stand for "not measured" (None would fail its types)
    out["variants"] = {n: e.model_dump(include=keep, exclude_none=True) for n, e in manifest.variants.items()}
    return out


def manifest_model_info(manifest: "ExportManifest") -> dict[str, Any]:
    """dinov2_triton.bench.results.ModelInfo from the export manifest (no --model-path)."""
    return {"checkpoint": manifest.source_checkpoint.path, "arch": manifest.arch, "img_size": manifest.img_size,
            "num_classes": manifest.num_classes, "class_names": list(manifest.class_names),
            "weights_source": manifest.weights_source, "pretrained": manifest.pretrained,
            "preprocessing": manifest.preprocessing}


def checkpoint_model_info(model_path: Path) -> dict[str, Any]:
    """dinov2_triton.bench.results.ModelInfo from the checkpoint itself."""
    from dinov2_triton.train.checkpoint import read_checkpoint

    rec = read_checkpoint(model_path)
    return {"checkpoint": str(model_path), "arch": rec.arch, "img_size": rec.image_size,
            "num_classes": rec.num_classes, "class_names": list(rec.class_names),
            "weights_source": rec.weights_source, "pretrained": rec.pretrained,
            "preprocessing": rec.preprocessing.to_dict()}


def server_metadata(url: str, protocol: str, api_key: str | None) -> dict[str, Any]:
    """The server's name/version/extensions for the report, or {"error": ...}."""
    from dinov2_triton.serve.triton_access import TritonError, connect

    try:
        with connect(url, protocol, api_key=api_key, timeout_s=10.0) as conn:
            return conn.server_metadata()
    except TritonError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
