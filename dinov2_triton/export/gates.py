"""The accuracy gates: one module for export verification, the INT8 search
and the live-endpoint parity check (``dinov2-triton qa parity``).

A :class:`Gate` is a set of pass/fail thresholds of a candidate against the
FP32 reference; :data:`GATES` holds one per precision. Users override them
with one flag, ``--gates SCOPE.FIELD=VALUE`` (``dinov2-triton export``,
``dinov2-triton qa parity``, ``dinov2-triton bench``), parsed by
:func:`parse_gate_overrides`:

* SCOPE is a precision (``fp16``), an export variant (``onnx_int8``), a
  served model name (``dinov2_onnx_int8``) or ``batch`` (the batch-1 vs
  batch-N consistency check of the export verification);
* FIELD is one of :data:`GATE_FIELDS` (:data:`BATCH_FIELDS` for ``batch``);
* VALUE is a number >= 0, or ``none`` to disable that check.

:func:`resolve_gate` applies them in a fixed order: the precision's gate,
then the precision-level overrides, then the variant- or model-level ones.
Standard library only: importing it is free.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping, Sequence

#: the one spelling of the override flag (export and dinov2_triton.qa.parity)
FLAG = "--gates"
#: fields of Gate a user may set (name/extra are bookkeeping)
GATE_FIELDS = ("min_top1_agreement", "min_embedding_cosine", "min_logit_cosine", "max_accuracy_drop",
               "max_logit_abs_diff")
BATCH_SCOPE = "batch"
BATCH_FIELDS = ("max_rel_diff", "min_top1_agreement")
#: the precision whose gate judges a precision that has none of its own
FALLBACK_PRECISION = "fp32"

# A value exactly on a threshold passes: EPS absorbs float rounding such as
# 0.99 - 1.0 = -0.010000000000000009.
_EPS = 1e-9

GateOverrides = dict[str, dict[str, "float | None"]]


class GateError(ValueError):
    """A gate override that cannot be applied; str(exc) names the entry."""


@dataclass
class Gate:
    """Pass/fail thresholds of a candidate against the FP32 reference.
    None disables a check. Deltas are in absolute units (0.01 = 1 point)."""
    min_top1_agreement: float | None = None
    min_embedding_cosine: float | None = None
    min_logit_cosine: float | None = None
    max_accuracy_drop: float | None = None
    max_logit_abs_diff: float | None = None
    name: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, parity: Mapping[str, Any]) -> list[str]:
        """The failures of dinov2_triton.train.metrics.parity_metrics output `parity`
        against this gate (empty = pass), each with its numbers."""
        fails = []
        if self.min_top1_agreement is not None and not parity["top1_agreement"] >= self.min_top1_agreement - _EPS:
            fails.append(f"top-1 agreement {parity['top1_agreement']:.4%} < {self.min_top1_agreement:.2%} "
                         f"({parity['flipped']} of {parity['n']} predictions flipped)")
        if self.min_embedding_cosine is not None:
            cos = (parity.get("embedding") or {}).get("cosine_mean")
            if cos is None or not cos >= self.min_embedding_cosine - _EPS:
                fails.append(f"embedding cosine {cos} < {self.min_embedding_cosine}")
        if self.min_logit_cosine is not None and not parity["logits"]["cosine_mean"] >= self.min_logit_cosine - _EPS:
            fails.append(f"logit cosine {parity['logits']['cosine_mean']:.6f} < {self.min_logit_cosine}")
        max_abs = parity["logits"]["max_abs_diff"]
        if self.max_logit_abs_diff is not None and not max_abs <= self.max_logit_abs_diff + _EPS:
            fails.append(f"logit max abs diff {parity['logits']['max_abs_diff']:.3g} > {self.max_logit_abs_diff}")
        if self.max_accuracy_drop is not None:
            delta = (parity.get("deltas") or {}).get("accuracy")
            if delta is None:
                fails.append("accuracy drop not measurable: no labels given")
            elif not -delta <= self.max_accuracy_drop + _EPS:
                fails.append(f"accuracy drop {-delta * 100:.2f} points > {self.max_accuracy_drop * 100:.2f}")
        if parity["logits"].get("non_finite"):
            fails.append("candidate produced NaN/Inf logits")
        return fails

    def evaluate(self, parity: Mapping[str, Any]) -> "GateResult":
        return GateResult(gate=self, failures=tuple(self.check(parity)))


@dataclass(frozen=True)
class GateResult:
    """The verdict of one gate on one parity measurement."""
    gate: Gate
    failures: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "failures": list(self.failures), "gate": self.gate.to_dict()}


# Default gates per precision (FP16 and BF16 >= 99.9% top-1 and cosine >= 0.999;
# INT8/FP8 >= 99% top-1 and <= 1 accuracy point lost).
GATES: dict[str, Gate] = {
    "fp32": Gate(name="fp32", min_top1_agreement=0.999, min_embedding_cosine=0.9999),
    "fp16": Gate(name="fp16", min_top1_agreement=0.999, min_embedding_cosine=0.999),
    "bf16": Gate(name="bf16", min_top1_agreement=0.999, min_embedding_cosine=0.999),
    "int8": Gate(name="int8", min_top1_agreement=0.99, max_accuracy_drop=0.01),
    "fp8": Gate(name="fp8", min_top1_agreement=0.99, max_accuracy_drop=0.01),
}

# Largest allowed relative logit difference (vs the largest |logit|) between
# batch 1 and batch N outputs of the same images. FP32 kernels differ only in
# summation order (~1e-6 measured); reduced-precision engines may pick other
# kernels per batch size, hence the looser bounds.
BATCH_MAX_REL_DIFF = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-2, "int8": 5e-2, "fp8": 5e-2}


# ----------------------------------------------------------------------------- parsing
def _value(item: str, text: str, flag: str) -> float | None:
    if text.lower() in ("none", "off", "null"):
        return None
    try:
        value = float(text)
    except ValueError:
        raise GateError(f"{flag} {item!r}: {text!r} is not a number (or 'none')") from None
    if not math.isfinite(value) or value < 0:
        raise GateError(f"{flag} {item!r}: must be a finite number >= 0 (or 'none')")
    return value


def parse_gate_overrides(entries: Iterable[str] | str | None, *, scopes: Iterable[str] | None = None,
                         batch_scope: bool = True, flag: str = FLAG) -> GateOverrides:
    """``["fp16.min_top1_agreement=0.99", "onnx_int8.max_accuracy_drop=none",
    "batch.max_rel_diff=1e-3"]`` -> ``{scope: {field: value}}``.

    Entries may also be separated by commas or spaces within one string.
    `scopes`: the accepted scopes (besides ``batch`` when `batch_scope`);
    None accepts any name (dinov2_triton.qa.parity: a served model may not come from
    this checkout's registry). Raises GateError naming the entry and `flag`."""
    if isinstance(entries, str):
        entries = [entries]
    known = set(scopes) if scopes is not None else None
    out: GateOverrides = {}
    for entry in entries or ():
        for item in re.sub(r"\s*=\s*", "=", str(entry)).replace(",", " ").split():
            key, sep, text = item.partition("=")
            scope, dot, name = key.rpartition(".")
            if not sep or not dot or not scope or not name:
                raise GateError(f"{flag} {item!r}: expected SCOPE.FIELD=VALUE, e.g. "
                                f"fp16.min_top1_agreement=0.99 (SCOPE: a precision, variant or model)")
            is_batch = batch_scope and scope == BATCH_SCOPE
            if not is_batch and known is not None and scope not in known:
                extra = f" or '{BATCH_SCOPE}'" if batch_scope else ""
                raise GateError(f"{flag} {item!r}: unknown scope {scope!r}; use a precision, variant or "
                                f"model name ({', '.join(sorted(known))}){extra}")
            allowed = BATCH_FIELDS if is_batch else GATE_FIELDS
            if name not in allowed:
                raise GateError(f"{flag} {item!r}: unknown field {name!r}; choose from {', '.join(allowed)}")
            out.setdefault(scope, {})[name] = _value(item, text, flag)
    return out


# ----------------------------------------------------------------------------- resolving
def _scopes_of(subject: Any, precision: str | None) -> tuple[str, tuple[str, ...]]:
    """(gate key, override scopes after it) of a registry Variant or a model name."""
    if isinstance(subject, str):
        if precision is None:
            raise TypeError("resolve_gate(model_name, ...): give precision= as well")
        return precision, (subject,)
    key = precision or subject.gate
    return key, tuple(dict.fromkeys((subject.name, subject.model_name)))


def resolve_gate(subject: Any, overrides: Mapping[str, Mapping[str, Any]] | None = None, *,
                 precision: str | None = None) -> Gate:
    """The gate of `subject` with the overrides applied.

    `subject` is a registry Variant (its ``gate`` key; overrides by precision,
    then by variant name, then by model name) or a served model name with
    `precision` (overrides by precision, then by model name). A precision
    without a gate of its own is judged by the fp32 gate. GATES itself
    is never modified."""
    key, names = _scopes_of(subject, precision)
    base = GATES.get(key) or GATES[FALLBACK_PRECISION]
    gate = dataclasses.replace(base, extra=dict(base.extra))
    overrides = overrides or {}
    changes: dict[str, Any] = {}
    for scope in (key, *names):
        for name, value in (overrides.get(scope) or {}).items():
            if name not in GATE_FIELDS:
                raise GateError(f"gate override {scope}.{name}: unknown field; choose from {', '.join(GATE_FIELDS)}")
            changes[name] = value
    if changes:
        gate = dataclasses.replace(gate, **changes, name=f"{base.name}+overrides")
    return gate


#: the precisions whose max_accuracy_drop --accuracy-budget sets
BUDGET_PRECISIONS = ("int8", "fp8")


def with_accuracy_budget(overrides: Mapping[str, Mapping[str, Any]] | None, budget: float | None
                         ) -> GateOverrides:
    """`overrides` plus max_accuracy_drop = `budget` for the INT8/FP8 gates,
    unless an override sets it for that precision already (variant-level
    overrides still apply after it). The export verification and the INT8
    search both judge with the result, so the search never settles on a
    configuration the verification would then reject."""
    out: GateOverrides = {k: dict(v) for k, v in (overrides or {}).items()}
    if budget is None:
        return out
    budget = float(budget)
    if not math.isfinite(budget) or budget < 0:
        raise GateError(f"--accuracy-budget {budget}: must be a finite number >= 0 (0.01 = 1 accuracy point)")
    for precision in BUDGET_PRECISIONS:
        if budget != GATES[precision].max_accuracy_drop:
            out.setdefault(precision, {}).setdefault("max_accuracy_drop", budget)
    return out


def batch_tolerance(precision: str, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Allowed batch-1 vs batch-N difference for a precision, with ``batch.*`` overrides."""
    batch = dict((overrides or {}).get(BATCH_SCOPE) or {})
    default_rel = BATCH_MAX_REL_DIFF.get(precision, BATCH_MAX_REL_DIFF[FALLBACK_PRECISION])
    return {"max_rel_diff": batch.get("max_rel_diff", default_rel),
            "min_top1_agreement": batch.get("min_top1_agreement", 1.0 if precision == "fp32" else 0.99)}


def override_help(scopes: Sequence[str] = ()) -> str:
    """The help text of the --gates flag."""
    names = f" ({', '.join(scopes)})" if scopes else ""
    return (f"gate overrides SCOPE.FIELD=VALUE; SCOPE a precision, variant or model name{names}"
            f" or '{BATCH_SCOPE}'; FIELD one of {', '.join(GATE_FIELDS)} (batch: "
            f"{', '.join(BATCH_FIELDS)}); VALUE a number or 'none' (disables the check)")
