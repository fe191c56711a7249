"""Parity of every served variant with the FP32 reference, through the live endpoint.

Served outputs can differ from local ones (docs/field-notes.md #8): a backend that
falls back to another device, a preprocessing step that moved to the server,
an FP16/INT8 build that lost accuracy (docs/field-notes.md #3-#5). So parity is
measured where users meet the model: through Triton, over gRPC (or HTTP),

- the ensemble gets the real files' bytes (server-side decoding and
  preprocessing included);
- each variant gets the tensors made on this side from the stored
  preprocessing record;

and each is compared with the reference computed from those same tensors:
eager PyTorch from the checkpoint, in this process (default), or a served
FP32 model. ``dinov2_triton.train.metrics.parity_metrics`` gives the task-level answers
(top-1 agreement, flipped predictions with file names, accuracy / precision
/ recall / F1 / AUC-ROC and their deltas, docs/field-notes.md #9) next to the tensor
ones (max/mean abs difference, cosine of logits and embeddings).

Every variant is judged by the gate of its precision (``dinov2_triton.export.gates``;
the precision comes from the model config's ``precision`` parameter, else
from the name: ``_fp16``, ``_int8``, ``_fp8``, else fp32; the ensemble takes
its default variant's). Gates can be overridden per precision or per model.

Exit codes of the CLI: 0 every gate passes, 1 a gate fails (or a variant
cannot be run), 2 bad input (flags, files, server or model not there).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dinov2_triton.client.classifier import DEFAULT_PREPROCESS_MODEL, LOGITS, TritonClassifier, input_kind
from dinov2_triton.client.inputs import load_preprocessing
from dinov2_triton.export.gates import GATE_FIELDS, GateError, parse_gate_overrides, resolve_gate
from dinov2_triton.serve.triton_access import (
    ModelNotReady,
    Overloaded,
    ServerUnreachable,
    TritonError,
    config_parameter,
    read_api_key,
)

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")


class ParityInputError(ValueError):
    """Bad input (flags, files, unknown models, server not reachable): CLI exit 2."""


# --------------------------------------------------------------------------- precision and gates
def precision_from_name(name: str) -> str:
    """``dinov2_onnx_fp16`` -> fp16, ``dinov2_trt_int8`` -> int8, anything else fp32."""
    m = re.search(r"_(fp16|bf16|int8|fp8|fp32)$", name)
    return m.group(1) if m else "fp32"


def model_precision(config: Mapping[str, Any], name: str | None = None) -> tuple[str, str]:
    """(precision, where it came from): the config's ``precision`` parameter
    (written by export) wins over the name suffix."""
    name = name or str(config.get("name", ""))
    value = config_parameter(config, "precision")
    if value:
        value = value.strip().lower()
        if value in PRECISIONS:
            return value, "config parameter 'precision'"
    return precision_from_name(name), "model name"


def ensemble_variant(config: Mapping[str, Any]) -> str | None:
    """The ensemble's default variant: its ``classifier_model`` parameter (written
    by export), else the step that produces ``logits``."""
    named = config_parameter(config, "classifier_model")
    if named:
        return named
    steps = (config.get("ensemble_scheduling") or {}).get("step") or []
    for step in steps:
        # output_map: the step model's output name -> the ensemble tensor name
        if LOGITS in (step.get("output_map") or {}).values():
            return step.get("model_name")
    others = [s.get("model_name") for s in steps if s.get("model_name") != DEFAULT_PREPROCESS_MODEL]
    return others[-1] if others else None


def judge(parity: Mapping[str, Any], gate) -> tuple[bool, list[str]]:
    fails = gate.check(dict(parity))
    return not fails, fails


# --------------------------------------------------------------------------- reference
def eager_reference(model_path: str | os.PathLike, pixels: np.ndarray, batch_size: int = 32
                    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(logits, embedding, record) of the checkpoint's model, in this process, FP32."""
    import torch

    from dinov2_triton.train.model import load_classifier

    model, record = load_classifier(model_path)
    logits, embs = [], []
    with torch.inference_mode():
        for i in range(0, len(pixels), batch_size):
            lo, em = model.forward_with_embedding(torch.from_numpy(pixels[i:i + batch_size]))
            logits.append(lo.float().numpy())
            embs.append(em.float().numpy())
    return np.concatenate(logits), np.concatenate(embs), record


# --------------------------------------------------------------------------- discovery
def _candidate(clf: TritonClassifier, name: str) -> dict[str, Any] | None:
    """Config + kind of a model that outputs logits, or None (e.g. the preprocessing model)."""
    cfg = clf.model_config(name)
    if not any(o.get("name") == LOGITS for o in cfg.get("output", [])):
        return None
    try:
        kind = input_kind(cfg)
    except ValueError:
        return None
    return {"name": name, "config": cfg, "kind": kind}


