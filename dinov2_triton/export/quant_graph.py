"""Which node of a DINOv2 classifier's ONNX graph is which, and Q/DQ surgery.

`node_roles` names every MatMul/Gemm/Conv by its job in the ViT (patch
embedding, attention qkv/proj, MLP fc1/fc2, the two attention matmuls, the
head) from the exporter's module-path metadata, the legacy exporter's node
names, or, for graphs without either, the LayerNorm order. `select_nodes`
turns a role list into the node names to quantize; `strip_qdq` undoes the
quantization of chosen nodes in an already calibrated Q/DQ graph (cheap
variants of one calibration); `quantized_nodes` lists what a Q/DQ graph
quantizes. Used by onnx_int8 (which nodes to quantize), onnx_fp16 (which to
keep FP32) and the TensorRT FP8 variant. Needs only onnx and numpy.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

ROLES = ("patch_embed", "qkv", "proj", "fc1", "fc2", "attn_qk", "attn_v", "head", "other")
WEIGHT_ROLES = ("qkv", "proj", "fc1", "fc2")
DEFAULT_ROLES = WEIGHT_ROLES

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
