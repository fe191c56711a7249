"""`onnx`: FP32 ONNX graph served by Triton's ONNX Runtime backend
(`onnxruntime_onnx`, model.onnx). The parent of the FP16/INT8 ONNX variants
and of the TensorRT engines.

Exporter: torch.onnx's dynamo exporter (default). Measured here on the DINOv2
wrapper it gives half the nodes of the legacy TorchScript exporter, fuses
LayerNormalization (opset >= 17, what TensorRT maps to its normalization
layer) and keeps the embedding width static. Only the batch axis is
dynamic: the position embedding was resampled (DINOv2) or the RoPE sin/cos
tables computed (DINOv3) for the fixed size at build time, so they are
constants of the graph. `check_static_graph` proves it on every dynamo
export: no `If`/`Loop`/`Scan` (subgraphs walked too), no `Range` fed by a
computed value, no symbolic dimension but the batch (the shape-dependent
RoPE subgraphs that TensorRT rejects, facebookresearch/dinov3#312, cannot
reach a published graph). `--onnx-exporter legacy` selects dynamo=False;
DINOv2 only: the TorchScript-based exporter fails on DINOv3's attention
(`scaled_dot_product_attention(): argument 'is_causal' must be bool, not
Tensor`)."""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from dinov2_triton.export.registry import Variant, register

log = logging.getLogger(__name__)

INPUT_NAME = "pixel_values"
OUTPUT_NAMES = ("logits", "embedding")
MIN_OPSET = 17
# protobuf's 2 GiB limit: above this, weights go to model.onnx.data beside the graph.
EXTERNAL_DATA_BYTES = 1_800_000_000


class OnnxContractError(RuntimeError):
    """The exported graph does not have the serving contract's I/O."""


#: control flow that has no place in a fixed-size image graph
CONTROL_FLOW_OPS = ("If", "Loop", "Scan")


def _subgraphs(node):
    from onnx import AttributeProto

    for attr in node.attribute:
        if attr.type == AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == AttributeProto.GRAPHS:
            yield from attr.graphs


def graph_facts(model) -> dict:
    """What makes a graph fixed-size, read from the ONNX model (subgraphs
    walked): control-flow nodes, `Range` nodes whose bounds are computed
    (not initializers or Constant outputs), `Sin`/`Cos` nodes (RoPE tables
    built at run time) and the symbolic dimension names of the graph's
    values. Paths are "graph/node" names."""
    import re

    facts = {"control_flow": [], "computed_ranges": [], "trig_ops": [], "symbols": set()}

    def walk(graph, where: str, constants: set[str]) -> None:
        constants = constants | {i.name for i in graph.initializer}
        constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
        for v in list(graph.input) + list(graph.output) + list(graph.value_info):
            for d in v.type.tensor_type.shape.dim:
                if d.dim_param:
                    facts["symbols"].update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", d.dim_param))
        for i, node in enumerate(graph.node):
            name = f"{where}/{node.name or f'{node.op_type}_{i}'}"
            if node.op_type in CONTROL_FLOW_OPS:
                facts["control_flow"].append(name)
            if node.op_type == "Range" and any(x and x not in constants for x in node.input):
                facts["computed_ranges"].append(name)
            if node.op_type in ("Sin", "Cos"):
                facts["trig_ops"].append(name)
            for sub in _subgraphs(node):
                walk(sub, name, constants)

    walk(model.graph, model.graph.name or "main", set())
    facts["symbols"] = sorted(facts["symbols"])
    return facts


def check_static_graph(model, *, batch_symbol: str | None = None) -> dict:
    """Raise OnnxContractError unless the graph has no control flow, no
    computed `Range`, no run-time `Sin`/`Cos` and no symbolic dimension other
    than the batch (`batch_symbol`, default: the one of the first input).
    Returns graph_facts."""
    facts = graph_facts(model)
    if batch_symbol is None:
        first = model.graph.input[0].type.tensor_type.shape.dim[0]
        batch_symbol = first.dim_param or None
    problems = []
    if facts["control_flow"]:
        problems.append(f"control flow {facts['control_flow'][:5]}")
    if facts["computed_ranges"]:
        problems.append(f"Range nodes with computed bounds {facts['computed_ranges'][:5]}")
    if facts["trig_ops"]:
        problems.append(f"Sin/Cos computed at run time {facts['trig_ops'][:5]} (position tables not baked)")
    other = [s for s in facts["symbols"] if s != batch_symbol]
    if other:
        problems.append(f"dynamic dimensions other than the batch axis {batch_symbol!r}: {other[:5]}")
    if problems:
        raise OnnxContractError("ONNX graph is not fixed-size apart from the batch: " + "; ".join(problems)
                                + ". Export from a model built for one image size (dynamic_img_size=False).")
    return facts


