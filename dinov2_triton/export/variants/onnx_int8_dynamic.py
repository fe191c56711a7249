"""`onnx_int8_dynamic`: ONNX Runtime dynamic quantization of the FP32 ONNX
graph, served by ONNX Runtime (`onnxruntime_onnx`, model.onnx).

Weights are quantized once, offline (int8, symmetric); activations are
quantized at run time, per batch, from their observed range
(DynamicQuantizeLinear -> MatMulInteger, fused by ORT into
DynamicQuantizeMatMul). No calibration set is needed, and an outlier in one
image cannot spoil a static scale for every later image, which is why it
kept top-1 agreement where static Q/DQ needs an accuracy search on some
hosts (README, "the fastest CPU deployment").

Which nodes: exactly the weight matrix multiplies the static `onnx_int8`
variant quantizes (attention qkv/proj, MLP fc1/fc2; dinov2_triton.export.quant_graph), so
the two INT8 variants differ in the quantization scheme only. The Q/DQ
`onnx_int8` stays: TensorRT's explicit-quantization engine is built from it.

Why a child process: NVIDIA ModelOpt patches ONNX Runtime's quantizer at
import (docs/environment.md) and other variants of the same export use ModelOpt.
`run_quantize_dynamic` runs ``python -m dinov2_triton.export.variants.onnx_int8_dynamic`` through
dinov2_triton.export.worker.run_worker; `main` is that child.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from dinov2_triton.export.registry import SkipVariant, Variant, register
from dinov2_triton.export.registry import as_bool as _as_bool

WORKER_MODULE = "dinov2_triton.export.variants.onnx_int8_dynamic"
DEFAULTS: dict[str, Any] = {
    # per-channel weight scales: one scale per output column of each MatMul
    # (ORT's DynamicQuantizeMatMul takes a per-column B scale)
    "int8_dynamic_per_channel": True,
    "int8_dynamic_roles": "qkv,proj,fc1,fc2",
    "int8_dynamic_timeout_s": 1800,
}


class DynamicInt8Error(RuntimeError):
    """The dynamic quantization could not produce a model; the message says why."""


def _option(options, key: str):
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def run_quantize_dynamic(onnx_path: Path, output: Path, nodes: Sequence[str], *, per_channel: bool,
                         timeout_s: float, log_path: Path | None = None) -> dict[str, Any]:
    """Run the child process; returns its JSON summary line plus the seconds.
    Raises DynamicInt8Error with the log's tail when it fails."""
    from dinov2_triton.export.worker import run_worker

    output = Path(output)
    nodes_file = output.with_suffix(".nodes.json")
    nodes_file.write_text(json.dumps(list(nodes)))
    log_path = Path(log_path or output.with_suffix(".log"))
    args = ["--onnx", str(onnx_path), "--output", str(output), "--nodes", str(nodes_file)]
    args += ["--per-channel"] if per_channel else ["--no-per-channel"]
    run = run_worker(WORKER_MODULE, args, output=output, log_path=log_path, timeout_s=timeout_s,
                     error=DynamicInt8Error, what="ONNX Runtime quantize_dynamic",
                     timeout_option="int8_dynamic_timeout_s")
    summary: dict[str, Any] = {}
    for line in reversed(run.lines):
        if line.startswith("{"):
            summary = json.loads(line)
            break
    return {**summary, "seconds": round(run.seconds, 2)}


def quantize_file(onnx_path: str, output: str, nodes: Sequence[str], *, per_channel: bool) -> dict[str, Any]:
    """The ORT call itself (inside the child process)."""
    import onnxruntime
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        raise ValueError("no nodes to quantize")
    quantize_dynamic(onnx_path, output, weight_type=QuantType.QInt8, per_channel=per_channel,
                     nodes_to_quantize=list(nodes), op_types_to_quantize=["MatMul"])
    return {"onnxruntime": onnxruntime.__version__, "weight_type": "QInt8", "activation_type": "QUInt8 (dynamic)",
            "per_channel": per_channel}


