"""`onnx_fp16`: the FP32 ONNX graph converted to FP16 with NVIDIA ModelOpt's
AutoCast (`modelopt.onnx.autocast.convert_to_mixed_precision`), inputs and
outputs kept FP32 (keep_io_types) so clients and the ensemble never change.

Kept in FP32 (docs/field-notes.md #3): LayerNormalization and Softmax (overflow and
accumulation in large ViTs), the classification head (the last Gemm/MatMul
producing `logits`), the patch embedding (the Conv reading the pixels), and
any node whose inputs/outputs exceed `data_max`
(512 by default) on a few training images, which AutoCast measures with
ONNX Runtime before converting. The list is configurable with
`--set fp16_keep_fp32=LayerNormalization,Softmax,head,patch_embed,<node-name regex>`.

onnxconverter-common's FP16 conversion produced a model ONNX Runtime refused
to load on this graph (docs/environment.md); AutoCast's works. There is no FP16
arithmetic on this CPU: the variant is slower here and exists for GPU hosts
(ONNX Runtime CUDA EP); its parity is still checked here on every build
(docs/field-notes.md #4). ModelOpt runs in a child process (`python -m
dinov2_triton.export.variants.onnx_fp16 ...`) so its logging and ONNX Runtime patches stay out of
the export process.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from dinov2_triton.export.quant_graph import node_roles
from dinov2_triton.export.registry import SkipVariant, Variant, register
from dinov2_triton.export.variants.onnx import check_io, fp32_work_copy, ort_runner
from dinov2_triton.export.worker import run_worker

log = logging.getLogger(__name__)

# patch_embed: the first op reads the FP32 pixels; in FP16 it flipped 1 of 300
# near-tie predictions of a ViT-S/14 at 112 px, for about 1% of the FLOPs.
DEFAULT_KEEP_FP32 = "LayerNormalization,Softmax,head,patch_embed"
DEFAULTS: dict[str, Any] = {
    "fp16_keep_fp32": DEFAULT_KEEP_FP32,
    "fp16_data_max": 512.0,       # AutoCast's default: |value| above which a node stays FP32
    "fp16_range_images": 4,       # train images AutoCast measures ranges on (0: random inputs)
    "fp16_timeout_s": 1800,
}
SPECIAL_NODES = ("head", "patch_embed")


class Fp16Error(RuntimeError):
    """The FP16 conversion failed; the message says how."""


def resolve_keep_list(model, entries: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """'LayerNormalization,Softmax,head,blocks\\.11' -> (op types, exact node names).
    An entry is an ONNX op type, 'head' / 'patch_embed' (found by role), or a
    regex searched in node names; an entry that matches nothing is an error."""
    import onnx

    if isinstance(entries, str):
        entries = [e.strip() for e in entries.split(",")]
    entries = [e for e in entries if e]
    graph_ops = {n.op_type for n in model.graph.node}
    roles = None
    op_types: list[str] = []
    nodes: list[str] = []
    for entry in entries:
        if entry in SPECIAL_NODES:
            roles = roles if roles is not None else node_roles(model)
            found = [r.name for r in roles if r.role == entry]
            if not found:
                raise ValueError(f"fp16_keep_fp32: no {entry} node found in the graph")
            nodes += found
        elif onnx.defs.has(entry):
            if entry in graph_ops:   # an op the graph does not use is harmless (e.g. ViT without Conv)
                op_types.append(entry)
        else:
            try:
                pattern = re.compile(entry)
            except re.error as exc:
                raise ValueError(f"fp16_keep_fp32: {entry!r} is neither an ONNX op type nor a valid "
                                 f"node-name regex ({exc})") from None
            found = [n.name for n in model.graph.node if pattern.search(n.name)]
            if not found:
                raise ValueError(f"fp16_keep_fp32: {entry!r} is not an ONNX op type and matches no node name")
            nodes += found
    return op_types, list(dict.fromkeys(nodes))


def convert_file(onnx_path: str, output: str, *, keep_ops: Sequence[str], keep_nodes: Sequence[str],
                 data_max: float, range_data: str | None) -> dict[str, Any]:
    """The ModelOpt AutoCast call (run inside the child process)."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision

    model = convert_to_mixed_precision(
        onnx_path, low_precision_type="fp16", keep_io_types=True,
        op_types_to_exclude=list(keep_ops),
        # AutoCast treats entries as regexes matched at the start: make them exact.
        nodes_to_exclude=[re.escape(n) + "$" for n in keep_nodes],
        data_max=data_max if data_max > 0 else np.inf, calibration_data=range_data, providers=["cpu"])
    onnx.save(model, output)
    return summarize_precisions(model)


def summarize_precisions(model) -> dict[str, Any]:
    """Count compute nodes by the element type of their first output."""
    import onnx

    types = {v.name: v.type.tensor_type.elem_type
             for v in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input)}
    fp16 = fp32 = 0
    kept: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type in ("Cast", "Constant") or not node.output:
            continue
        t = types.get(node.output[0])
        if t == onnx.TensorProto.FLOAT16:
            fp16 += 1
        elif t == onnx.TensorProto.FLOAT:
            fp32 += 1
            kept[node.op_type] = kept.get(node.op_type, 0) + 1
    casts = sum(1 for n in model.graph.node if n.op_type == "Cast")
    return {"fp16_nodes": fp16, "fp32_nodes": fp32, "fp32_nodes_by_op": dict(sorted(kept.items())),
            "cast_nodes": casts}


