"""The perf report: one page that puts accuracy next to latency, throughput,
size and memory, and names the variant to deploy.

    generate_report(results, out_dir) -> {"md", "html", "json", "plots": [...]}
    python -m perf.report --results perf/reports/<run-id>/results.json

`results` is what `perf.run` collects (see docs in perf/run.py): the raw
in-process benchmark, the perf_analyzer sweep, the live parity and the export
manifest's verdicts. From it this module derives one row per variant
(`summarize`) and the recommendation (`recommend`), writes both back into
results.json, and renders report.md, a self-contained report.html (plots as
base64 PNG, no external assets) and the PNG plots (matplotlib, Agg).

Recommendation rule: among the deployable variants (the Triton models, not
the eager PyTorch baseline, not the ensemble/preprocessing wrappers) that pass
ALL their gates, the one with the highest throughput at the operating point
(batch size, concurrency, protocol; measured through the server when the
sweep ran, in process otherwise), optionally under a p99 latency budget. A
variant that should be faster than its parent (lower precision, compiled) but
was measured slower is flagged (FIELD_NOTES 6).
"""
from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

EAGER = "pytorch"
ENSEMBLE_MODELS = ("dinov2",)
PREPROCESS_MODELS = ("dinov2_preprocess",)
NOISE_MARGIN = 0.05  # run-to-run noise measured on 2 cores; smaller differences are not "slower"
BREAKDOWN = (("client_send_us", "client send"), ("network_server_send_recv_us", "network + server send/recv"),
             ("server_queue_us", "server queue"), ("server_compute_input_us", "compute input"),
             ("server_compute_infer_us", "compute infer"), ("server_compute_output_us", "compute output"),
             ("client_recv_us", "client recv"))


class ReportInputError(ValueError):
    """results.json is missing or malformed (CLI exit 2)."""


# ----------------------------------------------------------------------------- small helpers
def _f(x: Any, spec: str = ".2f", none: str = "-") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    try:
        return format(x, spec)
    except (TypeError, ValueError):
        return str(x)


def _mb(n: Any) -> str:
    return _f(n / 1e6 if isinstance(n, (int, float)) else None, ".1f")


def _pct(x: Any, spec: str = ".1%") -> str:
    return _f(x, spec)


def _ms(us: Any) -> float | None:
    return us / 1000.0 if isinstance(us, (int, float)) else None


def _points(results: Mapping[str, Any]) -> list[dict]:
    return list(((results.get("perf_analyzer") or {}).get("points")) or [])


def operating_point(results: Mapping[str, Any]) -> dict[str, Any]:
    """The configured operating point, completed from what was measured."""
    op = {k: v for k, v in (results.get("operating_point") or {}).items() if v is not None}
    pa = (results.get("perf_analyzer") or {}).get("settings") or {}
    ip = ((results.get("in_process") or {}).get("settings")) or {}
    bss = pa.get("batch_sizes") or ip.get("batch_sizes") or [1]
    op.setdefault("batch_size", max(bss))
    conc = pa.get("concurrency") or ip.get("threads") or [1]
    op.setdefault("concurrency", max(conc))
    op.setdefault("protocol", (pa.get("protocols") or ["grpc"])[0])
    op.setdefault("max_p99_ms", None)
    return op


def _server_point(results, model: str, protocol: str, bs: int, conc: int) -> dict | None:
    for p in _points(results):
        if (p.get("model"), p.get("protocol"), p.get("batch_size"), p.get("concurrency")) == (model, protocol, bs, conc):
            return p
    return None


def _inproc_cell(entry: Mapping[str, Any] | None, bs: int, threads: int) -> dict | None:
    for c in (((entry or {}).get("benchmark") or {}).get("grid") or []):
        if c.get("batch_size") == bs and c.get("threads") == threads:
            return c
    return None


# ----------------------------------------------------------------------------- rows
def _parity_by_model(results) -> dict[str, dict]:
    return {v.get("model"): v for v in ((results.get("parity") or {}).get("variants") or [])}