# --------------------------------------------------------------------------- main function
def run_parity(url: str | None = None, protocol: str = "grpc", *, data_path: str | os.PathLike,
               model_path: str | os.PathLike | None = None,
               models: str | Sequence[str] = "all", reference: str = "eager",
               split: str = "test", max_images: int | None = None,
               gates: Mapping[str, Mapping[str, Any]] | Sequence[str] | None = None,
               batch_size: int | None = None, preprocessing: str | os.PathLike | None = None,
               repository: str | os.PathLike | None = None,
               api_key: str | None = None, max_flipped_listed: int = 10,
               timeout_s: float = 300.0, progress: bool = False, retries: int = 3) -> dict[str, Any]:
    """Run parity for ``models`` ("all" = every ready model that outputs logits)
    against ``reference`` ("eager" or a served model name) on ``split``.

    Returns a JSON-ready dict: ``passed`` (all gates), ``variants`` (one entry
    per model: precision, gate, parity metrics, failures, error) and the
    reference's own metrics. Raises ParityInputError for bad input.
    """
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        return _run_parity(Path(tmp), url, protocol, data_path=data_path, model_path=model_path,
                           models=models, reference=reference, split=split, max_images=max_images,
                           gates=gates, batch_size=batch_size, preprocessing=preprocessing,
                           repository=repository, api_key=api_key,
                           max_flipped_listed=max_flipped_listed, timeout_s=timeout_s,
                           progress=progress, retries=retries)


#: above this many bytes the preprocessed split lives in a memory-mapped temp
#: file instead of RAM (10k images at 224 px are 6 GB)
IN_MEMORY_LIMIT = 1 << 30


def preprocess_all(blobs: Sequence[bytes], names: Sequence[str], pre, tmp: Path) -> np.ndarray:
    """Encoded images -> float32 [N,3,H,W] with the stored record, once for
    every variant (memory-mapped when large)."""
    from dinov2_triton.core.preprocessing import preprocess_source

    shape = (len(blobs), 3, pre.image_size, pre.image_size)
    if int(np.prod(shape)) * 4 > IN_MEMORY_LIMIT:
        out = np.lib.format.open_memmap(tmp / "pixels.npy", mode="w+", dtype=np.float32, shape=shape)
    else:
        out = np.empty(shape, np.float32)
    for i, (b, n) in enumerate(zip(blobs, names)):
        out[i] = preprocess_source(b, pre, name=n)
    return out


