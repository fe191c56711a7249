"""Verification of a built variant against the eager FP32 model, before it is
published.

On the held-out images of ExportContext.eval_set(), the variant runs at batch
max_batch_size and at batch 1; both are compared with the eager reference
(top-1 agreement, flipped predictions, accuracy delta, logit/embedding
max-abs/relative difference and cosine: dinov2_triton.train.metrics.parity_metrics) and
checked against the variant's gate (dinov2_triton.export.gates, overridable with --gates).
A third check compares batch 1 with batch N for the same images: a model
whose answer depends on the batch it was grouped into by the dynamic
batcher is wrong even when both are close to the reference on average.
All failures are collected, each with its numbers."""
from __future__ import annotations

import time
from typing import Any, Mapping

from dinov2_triton.export.gates import batch_tolerance, resolve_gate


def verify_variant(ctx, variant, runner, *, gates: Mapping[str, Mapping[str, Any]] | None = None
                   ) -> dict[str, Any]:
    """Run the checks; returns a JSON-able dict with `passed`, `failures`
    (each says which batch size and the numbers) and the parity per batch
    size. Exceptions from the runner propagate (the caller marks FAILED)."""
    from dinov2_triton.export.context import run_batched
    from dinov2_triton.train.metrics import parity_metrics

    t0 = time.perf_counter()
    es = ctx.eval_set()
    ref_lo, ref_em = ctx.reference_outputs()
    n_max = ctx.max_batch_size
    gate = resolve_gate(variant, gates)
    tol = batch_tolerance(variant.precision, gates)

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
    deltas = [(r.get("deltas") or {}).get("accuracy") for r in rows]
    acc_drop = [-d for d in deltas if d is not None]
    return {"top1_agreement": agree, "embedding_cosine_min": cos, "logits_max_abs_diff": max_abs,
            "accuracy_drop": max(acc_drop) if acc_drop else None,
            "accuracy": rows[0].get("candidate_metrics", {}).get("accuracy") if rows else None}

