"""Mixed precision under an accuracy budget: try candidate quantization
configurations from the most aggressive (fastest) to the most conservative
and stop at the first one whose parity with eager FP32 passes the gate.

The search is generic: a candidate is a label, a JSON-able description and a
`make(path)` function that writes the ONNX file; `evaluate(path)` returns
dinov2_triton.train.metrics.parity_metrics. Candidates come from a generator, so an
expensive step that only later candidates need (per-block sensitivity) runs
only when the cheaper ones failed. Every attempt is recorded (config, parity
numbers, pass/fail, failures, seconds) whether or not one passes.

Which gate: the variant's gate with the run's --gates and --accuracy-budget
applied, resolved by dinov2_triton.export.gates exactly as the pipeline's verification
resolves it. So the search never settles on a configuration the pipeline
would then reject.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

log = logging.getLogger(__name__)


@dataclass
class Candidate:
    label: str                             # short name shown in logs and the manifest
    config: dict[str, Any]                 # JSON-able description of what is quantized
    make: Callable[[Path], Any]            # writes the candidate ONNX to the given path
    key: Any = None                        # identical keys are tried once (duplicates skipped)


@dataclass
class SearchResult:
    passed: bool
    chosen: int | None                     # index into attempts of the model to ship (None: no attempt ran)
    attempts: list[dict[str, Any]] = field(default_factory=list)
    gate: dict[str, Any] = field(default_factory=dict)
    stopped_because: str = ""

    @property
    def chosen_attempt(self) -> dict[str, Any] | None:
        return None if self.chosen is None else self.attempts[self.chosen]

    def to_dict(self) -> dict[str, Any]:
        chosen = self.chosen_attempt
        return {"passed": self.passed, "chosen": chosen["label"] if chosen else None,
                "chosen_index": self.chosen, "stopped_because": self.stopped_because,
                "gate": self.gate, "n_attempts": len(self.attempts),
                "attempts": [{k: v for k, v in a.items() if k != "path"} for a in self.attempts]}


def parity_summary(parity: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers a person compares attempts by (full parity stays with the pipeline)."""
    out = {"n": parity.get("n"), "top1_agreement": parity.get("top1_agreement"),
           "flipped": parity.get("flipped"),
           "logit_cosine_mean": parity.get("logits", {}).get("cosine_mean"),
           "logit_max_abs_diff": parity.get("logits", {}).get("max_abs_diff"),
           "embedding_cosine_mean": parity.get("embedding", {}).get("cosine_mean")}
    deltas = parity.get("deltas") or {}
    if "accuracy" in deltas:
        out["accuracy_delta"] = deltas["accuracy"]
    return out


def _score(summary: Mapping[str, Any]) -> tuple:
    """Best-effort ordering when no attempt passes: agreement, then logit cosine."""
    def num(v):
        return v if isinstance(v, (int, float)) and math.isfinite(v) else -math.inf
    return (num(summary.get("top1_agreement")), num(summary.get("accuracy_delta", 0.0)),
            num(summary.get("logit_cosine_mean")))


def search_gate(variant, options: Mapping[str, Any]):
    """The gate the search must meet: exactly the one the pipeline verifies
    `variant` with (the run's --gates and --accuracy-budget applied)."""
    from dinov2_triton.export.gates import parse_gate_overrides, resolve_gate, with_accuracy_budget
    from dinov2_triton.export.registry import gate_scopes

    overrides = parse_gate_overrides(options.get("gates") or (), scopes=gate_scopes() | {variant.name})
    return resolve_gate(variant, with_accuracy_budget(overrides, options.get("accuracy_budget")))


def run_search(candidates: Iterable[Candidate], *, evaluate: Callable[[Path], Mapping[str, Any]], gate,
               work_dir: Path, max_attempts: int | None = None) -> SearchResult:
    """Try candidates in order until one passes `gate` (dinov2_triton.export.gates.Gate),
    the candidates run out, or max_attempts were made. Returns every attempt;
    `chosen` is the passing attempt, else the best failing one. A candidate
    whose make/evaluate raises is recorded as an error and the search goes on."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    result = SearchResult(passed=False, chosen=None, gate=gate.to_dict())
    seen = set()
    iterator = iter(candidates)
    while True:
        if max_attempts is not None and len(result.attempts) >= max_attempts:
            result.stopped_because = f"reached the maximum of {max_attempts} attempts"
            break
        t0 = time.perf_counter()
        try:
            cand = next(iterator)
        except StopIteration:
            result.stopped_because = "no more configurations to try"
            break
        key = cand.key if cand.key is not None else repr(sorted(cand.config.items()))
        if key in seen:
            log.info("int8 search: %s is the same model as an earlier attempt; skipped", cand.label)
            continue
        seen.add(key)
        index = len(result.attempts)
        path = work_dir / f"attempt{index:02d}.onnx"
        attempt: dict[str, Any] = {"index": index, "label": cand.label, "config": cand.config,
                                   "path": str(path)}
        try:
            cand.make(path)
            parity = evaluate(path)
        except Exception as exc:  # noqa: BLE001 - one broken configuration must not end the search
            attempt.update(passed=False, error=f"{type(exc).__name__}: {exc}", failures=[],
                           seconds=round(time.perf_counter() - t0, 3))
            result.attempts.append(attempt)
            log.warning("int8 search: attempt %d (%s) could not be evaluated: %s", index, cand.label,
                        attempt["error"])
            continue
        failures = gate.check(parity)
        attempt.update(passed=not failures, failures=failures, parity=parity_summary(parity),
                       seconds=round(time.perf_counter() - t0, 3))
        result.attempts.append(attempt)
        log.info("int8 search: attempt %d %-40s %s (agreement %.4f, logit cosine %.6f)%s", index,
                 cand.label, "PASS" if not failures else "fail",
                 attempt["parity"]["top1_agreement"], attempt["parity"]["logit_cosine_mean"] or float("nan"),
                 "" if not failures else ": " + "; ".join(failures))
        if not failures:
            result.passed, result.chosen = True, index
            result.stopped_because = "gate passed"
            return result
    scored = [a for a in result.attempts if "parity" in a]
    if scored:
        result.chosen = max(scored, key=lambda a: _score(a["parity"]))["index"]
    return result
