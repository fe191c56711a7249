"""Verification of a built variant against the eager FP32 model, before it is
published (FIELD_NOTES 4, 8, 9).

On the held-out images of ExportContext.eval_set(), the variant runs at batch
max_batch_size and at batch 1; both are compared with the eager reference
(top-1 agreement, flipped predictions, accuracy delta, logit/embedding
max-abs/relative difference and cosine: train.metrics.parity_metrics) and
checked against the variant's gate (train.metrics.GATES, overridable with
--thresholds). A third check compares batch 1 with batch N for the same
images: a model whose answer depends on the batch it was grouped into by the
dynamic batcher is wrong even when both are close to the reference on average.
All failures are collected, each with its numbers."""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Iterable, Mapping

# Largest allowed relative logit difference (vs the largest |logit|) between
# batch 1 and batch N outputs of the same images. FP32 kernels differ only in
# summation order (~1e-6 measured); reduced-precision engines may pick other
# kernels per batch size, hence the looser bounds.
BATCH_CONSISTENCY_MAX_REL_DIFF = {"fp32": 1e-4, "fp16": 1e-2, "int8": 5e-2, "fp8": 5e-2}
GATE_FIELDS = ("min_top1_agreement", "min_embedding_cosine", "min_logit_cosine", "max_accuracy_drop",
               "max_logit_abs_diff")
BATCH_FIELDS = ("max_rel_diff", "min_top1_agreement")


class ThresholdError(ValueError):
    """A --thresholds entry that cannot be applied; names the entry."""


def parse_thresholds(entries: Iterable[str] | None, *, scopes: Iterable[str]) -> dict[str, dict[str, float | None]]:
    """["fp16.min_top1_agreement=0.99", "onnx_int8.max_accuracy_drop=0.02",
    "batch.max_rel_diff=1e-3", "int8.max_accuracy_drop=none"] ->
    {scope: {field: value}}. A scope is a gate name, a variant name or
    'batch'; 'none' disables a check."""
    scopes = set(scopes)
    out: dict[str, dict[str, float | None]] = {}
    for entry in entries or ():
        for item in str(entry).replace(",", " ").split():
            key, sep, value = item.partition("=")
            scope, dot, name = key.partition(".")
            if not sep or not dot:
                raise ThresholdError(f"--thresholds {item!r}: expected SCOPE.FIELD=VALUE, e.g. "
                                     f"fp16.min_top1_agreement=0.99")
            if scope not in scopes and scope != "batch":
                raise ThresholdError(f"--thresholds {item!r}: unknown scope {scope!r}; use a gate or "
                                     f"variant name ({', '.join(sorted(scopes))}) or 'batch'")
            allowed = BATCH_FIELDS if scope == "batch" else GATE_FIELDS
            if name not in allowed:
                raise ThresholdError(f"--thresholds {item!r}: unknown field {name!r}; choose from "
                                     f"{', '.join(allowed)}")
            if value.lower() in ("none", "off"):
                val = None
            else:
                try:
                    val = float(value)
                except ValueError:
                    raise ThresholdError(f"--thresholds {item!r}: {value!r} is not a number "
                                         f"(or 'none')") from None
                if not math.isfinite(val) or val < 0:
                    raise ThresholdError(f"--thresholds {item!r}: must be a finite number >= 0")
            out.setdefault(scope, {})[name] = val
    return out


def resolve_gate(variant, overrides: Mapping[str, Mapping[str, Any]] | None = None):
    """The variant's gate with --thresholds applied: gate-level entries
    first, then variant-level ones."""
    from train.metrics import GATES

    gate = GATES[variant.gate]
    overrides = overrides or {}
    changes = {**overrides.get(variant.gate, {}), **overrides.get(variant.name, {})}
    if not changes:
        return dataclasses.replace(gate)
    return dataclasses.replace(gate, **changes, name=f"{gate.name}+overrides")


def batch_tolerance(variant, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    batch = dict((overrides or {}).get("batch", {}))
    return {"max_rel_diff": batch.get("max_rel_diff", BATCH_CONSISTENCY_MAX_REL_DIFF[variant.precision]),
            "min_top1_agreement": batch.get("min_top1_agreement", 1.0 if variant.precision == "fp32" else 0.99)}


def verify_variant(ctx, variant, runner, *, thresholds: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Run the checks; returns a JSON-able dict with `passed`, `failures`
    (each says which batch size and the numbers) and the parity per batch
    size. Exceptions from the runner propagate (the caller marks FAILED)."""
    from export.context import run_batched
    from train.metrics import parity_metrics

    t0 = time.perf_counter()
    es = ctx.eval_set()
    ref_lo, ref_em = ctx.reference_outputs()
    n_max = ctx.max_batch_size
    gate = resolve_gate(variant, thresholds)
    tol = batch_tolerance(variant, thresholds)

    results: dict[str, Any] = {}
    outputs = {}
    failures: list[str] = []
    for bs in dict.fromkeys((n_max, 1)):   # batch N first, then 1 (once if N == 1)
        t = time.perf_counter()
        lo, em = run_batched(runner, es.pixel_values, bs)
        seconds = time.perf_counter() - t
        outputs[bs] = (lo, em)
        parity = parity_metrics(ref_lo, lo, ref_embedding=ref_em, cand_embedding=em,
                                labels=es.labels, names=es.names)
        parity["seconds"] = round(seconds, 3)
        fails = gate.check(parity)
        parity["gate_failures"] = fails
        results[str(bs)] = parity
        failures += [f"batch {bs}: {f}" for f in fails]

    consistency = None
    if n_max != 1:
        (lo_n, em_n), (lo_1, em_1) = outputs[n_max], outputs[1]
        consistency = parity_metrics(lo_n, lo_1, ref_embedding=em_n, cand_embedding=em_1, names=es.names)
        consistency["tolerance"] = tol
        rel = consistency["logits"]["max_rel_diff"]
        if not rel <= tol["max_rel_diff"]:
            failures.append(f"batch 1 vs batch {n_max}: logits differ by {rel:.3g} relative "
                            f"(> {tol['max_rel_diff']:g}) for the same images; the output depends on "
                            f"the batch size")
        if tol["min_top1_agreement"] is not None and not consistency["top1_agreement"] >= tol["min_top1_agreement"]:
            failures.append(f"batch 1 vs batch {n_max}: {consistency['flipped']} of {consistency['n']} "
                            f"predictions change with the batch size")
    return {
        "passed": not failures,
        "failures": failures,
        "gate": gate.to_dict(),
        "eval_set": es.describe(),
        "batch_sizes": results,
        "batch_consistency": consistency,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def headline(verification: Mapping[str, Any]) -> dict[str, Any]:
    """The few numbers a summary row shows: worst case over batch sizes."""
    rows = list((verification.get("batch_sizes") or {}).values())
    if not rows:
        return {}
    agree = min(r["top1_agreement"] for r in rows)
    cos = min(r.get("embedding", {}).get("cosine_min", float("nan")) for r in rows)
    max_abs = max(r["logits"]["max_abs_diff"] for r in rows)
    acc_drop = [-(r.get("deltas") or {}).get("accuracy") for r in rows if (r.get("deltas") or {}).get("accuracy") is not None]
    return {"top1_agreement": agree, "embedding_cosine_min": cos, "logits_max_abs_diff": max_abs,
            "accuracy_drop": max(acc_drop) if acc_drop else None,
            "accuracy": rows[0].get("candidate_metrics", {}).get("accuracy") if rows else None}