def check_io(model, *, image_size: int | None = None, num_classes: int | None = None,
             embed_dim: int | None = None) -> dict:
    """Check the graph's inputs/outputs are exactly pixel_values -> logits,
    embedding, FP32, with a symbolic batch axis and static other dims.
    Returns {name: [dims]} (str for symbolic dims); raises OnnxContractError."""
    from onnx import TensorProto

    def dims(v):
        return [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
                for d in v.type.tensor_type.shape.dim]

    ins = [v.name for v in model.graph.input]
    outs = [v.name for v in model.graph.output]
    problems = []
    if ins != [INPUT_NAME]:
        problems.append(f"inputs are {ins}, expected [{INPUT_NAME!r}]")
    if outs != list(OUTPUT_NAMES):
        problems.append(f"outputs are {outs}, expected {list(OUTPUT_NAMES)}")
    shapes = {v.name: dims(v) for v in list(model.graph.input) + list(model.graph.output)}
    expected_tail = {INPUT_NAME: [3, image_size, image_size], "logits": [num_classes],
                     "embedding": [embed_dim]}
    for v in list(model.graph.input) + list(model.graph.output):
        if v.type.tensor_type.elem_type != TensorProto.FLOAT:
            problems.append(f"{v.name}: element type {TensorProto.DataType.Name(v.type.tensor_type.elem_type)}"
                            f", expected FLOAT (I/O stays FP32 for every variant)")
        d = shapes[v.name]
        if not d or not isinstance(d[0], str) or d[0] in ("", "?"):
            problems.append(f"{v.name}: batch axis is {d[:1]}, expected a symbolic (dynamic) dimension")
        tail = expected_tail.get(v.name)
        if tail is not None and any(t is not None for t in tail):
            if len(d) != len(tail) + 1 or any(t is not None and t != got for t, got in zip(tail, d[1:])):
                problems.append(f"{v.name}: dims {d}, expected [batch, {', '.join(map(str, tail))}]")
    if problems:
        raise OnnxContractError("ONNX graph breaks the serving contract: " + "; ".join(problems))
    return shapes


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's optimizer logs one INFO line per rewrite (hundreds
    for a ViT) and torch warns about tracing asserts: keep the export log readable."""
    names = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning)
            import torch

            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(module, example, path: Path, *, opset: int = 18, exporter: str = "dynamo",
                external_data: bool = False) -> None:
    """torch.onnx.export of `module` with the contract's names and a dynamic batch."""
    import torch

    path = Path(path)
    if opset < MIN_OPSET:
        raise ValueError(f"--opset {opset}: needs >= {MIN_OPSET} (LayerNormalization)")
    with torch.no_grad(), _quiet_exporter():
        if exporter == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=4096)
            torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_shapes={INPUT_NAME: {0: batch}}, external_data=external_data,
                              optimize=True, verbose=False)
        elif exporter == "legacy":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                              dynamic_axes={n: {0: "batch"} for n in (INPUT_NAME, *OUTPUT_NAMES)},
                              do_constant_folding=True)
        else:
            raise ValueError(f"--onnx-exporter {exporter!r}: choose 'dynamo' or 'legacy'")


def pin_static_dims(path: Path, dims: dict, *, external_data: bool = False) -> None:
    """Set the non-batch dims of the named graph outputs to static values."""
    import onnx

    model = onnx.load(str(path))
    for out in model.graph.output:
        if out.name in dims:
            for d, value in zip(out.type.tensor_type.shape.dim[1:], dims[out.name]):
                d.ClearField("dim_param")
                d.dim_value = int(value)
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, location=Path(path).name + ".data")
    else:
        onnx.save(model, str(path))


