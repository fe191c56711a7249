"""The backbone is DINOv2 at the size it is deployed at.

Reference: the official facebookresearch/dinov2 code (PyPI dinov2==0.0.1.dev2, put in
.venv/reference/ by scripts/setup_env.sh,
random tiny weights: depth 2, width 64, the released 518 px / 37x37 grid),
saved in the official layout and loaded through `--weights file.pth`
(build_model(..., weights=path)); and transformers' own Dinov2Model /
Dinov2WithRegistersModel saved with save_pretrained. Class and patch tokens
after the final norm must agree to 1e-4 at 224, 112 and 518 px, eager and
through the exported ONNX graph."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dinov2_triton.train.model import build_model
from dinov2_triton.train.pos_embed import LEGACY_TIMM, OFFICIAL_PLAIN, OFFICIAL_REGISTERS, resample_grid
from tests.fixtures.official_dinov2 import (
    TINY_OVERRIDES,
    TINY_SWIGLU_OVERRIDES,
    ReferenceMissing,
    import_official_vit,
    make_official,
    make_transformers_folder,
    official_tokens,
)

TOL = 1e-4
SIZES = (224, 112, 518)
# arch, official constructor options, project backbone overrides
CASES = {
    "vits14": (dict(registers=False), TINY_OVERRIDES),
    "vits14_reg4": (dict(registers=True), TINY_OVERRIDES),
    # SwiGLU (w12/w3) as in ViT-g/14, blocks chunked as the official training code saves them
    "vitg14": (dict(ffn_layer="swiglufused", block_chunks=2), TINY_SWIGLU_OVERRIDES),
}


@pytest.fixture(scope="session")
def official_dinov2():
    """The official code's vision_transformer module (installed by scripts/setup_env.sh, never at test time)."""
    try:
        return import_official_vit()
    except ReferenceMissing as exc:
        pytest.fail(str(exc))


def _inputs(size: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(size))


def _project_tokens(model, x):
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
    return tokens[:, 0], tokens[:, model.backbone.num_prefix_tokens:]


def _max_diff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


