"""export_manifest.json: what one export run produced, from what, with which
versions, and the numbers that justify each published variant (STYLE 7).

Written atomically into the repository after every run (also when variants
failed), so the report and serving stages read one file."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

from export.repository import atomic_write_text

MANIFEST_FILE = "export_manifest.json"
FORMAT_VERSION = 1
STATUSES = ("OK", "FAILED", "SKIPPED", "GATE_FAILED")


def jsonable(obj: Any) -> Any:
    """Plain JSON: numpy scalars/arrays to Python, Paths to str, NaN/inf to
    the strings "nan"/"inf"/"-inf" (strict JSON has no such numbers)."""
    import numpy as np

    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_manifest(manifest: Mapping[str, Any], path: str | os.PathLike) -> Path:
    text = json.dumps(jsonable(manifest), indent=2, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no export manifest (run python -m export first)") from None


def summary_rows(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (plus the eager baseline) for the printed table."""
    rows = []
    eager = (manifest.get("baseline") or {}).get("benchmark")
    if eager:
        rows.append({"variant": "eager (pytorch)", "status": "baseline", "model": "-", "version": "-",
                     "size_mb": "-", "top1": "100%", "cos": "1", "acc": _fmt_acc(manifest),
                     "lat": f"{eager['batch1']['median_ms']:.2f}",
                     "thr": _thr(eager), "secs": "-", "note": ""})
    for name, v in (manifest.get("variants") or {}).items():
        h = v.get("headline") or {}
        bench = v.get("benchmark")
        notes = []
        if v.get("status") in ("SKIPPED", "FAILED"):
            notes.append(v.get("reason") or "")
        if v.get("status") == "GATE_FAILED":
            notes.append("; ".join(v.get("gate_failures") or [])[:160])
            notes.append("published anyway (--allow-failed-gates)" if v.get("published") else "not published")
        if (v.get("speed") or {}).get("slower_than_parent"):
            notes.append("SLOWER than " + v["speed"]["baseline"])
        rows.append({
            "variant": name, "status": v.get("status", "?"), "model": v.get("model_name", "-"),
            "version": str(v.get("version") or "-"),
            "size_mb": f"{v['size_bytes'] / 1e6:.1f}" if v.get("size_bytes") else "-",
            "top1": f"{h['top1_agreement']:.2%}" if isinstance(h.get("top1_agreement"), float) else "-",
            "cos": f"{h['embedding_cosine_min']:.6f}" if isinstance(h.get("embedding_cosine_min"), float) else "-",
            "acc": f"{h['accuracy']:.3f}" if isinstance(h.get("accuracy"), float) else "-",
            "lat": f"{bench['batch1']['median_ms']:.2f}" if bench else "-",
            "thr": _thr(bench) if bench else "-",
            "secs": "/".join(f"{x:.1f}" if isinstance(x, (int, float)) else "-" for x in (
                v.get("build_seconds"), (v.get("verification") or {}).get("seconds"),
                v.get("benchmark_seconds"))) if v.get("build_seconds") is not None else "-",
            "note": " | ".join(n for n in notes if n),
        })
    return rows


def _thr(bench: Mapping[str, Any]) -> str:
    return f"{bench['batch' + str(bench['throughput_batch'])]['img_per_s']:.1f}"


def _fmt_acc(manifest: Mapping[str, Any]) -> str:
    acc = (manifest.get("reference") or {}).get("accuracy")
    return f"{acc:.3f}" if isinstance(acc, float) else "-"


COLUMNS = [("variant", "variant"), ("status", "status"), ("version", "ver"), ("size_mb", "MB"),
           ("top1", "top-1 agree"), ("cos", "emb cos min"), ("acc", "accuracy"),
           ("lat", "b1 ms (p50)"), ("thr", "b8 img/s"),
           ("secs", "build/verify/bench s"), ("note", "note")]


def format_summary(manifest: Mapping[str, Any], *, rich: bool | None = None) -> str:
    """The summary table as text (rich when available and asked for)."""
    rows = summary_rows(manifest)
    title = (f"export {manifest.get('run_id', '')}: {manifest.get('repository', '')} "
             f"(eval: {(manifest.get('eval_set') or {}).get('split', '?')}, "
             f"n={(manifest.get('eval_set') or {}).get('n', '?')})")
    if rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table

            table = Table(title=title, show_lines=False)
            for _, head in COLUMNS:
                table.add_column(head, overflow="fold", max_width=60 if head == "note" else None)
            for r in rows:
                table.add_row(*[str(r[k]) for k, _ in COLUMNS])
            console = Console(record=True, width=160)
            with console.capture() as cap:
                console.print(table)
            return cap.get()
        except ImportError:
            if rich:
                raise
    widths = {k: max(len(h), *(len(str(r[k])) for r in rows)) if rows else len(h) for k, h in COLUMNS}
    lines = [title, "  ".join(h.ljust(widths[k]) for k, h in COLUMNS)]
    lines += ["  ".join(str(r[k]).ljust(widths[k]) for k, _ in COLUMNS) for r in rows]
    return "\n".join(lines)