def summarize(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per variant (keyed by its Triton model name, the eager model as
    'pytorch'), merging in-process, served, parity and export numbers."""
    op = operating_point(results)
    inproc = (results.get("in_process") or {}).get("variants") or {}
    manifest_variants = (results.get("export") or {}).get("variants") or {}
    parity = _parity_by_model(results)
    server_mem = ((results.get("server") or {}).get("memory") or {}).get("peak_per_model_rss_bytes") or {}
    served_models = list(dict.fromkeys([p["model"] for p in _points(results)] + list(parity)
                                       + list(((results.get("perf_analyzer") or {}).get("model_configs") or {}))))
    rows: dict[str, dict[str, Any]] = {}

    def row(key: str) -> dict[str, Any]:
        return rows.setdefault(key, {"key": key, "label": key, "kind": "variant", "model_name": None,
                                     "in_process_name": None, "precision": "fp32", "parent": None,
                                     "status": "OK", "reasons": [], "served": False})

    name_to_model: dict[str, str] = {EAGER: EAGER}
    for name, e in inproc.items():
        key = e.get("model_name") or name
        name_to_model[name] = key
        r = row(key)
        r.update(label=e.get("label") or name, in_process_name=name, model_name=e.get("model_name"),
                 precision=e.get("precision", "fp32"), file_bytes=e.get("file_bytes"),
                 platform=e.get("platform"), gate_name=e.get("gate"))
        r["parent_name"] = e.get("parent")
        if name == EAGER:
            r["kind"] = "baseline"
        if e.get("status") != "OK":
            r["status"] = e.get("status") or "FAILED"
            r["reasons"].append(e.get("reason") or "")
        r["in_process_entry"] = e
    for name, e in manifest_variants.items():
        key = e.get("model_name") or name
        name_to_model.setdefault(name, key)
        r = row(key)
        r.setdefault("label", name)
        r["model_name"] = e.get("model_name")
        r["precision"] = e.get("precision", r["precision"])
        r["parent_name"] = r.get("parent_name") or e.get("parent") or EAGER
        r.setdefault("file_bytes", e.get("size_bytes"))
        if r.get("file_bytes") is None:
            r["file_bytes"] = e.get("size_bytes")
        r["export"] = e
    for m in served_models:
        r = row(m)
        r["served"] = True
        r["model_name"] = m
        if m in ENSEMBLE_MODELS:
            r["kind"] = "ensemble"
            r["label"] = f"{m} (ensemble: server-side preprocessing + classifier)"
        elif m in PREPROCESS_MODELS:
            r["kind"] = "preprocess"
            r["label"] = f"{m} (preprocessing only)"
    for r in rows.values():
        if r["model_name"] and r["key"] in served_models:
            r["served"] = True
        pn = r.pop("parent_name", None)
        r["parent"] = name_to_model.get(pn, pn) if pn else (None if r["kind"] != "variant" else EAGER)
        if r["kind"] == "ensemble":
            ens = (results.get("export") or {}).get("ensemble") or {}
            r["parent"] = ens.get("classifier") or (parity.get(r["key"]) or {}).get("default_variant")
            if r["parent"] and not str(r["parent"]).startswith("dinov2_"):
                r["parent"] = name_to_model.get(r["parent"], r["parent"])
        _fill_numbers(results, r, op, parity.get(r["key"]), server_mem.get(r["key"]))
    _flag_slower(rows, op)
    order = {"baseline": 0, "variant": 1, "ensemble": 2, "preprocess": 3}
    return sorted(rows.values(), key=lambda r: (order.get(r["kind"], 9), r["key"]))


def _fill_numbers(results, r: dict, op: Mapping[str, Any], par: Mapping[str, Any] | None,
                  server_rss: float | None) -> None:
    bs, conc, proto = op["batch_size"], op["concurrency"], op["protocol"]
    e = r.pop("in_process_entry", None) or {}
    if not r.get("export") and e.get("export"):
        r["export"] = e["export"]
    bench = e.get("benchmark") or {}
    lat1 = (bench.get("latency") or {}).get("1") or {}
    cell = _inproc_cell(e, bs, conc)
    grid = bench.get("grid") or []
    r["in_process"] = {
        "b1_p50_ms": lat1.get("p50_ms"), "b1_p99_ms": lat1.get("p99_ms"),
        "op_images_per_s": (cell or {}).get("images_per_s"), "op_p99_ms": (cell or {}).get("p99_ms"),
        "best_images_per_s": max((c.get("images_per_s") or 0 for c in grid), default=None) if grid else None,
        "peak_rss_bytes": (e.get("memory") or {}).get("peak_rss_bytes"),
        "loaded_model_bytes": (e.get("memory") or {}).get("loaded_model_bytes"),
        "efficiency": ((e.get("efficiency") or {}).get("best") or {}).get("fraction_of_fp32_peak"),
        "efficiency_caveat": (e.get("efficiency") or {}).get("caveat"),
    } if e else {}
    p = _server_point(results, r["key"], proto, bs, conc) if r["served"] else None
    if p is None and r["served"]:
        # the op batch may exceed this model's max_batch_size: take its largest measured batch
        cands = [q for q in _points(results) if q["model"] == r["key"] and q["protocol"] == proto
                 and q["concurrency"] == conc]
        p = max(cands, key=lambda q: q["batch_size"]) if cands else None
    m = (p or {}).get("metrics") or {}
    r["server"] = {
        "batch_size": (p or {}).get("batch_size"), "concurrency": (p or {}).get("concurrency"),
        "protocol": (p or {}).get("protocol"),
        "op_images_per_s": m.get("throughput_infer_per_s"), "op_p50_ms": _ms(m.get("p50_latency_us")),
        "op_p99_ms": _ms(m.get("p99_latency_us")),
        "breakdown_ms": {k: _ms(m.get(k)) for k, _ in BREAKDOWN},
        "best_images_per_s": max((q["metrics"].get("throughput_infer_per_s") or 0 for q in _points(results)
                                  if q["model"] == r["key"]), default=None),
        "rss_bytes": server_rss,
    } if r["served"] else {}
    # --- gates: the live parity when it ran, else the export's in-process verification
    gate: dict[str, Any] = {"passed": None, "failures": [], "source": None, "name": r.get("gate_name")}
    acc: dict[str, Any] = {}
    if r["kind"] == "baseline":
        gate.update(passed=True, source="reference (eager FP32 is what every variant is compared with)")
    elif par is not None:
        pm = par.get("parity") or {}
        gate.update(passed=bool(par.get("passed")), failures=list(par.get("failures") or []),
                    source="live parity through Triton", name=(par.get("gate") or {}).get("name"))
        if par.get("error"):
            gate["failures"] = gate["failures"] or [par["error"]]
        acc = {"top1_agreement": pm.get("top1_agreement"), "flipped": pm.get("flipped"), "n": pm.get("n"),
               "accuracy": (pm.get("candidate_metrics") or {}).get("accuracy"),
               "accuracy_delta": (pm.get("deltas") or {}).get("accuracy"),
               "logit_max_abs_diff": (pm.get("logits") or {}).get("max_abs_diff"),
               "embedding_cosine_mean": (pm.get("embedding") or {}).get("cosine_mean")}
    elif r.get("export") and r["export"].get("gate_passed") is not None:
        ex = r["export"]
        h = ex.get("headline") or {}
        gate.update(passed=bool(ex.get("gate_passed")), failures=list(ex.get("gate_failures") or []),
                    source="export verification (in process)")
        acc = {"top1_agreement": h.get("top1_agreement"), "accuracy": h.get("accuracy"),
               "accuracy_delta": (-h["accuracy_drop"] if isinstance(h.get("accuracy_drop"), (int, float)) else None),
               "logit_max_abs_diff": h.get("logits_max_abs_diff"),
               "embedding_cosine_min": h.get("embedding_cosine_min")}
    r["gate"], r["accuracy"] = gate, acc
    r.pop("export", None)


def _flag_slower(rows: Mapping[str, dict], op: Mapping[str, Any]) -> None:
    """Flag a variant measured slower than its parent (same source, same point)."""
    for r in rows.values():
        r["slower_than_parent"] = []
        parent = rows.get(r.get("parent") or "")
        if parent is None or r["kind"] not in ("variant",):
            continue
        for src, label in (("server", "through the server"), ("in_process", "in process")):
            mine = (r.get(src) or {}).get("op_images_per_s")
            theirs = (parent.get(src) or {}).get("op_images_per_s")
            if mine and theirs and mine < theirs * (1 - NOISE_MARGIN):
                r["slower_than_parent"].append(
                    f"{r['key']} is {1 - mine / theirs:.0%} SLOWER than its parent {parent['key']} {label} "
                    f"({mine:.1f} vs {theirs:.1f} img/s at batch {op['batch_size']}, "
                    f"{'concurrency' if src == 'server' else 'threads'} {op['concurrency']})")


def recommend(rows: Sequence[Mapping[str, Any]], op: Mapping[str, Any]) -> dict[str, Any]:
    """The fastest deployable variant that passes all its gates at `op`."""
    variants = [r for r in rows if r["kind"] == "variant" and r.get("model_name")]
    use_server = any((r.get("server") or {}).get("op_images_per_s") for r in variants)
    source = "server" if use_server else "in_process"
    considered, rejected = [], []
    for r in variants:
        thr = (r.get(source) or {}).get("op_images_per_s")
        p99 = (r.get(source) or {}).get("op_p99_ms")
        why = None
        if r["status"] != "OK":
            why = f"{r['status']}: {'; '.join(x for x in r['reasons'] if x)}"
        elif r["gate"]["passed"] is None:
            why = "no gate verdict (no parity and no export verification)"
        elif not r["gate"]["passed"]:
            why = "gate FAILED: " + "; ".join(r["gate"]["failures"])
        elif not thr:
            why = f"not measured at the operating point ({source})"
        elif op.get("max_p99_ms") and p99 is not None and p99 > op["max_p99_ms"]:
            why = f"p99 {p99:.1f} ms over the budget {op['max_p99_ms']} ms"
        if why:
            rejected.append({"variant": r["key"], "reason": why})
        else:
            considered.append((thr, r))
    considered.sort(key=lambda t: -t[0])
    out: dict[str, Any] = {"source": source, "operating_point": dict(op), "rejected": rejected,
                           "ranking": [{"variant": r["key"], "images_per_s": t} for t, r in considered]}
    if not considered:
        out.update(variant=None, reason="no deployable variant passes all its gates at the operating point")
        return out
    thr, best = considered[0]
    out.update(variant=best["key"], label=best["label"], images_per_s=thr,
               p99_ms=(best.get(source) or {}).get("op_p99_ms"), gate_source=best["gate"]["source"],
               warnings=list(best.get("slower_than_parent") or []))
    where = ("through Triton (perf_analyzer, %s, batch %s, concurrency %s)" % (op["protocol"], op["batch_size"],
                                                                               op["concurrency"])
             if source == "server" else
             "in process (batch %s, %s client threads)" % (op["batch_size"], op["concurrency"]))
    out["reason"] = (f"highest throughput ({thr:.1f} img/s) {where} among the variants that pass all their "
                     f"gates ({best['gate']['source']})")
    return out


# ----------------------------------------------------------------------------- plots
def make_plots(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], out_dir: Path) -> list[dict[str, str]]:
    """PNG plots (Agg backend); returns [{"file", "title", "caption"}]."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    op = operating_point(results)

    def save(fig, name, title, caption):
        path = out_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        plots.append({"file": name, "title": title, "caption": caption})

    # 1. throughput vs p99 over concurrency
    pts = [p for p in _points(results) if p.get("status") == "OK"]
    if pts:
        bss = sorted({p["batch_size"] for p in pts})
        fig, axes = plt.subplots(1, len(bss), figsize=(6 * len(bss), 4.5), squeeze=False)
        for ax, bs in zip(axes[0], bss):
            for (model, proto) in sorted({(p["model"], p["protocol"]) for p in pts if p["batch_size"] == bs}):
                ser = sorted((p for p in pts if (p["model"], p["protocol"], p["batch_size"]) == (model, proto, bs)),
                             key=lambda p: p["concurrency"])
                xs = [(p["metrics"].get("p99_latency_us") or 0) / 1000 for p in ser]
                ys = [p["metrics"].get("throughput_infer_per_s") or 0 for p in ser]
                ax.plot(xs, ys, marker="o", linestyle="-" if proto == "grpc" else "--", label=f"{model} ({proto})")
                for p, x, y in zip(ser, xs, ys):
                    ax.annotate(f"c{p['concurrency']}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            ax.set_xlabel("p99 latency (ms)")
            ax.set_ylabel("throughput (images/s)")
            ax.set_title(f"through Triton, batch {bs}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "throughput_vs_p99.png", "Throughput vs p99 latency (served)",
             "Each line is one model and protocol; points are concurrency levels (c1, c2, ...). Up and to the "
             "left is better; where a line turns right, more concurrency only adds queueing.")
    else:
        cells = [(r, c) for r in rows for c in (((results.get("in_process") or {}).get("variants") or {})
                                                .get(r.get("in_process_name") or "", {}).get("benchmark") or {}).get("grid", [])]
        if cells:
            bss = sorted({c["batch_size"] for _, c in cells})
            fig, axes = plt.subplots(1, len(bss), figsize=(6 * len(bss), 4.5), squeeze=False)
            for ax, bs in zip(axes[0], bss):
                for r in rows:
                    ser = sorted((c for rr, c in cells if rr is r and c["batch_size"] == bs), key=lambda c: c["threads"])
                    if not ser:
                        continue
                    ax.plot([c["p99_ms"] for c in ser], [c["images_per_s"] for c in ser], marker="o", label=r["key"])
                    for c in ser:
                        ax.annotate(f"t{c['threads']}", (c["p99_ms"], c["images_per_s"]), textcoords="offset points",
                                    xytext=(4, 3), fontsize=7)
                ax.set_xlabel("p99 latency (ms)")
                ax.set_ylabel("throughput (images/s)")
                ax.set_title(f"in process, batch {bs}")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            save(fig, "throughput_vs_p99.png", "Throughput vs p99 latency (in process)",
                 "No server was measured: points are client-thread counts (t1, t2, ...) sharing one model.")

    # 2. accuracy delta vs throughput
    acc_rows = []
    for r in rows:
        thr = (r.get("server") or {}).get("op_images_per_s")
        name = r["key"]
        if thr is None and (r.get("in_process") or {}).get("op_images_per_s") is not None:
            thr = r["in_process"]["op_images_per_s"]
            name += " (in process)" if any((x.get("server") or {}).get("op_images_per_s") for x in rows) else ""
        a = r.get("accuracy") or {}
        if thr is None or r["kind"] == "preprocess":
            continue
        if r["kind"] == "baseline":
            y, kind = 0.0, "delta"
        elif a.get("accuracy_delta") is not None:
            y, kind = a["accuracy_delta"] * 100, "delta"
        elif a.get("top1_agreement") is not None:
            y, kind = (a["top1_agreement"] - 1) * 100, "agreement"
        else:
            continue
        acc_rows.append((r, name, thr, y, kind))
    if acc_rows:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        # Variants often share a delta (0.00): stagger labels, sorted by speed,
        # so neighbours do not print on top of each other.
        for i, (r, name, thr, y, kind) in enumerate(sorted(acc_rows, key=lambda t: t[2])):
            ok = r["gate"]["passed"]
            ax.scatter([thr], [y], s=80, marker="o" if ok else "X", color="tab:green" if ok else "tab:red",
                       edgecolor="black", zorder=3)
            ax.annotate(name + ("" if ok else " (gate FAIL)"), (thr, y), textcoords="offset points",
                        xytext=(5, 6 + 11 * (i % 4)), fontsize=8,
                        arrowprops={"arrowstyle": "-", "color": "grey", "lw": 0.5})
        ax.axhline(0, color="grey", lw=0.8)
        kinds = {k for *_, k in acc_rows}
        ax.set_ylabel("accuracy delta vs FP32 (points)" if kinds == {"delta"} else
                      "accuracy delta, or top-1 agreement - 100 % (points)")
        ax.set_xlabel(f"throughput at the operating point (images/s, batch {op['batch_size']}, "
                      f"concurrency {op['concurrency']})")
        ax.set_title("Accuracy vs speed (green: passes its gates, red X: fails)")
        ax.grid(alpha=0.3)
        save(fig, "accuracy_vs_throughput.png", "Accuracy vs throughput",
             "The trade-off in one picture: right is faster, up is closer to (or better than) the FP32 "
             "reference. Only green points may be deployed.")

    # 3. size and memory
    mem_rows = [r for r in rows if r.get("file_bytes") or (r.get("in_process") or {}).get("loaded_model_bytes")
                or (r.get("server") or {}).get("rss_bytes")]
    if mem_rows:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(mem_rows) + 2), 4.5))
        x = np.arange(len(mem_rows))
        series = [("artifact file", [r.get("file_bytes") for r in mem_rows]),
                  ("in-process RSS of the loaded model", [(r.get("in_process") or {}).get("loaded_model_bytes") for r in mem_rows]),
                  ("in-process peak RSS over baseline", [_peak_over(results, r) for r in mem_rows]),
                  ("server model process RSS", [(r.get("server") or {}).get("rss_bytes") for r in mem_rows])]
        series = [(n, v) for n, v in series if any(isinstance(y, (int, float)) and y for y in v)]
        w = 0.8 / max(1, len(series))
        for i, (name, vals) in enumerate(series):
            ax.bar(x + i * w - 0.4 + w / 2, [(v or 0) / 1e6 for v in vals], w, label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([r["key"] for r in mem_rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("MB")
        ax.set_title("Size and memory per variant")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "size_memory.png", "Size and memory",
             "Artifact size on disk; resident memory the loaded model added in a fresh process; the peak of the "
             "benchmark run over that process's baseline; the server's per-model process RSS (local server).")

    # 4. server-side latency breakdown
    br = [(r, (r.get("server") or {}).get("breakdown_ms") or {}) for r in rows if (r.get("server") or {}).get("op_images_per_s")]
    if br:
        import numpy as np

        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(br) + 2), 4.5))
        x = np.arange(len(br))
        bottom = np.zeros(len(br))
        for key, label in BREAKDOWN:
            vals = np.array([b.get(key) or 0.0 for _, b in br])
            ax.bar(x, vals, 0.6, bottom=bottom, label=label)
            bottom += vals
        ax.set_xticks(x)
        ax.set_xticklabels([f"{r['key']}\nb{r['server']['batch_size']} c{r['server']['concurrency']}" for r, _ in br],
                           fontsize=8, rotation=15, ha="right")
        ax.set_ylabel("ms per request (averages)")
        ax.set_title(f"Where a request's time goes ({op['protocol']})")
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        save(fig, "latency_breakdown.png", "Latency breakdown (client and server side)",
             "Average per request at the operating point, from perf_analyzer's CSV. Queue = waiting for a free "
             "model instance (or for the dynamic batcher to fill a batch); compute infer = the model itself.")
    return plots


