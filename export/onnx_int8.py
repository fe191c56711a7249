"""`onnx_int8`: INT8 post-training quantization of the FP32 ONNX graph with
NVIDIA ModelOpt (explicit Q/DQ, per-channel symmetric weights, per-tensor
activations), served by ONNX Runtime and the input of the TensorRT INT8
engine (explicit quantization).

What is quantized, and why (FIELD_NOTES 5, measured on this CPU):
- By default only the four weight matrix multiplies of every block (attention
  qkv and proj, MLP fc1 and fc2). ONNX Runtime fuses exactly this pattern
  (DQ(activation) + DQ(int8 weight) -> MatMul) into MatMulIntegerToFloat
  (VNNI), which is where the speed-up comes from.
- Never LayerNorm, Softmax, GELU or the residual Adds: ModelOpt's default
  placement quantizes them and top-1 agreement fell to 28% (ENVIRONMENT.md).
- The attention matmuls (Q.K^T, attn.V) stay FP32: quantizing them cut
  agreement from 99.7% to 95% for no speed-up on ORT CPU.
- The patch embedding (Conv) and the classification head stay FP32: ORT
  does not fuse DQ->Conv / DQ->Gemm with a float output, so quantizing them
  only adds error.
- Weights are stored as int8 initializers (`dq_only`): the file is 4x smaller
  than with float weights + Q/DQ, with identical outputs.

When that default fails the gate, `export.quant_search` tries more
conservative configurations (see `ladder`) and records every attempt.

ModelOpt runs in a child process (`python -m export.onnx_int8 ...`): it
patches ONNX Runtime's quantizer and logging at import, which must not leak
into the export process (ENVIRONMENT.md). Calibration images come from
ExportContext.calibration_images: the train split only.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

import export.onnx_variant  # noqa: F401 - registers the parent variant `onnx` first
from export.registry import Variant, register
from export.worker import run_worker

log = logging.getLogger(__name__)

ROLES = ("patch_embed", "qkv", "proj", "fc1", "fc2", "attn_qk", "attn_v", "head", "other")
WEIGHT_ROLES = ("qkv", "proj", "fc1", "fc2")
DEFAULT_ROLES = WEIGHT_ROLES
CALIB_METHODS = ("entropy", "max")   # what ModelOpt's INT8 path offers (anything else means max)
DEFAULTS: dict[str, Any] = {
    "calib_size": 512,
    "calib_method": "entropy",
    "int8_search": True,
    "int8_max_attempts": 8,
    "int8_roles": ",".join(DEFAULT_ROLES),
    "int8_exclude": "",
    "int8_dq_only": True,
    "int8_calib_eps": "cpu",
    "int8_sensitivity_images": 32,
    "int8_timeout_s": 3600,
}
_MODULE_RE = re.compile(r"blocks[./](\d+)[./](attn[./]qkv|attn[./]proj|mlp[./]fc1|mlp[./]fc2|mlp[./]w12|mlp[./]w3)"
                        r"(?![\w])")
_BLOCK_RE = re.compile(r"blocks[./](\d+)(?![\d])")
_ROLE_OF = {"attn.qkv": "qkv", "attn.proj": "proj", "mlp.fc1": "fc1", "mlp.fc2": "fc2",
            "mlp.w12": "fc1", "mlp.w3": "fc2"}


class Int8Error(RuntimeError):
    """Quantization could not produce a model; the message says what failed."""


# ---------------------------------------------------------------------------
# which node is which
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeRole:
    name: str
    op_type: str
    role: str              # one of ROLES
    block: int | None      # transformer block index, None outside the blocks


def _scope(node) -> str:
    """The PyTorch module path of a node: the dynamo exporter's name_scopes
    metadata, else the node name (the legacy exporter's "/model/backbone/blocks.0/attn/qkv/MatMul")."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return " ".join(re.findall(r"'([^']*)'", prop.value))
    return node.name


def _static_tensors(graph) -> set[str]:
    """Tensors computed from initializers/constants only (weights, possibly transposed)."""
    static = {i.name for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" or (node.input and all(i in static for i in node.input if i)):
            static.update(node.output)
    return static


def node_roles(model) -> list[NodeRole]:
    """Classify every MatMul/Gemm/Conv of a DINOv2 classifier graph. The
    module path (dynamo metadata or legacy node names) names the role; a
    structural fallback (LayerNorm order) covers graphs without either."""
    graph = model.graph
    static = _static_tensors(graph)
    producer = {o: n for n in graph.node for o in n.output}
    head = None
    out = producer.get("logits")
    while out is not None and head is None:   # logits <- [Add bias] <- MatMul/Gemm
        if out.op_type in ("Gemm", "MatMul"):
            head = out.name
        elif out.op_type in ("Add", "Identity", "Reshape", "Flatten"):
            out = next((producer[i] for i in out.input if i in producer and i not in static), None)
        else:
            break
    roles: list[NodeRole] = []
    ln_count = 0
    fallback_order: dict[tuple[int, int], int] = {}
    mha_seen: dict[int, int] = {}
    for node in graph.node:
        if node.op_type == "LayerNormalization":
            ln_count += 1
        if node.op_type not in ("MatMul", "Gemm", "Conv"):
            continue
        scope = _scope(node)
        if node.name == head:
            roles.append(NodeRole(node.name, node.op_type, "head", None))
            continue
        if node.op_type == "Conv":
            role = "patch_embed" if ("patch_embed" in scope or ln_count == 0) else "other"
            roles.append(NodeRole(node.name, node.op_type, role, None))
            continue
        has_weight = any(i in static for i in node.input[:2])
        m_block = _BLOCK_RE.search(scope)
        block = int(m_block.group(1)) if m_block else None
        if not has_weight:
            if block is None and ln_count:
                block = (ln_count - 1) // 2
            k = mha_seen.get(block, 0)
            mha_seen[block] = k + 1
            roles.append(NodeRole(node.name, node.op_type, "attn_qk" if k % 2 == 0 else "attn_v", block))
            continue
        m = _MODULE_RE.search(scope)
        if m:
            roles.append(NodeRole(node.name, node.op_type, _ROLE_OF[m.group(2).replace("/", ".")],
                                  int(m.group(1))))
            continue
        if ln_count == 0:
            roles.append(NodeRole(node.name, node.op_type, "other", None))
            continue
        # Fallback: block b has LayerNorms 2b (attention: qkv, proj) and 2b+1 (MLP: fc1, fc2).
        b, half = divmod(ln_count - 1, 2)
        k = fallback_order.get((b, half), 0)
        fallback_order[(b, half)] = k + 1
        names = ("qkv", "proj") if half == 0 else ("fc1", "fc2")
        roles.append(NodeRole(node.name, node.op_type, names[k] if k < 2 else "other", b))
    return roles


def depth_of(roles: Sequence[NodeRole]) -> int:
    blocks = [r.block for r in roles if r.block is not None]
    return max(blocks) + 1 if blocks else 0


def parse_roles(value: str | Iterable[str]) -> tuple[str, ...]:
    """'qkv,proj,fc1,fc2[,mha][,head][,patch_embed]' -> role tuple ('mha' = both attention matmuls)."""
    items = [v for v in (value.replace(" ", "").split(",") if isinstance(value, str) else value) if v]
    out: list[str] = []
    for item in items:
        expanded = ("attn_qk", "attn_v") if item == "mha" else (item,)
        for r in expanded:
            if r not in ROLES or r == "other":
                raise ValueError(f"int8_roles: unknown role {item!r}; choose from "
                                 f"{', '.join(r for r in ROLES if r != 'other')} or 'mha'")
            if r not in out:
                out.append(r)
    if not out:
        raise ValueError("int8_roles: give at least one role (default qkv,proj,fc1,fc2)")
    return tuple(out)


def select_nodes(roles: Sequence[NodeRole], quantize_roles: Iterable[str], *,
                 exclude: Iterable[tuple[int | None, str]] = (), exclude_blocks: Iterable[int] = (),
                 exclude_patterns: Iterable[str] = ()) -> list[str]:
    """Names of the nodes to quantize: those whose role is in quantize_roles,
    minus excluded (block, role) pairs, whole blocks and node-name regexes."""
    quantize_roles = set(quantize_roles)
    exclude = set(exclude)
    exclude_blocks = set(exclude_blocks)
    pats = [re.compile(p) for p in exclude_patterns if p]
    return [r.name for r in roles
            if r.role in quantize_roles and (r.block, r.role) not in exclude
            and r.block not in exclude_blocks and not any(p.search(r.name) for p in pats)]


# ---------------------------------------------------------------------------
# undoing quantization of chosen nodes (cheap variants of one calibrated model)
# ---------------------------------------------------------------------------
def _dequantize_initializer(q_init, scale_init, zp_init, axis: int) -> np.ndarray:
    from onnx import numpy_helper

    q = numpy_helper.to_array(q_init).astype(np.float32)
    scale = numpy_helper.to_array(scale_init).astype(np.float32)
    zp = numpy_helper.to_array(zp_init).astype(np.float32) if zp_init is not None else np.zeros_like(scale)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[axis % q.ndim] = scale.size
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def strip_qdq(model, nodes: Iterable[str], originals: Mapping[str, Any] | None = None):
    """A copy of a Q/DQ model in which `nodes` read their FP32 inputs again.

    Calibration ranges come from the FP32 graph, so removing the Q/DQ of some
    nodes gives exactly the model a calibration with those nodes excluded
    would give, without calibrating again. An int8 weight initializer (DQ-only
    graphs) is replaced by the FP32 initializer of the same name from
    `originals` (the FP32 graph's initializers; ModelOpt keeps the names);
    without it, by its dequantized value (weight rounding error remains)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes = set(nodes)
    producer = {o: n for n in graph.node for o in n.output}
    inits = {i.name: i for i in graph.initializer}
    missing = nodes - {n.name for n in graph.node}
    if missing:
        raise Int8Error(f"strip_qdq: nodes not in the quantized graph: {sorted(missing)[:5]}")
    for node in graph.node:
        if node.name not in nodes:
            continue
        for idx, name in enumerate(node.input):
            dq = producer.get(name)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            src = dq.input[0]
            q = producer.get(src)
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[idx] = q.input[0]
            elif src in inits:
                new_name = f"{src}__fp32"
                orig = (originals or {}).get(src)
                if orig is not None and orig.data_type == onnx.TensorProto.FLOAT:
                    if new_name not in inits:
                        init = onnx.TensorProto()
                        init.CopyFrom(orig)
                        init.name = new_name
                        graph.initializer.append(init)
                        inits[new_name] = init
                elif new_name not in inits:
                    axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
                    if dq.input[1] not in inits:
                        raise Int8Error(f"strip_qdq: scale of {dq.name} is not an initializer")
                    zp = inits.get(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else None
                    w = _dequantize_initializer(inits[src], inits[dq.input[1]], zp, axis)
                    init = numpy_helper.from_array(w, new_name)
                    graph.initializer.append(init)
                    inits[new_name] = init
                node.input[idx] = new_name
    _remove_dead(graph)
    return model


def _remove_dead(graph) -> None:
    """Drop nodes whose outputs nobody reads and initializers nobody uses."""
    outputs = {o.name for o in graph.output}
    while True:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input} | outputs
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def quantized_nodes(model) -> list[str]:
    """Nodes that read at least one DequantizeLinear output."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear") and any(i in dq_out for i in n.input)]


# ---------------------------------------------------------------------------
# ModelOpt in a child process
# ---------------------------------------------------------------------------
def run_modelopt_quantize(onnx_path: Path, output: Path, calib_npy: Path, nodes: Sequence[str], *,
                          calib_method: str, dq_only: bool = True, calib_eps: str = "cpu",
                          timeout_s: float = 3600, log_path: Path | None = None, mode: str = "int8") -> dict[str, Any]:
    """Run `python -m export.onnx_int8` (ModelOpt) in a child process; returns
    timing info, raises Int8Error with the log tail on failure."""
    output = Path(output)
    nodes_file = output.with_suffix(".nodes.json")
    nodes_file.write_text(json.dumps(list(nodes)))
    log_path = Path(log_path or output.with_suffix(".log"))
    args = ["--onnx", str(onnx_path), "--output", str(output), "--calib", str(calib_npy),
            "--nodes", str(nodes_file), "--calib-method", calib_method, "--calib-eps", calib_eps,
            "--mode", mode] + (["--dq-only"] if dq_only else ["--no-dq-only"])
    run = run_worker("export.onnx_int8", args, output=output, log_path=log_path, timeout_s=timeout_s,
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
    p = argparse.ArgumentParser(prog="python -m export.onnx_int8",
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


# ---------------------------------------------------------------------------
# the variant
# ---------------------------------------------------------------------------
def option(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def as_bool(value, key: str) -> bool:
    if isinstance(value, str):
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{key}={value!r}: expected true or false")
    return bool(value)


def link_or_copy(src: Path, dst: Path) -> None:
    """Work on a copy: ModelOpt writes helper files beside its input, and the
    input here is the published FP32 model."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    for s, d in ((src, dst), (src.with_name(src.name + ".data"), dst.with_name(dst.name + ".data"))):
        if not s.exists():
            continue
        if d.exists():
            d.unlink()
        try:
            os.link(s, d)
        except OSError:
            shutil.copyfile(s, d)


def fp32_work_copy(ctx, name: str, error: type[Exception]) -> tuple[Path, Path]:
    """A fresh ``<work_dir>/<name>`` and in it ``fp32.onnx``, a copy (link_or_copy)
    of the FP32 `onnx` artifact; raises ``error`` when that artifact is missing."""
    fp32_artifact = ctx.artifacts.get("onnx")
    if fp32_artifact is None or not Path(fp32_artifact).is_file():
        raise error("the FP32 `onnx` artifact is missing: build the onnx variant first")
    work = Path(ctx.work_dir) / name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32 = work / "fp32.onnx"
    link_or_copy(Path(fp32_artifact), fp32)
    return work, fp32


def _ort_outputs(path: Path, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    from export.context import run_batched
    from export.onnx_variant import ort_runner

    return run_batched(ort_runner(path), x, batch)


def block_sensitivity(base_q, roles: Sequence[NodeRole], quant_nodes: Sequence[str], fp32_path: Path,
                      images: np.ndarray, work_dir: Path, originals=None) -> list[dict[str, Any]]:
    """Per block: the error of a model in which ONLY that block is quantized,
    on calibration (train) images against the FP32 ONNX graph. Highest first.
    Score = (1 - logit cosine) + (1 - embedding cosine), means over images."""
    import onnx

    from train.metrics import tensor_diff

    ref_lo, ref_em = _ort_outputs(fp32_path, images)
    by_block: dict[int, list[str]] = {}
    for r in roles:
        if r.name in quant_nodes and r.block is not None:
            by_block.setdefault(r.block, []).append(r.name)
    others = set(quant_nodes)
    out = []
    for block, names in sorted(by_block.items()):
        path = work_dir / f"sensitivity_block{block:02d}.onnx"
        onnx.save(strip_qdq(base_q, others - set(names), originals), str(path))
        lo, em = _ort_outputs(path, images)
        dl, de = tensor_diff(ref_lo, lo), tensor_diff(ref_em, em)
        score = (1 - dl["cosine_mean"]) + (1 - de["cosine_mean"])
        out.append({"block": block, "score": float(score), "logit_cosine": dl["cosine_mean"],
                    "embedding_cosine": de["cosine_mean"],
                    "top1_agreement": float((ref_lo.argmax(1) == lo.argmax(1)).mean())})
        path.unlink()
    return sorted(out, key=lambda s: -s["score"])


def ladder(depth: int, methods: Sequence[str], sensitivity) -> Iterator[tuple[str, str, set, set]]:
    """Configurations from fastest to most conservative:
    (label, calibration method, excluded (block, role) pairs, excluded blocks).
    1. the default (weight matmuls of every block);
    2. + MLP fc2 of the last quarter of the blocks stays FP32 (GELU outputs
       have the widest ranges, worst in the last blocks);
    3. + the 1, 2, 4 ... and half of the most sensitive blocks stay FP32
       (`sensitivity()` is called only when this step is reached);
    4. the other calibration method, default and most conservative set."""
    m0 = methods[0]
    yield "default", m0, set(), set()
    if depth == 0:
        return
    n_last = max(1, depth // 4)
    last_fc2 = {(b, "fc2") for b in range(depth - n_last, depth)}
    yield f"fp32 fc2 in last {n_last} block(s)", m0, last_fc2, set()
    conservative = (last_fc2, set())
    half = max(1, depth // 2)
    ks = [1 << i for i in range(half.bit_length()) if 1 << i <= half]
    ks += [half] if ks[-1] != half else []
    for k in ks:
        ranked = [s["block"] for s in sensitivity()]
        blocks = set(ranked[:k])
        conservative = (last_fc2, blocks)
        yield f"+ fp32 top-{k} sensitive block(s) {sorted(blocks)}", m0, last_fc2, blocks
    for m in methods[1:]:
        yield f"calibration {m}", m, set(), set()
        yield f"calibration {m}, most conservative", m, conservative[0], conservative[1]


def _role_order(r: NodeRole) -> tuple:
    return (-1 if r.block is None else r.block, ROLES.index(r.role), r.name)


def _describe(r: NodeRole) -> str:
    return f"block {r.block} {r.role}" if r.block is not None else f"{r.role} ({r.name})"


def build(ctx, path: Path) -> dict:
    import onnx

    from export.onnx_variant import check_io, ort_runner
    from export.quant_search import Candidate, run_search, search_gate
    import modelopt  # noqa: F401 - fail here, clearly, when ModelOpt is not installed

    opts = ctx.options
    calib_method = str(option(opts, "calib_method"))
    if calib_method not in CALIB_METHODS:
        raise ValueError(f"--calib-method {calib_method!r}: ModelOpt INT8 supports {CALIB_METHODS}")
    quant_roles = parse_roles(option(opts, "int8_roles"))
    exclude_patterns = [p for p in str(option(opts, "int8_exclude")).split(",") if p]
    dq_only = as_bool(option(opts, "int8_dq_only"), "int8_dq_only")
    search = as_bool(option(opts, "int8_search"), "int8_search")
    max_attempts = int(option(opts, "int8_max_attempts")) if search else 1
    work, fp32 = fp32_work_copy(ctx, "onnx_int8", Int8Error)
    fp32_model = onnx.load(str(fp32))
    originals = {i.name: i for i in fp32_model.graph.initializer}
    roles = node_roles(fp32_model)
    depth = depth_of(roles)
    candidates = select_nodes(roles, quant_roles, exclude_patterns=exclude_patterns)
    if not candidates:
        raise Int8Error(f"no node matches int8_roles={','.join(quant_roles)} (minus int8_exclude); "
                        f"roles found: {sorted({r.role for r in roles})}")

    t = time.perf_counter()
    calib = np.ascontiguousarray(ctx.calibration_images(int(option(opts, "calib_size")), seed=0), dtype=np.float32)
    calib_npy = work / "calib.npy"
    np.save(calib_npy, calib)
    calib_load_s = time.perf_counter() - t

    base: dict[str, Path] = {}
    runs: dict[str, dict] = {}

    failed: dict[str, Exception] = {}

    def base_model(method: str):
        if method in failed:   # one failed calibration is not retried by every later attempt
            raise failed[method]
        if method not in base:
            out = work / f"base_{method}.onnx"
            log.info("onnx_int8: calibrating %d nodes on %d train images (%s, ModelOpt)...",
                     len(candidates), len(calib), method)
            try:
                runs[method] = run_modelopt_quantize(
                    fp32, out, calib_npy, candidates, calib_method=method, dq_only=dq_only,
                    calib_eps=str(option(opts, "int8_calib_eps")), timeout_s=float(option(opts, "int8_timeout_s")))
            except Int8Error as exc:
                failed[method] = exc
                raise
            base[method] = out
        return onnx.load(str(base[method]))

    sens_cache: list = []

    def sensitivity():
        if not sens_cache:
            n = min(int(option(opts, "int8_sensitivity_images")), len(calib))
            t0 = time.perf_counter()
            sens_cache.append(block_sensitivity(base_model(calib_method), roles, candidates, fp32, calib[:n],
                                                 work, originals))
            log.info("onnx_int8: block sensitivity on %d train images in %.1f s: %s", n,
                     time.perf_counter() - t0,
                     ", ".join(f"block {s['block']} {s['score']:.2e}" for s in sens_cache[0][:4]))
        return sens_cache[0]

    by_name = {r.name: r for r in roles}

    def make_candidates():
        methods = [calib_method] + [m for m in CALIB_METHODS if m != calib_method]
        for label, method, excl, excl_blocks in ladder(depth, methods, sensitivity):
            keep = select_nodes(roles, quant_roles, exclude=excl, exclude_blocks=excl_blocks,
                                exclude_patterns=exclude_patterns)
            dropped = sorted(set(candidates) - set(keep), key=lambda n: _role_order(by_name[n]))

            def make(p: Path, method=method, dropped=dropped):
                onnx.save(strip_qdq(base_model(method), dropped, originals), str(p))
            config = {"calib_method": method, "quantized_roles": list(quant_roles),
                      "n_quantized_nodes": len(keep), "fp32_blocks": sorted(excl_blocks),
                      "fp32_nodes": [_describe(by_name[n]) for n in dropped]}
            yield Candidate(label, config, make, key=(method, tuple(dropped)))

    gate = search_gate(_VARIANT, opts)
    t = time.perf_counter()
    result = run_search(make_candidates(), evaluate=lambda p: ctx.evaluate(ort_runner(p), purpose="search"), gate=gate,
                        work_dir=work / "attempts", max_attempts=max_attempts)
    search_s = time.perf_counter() - t
    chosen = result.chosen_attempt
    if chosen is None:
        errors = "; ".join(f"{a['label']}: {a.get('error')}" for a in result.attempts)
        raise Int8Error(f"no INT8 configuration could be built or evaluated ({errors or 'no attempts'})")
    if not result.passed:
        log.warning("onnx_int8: no configuration met gate %s after %d attempts; shipping the best one "
                    "(%s) for the pipeline to mark GATE_FAILED", gate.name, len(result.attempts), chosen["label"])
    shutil.copyfile(chosen["path"], path)

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    shapes = check_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes, embed_dim=ctx.embed_dim)
    qnodes = set(quantized_nodes(model))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    role_counts: dict[str, int] = {}
    for r in roles:
        if r.name in qnodes:
            role_counts[r.role] = role_counts.get(r.role, 0) + 1
    import modelopt as _mo
    import onnxruntime

    return {
        "tool": "nvidia-modelopt", "modelopt": getattr(_mo, "__version__", "?"),
        "onnxruntime": onnxruntime.__version__,
        "scheme": "explicit Q/DQ, int8 symmetric, per-channel weights, per-tensor activations",
        "dq_only": dq_only,
        "calibration": {"images": int(len(calib)),
                        "split": ",".join(sorted(getattr(ctx, "calibration_splits", None) or {"train"})), "method": chosen["config"]["calib_method"],
                        "requested_images": int(option(opts, "calib_size")), "load_seconds": round(calib_load_s, 2)},
        "quantized_nodes": len(qnodes), "quantized_by_role": role_counts, "blocks": depth,
        "kept_fp32": "LayerNorm, Softmax, GELU, residual Adds, attention matmuls, patch embedding, head "
                     "(unless int8_roles says otherwise)" + (f"; plus {chosen['config']['fp32_nodes']}"
                                                              if chosen["config"]["fp32_nodes"] else ""),
        "modelopt_runs": runs,
        "search": {**result.to_dict(), "seconds": round(search_s, 2), "enabled": search,
                   "sensitivity": sens_cache[0] if sens_cache else None},
        "io": shapes, "op_types": dict(sorted(ops.items())), "opset": next(
            (o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None),
    }


# an ONNX Runtime CPU session, as for the FP32 `onnx` variant
load_runner = export.onnx_variant.load_runner


_VARIANT = register(Variant(
    name="onnx_int8", platform="onnxruntime_onnx", filename="model.onnx", precision="int8",
    build=build, load_runner=load_runner, parent="onnx", gate="int8",
    description="ONNX INT8 Q/DQ (ModelOpt PTQ, train-split calibration, weight matmuls only; "
                "accuracy-budget search), ONNX Runtime backend; input of trt_int8"))


if __name__ == "__main__":
    sys.exit(main())
