"""`onnx_int8`: INT8 post-training quantization of the FP32 ONNX graph with
NVIDIA ModelOpt (explicit Q/DQ, per-channel symmetric weights, per-tensor
activations), served by ONNX Runtime and the input of the TensorRT INT8
engine (explicit quantization).

What is quantized, and why (measured on this CPU, docs/environment.md):
- By default only the four weight matrix multiplies of every block (attention
  qkv and proj, MLP fc1 and fc2). ONNX Runtime fuses exactly this pattern
  (DQ(activation) + DQ(int8 weight) -> MatMul) into MatMulIntegerToFloat
  (VNNI), which is where the speed-up comes from.
- Never LayerNorm, Softmax, GELU or the residual Adds: ModelOpt's default
  placement quantizes them and top-1 agreement fell to 28% (docs/environment.md).
- The attention matmuls (Q.K^T, attn.V) stay FP32: quantizing them cut
  agreement from 99.7% to 95% for no speed-up on ORT CPU.
- The patch embedding (Conv) and the classification head stay FP32: ORT
  does not fuse DQ->Conv / DQ->Gemm with a float output, so quantizing them
  only adds error.
- Weights are stored as int8 initializers (`dq_only`): the file is 4x smaller
  than with float weights + Q/DQ, with identical outputs.

When that default fails the gate, `dinov2_triton.export.quant_search` tries more
conservative configurations (see `ladder`) and records every attempt.

Where the parts live: node roles and Q/DQ surgery in export/quant_graph.py,
the ModelOpt call (in a child process) in export/modelopt_worker.py; this
module chooses the configuration and declares the variant. Calibration
images come from ExportContext.calibration_images: the train split only.
"""
from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from dinov2_triton.export.modelopt_worker import CALIB_METHODS, run_modelopt_quantize
from dinov2_triton.export.quant_graph import (
    DEFAULT_ROLES,
    ROLES,
    Int8Error,
    NodeRole,
    depth_of,
    node_roles,
    parse_roles,
    quantized_nodes,
    select_nodes,
    strip_qdq,
)
from dinov2_triton.export.registry import Variant, as_bool, register
from dinov2_triton.export.variants.onnx import check_io, fp32_work_copy, ort_runner

log = logging.getLogger(__name__)

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


# ---------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------
def option(options: Mapping[str, Any], key: str):
    value = options.get(key)
    return DEFAULTS[key] if value is None else value


def _ort_outputs(path: Path, x: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    from dinov2_triton.export.context import run_batched

    return run_batched(ort_runner(path), x, batch)


def block_sensitivity(base_q, roles: Sequence[NodeRole], quant_nodes: Sequence[str], fp32_path: Path,
                      images: np.ndarray, work_dir: Path, originals=None) -> list[dict[str, Any]]:
    """Per block: the error of a model in which ONLY that block is quantized,
    on calibration (train) images against the FP32 ONNX graph. Highest first.
    Score = (1 - logit cosine) + (1 - embedding cosine), means over images."""
    import onnx

    from dinov2_triton.train.metrics import tensor_diff

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
    import modelopt  # noqa: F401 - fail here, clearly, when ModelOpt is not installed
    import onnx

    from dinov2_triton.export.quant_search import Candidate, run_search, search_gate

    opts = ctx.options
    calib_method = str(option(opts, "calib_method"))
    if calib_method not in CALIB_METHODS:
        raise ValueError(f"--calib-method {calib_method!r}: ModelOpt INT8 supports {CALIB_METHODS}")
    quant_roles = parse_roles(option(opts, "int8_roles"))
    exclude_patterns = [p for p in str(option(opts, "int8_exclude")).split(",") if p]
    dq_only = as_bool(option(opts, "int8_dq_only"), "int8_dq_only")
    search = as_bool(option(opts, "int8_search"), "int8_search")
    max_attempts = int(option(opts, "int8_max_attempts")) if search else 1
    work, fp32 = fp32_work_copy(ctx, _VARIANT, Int8Error)
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
        "calibration": {"images": int(len(calib)), "split": ",".join(sorted(ctx.calibration_splits)),
                        "method": chosen["config"]["calib_method"],
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


_VARIANT = register(Variant(
    name="onnx_int8", platform="onnxruntime_onnx", filename="model.onnx", precision="int8",
    # an ONNX Runtime CPU session, as for the FP32 parent
    build=build, load_runner=ort_runner, parent="onnx", gate="int8",
    description="ONNX INT8 Q/DQ (ModelOpt PTQ, train-split calibration, weight matmuls only; "
                "accuracy-budget search), ONNX Runtime backend; input of trt_int8"))
