"""Golden numbers: outputs of the pinned stack, stored here, so that a library
upgrade (torch, timm, Pillow, numpy, onnxruntime) that shifts them fails a
test instead of slipping into every later stage unnoticed.

- The model golden is a tiny DINOv2 classifier (vits14 layout, 2 blocks,
  width 48, 42 px = a 3x3 patch grid). Its position embedding is created for
  42 px, so no resampling is involved, and every tensor is overwritten from a
  seeded numpy generator: the numbers test the forward pass of timm + torch,
  not timm's initialisers or our weight conversion.
- The preprocessing golden is the sha256 of `preprocess_pil`'s float32 output
  for a synthetic 37x53 image built below: exact, any changed bit fails.

After an intentional upgrade, check the new numbers are right (e.g. parity
and accuracy unchanged in the pipeline), then regenerate with
`.venv/bin/python -m tests.test_golden` and paste its output over the
GOLDEN_* constants.
"""
from __future__ import annotations

import hashlib
import zlib

import numpy as np
import pytest

# ---------------------------------------------------------------------------
# The golden model and input (independent of tests/fixtures so that changing a
# shared fixture never moves these numbers).
# ---------------------------------------------------------------------------
ARCH = "vits14"
BACKBONE = {"depth": 2, "embed_dim": 48, "num_heads": 3}
IMG = 42           # 3 x 3 patches of 14 px: the grid the position embedding is created for
NUM_CLASSES = 3
BATCH = 2
# Embedding entries reported verbatim (class-token part and patch-mean part).
EMB_PROBES = (0, 1, 47, 48, 95)
N_PROJ = 4
# Float32 forward passes of the same graph differ by ~1e-7 between CPUs
# (AVX2 vs AVX-512 kernels); a changed kernel or default moves them by far more.
ATOL = 1e-5

# Computed with the pinned stack (requirements/lock-cpu.txt) by `python -m tests.test_golden`.
GOLDEN_LOGITS = [[0.04310534, -0.94784510, -0.03246175],
    [-0.54839242, -0.85055524, 0.51981384]]
GOLDEN_EMB_PROBES = [[-0.92053849, 0.71264666, -0.04732335, -0.40050772, 0.21434680],
    [-0.89176536, 0.19944082, -0.01198687, -0.20356902, 0.60890102]]
GOLDEN_EMB_PROJ = [[-0.88008792, -0.12083641, -0.48459177, -0.25505318],
    [0.11992350, 0.26026116, 0.88215358, -0.37243175]]
GOLDEN_PREPROCESS = {
    'default': ('86430d24e4f588f50843eaa6aa46c0b443940507728ede8ef2fe97f707d2cab9', (3, 224, 224), 0.245412600),
    'bilinear_56': ('e1ccc8e5e8700f491e831875a52a7632fbe6a10edc2ab817fb4d09d348005ffc', (3, 56, 56), 0.250483619),
    'nearest_28': ('2396667d462acef112e914f0ffe05494448dde1fc73c1a4a2b63f57d81151905', (3, 28, 28), 0.263025673),
}
GOLDEN = {"logits": GOLDEN_LOGITS, "emb_probes": GOLDEN_EMB_PROBES, "emb_proj": GOLDEN_EMB_PROJ}