def run_convert(onnx_path: Path, output: Path, *, keep_ops: Sequence[str], keep_nodes: Sequence[str],
                data_max: float, range_data: Path | None, timeout_s: float = 1800) -> dict[str, Any]:
    """Run `python -m dinov2_triton.export.variants.onnx_fp16` in a child process; returns its summary."""
    output = Path(output)
    nodes_file = output.with_suffix(".keep_nodes.json")
    nodes_file.write_text(json.dumps(list(keep_nodes)))
    log_path = output.with_suffix(".log")
    args = ["--onnx", str(onnx_path), "--output", str(output), "--keep-ops", ",".join(keep_ops),
            "--keep-nodes", str(nodes_file), "--data-max", str(data_max)]
    if range_data is not None:
        args += ["--range-data", str(range_data)]
    run = run_worker("dinov2_triton.export.variants.onnx_fp16", args, output=output, log_path=log_path,
                     timeout_s=timeout_s,
                     error=Fp16Error, what="ModelOpt AutoCast", timeout_what="FP16 conversion",
                     timeout_option="fp16_timeout_s")
    summary = next((json.loads(line) for line in reversed(run.lines) if line.startswith("{")), {})
    summary["seconds"] = round(run.seconds, 2)
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dinov2_triton.export.variants.onnx_fp16",
                                description="FP16 conversion of an ONNX file with NVIDIA ModelOpt AutoCast, "
                                            "FP32 inputs/outputs (the worker the onnx_fp16 variant runs).")
    req = p.add_argument_group("Required")
    req.add_argument("--onnx", required=True, help="FP32 ONNX file")
    req.add_argument("--output", required=True, help="FP16 ONNX file to write")
    opt = p.add_argument_group("Optional")
    opt.add_argument("--keep-ops", default="LayerNormalization,Softmax", help="op types kept in FP32")
    opt.add_argument("--keep-nodes", default=None, help="JSON file: node names kept in FP32")
    opt.add_argument("--data-max", type=float, default=DEFAULTS["fp16_data_max"],
                     help="nodes with |input/output| above this stay FP32 (<= 0 disables the check)")
    opt.add_argument("--range-data", default=None,
                     help=".npz with pixel_values to measure ranges on (default: random inputs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag, path in (("--onnx", args.onnx), ("--range-data", args.range_data), ("--keep-nodes", args.keep_nodes)):
        if path is not None and not Path(path).is_file():
            print(f"error: {flag} {path}: file not found", file=sys.stderr)
            return 2
    keep_nodes = json.loads(Path(args.keep_nodes).read_text()) if args.keep_nodes else []
    summary = convert_file(args.onnx, args.output, keep_ops=[o for o in args.keep_ops.split(",") if o],
                           keep_nodes=keep_nodes, data_max=args.data_max, range_data=args.range_data)
    print(json.dumps(summary))
    return 0


# ---------------------------------------------------------------------------
# the variant
# ---------------------------------------------------------------------------
def _option(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def build(ctx, path: Path) -> dict:
    import modelopt  # noqa: F401 - fail here, clearly, when ModelOpt is not installed
    import onnx

    work, fp32 = fp32_work_copy(ctx, VARIANT, Fp16Error)
    keep_spec = str(_option(ctx.options, "fp16_keep_fp32"))
    keep_ops, keep_nodes = resolve_keep_list(onnx.load(str(fp32), load_external_data=False), keep_spec)

    data_max = float(_option(ctx.options, "fp16_data_max"))
    n_range = int(_option(ctx.options, "fp16_range_images"))
    range_data, range_source = None, "random inputs (AutoCast default)"
    if data_max > 0 and n_range > 0:
        try:
            x = ctx.calibration_images(n_range, seed=1)
            range_data = work / "range.npz"
            np.savez(range_data, pixel_values=np.ascontiguousarray(x, dtype=np.float32))
            range_source = f"{len(x)} train images"
        except SkipVariant as exc:   # no data folder: AutoCast's random inputs still catch overflow
            log.warning("onnx_fp16: %s; measuring FP16 ranges on random inputs", exc)

    log.info("onnx_fp16: converting with ModelOpt AutoCast (FP32 kept: %s%s)...", ",".join(keep_ops),
             f" + {len(keep_nodes)} node(s)" if keep_nodes else "")
    out = work / "model_fp16.onnx"
    summary = run_convert(fp32, out, keep_ops=keep_ops, keep_nodes=keep_nodes, data_max=data_max,
                          range_data=range_data, timeout_s=float(_option(ctx.options, "fp16_timeout_s")))
    shutil.copyfile(out, path)
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    shapes = check_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    import modelopt as _mo

    return {"tool": "nvidia-modelopt autocast", "modelopt": getattr(_mo, "__version__", "?"),
            "keep_io_types": True, "keep_fp32_spec": keep_spec, "keep_fp32_op_types": keep_ops,
            "keep_fp32_nodes": keep_nodes, "data_max": data_max, "range_check_on": range_source,
            "conversion": summary, "io": shapes,
            "opset": next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)}


VARIANT = register(Variant(
    name="onnx_fp16", platform="onnxruntime_onnx", filename="model.onnx", precision="fp16",
    # an ONNX Runtime CPU session, as for the FP32 parent
    build=build, load_runner=ort_runner, parent="onnx", gate="fp16",
    description="ONNX FP16 (ModelOpt AutoCast; LayerNorm, Softmax, patch embedding and head kept FP32; "
                "FP32 I/O), "
                "ONNX Runtime backend"))


if __name__ == "__main__":
    sys.exit(main())