def _peak_over(results, r) -> float | None:
    e = ((results.get("in_process") or {}).get("variants") or {}).get(r.get("in_process_name") or "") or {}
    return (e.get("memory") or {}).get("peak_over_baseline_bytes")


# ----------------------------------------------------------------------------- document blocks
def build_blocks(results: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], rec: Mapping[str, Any],
                 plots: Sequence[Mapping[str, str]]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"h3"|"p"|"banner"|"ul"|"table"|"img"|"pre", ...)."""
    b: list[tuple] = []
    op = operating_point(results)
    model = results.get("model") or {}
    b.append(("h1", f"Perf report {results.get('run_id', '')}"))
    b.append(("p", f"Created {results.get('created', '?')}; git {results.get('git_revision', '?')}; "
                   f"checkpoint `{model.get('checkpoint', '?')}` ({model.get('arch', '?')}, {model.get('img_size', '?')} px, "
                   f"{model.get('num_classes', '?')} classes)."))
    # banners
    ws = str(model.get("weights_source") or (results.get("export") or {}).get("weights_source") or "unknown")
    if model.get("pretrained") is False or ws.lower().startswith("random"):
        b.append(("banner", "NOT pretrained weights: accuracy numbers are not representative. "
                            f"The checkpoint's weights_source is: {ws}"))
    inp = ((results.get("in_process") or {}).get("input_data") or (results.get("perf_analyzer") or {}).get("input_data") or {})
    if inp.get("synthetic"):
        b.append(("banner", "Inputs were SYNTHETIC (no --data_path): speed is representative, accuracy is not "
                            "measured on real images."))
    over = [r["key"] for r in rows if ((r.get("in_process") or {}).get("efficiency") or 0) > 1.0]
    if over:
        b.append(("banner", f"{', '.join(over)} measured ABOVE the FP32 matmul peak: the machine was busier while "
                            "the peak was measured than during the benchmark (shared cores). The efficiency "
                            "column is unreliable for this run."))
    errors = results.get("errors") or []
    for e in errors:
        b.append(("banner", f"ERROR: {e}"))

    b.append(("h2", "Recommendation"))
    if rec.get("variant"):
        b.append(("p", f"**Deploy `{rec['variant']}`** ({rec.get('label', '')}): {rec['reason']}."))
        for w in rec.get("warnings") or []:
            b.append(("banner", w))
    else:
        b.append(("p", f"**No variant recommended**: {rec.get('reason')}."))
    if rec.get("rejected"):
        b.append(("ul", [f"`{x['variant']}` not chosen: {x['reason']}" for x in rec["rejected"]]))
    slower = [w for r in rows for w in r.get("slower_than_parent") or []]
    if slower:
        b.append(("p", "**Faster on paper, slower measured** (do not ship these for speed):"))
        b.append(("ul", slower))
    b.append(("p", f"Operating point: batch {op['batch_size']}, concurrency {op['concurrency']}, protocol "
                   f"{op['protocol']}" + (f", p99 budget {op['max_p99_ms']} ms" if op.get("max_p99_ms") else "")
                   + f"; ranked on {'server-side (perf_analyzer)' if rec.get('source') == 'server' else 'in-process'} throughput."))

    # summary table
    b.append(("h2", "Summary"))
    head = ["variant", "precision", "status", "gates", "top-1 agree", "acc delta (pts)", "size MB",
            "served img/s @op", "served p99 ms @op", "in-proc img/s @op", "in-proc b1 p50 ms", "% FP32 peak"]
    body = []
    for r in rows:
        a, g, s, ip = r.get("accuracy") or {}, r.get("gate") or {}, r.get("server") or {}, r.get("in_process") or {}
        gtxt = "PASS" if g.get("passed") else ("FAIL" if g.get("passed") is False else "-")
        body.append([f"`{r['key']}`" + (" (recommended)" if r["key"] == rec.get("variant") else ""), r["precision"],
                     r["status"], gtxt, _pct(a.get("top1_agreement"), ".2%"),
                     _f(a.get("accuracy_delta") * 100 if isinstance(a.get("accuracy_delta"), (int, float)) else None, "+.2f"),
                     _mb(r.get("file_bytes")), _f(s.get("op_images_per_s"), ".1f"), _f(s.get("op_p99_ms"), ".1f"),
                     _f(ip.get("op_images_per_s"), ".1f"), _f(ip.get("b1_p50_ms"), ".2f"),
                     _pct(ip.get("efficiency"))])
    b.append(("table", head, body))
    b.append(("p", "Gates: top-1 agreement / cosine / accuracy-drop thresholds per precision "
                   "(train.metrics.GATES, overridable). Gate source per variant is in the accuracy table."))

    # plots
    if plots:
        b.append(("h2", "Plots"))
        for p in plots:
            b.append(("img", p["file"], p["title"], p["caption"]))

    # served
    pa = results.get("perf_analyzer") or {}
    if pa:
        b.append(("h2", "Through Triton (perf_analyzer)"))
        st = pa.get("settings") or {}
        b.append(("p", f"Window {st.get('window_ms')} ms ({st.get('measurement_mode')}), stability {st.get('stability_pct')} %, "
                       f"max {st.get('max_trials')} trials; protocols {', '.join(st.get('protocols') or [])}; inputs: "
                       f"{(pa.get('input_data') or {}).get('source', '?')}. Shapes are the server's model config."))
        head = ["model", "proto", "batch", "conc", "img/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms",
                "client send", "network+server", "queue", "compute in", "infer", "compute out", "client recv"]
        body = []
        for p in _points(results):
            m = p["metrics"]
            body.append([p["model"], p["protocol"], p["batch_size"], p["concurrency"],
                         _f(m.get("throughput_infer_per_s"), ".1f")] +
                        [_f(_ms(m.get(k)), ".2f") for k in ("p50_latency_us", "p90_latency_us", "p95_latency_us",
                                                           "p99_latency_us")] +
                        [_f(_ms(m.get(k)), ".2f") for k, _ in BREAKDOWN])
        b.append(("table", head, body))
        b.append(("p", "Breakdown columns are average milliseconds per request."))
        if pa.get("failures"):
            b.append(("h3", "Failed points"))
            b.append(("ul", [f["reason"] for f in pa["failures"]]))

    # in process
    ipr = results.get("in_process") or {}
    if ipr.get("variants"):
        b.append(("h2", "In process"))
        st = ipr.get("settings") or {}
        b.append(("p", f"{st.get('seconds')} s per cell after {st.get('warmup')} warm-up calls per batch size; "
                       f"N client threads share one loaded model; torch intra-op threads {st.get('torch_threads')}; "
                       f"each variant in a {'fresh process' if st.get('isolated_processes') else 'shared process (memory peaks mix)'}; "
                       f"inputs: {(ipr.get('input_data') or {}).get('source', '?')}."))
        head = ["variant", "batch", "threads", "img/s", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "% FP32 peak"]
        body = []
        gfl = (ipr.get("flops") or {}).get("gflops")
        peak = (ipr.get("matmul_peak") or {}).get("gflops")
        for name, e in ipr["variants"].items():
            for c in ((e.get("benchmark") or {}).get("grid") or []):
                eff = (c["images_per_s"] * gfl / peak) if (gfl and peak and c.get("images_per_s")) else None
                body.append([name, c["batch_size"], c["threads"], _f(c.get("images_per_s"), ".1f"),
                             _f(c.get("p50_ms"), ".2f"), _f(c.get("p90_ms"), ".2f"), _f(c.get("p95_ms"), ".2f"),
                             _f(c.get("p99_ms"), ".2f"), _pct(eff)])
        b.append(("table", head, body))

    # accuracy
    b.append(("h2", "Accuracy and parity"))
    par = results.get("parity") or {}
    if par:
        ref = (par.get("reference") or {}).get("metrics") or {}
        b.append(("p", f"Live parity through Triton ({par.get('protocol')} {par.get('url')}) on {par.get('n_images')} "
                       f"{par.get('split')} images; reference {((par.get('reference') or {}).get('kind'))} accuracy "
                       f"{_pct(ref.get('accuracy'), '.2%')}."))
    head = ["variant", "gate", "result", "source", "top-1 agree", "flipped", "accuracy", "acc delta (pts)",
            "max |d logit|", "failures"]
    body = []
    for r in rows:
        a, g = r.get("accuracy") or {}, r.get("gate") or {}
        body.append([r["key"], g.get("name") or "-",
                     "PASS" if g.get("passed") else ("FAIL" if g.get("passed") is False else "-"),
                     g.get("source") or "-", _pct(a.get("top1_agreement"), ".2%"),
                     f"{a['flipped']}/{a['n']}" if a.get("flipped") is not None else "-",
                     _pct(a.get("accuracy"), ".2%"),
                     _f(a.get("accuracy_delta") * 100 if isinstance(a.get("accuracy_delta"), (int, float)) else None, "+.2f"),
                     _f(a.get("logit_max_abs_diff"), ".3g"), "; ".join(g.get("failures") or []) or "-"])
    b.append(("table", head, body))

    # memory + efficiency
    b.append(("h2", "Size, memory and compute efficiency"))
    flops = ipr.get("flops") or results.get("flops") or {}
    peak = ipr.get("matmul_peak") or results.get("matmul_peak") or {}
    if flops or peak:
        b.append(("p", f"Model: {_f(flops.get('gflops'), '.3f')} GFLOP per image ({flops.get('method', '')}). "
                       f"Measured FP32 matmul peak of this machine: {_f(peak.get('gflops'), '.1f')} GFLOP/s "
                       f"({peak.get('threads')} threads, {peak.get('size')}x{peak.get('size')}), so FP32 cannot exceed "
                       f"about {_f((peak.get('gflops') or 0) / flops['gflops'] if flops.get('gflops') else None, '.1f')} images/s here."))
    head = ["variant", "file MB", "in-proc loaded MB", "in-proc run peak over baseline MB",
            "in-proc process peak RSS MB", "server proc RSS MB",
            "in bytes/img", "out bytes/img", "weight bytes/img @op batch", "best GFLOP/s", "% FP32 peak", "note"]
    body = []
    for r in rows:
        e = (ipr.get("variants") or {}).get(r.get("in_process_name") or "") or {}
        bm = e.get("bytes_moved") or {}
        pb = (bm.get("per_batch_size") or {}).get(str(op["batch_size"])) or {}
        eff = (e.get("efficiency") or {}).get("best") or {}
        body.append([r["key"], _mb(r.get("file_bytes")), _mb((r.get("in_process") or {}).get("loaded_model_bytes")),
                     _mb(_peak_over(results, r)), _mb((r.get("in_process") or {}).get("peak_rss_bytes")), _mb((r.get("server") or {}).get("rss_bytes")),
                     _f(bm.get("input_bytes_per_image"), ".0f"), _f(bm.get("output_bytes_per_image"), ".0f"),
                     _f(pb.get("weight_bytes_per_image"), ".0f"), _f(eff.get("achieved_gflops"), ".1f"),
                     _pct(eff.get("fraction_of_fp32_peak")), (e.get("efficiency") or {}).get("caveat") or ""])
    b.append(("table", head, body))
    smem = (results.get("server") or {}).get("memory") or {}
    if smem:
        tree = smem.get("peak_process_tree") or {}
        items = []
        if tree:
            items.append(f"tritonserver process tree (pid {tree.get('pid')}, {tree.get('processes')} processes): peak "
                         f"{_mb(tree.get('total_rss_bytes'))} MB resident during the sweep (server itself "
                         f"{_mb(tree.get('server_rss_bytes'))} MB; each Python-backend model instance is its own process)")
        if smem.get("peak_host_used_bytes") is not None:
            items.append(f"metrics endpoint nv_cpu_memory_used_bytes (whole host, all processes): peak "
                         f"{_mb(smem['peak_host_used_bytes'])} MB")
        for uuid, v in (smem.get("peak_gpu_used_bytes") or {}).items():
            items.append(f"GPU {uuid}: peak nv_gpu_memory_used_bytes {_mb(v)} MB")
        for e in smem.get("errors") or []:
            items.append(f"not measured: {e}")
        if items:
            b.append(("h3", "Server memory"))
            b.append(("ul", items))

    # skipped
    items = [f"{r['key']} ({r['status']}): {'; '.join(x for x in r['reasons'] if x)}"
             for r in rows if r["status"] != "OK"]
    items += [f"{s.get('what')}: {s.get('reason')}" for s in results.get("skipped") or []]
    items = list(dict.fromkeys(items))
    if items:
        b.append(("h2", "Skipped or failed"))
        b.append(("ul", items))

    b.append(("h2", "How to read these numbers"))
    b.append(("ul", [
        "**img/s** counts images (a batch-8 request is 8 inferences), so batch sizes are comparable.",
        "**Client side vs server side**: perf_analyzer's latency is what a client waits for. It splits into "
        "client send, network + server send/receive, the server-side parts, and client receive.",
        "**Server queue** is the time a request waits inside Triton before a model instance takes it: for a free "
        "instance, or for the dynamic batcher to gather a batch (bounded by max_queue_delay). Growing queue time "
        "with concurrency means the model is saturated: more clients add latency, not throughput.",
        "**Compute input / infer / output**: copying inputs into the backend, running the model, copying outputs "
        "back. Compute infer is the number to compare with the in-process latency; on this CPU the ONNX/PyTorch "
        "models run in Python-based stand-in backends, so their overhead is included.",
        "**The ensemble** (`dinov2`) includes server-side decoding and preprocessing; compare it with its "
        "classifier to see what preprocessing costs (FIELD_NOTES 11).",
        "**p99** is the latency 99 % of requests stay under; it is what a latency budget should be set on.",
        "**% FP32 peak**: achieved GFLOP/s (img/s x GFLOP per image) over this machine's measured FP32 matmul "
        "peak. INT8/FP16 variants are compared with the same FP32 peak, which is not their own limit.",
        "**Shared machine**: the load generator (perf_analyzer), the server and any other process share the "
        "same cores; on a 2-core machine the numbers are lower bounds and vary run to run (~5 %).",
    ]))

    b.append(("h2", "Machine, versions and settings"))
    mach = results.get("machine") or {}
    gpus = ", ".join(f"{g.get('name')} ({_f(g.get('memory_mib'), '.0f')} MiB)" for g in mach.get("gpus") or []) or "none"
    b.append(("ul", [
        f"CPU: {mach.get('cpu_model', '?')} ({mach.get('usable_cores', '?')} usable cores, "
        f"{mach.get('logical_cores', '?')} logical; {', '.join(mach.get('cpu_flags') or []) or 'flags n/a'})",
        f"Memory: {_f((mach.get('memory_total_bytes') or 0) / 2**30, '.1f')} GiB; GPU: {gpus}",
        f"OS: {mach.get('os', '?')}, {mach.get('libc', '')}; Python {mach.get('python', '?')}; load average at "
        f"start {mach.get('load_average')}",
        f"Weights: {ws}",
        "Triton: " + json.dumps(((results.get("server") or {}).get("metadata") or {}).get("version"))
        + f"; URL {(results.get('server') or {}).get('url') or 'none (in-process only)'}",
    ]))
    vers = results.get("versions") or {}
    if vers:
        b.append(("p", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))))
    st = results.get("settings") or {}
    if st:
        b.append(("pre", json.dumps(st, indent=2, default=str)))
    return b


# ----------------------------------------------------------------------------- rendering
def _md_cell(x: Any) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[tuple]) -> str:
    out = []
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append("#" * int(kind[1]) + " " + blk[1])
        elif kind == "p":
            out.append(blk[1])
        elif kind == "banner":
            out.append(f"> **WARNING: {blk[1]}**")
        elif kind == "ul":
            out.append("\n".join(f"- {x}" for x in blk[1]))
        elif kind == "table":
            head, body = blk[1], blk[2]
            lines = ["| " + " | ".join(_md_cell(h) for h in head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in body]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{blk[2]}]({blk[1]})\n\n*{blk[3]}*")
        elif kind == "pre":
            out.append("```\n" + blk[1] + "\n```")
    return "\n\n".join(out) + "\n"


def _inline_html(text: str) -> str:
    """Escape, then the two markdown inlines the blocks use: **bold** and `code`."""
    import re

    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1200px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;text-align:right}th{background:#f2f2f2}
td:first-child,th:first-child{text-align:left}.banner{background:#ffe3e3;border:2px solid #d33;padding:.7em 1em;
font-weight:bold;margin:1em 0}code{background:#f4f4f4;padding:0 3px}img{max-width:100%;border:1px solid #ddd}
figure{margin:1.5em 0}figcaption{font-size:13px;color:#555}pre{background:#f7f7f7;padding:1em;overflow:auto;
font-size:12px}"""