@pytest.fixture(scope="module")
def official_checkpoints(official_dinov2, tmp_path_factory):
    """arch -> (official model, path of its state dict in the official layout)."""
    folder = tmp_path_factory.mktemp("official")
    out = {}
    for arch, (kwargs, _) in CASES.items():
        model = make_official(official_dinov2, **kwargs)
        path = folder / f"dinov2_{arch}_pretrain.pth"
        torch.save(model.state_dict(), path)
        out[arch] = (model, path)
    return out


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("arch", sorted(CASES))
def test_official_layout_reproduces_official_forward_features(official_checkpoints, arch, size):
    official, path = official_checkpoints[arch]
    registers = arch.endswith("_reg4")
    built = build_model(arch, weights=str(path), num_classes=3, img_size=size,
                        backbone_overrides=CASES[arch][1])
    assert "official layout" in built.weights_source
    assert built.pos_embed_resampling == (OFFICIAL_REGISTERS if registers else OFFICIAL_PLAIN)
    model = built.model.eval()
    x = _inputs(size)
    ref_cls, ref_patches = official_tokens(official, x, registers=registers)
    cls, patches = _project_tokens(model, x)
    assert patches.shape == ref_patches.shape == (2, (size // 14) ** 2, 64)
    assert _max_diff(cls, ref_cls) <= TOL, f"class token differs by {_max_diff(cls, ref_cls):.2e}"
    assert _max_diff(patches, ref_patches) <= TOL, f"patch tokens differ by {_max_diff(patches, ref_patches):.2e}"
    if registers:
        with torch.no_grad():
            regs = model.backbone.forward_features(x)[:, 1:5]
            ref_regs = official.forward_features(x)["x_norm_patchtokens"][:, :4]
        assert _max_diff(regs, ref_regs) <= TOL

    if size != 518:
        # The comparison discriminates: the resampling of the *other* family
        # (timm's antialiased resize for plain models, the offset variant for
        # register models) misses the official tokens by far more than TOL.
        other = OFFICIAL_PLAIN if registers else LEGACY_TIMM
        grid = torch.load(path, weights_only=True)["pos_embed"][:, 1:]
        wrong = resample_grid(grid, (size // 14, size // 14), other)
        bb = model.backbone
        keep = 0 if bb.no_embed_class else 1
        with torch.no_grad():
            bb.pos_embed.copy_(torch.cat([bb.pos_embed[:, :keep], wrong], dim=1))
        wrong_cls, _ = _project_tokens(model, x)
        assert _max_diff(wrong_cls, ref_cls) > 100 * TOL


@pytest.mark.parametrize("arch", ["vits14", pytest.param("vits14_reg4", marks=pytest.mark.slow)])
def test_exported_onnx_graph_reproduces_official_model(official_checkpoints, tmp_path, arch):
    """The same comparison through the ONNX graph the export stage serves
    (dynamo exporter, ONNX Runtime CPU): embedding = [class token, mean of
    patch tokens]; no Resize node, i.e. no run-time interpolation."""
    import onnx

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import export_onnx, ort_runner

    official, path = official_checkpoints[arch]
    registers = arch.endswith("_reg4")
    size = 112
    model = build_model(arch, weights=str(path), num_classes=3, img_size=size,
                        backbone_overrides=CASES[arch][1]).model.eval()
    onnx_path = tmp_path / "model.onnx"
    export_onnx(export_module(model), _inputs(size), onnx_path)
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert "Resize" not in ops and "Upsample" not in ops, sorted(ops)

    x = _inputs(size, batch=3)
    _, embedding = ort_runner(onnx_path)(x.numpy())
    ref_cls, ref_patches = official_tokens(official, x, registers=registers)
    ref = torch.cat([ref_cls, ref_patches.mean(dim=1)], dim=-1).numpy()
    assert embedding.shape == ref.shape
    assert float(np.abs(embedding - ref).max()) <= TOL


# ----------------------------------------------------------------------------- transformers
HF_CASES = {"vits14": dict(registers=False), "vits14_reg4": dict(registers=True),
            "vitg14": dict(swiglu=True)}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """arch -> (transformers model, its save_pretrained folder)."""
    root = tmp_path_factory.mktemp("hf")
    return {arch: (make_transformers_folder(root / arch, **kw), root / arch) for arch, kw in HF_CASES.items()}


def _official_interpolation(official_vit, hf_model):
    """transformers' embeddings.interpolate_pos_encoding replaced by the
    official code's own method (PyPI dinov2) on the same position table."""
    emb = hf_model.embeddings
    this = SimpleNamespace(pos_embed=emb.position_embeddings, patch_size=14)
    return lambda embeddings, height, width: official_vit.DinoVisionTransformer.interpolate_pos_encoding(
        this, embeddings, height, width)


@pytest.mark.parametrize("size", [518, 224])
@pytest.mark.parametrize("form", ["folder", "file"])
@pytest.mark.parametrize("arch", sorted(HF_CASES))
def test_transformers_layout_matches_transformers_forward(hf_folders, official_dinov2, monkeypatch,
                                                         arch, form, size):
    """`--weights FOLDER` and `--weights FOLDER/model.safetensors` load a hub
    layout folder strictly; tokens = transformers' last_hidden_state.

    At 518 px nothing is interpolated and transformers' forward is compared
    as it is. Below it, transformers' Dinov2WithRegistersModel interpolates
    like the official register models (antialiased bicubic to size) and is
    compared as it is; the plain Dinov2Model resizes with bicubic to size=
    (no 0.1 offset, unlike the official plain models), so its tokens differ
    from the official model's: there it is compared with the official
    interpolation put in its place, and the difference is asserted to exist."""
    hf_model, folder = hf_folders[arch]
    weights = folder if form == "folder" else folder / "model.safetensors"
    overrides = TINY_SWIGLU_OVERRIDES if arch == "vitg14" else TINY_OVERRIDES
    built = build_model(arch, weights=str(weights), num_classes=3, img_size=size, backbone_overrides=overrides)
    assert "transformers layout" in built.weights_source
    model = built.model.eval()
    x = _inputs(size)
    with torch.no_grad():
        tokens = model.backbone.forward_features(x)
        own = hf_model(pixel_values=x).last_hidden_state
    plain_resized = size != 518 and not arch.endswith("_reg4")
    if plain_resized:
        assert _max_diff(tokens, own) > 100 * TOL     # transformers' own plain-model resize differs
        monkeypatch.setattr(hf_model.embeddings, "interpolate_pos_encoding",
                            _official_interpolation(official_dinov2, hf_model))
        with torch.no_grad():
            own = hf_model(pixel_values=x).last_hidden_state
    assert tokens.shape == own.shape
    assert _max_diff(tokens, own) <= TOL, f"{_max_diff(tokens, own):.2e}"


def test_transformers_config_that_weights_cannot_show_is_checked(hf_folders, tmp_path):
    """The head count changes the numbers but not a single weight shape: a
    config.json that disagrees with --arch is refused, naming the field."""
    import json
    import shutil

    from dinov2_triton.train.model import WeightsError

    _, folder = hf_folders["vits14"]
    copy = tmp_path / "dinov2-small"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_attention_heads"] = 8
    (copy / "config.json").write_text(json.dumps(config))
    for weights in (copy, copy / "model.safetensors"):
        with pytest.raises(WeightsError, match=r"config\.json: field 'num_attention_heads' is 8.*--arch"):
            build_model("vits14", weights=str(weights), num_classes=3, img_size=224,
                        backbone_overrides=TINY_OVERRIDES)
    # registers folder for a plain arch: refused by config (and would be by keys)
    _, reg_folder = hf_folders["vits14_reg4"]
    with pytest.raises(WeightsError, match="num_register_tokens"):
        build_model("vits14", weights=str(reg_folder), num_classes=3, img_size=224,
                    backbone_overrides=TINY_OVERRIDES)