def build(ctx, path: Path) -> dict:
    import onnx
    import torch

    opset = int(ctx.options.get("opset", 18))
    exporter = ctx.options.get("onnx_exporter", "dynamo")
    if exporter == "legacy" and getattr(ctx.model, "family", "dinov2") == "dinov3":
        raise OnnxContractError("--onnx-exporter legacy cannot export DINOv3: the TorchScript-based exporter "
                                "fails on its attention (scaled_dot_product_attention(): argument 'is_causal' "
                                "must be bool, not Tensor); use the default dynamo exporter")
    n_bytes = sum(p.numel() * p.element_size() for p in ctx.model.parameters())
    external = n_bytes > EXTERNAL_DATA_BYTES
    export_onnx(ctx.export_module(), ctx.example_input(2), path, opset=opset, exporter=exporter,
                external_data=external)
    if exporter == "legacy":
        # The legacy exporter leaves the concatenated embedding width symbolic
        # ("Concatembedding_dim_1"); the contract (and TensorRT) wants it static.
        pin_static_dims(path, {"logits": [ctx.num_classes], "embedding": [ctx.embed_dim]},
                        external_data=external)
    # Validate from the file (the >2 GiB path needs the path form of the checker).
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    shapes = check_io(model, image_size=ctx.image_size, num_classes=ctx.num_classes,
                      embed_dim=ctx.embed_dim)
    # the legacy exporter (DINOv2 only) leaves unnamed intermediate dims; its
    # graph is recorded, the dynamo one must be fixed-size apart from the batch
    facts = check_static_graph(model) if exporter == "dynamo" else graph_facts(model)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset_used = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"exporter": exporter, "opset": opset_used, "ir_version": model.ir_version,
            "torch": torch.__version__, "onnx": onnx.__version__, "nodes": len(model.graph.node),
            "op_types": dict(sorted(ops.items())), "io": shapes, "external_data": external,
            "fixed_size": {"checked": exporter == "dynamo", "control_flow": len(facts["control_flow"]),
                           "computed_ranges": len(facts["computed_ranges"]), "symbols": facts["symbols"]}}


def load_runner(path: Path):
    """ONNX Runtime CPU session (the same provider the local stand-in backend uses)."""
    return ort_runner(path)


def ort_runner(path: Path, *, providers=("CPUExecutionProvider",), intra_op_threads: int | None = None):
    """A runner for any ONNX file with the contract's I/O (FP16/INT8 variants reuse it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    opts.log_severity_level = 3  # errors only: ORT warns about every unused initializer otherwise
    session = ort.InferenceSession(str(path), sess_options=opts, providers=list(providers))
    outputs = list(OUTPUT_NAMES)

    def run(x: np.ndarray):
        logits, embedding = session.run(outputs, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return logits, embedding
    run.session = session  # for callers that want provider/thread details
    return run


# ---------------------------------------------------------------------------
# work copies for the variants built from this one (onnx_fp16, onnx_int8, trt_fp8)
# ---------------------------------------------------------------------------
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


def fp32_work_copy(ctx, variant, error: type[Exception]) -> tuple[Path, Path]:
    """A fresh ``<work_dir>/<variant.name>`` and in it ``fp32.onnx``, a copy
    (link_or_copy) of the artifact of ``variant.parent`` (the FP32 graph);
    raises ``error`` when that artifact is missing."""
    source = variant.parent
    fp32_artifact = ctx.artifacts.get(source)
    if fp32_artifact is None or not Path(fp32_artifact).is_file():
        raise error(f"the FP32 `{source}` artifact is missing: build the {source} variant first")
    work = Path(ctx.work_dir) / variant.name
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    fp32 = work / "fp32.onnx"
    link_or_copy(Path(fp32_artifact), fp32)
    return work, fp32


ONNX = register(Variant(
    name="onnx", platform="onnxruntime_onnx", filename="model.onnx", precision="fp32",
    build=build, load_runner=load_runner, gate="fp32", ensemble_rank=0,
    description="ONNX FP32 (opset 18, dynamic batch), ONNX Runtime backend"))
