"""Classification metrics and variant-vs-reference parity, in one place.

Training, export verification, the accuracy gates and the live-endpoint
parity client all call these functions, so a number means the same thing in
every report. Metric definitions are scikit-learn's."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def classification_metrics(labels: Sequence[int], logits: np.ndarray,
                           class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """accuracy, macro + per-class precision/recall/F1, AUC-ROC (one-vs-rest,
    macro) and the confusion matrix. AUC is None (with the reason) when the
    labels present do not allow it (e.g. a single class in the split)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score

    y = np.asarray(labels, dtype=np.int64)
    logits = np.asarray(logits)
    if logits.ndim != 2 or len(y) != logits.shape[0]:
        raise ValueError(f"classification_metrics: {len(y)} labels vs logits of shape {logits.shape}")
    n_classes = logits.shape[1]
    all_labels = list(range(n_classes))
    pred = logits.argmax(axis=1)
    p, r, f1, support = precision_recall_fscore_support(y, pred, labels=all_labels, zero_division=0)
    mp, mr, mf1, _ = precision_recall_fscore_support(y, pred, labels=all_labels, average="macro",
                                                     zero_division=0)
    out: dict[str, Any] = {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)) if len(y) else float("nan"),
        "precision_macro": float(mp),
        "recall_macro": float(mr),
        "f1_macro": float(mf1),
        "auc_roc_macro": None,
    }
    present = np.unique(y)
    if len(present) < 2:
        out["auc_roc_note"] = "undefined: fewer than 2 classes present"
    else:
        probs = softmax(logits)
        try:
            if n_classes == 2:
                out["auc_roc_macro"] = float(roc_auc_score(y, probs[:, 1]))
            else:
                # Only classes present in y can be scored one-vs-rest.
                aucs = [roc_auc_score((y == c).astype(int), probs[:, c]) for c in present]
                out["auc_roc_macro"] = float(np.mean(aucs))
                if len(present) < n_classes:
                    out["auc_roc_note"] = f"macro over the {len(present)} classes present"
        except ValueError as exc:
            out["auc_roc_note"] = f"undefined: {exc}"
    names = list(class_names) if class_names is not None else [str(i) for i in all_labels]
    out["per_class"] = {
        names[c]: {"precision": float(p[c]), "recall": float(r[c]), "f1": float(f1[c]),
                   "support": int(support[c])}
        for c in all_labels
    }
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=all_labels).tolist()
    return out


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64).reshape(len(a), -1)
    b = b.astype(np.float64).reshape(len(b), -1)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.where(den > 0, num / np.maximum(den, 1e-300), np.where(num == 0, 1.0, 0.0))


def tensor_diff(ref: np.ndarray, cand: np.ndarray) -> dict[str, float]:
    """max/mean abs difference, max relative difference (vs the reference
    tensor's largest magnitude) and the mean/min cosine similarity per row."""
    ref = np.asarray(ref, dtype=np.float64)
    cand = np.asarray(cand, dtype=np.float64)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {ref.shape} vs candidate {cand.shape}")
    if not np.isfinite(cand).all():
        return {"max_abs_diff": float("inf"), "mean_abs_diff": float("inf"), "max_rel_diff": float("inf"),
                "cosine_mean": float("nan"), "cosine_min": float("nan"), "non_finite": True}
    diff = np.abs(ref - cand)
    scale = max(float(np.abs(ref).max()), 1e-12)
    cos = _cosine_rows(ref, cand)
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_rel_diff": float(diff.max() / scale), "cosine_mean": float(cos.mean()),
            "cosine_min": float(cos.min()), "non_finite": False}


def parity_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, *,
                   ref_embedding: np.ndarray | None = None, cand_embedding: np.ndarray | None = None,
                   labels: Sequence[int] | None = None, names: Sequence[str] | None = None,
                   max_flipped_listed: int = 10) -> dict[str, Any]:
    """Task-level and tensor-level agreement of a candidate with the reference
    (docs/field-notes.md #9): top-1 agreement, flipped predictions (with names), metric
    deltas when labels are given, and logit/embedding differences."""
    ref_logits, cand_logits = np.asarray(ref_logits), np.asarray(cand_logits)
    ref_pred, cand_pred = ref_logits.argmax(1), cand_logits.argmax(1)
    flipped = np.nonzero(ref_pred != cand_pred)[0]
    out: dict[str, Any] = {
        "n": int(len(ref_pred)),
        "top1_agreement": float((ref_pred == cand_pred).mean()) if len(ref_pred) else float("nan"),
        "flipped": int(len(flipped)),
        "flipped_examples": [
            {"index": int(i), "name": (names[i] if names is not None else None),
             "reference": int(ref_pred[i]), "candidate": int(cand_pred[i])}
            for i in flipped[:max_flipped_listed]],
        "logits": tensor_diff(ref_logits, cand_logits),
    }
    if ref_embedding is not None and cand_embedding is not None:
        out["embedding"] = tensor_diff(ref_embedding, cand_embedding)
    if labels is not None:
        ref_m = classification_metrics(labels, ref_logits)
        cand_m = classification_metrics(labels, cand_logits)
        out["reference_metrics"] = {k: ref_m[k] for k in _HEADLINE}
        out["candidate_metrics"] = {k: cand_m[k] for k in _HEADLINE}
        out["deltas"] = {k: (None if ref_m[k] is None or cand_m[k] is None else cand_m[k] - ref_m[k])
                         for k in _HEADLINE}
    return out


_HEADLINE = ("accuracy", "precision_macro", "recall_macro", "f1_macro", "auc_roc_macro")

# The accuracy gates (Gate, GATES: pass/fail thresholds per precision) live in
# export/gates.py: only export and perf judge variants.