def render_html(blocks: Sequence[tuple], image_dir: Path) -> str:
    """A self-contained page: the PNGs are embedded as base64 data URIs."""
    title = next((blk[1] for blk in blocks if blk[0] == "h1"), "Perf report")
    out = ["<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
           f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for blk in blocks:
        kind = blk[0]
        if kind in ("h1", "h2", "h3"):
            out.append(f"<{kind}>{_inline_html(blk[1])}</{kind}>")
        elif kind == "p":
            out.append(f"<p>{_inline_html(blk[1])}</p>")
        elif kind == "banner":
            out.append(f"<div class=\"banner\">WARNING: {_inline_html(blk[1])}</div>")
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(x)}</li>" for x in blk[1]) + "</ul>")
        elif kind == "table":
            head, body = blk[1], blk[2]
            rows = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in body)
            out.append("<table><thead><tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in head)
                       + f"</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            data = base64.b64encode((image_dir / blk[1]).read_bytes()).decode("ascii")
            out.append(f"<figure><img alt=\"{html.escape(blk[2])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption><strong>{html.escape(blk[2])}.</strong> {_inline_html(blk[3])}</figcaption></figure>")
        elif kind == "pre":
            out.append(f"<pre>{html.escape(blk[1])}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------- entry points
def jsonable(obj: Any) -> Any:
    """Strict JSON: NaN/inf as strings, numpy scalars as Python, Paths as str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (TypeError, ValueError):
            return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def write_json(obj: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jsonable(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def generate_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write report.md, report.html, results.json (with the derived `rows` and
    `recommendation`) and the PNG plots into out_dir; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    rows = summarize(results)
    op = operating_point(results)
    rec = recommend(rows, op)
    results["operating_point"] = op
    results["rows"] = rows
    results["recommendation"] = rec
    plots = make_plots(results, rows, out_dir)
    blocks = build_blocks(results, rows, rec, plots)
    md = out_dir / "report.md"
    md.write_text(render_markdown(blocks), encoding="utf-8")
    page = out_dir / "report.html"
    page.write_text(render_html(blocks, out_dir), encoding="utf-8")
    js = write_json(results, out_dir / "results.json")
    return {"md": md, "html": page, "json": js, "plots": [out_dir / p["file"] for p in plots],
            "recommendation": rec, "rows": rows}


def summary_table(rows: Sequence[Mapping[str, Any]], rec: Mapping[str, Any]) -> str:
    """Plain-text table for the terminal."""
    head = ["variant", "status", "gates", "top-1", "served img/s", "p99 ms", "in-proc img/s", "size MB"]
    body = []
    for r in rows:
        g, a, s, ip = r.get("gate") or {}, r.get("accuracy") or {}, r.get("server") or {}, r.get("in_process") or {}
        body.append([r["key"] + (" *" if r["key"] == rec.get("variant") else ""), r["status"],
                     "PASS" if g.get("passed") else ("FAIL" if g.get("passed") is False else "-"),
                     _pct(a.get("top1_agreement"), ".2%"), _f(s.get("op_images_per_s"), ".1f"),
                     _f(s.get("op_p99_ms"), ".1f"), _f(ip.get("op_images_per_s"), ".1f"), _mb(r.get("file_bytes"))])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in body]
    lines.append(f"* recommended: {rec.get('variant') or 'none'} ({rec.get('reason')})")
    return "\n".join(lines)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportInputError(f"--results {path}: file not found") from None
    except ValueError as exc:
        raise ReportInputError(f"--results {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "schema_version" not in data:
        raise ReportInputError(f"--results {path}: not a perf results.json (no schema_version)")
    return data


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m perf.report",
                                description="Re-generate a perf report from a stored results.json.")
    req = p.add_argument_group("Required")
    req.add_argument("--results", required=True, help="perf/reports/<run-id>/results.json")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--out", default=None, help="output folder (default: the results file's folder)")
    opt.add_argument("--batch-size", type=int, default=None, help="operating point: batch size")
    opt.add_argument("--concurrency", type=int, default=None, help="operating point: concurrency")
    opt.add_argument("--protocol", choices=("grpc", "http"), default=None, help="operating point: protocol")
    opt.add_argument("--max-p99-ms", type=float, default=None, help="latency budget for the recommendation")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        results = load_results(args.results)
    except ReportInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    op = dict(results.get("operating_point") or {})
    for key, val in (("batch_size", args.batch_size), ("concurrency", args.concurrency),
                     ("protocol", args.protocol), ("max_p99_ms", args.max_p99_ms)):
        if val is not None:
            op[key] = val
    results["operating_point"] = op
    out = Path(args.out) if args.out else Path(args.results).parent
    paths = generate_report(results, out)
    print(summary_table(paths["rows"], paths["recommendation"]))
    print(f"report: {paths['md']}\n        {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