def build(ctx, path: Path) -> dict:
    try:
        import onnx
        import onnxruntime.quantization  # noqa: F401 - fail here, clearly, when ORT lacks its quantizer
    except ImportError as exc:
        raise SkipVariant(f"not built: onnxruntime.quantization is not importable here ({exc})") from None

    from dinov2_triton.export.quant_graph import node_roles, parse_roles, quantized_nodes, select_nodes
    from dinov2_triton.export.variants.onnx import check_io, fp32_work_copy

    opts = ctx.options
    work, fp32 = fp32_work_copy(ctx, _VARIANT, DynamicInt8Error)
    roles = node_roles(onnx.load(str(fp32), load_external_data=False))
    quant_roles = parse_roles(_option(opts, "int8_dynamic_roles"))
    nodes = select_nodes(roles, quant_roles)
    if not nodes:
        raise DynamicInt8Error(f"no node matches int8_dynamic_roles={','.join(quant_roles)}; roles found: "
                               f"{sorted({r.role for r in roles})}")
    per_channel = _as_bool(_option(opts, "int8_dynamic_per_channel"), "int8_dynamic_per_channel")
    out = work / "dynamic.onnx"
    run = run_quantize_dynamic(fp32, out, nodes, per_channel=per_channel,
                               timeout_s=float(_option(opts, "int8_dynamic_timeout_s")))
    model = onnx.load(str(out))
    onnx.checker.check_model(model)
    shapes = check_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    integer_ops = [n for n in model.graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    if len(integer_ops) != len(nodes):
        # quantize_dynamic skips a MatMul it cannot quantize (e.g. no constant weight) without failing
        raise DynamicInt8Error(f"{len(nodes)} MatMuls were selected but {len(integer_ops)} were quantized")
    onnx.save(model, str(path))
    by_role: dict[str, int] = {}
    chosen = set(nodes)
    for r in roles:
        if r.name in chosen:
            by_role[r.role] = by_role.get(r.role, 0) + 1
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"tool": "onnxruntime.quantization.quantize_dynamic", **run,
            "scheme": "int8 symmetric weights (per-channel)" if per_channel else "int8 symmetric weights",
            "activations": "uint8, quantized at run time per batch (no calibration set)",
            "quantized_nodes": len(nodes), "quantized_by_role": by_role, "quantized_roles": list(quant_roles),
            "qdq_nodes_left": len(quantized_nodes(model)), "io": shapes, "op_types": dict(sorted(ops.items()))}


def load_runner(path: Path):
    from dinov2_triton.export.variants.onnx import ort_runner

    return ort_runner(path)


# ---------------------------------------------------------------------------
# the child process
# ---------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2_triton.export.variants.onnx_int8_dynamic",
                                description="ONNX Runtime dynamic INT8 quantization of an FP32 ONNX file (the "
                                            "worker the onnx_int8_dynamic variant runs in a child process).")
    req = p.add_argument_group("Required")
    req.add_argument("--onnx", required=True, help="FP32 ONNX file (input pixel_values)")
    req.add_argument("--output", required=True, help="quantized ONNX file to write")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--nodes", default=None,
                     help="JSON file with the MatMul node names to quantize (default: qkv/proj/fc1/fc2 of every block)")
    opt.add_argument("--per-channel", dest="per_channel", action="store_true", default=True,
                     help="one weight scale per output column")
    opt.add_argument("--no-per-channel", dest="per_channel", action="store_false", help="one scale per weight")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import onnx

    from dinov2_triton.export.quant_graph import DEFAULT_ROLES, node_roles, select_nodes

    if not Path(args.onnx).is_file():
        print(f"error: --onnx {args.onnx}: file not found", file=sys.stderr)
        return 2
    if args.nodes:
        try:
            nodes = json.loads(Path(args.nodes).read_text())
        except (OSError, ValueError) as exc:
            print(f"error: --nodes {args.nodes}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes):
            print(f"error: --nodes {args.nodes}: expected a JSON list of node names", file=sys.stderr)
            return 2
    else:
        nodes = select_nodes(node_roles(onnx.load(args.onnx, load_external_data=False)), DEFAULT_ROLES)
    try:
        info = quantize_file(args.onnx, args.output, nodes, per_channel=args.per_channel)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"output": args.output, "nodes": len(nodes), **info}))
    return 0


_VARIANT = register(Variant(
    name="onnx_int8_dynamic", platform="onnxruntime_onnx", filename="model.onnx", precision="int8",
    build=build, load_runner=load_runner, parent="onnx", gate="int8",
    description="ONNX INT8, ONNX Runtime dynamic quantization (int8 weights, activations quantized per batch "
                "at run time, no calibration), the same MatMuls as onnx_int8; ONNX Runtime backend"))


if __name__ == "__main__":
    sys.exit(main())