def _run_parity(tmp: Path, url: str | None, protocol: str, *, data_path, model_path, models, reference,
                split, max_images, gates, batch_size, preprocessing, repository, api_key,
                max_flipped_listed, timeout_s, progress, retries=3) -> dict[str, Any]:
    """run_parity with a temporary folder for the preprocessed split."""
    from dinov2_triton.data.datasets import ManifestError, read_labels, read_manifest

    t_start = time.perf_counter()
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if progress else (lambda msg: None)
    if isinstance(gates, Mapping):
        overrides = {k: dict(v) for k, v in gates.items()}
    else:
        try:
            overrides = parse_gate_overrides(gates, batch_scope=False)
        except GateError as exc:
            raise ParityInputError(str(exc)) from None
    if max_images is not None and max_images < 1:
        raise ParityInputError(f"max_images={max_images}: must be >= 1")
    if reference == "eager" and model_path is None:
        raise ParityInputError("--reference eager needs --model-path (the FP32 checkpoint)")

    # --- data
    try:
        class_names = read_labels(data_path)
        records = read_manifest(data_path, split)
    except (ManifestError, ValueError) as exc:
        raise ParityInputError(str(exc)) from None
    if not records:
        raise ParityInputError(f"{Path(data_path) / 'manifest.csv'}: no images in split {split!r}")
    if max_images is not None:
        records = records[:max_images]
    names = [r.path for r in records]
    labels = [r.label for r in records]
    try:
        blobs = [r.file(data_path).read_bytes() for r in records]
    except OSError as exc:
        raise ParityInputError(f"cannot read a test image: {exc}") from None

    # --- the preprocessing record (dinov2_triton.train.preprocessing_source.resolve_preprocessing: an
    # explicit file as given; a repository's record must equal the checkpoint's)
    try:
        pre = load_preprocessing(model_path=model_path, preprocessing=preprocessing, repository=repository)
    except Exception as exc:  # noqa: BLE001 - ValueError or RecordError, both name the file
        raise ParityInputError(str(exc)) from None
    say(f"preprocessing {len(records)} {split} images ({pre.image_size} px)")
    try:
        pixels = preprocess_all(blobs, names, pre, tmp)
    except ValueError as exc:
        raise ParityInputError(f"{data_path}: {exc}") from None

    # --- discover the served models
    url = url or ("localhost:8001" if protocol == "grpc" else "localhost:8000")
    try:
        probe = TritonClassifier(url, protocol, None, api_key=api_key, timeout_s=timeout_s)
    except ServerUnreachable as exc:
        raise ParityInputError(str(exc)) from None
    try:
        ready, discovery = probe.ready_models()
        if models == "all" or models == ["all"]:
            if not ready and discovery != "repository index":
                raise ParityInputError(f"cannot list the models served at {url}: {discovery}; "
                                       f"or name them with --models a,b")
            wanted = [m for m in ready if m != reference]
        else:
            wanted = [m for m in ([models] if isinstance(models, str) else models)]
            wanted = [m.strip() for w in wanted for m in w.split(",") if m.strip()]
        missing = [m for m in wanted + ([] if reference == "eager" else [reference])
                   if m not in ready and not probe.is_ready(m)]
        if missing:
            listed = "" if discovery == "repository index" else f" ({discovery})"
            raise ParityInputError(f"model(s) {missing} not ready on Triton at {url}; ready "
                                   f"models: {', '.join(ready) or 'none'}{listed}")
        candidates = []
        for m in wanted:
            c = _candidate(probe, m)
            if c is None:
                if models != "all":
                    raise ParityInputError(f"model '{m}' has no '{LOGITS}' output (not a classifier "
                                           f"variant); leave it out of --models")
                continue
            candidates.append(c)
        if not candidates:
            raise ParityInputError(f"no served classifier to compare on Triton at {url} "
                                   f"(ready: {', '.join(ready) or 'none'})")
        for c in candidates:
            if c["kind"] == "bytes":
                variant = ensemble_variant(c["config"])
                vcfg = probe.model_config(variant) if variant else {}
                c["precision"], src = model_precision(vcfg, variant) if variant else ("fp32", "default")
                c["precision_source"] = f"default variant '{variant}' ({src})"
                c["default_variant"] = variant
            else:
                c["precision"], c["precision_source"] = model_precision(c["config"], c["name"])
    except TritonError as exc:
        raise ParityInputError(str(exc)) from None
    finally:
        probe.close()
    say(f"models: {', '.join(c['name'] for c in candidates)} ({discovery})")

    # --- reference
    ref_info: dict[str, Any] = {"kind": reference if reference == "eager" else "served",
                                "model": None if reference == "eager" else reference}
    if reference == "eager":
        say(f"eager FP32 reference from {model_path}")
        try:
            ref_logits, ref_emb, record = eager_reference(model_path, pixels)
        except Exception as exc:  # noqa: BLE001 - WeightsError and friends name the file
            raise ParityInputError(str(exc).splitlines()[0]) from None
        ref_info["model_path"] = str(model_path)
        if list(record.class_names) != list(class_names):
            raise ParityInputError(
                f"{model_path}: class names {record.class_names} differ from "
                f"{Path(data_path) / 'labels.txt'} {class_names}; the checkpoint was not trained "
                f"on this data folder")
    else:
        say(f"served FP32 reference '{reference}'")
        try:
            with TritonClassifier(url, protocol, reference, preprocessing=pre, batch_size=batch_size,
                                  api_key=api_key, timeout_s=timeout_s, retries=retries) as ref:
                if ref.kind == "bytes":
                    ref_logits, ref_emb = ref.infer_images(blobs)
                else:
                    ref_logits, ref_emb = ref.infer_pixels(pixels)
        except (TritonError, ValueError) as exc:
            raise ParityInputError(f"reference '{reference}': {exc}") from None
    if ref_logits.shape[1] != len(class_names):
        raise ParityInputError(f"the reference has {ref_logits.shape[1]} classes, "
                               f"{Path(data_path) / 'labels.txt'} lists {len(class_names)}")
    from dinov2_triton.train.metrics import classification_metrics

    ref_m = classification_metrics(labels, ref_logits, class_names)
    ref_info["metrics"] = {k: ref_m[k] for k in ("accuracy", "precision_macro", "recall_macro",
                                                 "f1_macro", "auc_roc_macro")}

    # --- every variant
    from dinov2_triton.train.metrics import parity_metrics

    variants = []
    for c in candidates:
        name = c["name"]
        gate = resolve_gate(name, overrides, precision=c["precision"])
        entry: dict[str, Any] = {
            "model": name,
            "input": ("encoded image bytes (server-side preprocessing)" if c["kind"] == "bytes"
                      else "pixel_values (client-side preprocessing)"),
            "precision": c["precision"], "precision_source": c["precision_source"],
            "gate": {k: v for k, v in gate.to_dict().items() if k != "extra"},
            "parity": None, "failures": [], "passed": False, "error": None,
        }
        if c.get("default_variant"):
            entry["default_variant"] = c["default_variant"]
        say(f"{name}: {len(records)} images ({entry['input']})")
        t0 = time.perf_counter()
        try:
            clf = TritonClassifier(url, protocol, name, preprocessing=pre, batch_size=batch_size,
                                   api_key=api_key, timeout_s=timeout_s, retries=retries)
            # shed requests (the server's queue policy; retried) are load, not parity failures
            entry["shed_requests"] = clf.stats
            with clf:
                entry["max_batch_size"] = clf.max_batch_size
                if clf.kind == "bytes":
                    logits, emb = clf.infer_images(blobs)
                else:
                    logits, emb = clf.infer_pixels(pixels)
            if logits.shape != ref_logits.shape:
                raise ValueError(f"logits shape {list(logits.shape)} differs from the reference's "
                                 f"{list(ref_logits.shape)}")
            par = parity_metrics(ref_logits, logits, ref_embedding=ref_emb,
                                 cand_embedding=emb if emb is not None and emb.shape == ref_emb.shape
                                 else None,
                                 labels=labels, names=names, max_flipped_listed=max_flipped_listed)
            for ex in par["flipped_examples"]:
                ex["reference_label"] = class_names[ex["reference"]]
                ex["candidate_label"] = class_names[ex["candidate"]]
                ex["true_label"] = class_names[labels[ex["index"]]]
            entry["parity"] = par
            entry["passed"], entry["failures"] = judge(par, gate)
        except ServerUnreachable as exc:
            entry["error"] = str(exc)
            entry["failures"] = [str(exc)]
        except Overloaded as exc:
            entry["error"] = str(exc)
            entry["shed"] = True
            entry["failures"] = [f"not measured: the server shed a request {retries + 1} times "
                                 f"(overloaded; --retries {retries}): {exc}"]
        except (TritonError, ValueError) as exc:
            entry["error"] = str(exc)
            entry["failures"] = [f"could not run: {exc}"]
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        variants.append(entry)

    return {
        "url": url, "protocol": protocol, "data_path": str(data_path), "split": split,
        "n_images": len(records), "class_names": list(class_names),
        "preprocessing": pre.to_dict(), "reference": ref_info, "gate_overrides": overrides,
        "model_discovery": discovery,
        "variants": variants, "passed": all(v["passed"] for v in variants),
        "seconds": round(time.perf_counter() - t_start, 3),
    }