def _fill(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Deterministic values for one tensor, seeded by its name (legacy
    RandomState: numpy guarantees its stream across versions)."""
    u = np.random.RandomState(zlib.crc32(name.encode())).uniform(-1.0, 1.0, size=shape)
    if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "backbone.norm.weight":
        return 1.0 + 0.1 * u                       # LayerNorm scale near 1
    if name.endswith(".weight") and len(shape) >= 2:
        return u * np.sqrt(3.0 / np.prod(shape[1:]))   # unit-variance activations (head included)
    if name.endswith(".gamma"):
        return 0.5 + 0.5 * u                       # LayerScale: the blocks must matter to the output
    return 0.1 * u                                 # biases, tokens, position embedding


def golden_model():
    import torch

    from dinov2_triton.train.model import build_model

    model = build_model(ARCH, weights="random", num_classes=NUM_CLASSES, img_size=IMG,
                        backbone_overrides=BACKBONE).model.eval()
    n_prefix = model.backbone.num_prefix_tokens
    grid = IMG // 14
    # Golden invariant: the position embedding is stored for exactly this grid
    # (if this fails, the numbers below would include a resampling).
    assert tuple(model.backbone.pos_embed.shape) == (1, n_prefix + grid * grid, BACKBONE["embed_dim"])
    state = {k: torch.from_numpy(_fill(k, tuple(v.shape)).astype(np.float32))
             for k, v in model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model


def golden_input() -> np.ndarray:
    return np.random.RandomState(7).standard_normal((BATCH, 3, IMG, IMG)).astype(np.float32)


def _projection_matrix(dim: int) -> np.ndarray:
    # Fixed directions: a change in any embedding entry moves some projection.
    return np.random.RandomState(11).standard_normal((dim, N_PROJ)) / np.sqrt(dim)


def summarize(logits: np.ndarray, emb: np.ndarray) -> dict:
    emb = np.asarray(emb, dtype=np.float64)
    return {"logits": np.asarray(logits, dtype=np.float64),
            "emb_probes": emb[:, list(EMB_PROBES)],
            "emb_proj": emb @ _projection_matrix(emb.shape[1])}


def eager_outputs(model, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import torch

    with torch.inference_mode():
        logits, emb = model.forward_with_embedding(torch.from_numpy(x))
    return logits.numpy(), emb.numpy()


def _compare(got: dict, expected: dict, atol: float) -> list[str]:
    """Every summarised quantity that differs by more than atol, with the numbers."""
    problems = []
    for key, want in expected.items():
        want = np.asarray(want, dtype=np.float64)
        diff = np.abs(got[key] - want).max()
        if not diff <= atol:
            problems.append(f"{key}: max abs diff {diff:.3g} > {atol:g}\n  got  {np.round(got[key], 7).tolist()}"
                            f"\n  want {want.tolist()}")
    return problems


# ---------------------------------------------------------------------------
# The golden image and preprocessing records
# ---------------------------------------------------------------------------
def golden_image():
    """A 37 (wide) x 53 (high) RGB image: gradients plus a checker pattern, so
    resizing, cropping and the per-channel normalisation all matter."""
    from PIL import Image

    y, x = np.mgrid[0:53, 0:37]
    r = (x * 255) // 36
    g = (y * 255) // 52
    b = np.where(((x // 4) + (y // 4)) % 2 == 0, 230, 20) + (x * y) % 17
    return Image.fromarray(np.stack([r, g, b], axis=-1).astype(np.uint8), mode="RGB")


def preprocess_configs() -> dict:
    from dinov2_triton.core.preprocessing import PreprocessConfig

    return {"default": PreprocessConfig(),
            "bilinear_56": PreprocessConfig(image_size=56, resize_size=64, interpolation="bilinear"),
            "nearest_28": PreprocessConfig(image_size=28, resize_size=32, interpolation="nearest")}


def preprocess_digest(name: str) -> tuple[str, tuple[int, ...], float]:
    from dinov2_triton.core.preprocessing import preprocess_pil

    out = preprocess_pil(golden_image(), preprocess_configs()[name])
    assert out.dtype == np.float32 and out.flags.c_contiguous
    return hashlib.sha256(out.tobytes()).hexdigest(), tuple(out.shape), float(out.astype(np.float64).mean())


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_input():
    import torch

    torch.set_num_threads(1)   # the numbers must not depend on the thread count either
    return golden_model(), golden_input()


def test_model_outputs_match_golden(model_and_input):
    model, x = model_and_input
    logits, emb = eager_outputs(model, x)
    assert logits.shape == (BATCH, NUM_CLASSES) and emb.shape == (BATCH, 2 * BACKBONE["embed_dim"])
    problems = _compare(summarize(logits, emb), GOLDEN, ATOL)
    assert not problems, ("eager outputs of the golden DINOv2 moved (library upgrade?):\n"
                          + "\n".join(problems))


def _perturb(model, x, kind: str):
    """One small change of the kind a library upgrade makes; returns (x, undo)."""
    import torch
    from torch import nn

    blocks = model.backbone.blocks
    if kind == "input":
        x = x.copy()
        x[1, 2, 20, 20] += 1e-2
        return x, lambda: None
    if kind == "weight":
        w = blocks[1].mlp.fc2.weight
        with torch.no_grad():
            w[3, 5] += 1e-3

        def undo():
            with torch.no_grad():
                w[3, 5] -= 1e-3
        return x, undo
    if kind == "layernorm_eps":   # torch's default 1e-5 instead of DINOv2's 1e-6
        for b in blocks:
            b.norm1.eps = 1e-5
        return x, lambda: [setattr(b.norm1, "eps", 1e-6) for b in blocks]
    if kind == "gelu_tanh":       # the tanh approximation instead of the exact erf GELU
        acts = [b.mlp.act for b in blocks]
        for b in blocks:
            b.mlp.act = nn.GELU(approximate="tanh")
        return x, lambda: [setattr(b.mlp, "act", a) for b, a in zip(blocks, acts)]
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["input", "weight", "layernorm_eps", "gelu_tanh"])
def test_golden_comparison_detects_small_changes(model_and_input, kind):
    """The check above can fail: one changed input pixel (+1e-2), one changed
    weight (+1e-3), LayerNorm eps 1e-5 or the tanh GELU each move the golden
    numbers by 5x-35x the tolerance (compared with the unperturbed model's
    own outputs, so this holds whatever the stored golden values are)."""
    model, x = model_and_input
    base = summarize(*eager_outputs(model, x))
    x2, undo = _perturb(model, x, kind)
    try:
        assert _compare(summarize(*eager_outputs(model, x2)), base, ATOL), f"{kind}: the perturbed model still matched"
    finally:
        undo()
    assert not _compare(summarize(*eager_outputs(model, x)), base, 0.0), f"{kind}: undo did not restore the model"


@pytest.mark.parametrize("name", ["default", "bilinear_56", "nearest_28"])
def test_preprocess_pil_matches_golden(name):
    digest, shape, mean = preprocess_digest(name)
    want_digest, want_shape, want_mean = GOLDEN_PREPROCESS[name]
    assert (digest, shape) == (want_digest, tuple(want_shape)), (
        f"preprocess_pil({name}) output changed (Pillow/numpy upgrade or a preprocessing change): "
        f"shape {shape} vs {tuple(want_shape)}, mean {mean:.9f} vs {want_mean:.9f}, sha256 {digest}")


def test_onnx_export_matches_golden(model_and_input, tmp_path):
    """The exported graph, run by onnxruntime, gives the same golden numbers
    (tolerance 2e-5: ORT's kernels and fusions round differently; measured
    1.1e-6 on the pinned stack)."""
    import onnxruntime as ort
    import torch

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import export_onnx

    model, x = model_and_input
    path = tmp_path / "golden.onnx"
    export_onnx(export_module(model), torch.from_numpy(x[:1]), path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    logits, emb = sess.run(["logits", "embedding"], {"pixel_values": x})
    problems = _compare(summarize(logits, emb), GOLDEN, 2e-5)
    assert not problems, "onnxruntime outputs of the golden DINOv2 moved:\n" + "\n".join(problems)


def _regenerate() -> str:
    import torch

    torch.set_num_threads(1)
    got = summarize(*eager_outputs(golden_model(), golden_input()))

    def fmt(a):
        return "[" + ",\n    ".join("[" + ", ".join(f"{v:.8f}" for v in row) + "]" for row in a) + "]"

    lines = [f"GOLDEN_LOGITS = {fmt(got['logits'])}",
             f"GOLDEN_EMB_PROBES = {fmt(got['emb_probes'])}",
             f"GOLDEN_EMB_PROJ = {fmt(got['emb_proj'])}",
             "GOLDEN_PREPROCESS = {"]
    for name in preprocess_configs():
        digest, shape, mean = preprocess_digest(name)
        lines.append(f"    {name!r}: ({digest!r}, {shape}, {mean:.9f}),")
    lines.append("}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(_regenerate())
