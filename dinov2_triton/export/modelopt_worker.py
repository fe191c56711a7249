"""ModelOpt ONNX post-training quantization, run in a child process.

`run_modelopt_quantize` (the export process's side) runs
`python -m dinov2_triton.export.modelopt_worker ...` through dinov2_triton.export.worker.run_worker;
`main` / `quantize_file` (the child's side) call
`modelopt.onnx.quantization.quantize` on the given nodes with explicit Q/DQ
(INT8 or FP8), per-channel symmetric weights and per-tensor activations.
Why a child process: ModelOpt patches ONNX Runtime's quantizer and logging
at import (docs/environment.md), which must not leak into the export process.
Used by the onnx_int8 variant and the TensorRT FP8 variant.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from dinov2_triton.export.quant_graph import DEFAULT_ROLES, Int8Error, node_roles, select_nodes
from dinov2_triton.export.worker import run_worker

CALIB_METHODS = ("entropy", "max")   # what ModelOpt's INT8 path offers (anything else means max)
WORKER_MODULE = "dinov2_triton.export.modelopt_worker"


def run_modelopt_quantize(onnx_path: Path, output: Path, calib_npy: Path, nodes: Sequence[str], *,
                          calib_method: str, dq_only: bool = True, calib_eps: str = "cpu",
                          timeout_s: float = 3600, log_path: Path | None = None, mode: str = "int8") -> dict[str, Any]:
    """Run `python -m dinov2_triton.export.modelopt_worker` (ModelOpt) in a child process; returns
    timing info, raises Int8Error with the log tail on failure."""
    output = Path(output)
    nodes_file = output.with_suffix(".nodes.json")
    nodes_file.write_text(json.dumps(list(nodes)))
    log_path = Path(log_path or output.with_suffix(".log"))
    args = ["--onnx", str(onnx_path), "--output", str(output), "--calib", str(calib_npy),
            "--nodes", str(nodes_file), "--calib-method", calib_method, "--calib-eps", calib_eps,
            "--mode", mode] + (["--dq-only"] if dq_only else ["--no-dq-only"])
    run = run_worker(WORKER_MODULE, args, output=output, log_path=log_path, timeout_s=timeout_s,
                     error=Int8Error, what="ModelOpt quantization", timeout_option="int8_timeout_s")
    return {"seconds": round(run.seconds, 2)}


def quantize_file(onnx_path: str, output: str, calib: np.ndarray, nodes: Sequence[str], *,
                  calib_method: str = "entropy", dq_only: bool = True, calib_eps: Sequence[str] = ("cpu",),
                  mode: str = "int8") -> None:
    """The ModelOpt call itself (run inside the child process); mode int8 or fp8."""
    from modelopt.onnx.quantization import quantize

    if calib_method not in CALIB_METHODS:
        raise ValueError(f"--calib-method {calib_method!r}: choose from {CALIB_METHODS}")
    if not nodes:
        raise ValueError("no nodes to quantize")
    # Exact names: ModelOpt treats each entry as a regex matched at the start.
    patterns = [re.escape(n) + "$" for n in nodes]
    if mode not in ("int8", "fp8"):
        raise ValueError(f"--mode {mode!r}: choose int8 or fp8")
    quantize(onnx_path, quantize_mode=mode, calibration_data={"pixel_values": calib},
             calibration_method=calib_method, calibration_eps=list(calib_eps), nodes_to_quantize=patterns,
             high_precision_dtype="fp32",   # FP16 elsewhere is slower on CPU; TensorRT picks FP16 itself
             dq_only=dq_only, output_path=output, log_level="WARNING")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2_triton.export.modelopt_worker",
                                description="INT8 Q/DQ quantization of an ONNX file with NVIDIA ModelOpt "
                                            "(the worker the onnx_int8 variant runs in a child process).")
    req = p.add_argument_group("Required")
    req.add_argument("--onnx", required=True, help="FP32 ONNX file (input pixel_values)")
    req.add_argument("--output", required=True, help="Q/DQ ONNX file to write")
    req.add_argument("--calib", required=True, help=".npy float32 [N,3,H,W] preprocessed TRAIN images")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--nodes", default=None,
                     help="JSON file with the node names to quantize (default: qkv/proj/fc1/fc2 of every block)")
    opt.add_argument("--calib-method", choices=CALIB_METHODS, default="entropy")
    opt.add_argument("--mode", choices=("int8", "fp8"), default="int8", help="quantization mode")
    opt.add_argument("--calib-eps", default="cpu", help="comma-separated ModelOpt calibration EPs (cpu, cuda:0, trt)")
    opt.add_argument("--dq-only", dest="dq_only", action="store_true", default=True,
                     help="store int8 weights (DQ only; 4x smaller file)")
    opt.add_argument("--no-dq-only", dest="dq_only", action="store_false", help="float weights + Q/DQ")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnx

    for flag, path in (("--onnx", args.onnx), ("--calib", args.calib)):
        if not Path(path).is_file():
            print(f"error: {flag} {path}: file not found", file=sys.stderr)
            return 2
    calib = np.load(args.calib)
    if calib.ndim != 4 or calib.dtype != np.float32:
        print(f"error: --calib {args.calib}: expected float32 [N,3,H,W], got {calib.dtype} {calib.shape}",
              file=sys.stderr)
        return 2
    if args.nodes:
        nodes = json.loads(Path(args.nodes).read_text())
    else:
        nodes = select_nodes(node_roles(onnx.load(args.onnx, load_external_data=False)), DEFAULT_ROLES)
    try:
        quantize_file(args.onnx, args.output, calib, nodes, calib_method=args.calib_method,
                      dq_only=args.dq_only, calib_eps=[e for e in args.calib_eps.split(",") if e],
                      mode=args.mode)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "nodes": len(nodes), "calibration_images": int(len(calib))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