# --------------------------------------------------------------------------- output
def write_json(result: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """The parity result as strict JSON (non-finite numbers as strings), atomically."""
    from dinov2_triton.core.artifact_io import atomic_write_json

    return atomic_write_json(path, result)


def _fmt(value: Any, spec: str, signed: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, ("+" if signed else "") + spec)


def print_report(result: Mapping[str, Any], console=None) -> None:
    """A rich table: one row per variant, then the failures and flipped files."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # a log file or a pipe: do not squeeze the table to 80 columns
            console = Console(width=max(console.width, 180))
    ref = result["reference"]
    ref_name = "eager PyTorch FP32" if ref["kind"] == "eager" else f"served '{ref['model']}'"
    acc = ref["metrics"]["accuracy"]
    table = Table(title=f"Parity vs {ref_name} on {result['n_images']} {result['split']} images "
                        f"(reference accuracy {_fmt(acc, '.2%')}), {result['protocol']} "
                        f"{result['url']}")
    for col in ("model", "input", "precision", "top-1 agree", "flipped", "accuracy", "d acc",
                "d F1", "d AUC", "max |d logit|", "cos logits", "cos emb", "gate"):
        table.add_column(col, justify="left" if col in ("model", "input", "precision") else "right")
    for v in result["variants"]:
        status = "[green]PASS[/]" if v["passed"] else "[red]FAIL[/]"
        p = v["parity"]
        kind = "bytes" if v["input"].startswith("encoded") else "tensor"
        if p is None:
            table.add_row(v["model"], kind, v["precision"], *["-"] * 9, status)
            continue
        d = p.get("deltas", {})
        cand = p.get("candidate_metrics", {})
        table.add_row(
            v["model"], kind, v["precision"], _fmt(p["top1_agreement"], ".2%"),
            f"{p['flipped']}/{p['n']}", _fmt(cand.get("accuracy"), ".2%"),
            _fmt(None if d.get("accuracy") is None else d["accuracy"] * 100, ".2f", True),
            _fmt(None if d.get("f1_macro") is None else d["f1_macro"] * 100, ".2f", True),
            _fmt(None if d.get("auc_roc_macro") is None else d["auc_roc_macro"] * 100, ".2f", True),
            _fmt(p["logits"]["max_abs_diff"], ".3g"), _fmt(p["logits"]["cosine_mean"], ".6f"),
            _fmt(p.get("embedding", {}).get("cosine_mean"), ".6f"), status)
    console.print(table)
    console.print("deltas in points (candidate - reference); cosines are means over images")
    for v in result["variants"]:
        if v["failures"]:
            console.print(f"[red]{v['model']}[/] ({v['precision']} gate): " + "; ".join(v["failures"]),
                          markup=True, highlight=False)
        p = v["parity"]
        if p and p["flipped_examples"]:
            shown = ", ".join(f"{e['name']} ({e['reference_label']} -> {e['candidate_label']})"
                              for e in p["flipped_examples"])
            more = p["flipped"] - len(p["flipped_examples"])
            console.print(f"  {v['model']} flipped: {shown}" + (f" and {more} more" if more > 0 else ""),
                          markup=False, highlight=False)
    verdict = "[green]all gates pass[/]" if result["passed"] else "[red]gate FAILED[/]"
    console.print(verdict)


# --------------------------------------------------------------------------- CLI
PROG = "dinov2-triton qa parity"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog or PROG,
        description="Compare every served variant with the FP32 reference through the live "
                    "Triton endpoint (ensemble: real file bytes; variants: client-preprocessed "
                    "tensors) and gate each one. Exit 0 all pass, 1 a gate fails, 2 bad input.")
    req = p.add_argument_group("Required")
    req.add_argument("--data-path", required=True,
                     help="data folder with manifest.csv and labels.txt (dinov2-triton data)")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--model-path",
                     help="FP32 checkpoint: the eager reference and the preprocessing record")
    opt.add_argument("--url", default=None, help="host:port (default localhost:8001 grpc, :8000 http)")
    opt.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    opt.add_argument("--models", default="all",
                     help="comma-separated served models, or 'all' (every ready model with a "
                          "logits output) (default: %(default)s)")
    opt.add_argument("--reference", default="eager",
                     help="'eager' (PyTorch from --model-path, in this process) or a served FP32 "
                          "model such as dinov2_onnx (default: %(default)s)")
    opt.add_argument("--split", choices=("train", "val", "test"), default="test")
    opt.add_argument("--max-images", type=int, default=None,
                     help="first N images of the split only")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="images per request (default and maximum: each model's max_batch_size)")
    opt.add_argument("--gates", nargs="*", default=[], metavar="KEY.FIELD=VALUE",
                     help="override gate thresholds; KEY is a precision (fp32, fp16, int8, fp8) "
                          f"or a model name; FIELD one of {', '.join(GATE_FIELDS)}; VALUE a "
                          "number or 'none' (e.g. fp16.min_top1_agreement=0.999)")
    src = opt.add_mutually_exclusive_group()
    src.add_argument("--preprocessing", help="preprocessing.json to use instead of the checkpoint's")
    src.add_argument("--repository", help="local model repository to read preprocessing.json from")
    opt.add_argument("--api-key-file", help="the local server's API key file (lists every model "
                                            "through the repository index)")
    opt.add_argument("--out", default=None, help="write the full result as JSON here")
    opt.add_argument("--max-flipped", type=int, default=10, help="flipped files listed per variant")
    opt.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    opt.add_argument("--retries", type=int, default=3,
                     help="resend a request the server shed (overloaded) up to this many times, with a "
                          "jittered back-off (default: %(default)s)")
    opt.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.batch_size is not None and args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size}: must be >= 1")
    try:
        api_key = read_api_key(file=args.api_key_file)
        result = run_parity(args.url, args.protocol, data_path=args.data_path,
                            model_path=args.model_path, models=args.models,
                            reference=args.reference, split=args.split, max_images=args.max_images,
                            gates=args.gates, batch_size=args.batch_size,
                            preprocessing=args.preprocessing, repository=args.repository,
                            api_key=api_key, max_flipped_listed=args.max_flipped,
                            timeout_s=args.timeout, progress=not args.quiet, retries=args.retries)
    except (ParityInputError, ValueError, ModelNotReady) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print_report(result)
    if args.out:
        print(f"wrote {write_json(result, args.out)}")
    return 0 if result["passed"] else 1
