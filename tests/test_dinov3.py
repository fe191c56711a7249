"""DINOv3 end to end (issue 21): the archs, weights in every layout, numerics
against transformers, RoPE baked into the exported graphs, training modes,
the checkpoint record and the export variants.

The numerical reference is transformers' `DINOv3ViTModel` (5.24) on a tiny
random model (tests/fixtures/dinov3.py: 2 blocks, width 32, 2 heads, 4
registers, every parameter random); the tolerance is 1e-4 absolute on the
final-norm tokens and embeddings (the values are O(1)). Offline: no weights
are downloaded; the official and timm layouts are built from tiny models."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_triton.train.model import WeightsError, build_model, load_classifier
from tests.fixtures.dinov3 import (
    TINY3,
    TINY3_IMG,
    hf_model,
    hf_state_dict,
    hf_tokens,
    randomize_,
    save_hf_folder,
    timm_backbone,
    to_official,
    write_tiny_dinov3_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4     # max |ours - transformers| on tokens / embeddings

# facebookresearch/dinov3 dinov3/hub/backbones.py: (embed_dim, depth, heads, ffn_ratio, ffn_layer, qkv_bias)
OFFICIAL = {
    "dinov3_vits16": (384, 12, 6, 4, "mlp", True),
    "dinov3_vits16plus": (384, 12, 6, 6, "swiglu", True),
    "dinov3_vitb16": (768, 12, 12, 4, "mlp", True),
    "dinov3_vitl16": (1024, 24, 16, 4, "mlp", True),
    "dinov3_vith16plus": (1280, 32, 20, 6, "swiglu", True),
    "dinov3_vit7b16": (4096, 40, 32, 3, "swiglu64", False),
}


def _images(size: int, n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _ours(weights, size: int, arch: str = "dinov3_vits16", head: str = "cls_mean"):
    return build_model(arch, weights=str(weights), num_classes=3, img_size=size, head=head,
                       backbone_overrides=TINY3).model.eval()


def _tokens(backbone, x):
    with torch.no_grad():
        return backbone.forward_features(x)


def _maxdiff(a, b) -> float:
    return float((torch.as_tensor(a) - torch.as_tensor(b)).abs().max())


# --------------------------------------------------------------------------- archs
@pytest.mark.parametrize("arch", sorted(OFFICIAL))
def test_arch_is_the_official_architecture(arch):
    """Each arch's timm model has the official width, depth, heads, FFN,
    qkv bias, 4 registers, LayerNorm eps 1e-5 and RoPE base 100 (built on the
    meta device: no memory, the 7B included)."""
    import timm

    from dinov2_triton.train.archs import arch_spec

    dim, depth, heads, ratio, ffn, qkv_bias = OFFICIAL[arch]
    spec = arch_spec(arch)
    assert (spec.family, spec.patch_size, spec.registers, spec.position_encoding) == ("dinov3", 16, 4, "rope")
    with torch.device("meta"):
        m = timm.create_model(spec.timm_name, pretrained=False, num_classes=0, img_size=224, dynamic_img_size=False)
    block = m.blocks[0]
    assert (m.embed_dim, len(m.blocks), block.attn.num_heads, m.reg_token.shape[1]) == (dim, depth, heads, 4)
    assert (block.attn.q_bias is not None) == qkv_bias and m.norm.eps == 1e-5 and m.rope.temperature == 100
    assert m.pos_embed is None and m.patch_embed.patch_size == (16, 16)
    if ffn == "mlp":
        assert block.mlp.fc1.out_features == dim * ratio
    else:   # official SwiGLUFFN: 2/3 of the ratio, aligned to 8 (64 for the 7B)
        align = 64 if ffn == "swiglu64" else 8
        hidden = -(-int(2 * dim * ratio / 3) // align) * align
        assert block.mlp.fc1_g.out_features == block.mlp.fc1_x.out_features == hidden


def test_official_file_names_match_the_arch():
    from fnmatch import fnmatch

    from dinov2_triton.train.archs import arch_spec

    assert fnmatch("dinov3_vits16_pretrain_lvd1689m-08c60483.pth", arch_spec("dinov3_vits16").weights_file_glob)
    assert not fnmatch("dinov3_vits16plus_pretrain_lvd1689m-4057cbaa.pth",
                       arch_spec("dinov3_vits16").weights_file_glob)
    assert arch_spec("vits14_reg4").weights_file_glob == "dinov2_vits14_reg4_pretrain.pth"
    assert arch_spec("vit_7b_patch16_dinov3").hf_repo == "facebook/dinov3-vit7b16-pretrain-lvd1689m"


def test_image_size_must_be_a_multiple_of_16():
    from dinov2_triton.core.preprocessing import PreprocessConfig
    from dinov2_triton.train.finetune_config import ConfigError, resolve_config

    with pytest.raises(ValueError, match=r"img_size 56: must be a positive multiple of the patch size 16 of "
                                         r"dinov3_vits16 \(dinov3; e.g. .*64"):
        build_model("dinov3_vits16", weights="random", num_classes=3, img_size=56, backbone_overrides=TINY3)
    with pytest.raises(ConfigError, match=r"--img-size 56: must be a positive multiple of the patch size 16"):
        resolve_config({"arch": "dinov3_vits16", "img_size": 56})
    assert resolve_config({"arch": "dinov3_vits16", "img_size": 64}).img_size == 64
    assert PreprocessConfig.for_image_size(64).image_size == 64
    with pytest.raises(ConfigError, match=r"--arch 'dinov3_vitz16': choose one of .*dinov3_vits16"):
        resolve_config({"arch": "dinov3_vitz16"})


def test_xformers_attention_is_refused_for_dinov3():
    with pytest.raises(ValueError, match=r"--attention xformers: DINOv2 backbones only .*use --attention sdpa"):
        build_model("dinov3_vits16", weights="random", num_classes=3, img_size=TINY3_IMG, attention="xformers",
                    backbone_overrides=TINY3)


def test_rope_is_baked_for_the_fixed_grid_and_travels_with_the_weights():
    """The table every forward pass uses is computed once (our rope_tables,
    equal to timm's own at float32 periods); the periods are in the state
    dict, and loading other periods rebakes the table."""
    from dinov2_triton.train.pos_embed import rope_periods, rope_tables

    native = timm_backbone(img_size=64)
    model = _ours("random", 64).backbone
    assert torch.equal(model.rope.periods, rope_periods(16))
    torch.testing.assert_close(model.rope.pos_embed_cached, native.rope.pos_embed_cached, rtol=0, atol=1e-6)
    sd = model.state_dict()
    assert "rope.periods" in sd and "rope.pos_embed_cached" not in sd
    bf16 = rope_periods(16).to(torch.bfloat16).float()
    assert not torch.equal(bf16, rope_periods(16))
    model.load_state_dict({**sd, "rope.periods": bf16}, strict=True)
    sin, cos = rope_tables(bf16, (4, 4))
    assert torch.equal(model.rope.pos_embed_cached, torch.cat([sin, cos], dim=-1))


# --------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("gated", [False, True], ids=["mlp", "swiglu"])
@pytest.mark.parametrize("size", [224, 160])
def test_eager_backbone_matches_transformers(tmp_path, size, gated):
    """Class token, the 4 registers and every patch token (final norm
    applied) equal transformers' DINOv3ViTModel.last_hidden_state to 1e-4,
    loading its save_pretrained folder (S/16 MLP and S+/16 SwiGLU layouts)."""
    ref = hf_model(gated=gated)
    folder = save_hf_folder(ref, tmp_path / "hf")
    ours = _ours(folder, size, "dinov3_vits16plus" if gated else "dinov3_vits16")
    x = _images(size)
    got, want = _tokens(ours.backbone, x), hf_tokens(ref, x)
    assert got.shape == want.shape == (2, 1 + 4 + (size // 16) ** 2, TINY3["embed_dim"])
    assert _maxdiff(got[:, 0], want[:, 0]) <= TOL             # class token
    assert _maxdiff(got[:, 5:], want[:, 5:]) <= TOL           # patch tokens
    assert _maxdiff(got, want) <= TOL                         # registers too


@pytest.mark.slow
@pytest.mark.parametrize("size", [224, 160])
def test_exported_onnx_matches_transformers(tmp_path, size):
    """Through ONNX Runtime: the project's exported classifier graph (the
    served one) gives embedding = [class token, mean patch token] equal to
    transformers' to 1e-4, and a token graph exported the same way gives
    every class/patch token to 1e-4. Both graphs are fixed-size: no control
    flow, no computed Range, no Sin/Cos, only the batch axis dynamic."""
    import onnx

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import check_io, check_static_graph, export_onnx, ort_runner

    ref = hf_model()
    ours = _ours(save_hf_folder(ref, tmp_path / "hf"), size)
    x = _images(size, n=3)
    want = hf_tokens(ref, x)
    path = tmp_path / "model.onnx"
    export_onnx(export_module(ours), _images(size, n=2, seed=1), path)
    graph = onnx.load(str(path))
    check_io(graph, image_size=size, num_classes=3, embed_dim=2 * TINY3["embed_dim"])
    assert check_static_graph(graph)["symbols"] == ["batch"]
    _, emb = ort_runner(path)(x.numpy())
    assert _maxdiff(emb, torch.cat([want[:, 0], want[:, 5:].mean(1)], -1)) <= TOL

    class Tokens(torch.nn.Module):
        def __init__(self, backbone):
            super().__init__()
            self.backbone = backbone

        def forward(self, pixel_values):
            t = self.backbone.forward_features(pixel_values)
            return t[:, 0], t[:, 5:]

    tokens_path = tmp_path / "tokens.onnx"
    export_onnx(Tokens(ours.backbone).eval(), _images(size, n=2, seed=1), tokens_path)
    check_static_graph(onnx.load(str(tokens_path)))
    cls_tok, patches = ort_runner(tokens_path)(x.numpy())
    assert _maxdiff(cls_tok, want[:, 0]) <= TOL and _maxdiff(patches, want[:, 5:]) <= TOL


@pytest.mark.slow
def test_exported_graph_carries_the_rope_table_as_a_constant(tmp_path):
    """The sin/cos table of the checkpoint's size is an initializer of the
    graph (what TensorRT needs: facebookresearch/dinov3#312)."""
    import onnx
    from onnx import numpy_helper

    from dinov2_triton.export.context import export_module
    from dinov2_triton.export.variants.onnx import check_static_graph, export_onnx
    from dinov2_triton.train.pos_embed import rope_tables

    model = _ours("random", 64)
    path = tmp_path / "m.onnx"
    export_onnx(export_module(model), _images(64), path)
    graph = onnx.load(str(path))
    check_static_graph(graph)
    sin, cos = (t.numpy() for t in rope_tables(model.backbone.rope.periods, (4, 4)))
    table = np.concatenate([sin, cos], axis=-1)
    inits = [numpy_helper.to_array(i) for i in graph.graph.initializer]
    assert any(a.shape == table.shape and np.allclose(a, table, atol=1e-7) for a in inits) or (
        any(a.shape == sin.shape and np.allclose(a, sin, atol=1e-7) for a in inits)
        and any(a.shape == cos.shape and np.allclose(a, cos, atol=1e-7) for a in inits))


def _graph(nodes, inits=(), inputs=None):
    from onnx import TensorProto, helper

    inputs = inputs or [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3])]
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph(nodes, "g", inputs, [out], initializer=list(inits)))


def test_static_graph_check_fails_on_control_flow_computed_range_and_extra_dims():
    """The gate proven to fail: an If nested in a Loop body, a Range fed by
    a Shape, a Sin, a second symbolic dimension. A Range of constants passes."""
    from onnx import TensorProto, helper, numpy_helper

    from dinov2_triton.export.variants.onnx import OnnxContractError, check_static_graph

    branch = helper.make_graph([helper.make_node("Identity", ["c"], ["y"])], "branch", [],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    inner_if = helper.make_node("If", ["cond"], ["y"], name="inner_if", then_branch=branch, else_branch=branch)
    body = helper.make_graph([inner_if], "body", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    loop = helper.make_node("Loop", ["", "cond"], ["y"], name="the_loop", body=body)
    with pytest.raises(OnnxContractError, match=r"control flow \['g/the_loop', 'g/the_loop/inner_if'\]"):
        check_static_graph(_graph([loop]))

    start, step = (numpy_helper.from_array(np.array(v, dtype=np.int64), n) for v, n in ((0, "start"), (1, "step")))
    shape = helper.make_node("Shape", ["pixel_values"], ["n"])
    computed = helper.make_node("Range", ["start", "n", "step"], ["y"], name="arange")
    with pytest.raises(OnnxContractError, match=r"Range nodes with computed bounds \['g/arange'\]"):
        check_static_graph(_graph([shape, computed], [start, step]))
    limit = numpy_helper.from_array(np.array(4, dtype=np.int64), "limit")
    assert check_static_graph(_graph([helper.make_node("Range", ["start", "limit", "step"], ["y"])],
                                     [start, limit, step]))["computed_ranges"] == []

    with pytest.raises(OnnxContractError, match=r"Sin/Cos computed at run time"):
        check_static_graph(_graph([helper.make_node("Sin", ["pixel_values"], ["y"])]))
    two = [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", "height"])]
    with pytest.raises(OnnxContractError, match=r"dynamic dimensions other than the batch axis 'batch': \['height'\]"):
        check_static_graph(_graph([helper.make_node("Identity", ["pixel_values"], ["y"])], inputs=two))


@pytest.mark.slow
def test_static_graph_check_rejects_a_run_time_rope_export(tmp_path):
    """What goes wrong without baking: timm's DINOv3 with dynamic_img_size
    exported with dynamic height/width builds RoPE at run time (Range, Sin,
    Cos over symbolic sizes); the check names those nodes."""
    import onnx
    import timm

    from dinov2_triton.export.variants.onnx import OnnxContractError, _quiet_exporter, check_static_graph

    m = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, img_size=64, dynamic_img_size=True,
                          embed_dim=32, depth=1, num_heads=2).eval()
    dims = {0: torch.export.Dim("batch", min=1, max=64), 2: 16 * torch.export.Dim("h", min=1, max=32),
            3: 16 * torch.export.Dim("w", min=1, max=32)}
    with torch.no_grad(), _quiet_exporter():
        torch.onnx.export(m, (_images(64),), str(tmp_path / "dyn.onnx"), dynamo=True, opset_version=18,
                          dynamic_shapes={"x": dims}, optimize=True)
    with pytest.raises(OnnxContractError, match=r"Range nodes with computed bounds.*Sin/Cos computed at run time"):
        check_static_graph(onnx.load(str(tmp_path / "dyn.onnx")))


# --------------------------------------------------------------------------- weight layouts
def test_hf_folder_and_its_safetensors_file(tmp_path):
    """A facebook/dinov3-* folder, and its model.safetensors passed alone
    (config.json beside it is read and checked), load strictly."""
    ref = hf_model(seed=3)
    folder = save_hf_folder(ref, tmp_path / "dinov3-vits16")
    x = _images(TINY3_IMG)
    for weights in (folder, folder / "model.safetensors"):
        built = build_model("dinov3_vits16", weights=str(weights), num_classes=3, img_size=TINY3_IMG,
                            backbone_overrides=TINY3)
        assert "transformers layout" in built.weights_source and built.pos_embed_resampling == "dinov3_rope_fixed_grid"
        assert _maxdiff(_tokens(built.model.eval().backbone, x), hf_tokens(ref, x)) <= TOL


def test_official_checkpoint_keeps_its_rope_periods(tmp_path):
    """The facebookresearch/dinov3 layout (random masked key bias, bias_mask,
    mask_token, bfloat16-rounded rope_embed.periods as in the released
    files): equal to transformers run with the same periods, and the fixture
    is the official layout as timm's own checkpoint_filter_fn reads it."""
    import timm
    from timm.models.eva import checkpoint_filter_fn

    from dinov2_triton.train.pos_embed import rope_periods

    ref = hf_model(seed=4)
    bf16 = rope_periods(16).to(torch.bfloat16).float()
    official = to_official(hf_state_dict(ref), periods=bf16)
    path = tmp_path / "dinov3_vits16_pretrain_lvd1689m-test.pth"
    torch.save(official, path)
    built = build_model("dinov3_vits16", weights=str(path), num_classes=3, img_size=64, backbone_overrides=TINY3)
    assert "official layout" in built.weights_source
    ours = built.model.eval()
    assert torch.equal(ours.backbone.rope.periods, bf16)
    x = _images(64)
    with torch.no_grad():
        ref.rope_embeddings.inv_freq.copy_(1.0 / bf16)       # transformers with the checkpoint's periods
    assert _maxdiff(_tokens(ours.backbone, x), hf_tokens(ref, x)) <= TOL

    with torch.no_grad():
        ref.rope_embeddings.inv_freq.copy_(1.0 / rope_periods(16))
    native = timm.create_model("vit_small_patch16_dinov3_qkvb", num_classes=0, img_size=64,
                               dynamic_img_size=False, **TINY3).eval()
    native.load_state_dict(checkpoint_filter_fn(dict(official), native), strict=True)   # timm: float32 periods
    assert _maxdiff(_tokens(native, x), hf_tokens(ref, x)) <= TOL


@pytest.mark.parametrize("timm_name", ["vit_small_patch16_dinov3_qkvb", "vit_small_patch16_dinov3"])
def test_timm_layout(tmp_path, timm_name):
    """timm's keys, from the qkvb variant and from the plain one (no
    query/value bias: loaded as zero biases, the same function)."""
    native = timm_backbone(timm_name, img_size=64, seed=5)
    path = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in native.state_dict().items()}, str(path))
    ours = _ours(path, 64)
    x = _images(64)
    assert _maxdiff(_tokens(ours.backbone, x), _tokens(native, x)) <= TOL
    if timm_name.endswith("dinov3"):
        assert float(ours.backbone.blocks[0].attn.q_bias.detach().abs().max()) == 0.0


def test_layouts_refuse_what_does_not_fit(tmp_path):
    """Each refusal names the file or field and what to do."""
    from tests.fixtures.models import tiny_model, to_official_layout

    v2 = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_official_layout(tiny_model().backbone.state_dict()), v2)
    with pytest.raises(WeightsError, match=r"dinov2_vits14_pretrain.pth: these are DINOv2 weights, but the "
                                           r"architecture built \(--arch\) is a DINOv3 model; pass a DINOv2 --arch"):
        _ours(v2, TINY3_IMG)
    ref = hf_model()
    folder = save_hf_folder(ref, tmp_path / "hf")
    with pytest.raises(WeightsError, match=r"these are DINOv3 weights.*a DINOv2 model; pass a DINOv3 --arch"):
        build_model("vits14", weights=str(folder), num_classes=3, img_size=28)

    config = json.loads((folder / "config.json").read_text())
    for field, bad, want in (("num_attention_heads", 4, 2), ("rope_theta", 10000.0, 100.0),
                             ("num_register_tokens", 0, 4), ("hidden_act", "relu", "'gelu'")):
        (folder / "config.json").write_text(json.dumps({**config, field: bad}))
        with pytest.raises(WeightsError, match=rf"config.json: field '{field}' is {bad!r} but the architecture "
                                               rf"built \(--arch\) has {want}"):
            _ours(folder, TINY3_IMG)
    (folder / "config.json").write_text(json.dumps(config))

    official = to_official(hf_state_dict(ref))
    for name, change, message in (
            ("untied.pth", {"cls_norm.weight": torch.ones(32), "cls_norm.bias": torch.zeros(32)},
             r"untied.pth: holds \['cls_norm.bias', 'cls_norm.weight'\].*untie_cls_and_patch_norms"),
            ("base.pth", {"rope_embed.periods": official["rope_embed.periods"] ** 2},
             r"base.pth: RoPE periods.*differ from base 100 .*not a DINOv3 RoPE of this architecture"),
            ("extra.pth", {"blocks.0.attn.surprise": torch.zeros(3)},
             r"extra.pth: checkpoint does not match the architecture \(missing 0 keys.*unexpected 1 keys, "
             r"e.g. \['blocks.0.attn.surprise'\]")):
        torch.save({**official, **change}, tmp_path / name)
        with pytest.raises(WeightsError, match=message):
            _ours(tmp_path / name, TINY3_IMG)
    # the 7B has no query/value bias: a checkpoint with non-zero ones cannot be it
    torch.save(official, tmp_path / "biased.pth")
    with pytest.raises(WeightsError, match=r"biased.pth: blocks.0.attn.q_bias is not zero, but the architecture "
                                           r"built \(--arch\) has no query/value bias"):
        _ours(tmp_path / "biased.pth", TINY3_IMG, arch="dinov3_vit7b16")


# --------------------------------------------------------------------------- training modes
def test_lora_adapters_take_part_and_merge():
    """peft LoRA on timm's DINOv3 attention: the adapter on `qkv` changes the
    output (timm's fused-bias path would bypass it), and the merged plain
    model gives the adapted output."""
    from dinov2_triton.train.peft_modes import setup_mode

    base = randomize_(_ours("random", TINY3_IMG), seed=6).eval()   # layer scales ~1e-5 at init otherwise
    x = _images(TINY3_IMG)
    with torch.no_grad():
        before = base(x)
    setup = setup_mode(base, "lora", lora_rank=4)
    lora_b = [(n, p) for n, p in setup.model.named_parameters() if "lora_B" in n]
    assert {n.split(".attn.")[1].split(".")[0] for n, _ in lora_b} == {"qkv", "proj"}
    with torch.no_grad():
        for _, p in lora_b:
            p.normal_(0, 0.5)
        adapted = setup.model(x)
        qkv_only = [p for n, p in lora_b if ".attn.proj." in n]
        for p in qkv_only:
            p.zero_()
        qkv_adapted = setup.model(x)
    assert _maxdiff(qkv_adapted, before) > 1e-3     # the qkv adapter alone changes the output
    merged = setup.export_model().eval()
    with torch.no_grad():
        assert _maxdiff(merged(x), qkv_adapted) <= 1e-5
    assert _maxdiff(adapted, before) > 1e-3


def test_layer_decay_and_last_n_blocks_see_the_dinov3_blocks():
    from dinov2_triton.train.optim import param_groups
    from dinov2_triton.train.peft_modes import setup_mode

    model = _ours("random", TINY3_IMG)
    groups = param_groups(model, weight_decay=0.05, layer_decay=0.5)
    where = {n: (g["layer_id"], g["weight_decay"] > 0) for g in groups for n in g["names"]}
    assert len(where) == len(list(model.named_parameters()))
    assert where["backbone.cls_token"] == where["backbone.reg_token"] == (0, False)
    assert where["backbone.patch_embed.proj.weight"] == (0, True)
    assert where["backbone.blocks.1.attn.qkv.weight"] == (2, True)
    assert where["backbone.blocks.0.attn.q_bias"] == where["backbone.blocks.0.gamma_1"] == (1, False)
    assert where["backbone.norm.weight"][0] == where["head.weight"][0] == 3
    scales = {g["layer_id"]: g["lr_scale"] for g in groups}
    assert scales == {0: 0.125, 1: 0.25, 2: 0.5, 3: 1.0}

    setup = setup_mode(_ours("random", TINY3_IMG), "lastn", unfreeze_blocks=1)
    trainable = {n for n, p in setup.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("backbone.blocks.1.", "backbone.norm.", "head.")) for n in trainable)
    assert "backbone.blocks.1.attn.q_bias" in trainable


@pytest.fixture(scope="module")
def dinov3_data(tmp_path_factory) -> Path:
    from tests.fixtures.data import make_tiny_dataset

    return make_tiny_dataset(tmp_path_factory.mktemp("dinov3_data"), per_class=8)


def _cfg(data: Path, out: Path, **kw):
    from dinov2_triton.train.finetune_config import FinetuneConfig

    base = dict(data_path=str(data), output_path=str(out), arch="dinov3_vits16", weights="random",
                img_size=TINY3_IMG, backbone_overrides=dict(TINY3), epochs=1, batch_size=4, num_workers=0,
                progress=False, warmup_epochs=0, lr=1e-3)
    return FinetuneConfig(**{**base, **kw})


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["linear", "full", "lora", "lastn"])
def test_finetune_modes_write_a_dinov3_checkpoint(dinov3_data, tmp_path, mode):
    """Each training mode trains a tiny DINOv3 and writes a record that names
    the family and the position encoding; it rebuilds to the same outputs."""
    from dinov2_triton.train.checkpoint import read_checkpoint
    from dinov2_triton.train.trainer import finetune

    out = tmp_path / mode
    metrics = finetune(_cfg(dinov3_data, out, mode=mode, layer_decay=0.75 if mode == "full" else 1.0))
    assert "accuracy" in metrics["test"]
    record = read_checkpoint(out / "model_final.pth")
    assert (record.arch, record.family, record.position_encoding, record.pos_embed_resampling, record.mode) == (
        "dinov3_vits16", "dinov3", "rope", "dinov3_rope_fixed_grid", mode)
    assert "backbone.rope.periods" in record.state_dict and not any("lora_" in k for k in record.state_dict)
    model, _ = load_classifier(out / "model_final.pth")
    assert model.family == "dinov3"


@pytest.mark.slow
def test_dinov3_resume_is_exact(dinov3_data, tmp_path):
    """Interrupted mid-run and resumed (the default) gives the same weights
    as one uninterrupted run: the RoPE periods and table included."""
    from dinov2_triton.train.trainer import finetune

    class Stop(Exception):
        pass

    def stop_at(state, model):
        if state.step == 4:
            raise Stop()

    finetune(_cfg(dinov3_data, tmp_path / "ref", epochs=2))
    cfg = _cfg(dinov3_data, tmp_path / "cut", epochs=2, save_every_steps=1)
    with pytest.raises(Stop):
        finetune(cfg, step_callback=stop_at)
    finetune(cfg)
    ref, got = (torch.load(tmp_path / d / "model_final.pth", weights_only=True)["state_dict"] for d in ("ref", "cut"))
    assert ref.keys() == got.keys() and not [k for k in ref if not torch.equal(ref[k], got[k])]


# --------------------------------------------------------------------------- checkpoint record
def test_record_names_the_family_and_old_records_migrate(tmp_path):
    from dinov2_triton.core.records import RecordError
    from dinov2_triton.train.checkpoint import read_checkpoint
    from tests.fixtures.models import write_tiny_checkpoint

    path = write_tiny_dinov3_checkpoint(tmp_path / "v3.pth")
    raw = torch.load(path, weights_only=True)
    assert (raw["schema_version"], raw["family"], raw["position_encoding"]) == (3, "dinov3", "rope")
    torch.save({**raw, "family": "dinov2"}, tmp_path / "lying.pth")
    with pytest.raises(RecordError, match=r"lying.pth: .*family 'dinov2' / position_encoding 'rope' do not "
                                          r"describe arch 'dinov3_vits16'"):
        read_checkpoint(tmp_path / "lying.pth")
    torch.save({**raw, "preprocessing": {**raw["preprocessing"], "image_size": 28, "resize_size": 32}},
               tmp_path / "size.pth")
    with pytest.raises(RecordError, match=r"size.pth: .*preprocessing.image_size 28: must be a positive multiple "
                                          r"of the patch size 16"):
        read_checkpoint(tmp_path / "size.pth")

    # a schema-2 file (before DINOv3) is a DINOv2 one
    v2 = torch.load(write_tiny_checkpoint(tmp_path / "v2.pth"), weights_only=True)
    old = {k: v for k, v in v2.items() if k not in ("family", "position_encoding")} | {"schema_version": 2}
    torch.save(old, tmp_path / "old.pth")
    rec = read_checkpoint(tmp_path / "old.pth")
    assert (rec.schema_version, rec.family, rec.position_encoding) == (3, "dinov2", "learned")
    load_classifier(tmp_path / "old.pth")
    torch.save({k: v for k, v in raw.items() if k not in ("family", "position_encoding")} | {"schema_version": 2},
               tmp_path / "v3_as_2.pth")
    with pytest.raises(RecordError, match=r"v3_as_2.pth: .*do not describe arch 'dinov3_vits16'"):
        read_checkpoint(tmp_path / "v3_as_2.pth")


# --------------------------------------------------------------------------- export
@pytest.fixture(scope="module")
def dinov3_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_dinov3_checkpoint(tmp_path_factory.mktemp("dinov3_ckpt") / "model_final.pth")


def test_legacy_onnx_exporter_is_refused_for_dinov3(dinov3_checkpoint, tmp_path):
    from dinov2_triton.export.context import ExportContext
    from dinov2_triton.export.variants.onnx import ONNX, OnnxContractError

    model, record = load_classifier(dinov3_checkpoint)
    ctx = ExportContext(model, record, data_path=None, work_dir=tmp_path, options={"onnx_exporter": "legacy"})
    with pytest.raises(OnnxContractError, match=r"legacy cannot export DINOv3.*'is_causal' must be bool"):
        ONNX.build(ctx, tmp_path / "model.onnx")


EXPORT_TEST = "test_export_pipeline_gates_the_dinov3_variants"


@pytest.fixture(scope="module")
def dinov3_export(dinov3_checkpoint, tiny_dataset, tmp_path_factory):
    """One export of a tiny DINOv3 checkpoint with the default variants (auto: every CPU variant)
    and trt_fp16, through the command, started, not waited for: (repository, process, log folder).
    In a separate process: OpenVINO's runtime and torch training must not share one
    (scripts/test.sh)."""
    repo = tmp_path_factory.mktemp("dinov3_repo")
    logs = tmp_path_factory.mktemp("dinov3_export_logs")
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "dinov2_triton.cli", "export", "--model-path",
                                 str(dinov3_checkpoint), "--repository", str(repo), "--data-path", str(tiny_dataset),
                                 "--variants", "auto,trt_fp16", "--bench-seconds", "0.2", "-q"],
                                cwd=ROOT, stdout=out, stderr=err, text=True)
    try:
        yield repo, proc, logs
    finally:
        if proc.poll() is None:       # the module ended before the export test waited for it
            proc.kill()
        proc.wait()


@pytest.fixture(scope="module", autouse=True)
def _dinov3_export_beside_the_module(request):
    """Starts the export (tens of seconds, mostly on one core: imports, tracing, ModelOpt's
    child processes) with the module's first test when its test is selected, so that it runs
    beside the module's other tests instead of after them; not started otherwise (-m unit)."""
    if any(item.name == EXPORT_TEST and getattr(item, "module", None) is request.module
           for item in request.session.items):
        request.getfixturevalue("dinov3_export")


@pytest.fixture(scope="module")
def dinov3_repository(dinov3_export) -> Path:
    """The export's repository, once the command has finished (exit 0)."""
    repo, proc, logs = dinov3_export
    try:
        code = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert code == 0, (logs / "stderr").read_text()[-3000:]
    return repo


@pytest.mark.slow
def test_export_pipeline_gates_the_dinov3_variants(dinov3_repository):
    """A tiny DINOv3 checkpoint exported with the default variants: ONNX FP32, FP16 and INT8
    (modelopt static and ORT dynamic), OpenVINO FP32 and NNCF INT8 and TorchScript built,
    verified and gated like DINOv2's; BF16 and TensorRT SKIPPED here with their reason
    (BF16 built where the CPU has it); the FP32 graph fixed-size apart from the batch."""
    from dinov2_triton.core.cpu_features import bf16_support, read_cpu_flags
    from dinov2_triton.export.manifest import read_export_manifest
    from dinov2_triton.export.pipeline import exit_code

    manifest = read_export_manifest(dinov3_repository)
    status = {n: v.status for n, v in manifest.variants.items()}
    built = ("onnx", "onnx_fp16", "onnx_int8", "onnx_int8_dynamic", "openvino", "openvino_int8", "torchscript")
    bf16 = "OK" if bf16_support(read_cpu_flags())[0] else "SKIPPED"
    assert status == {**dict.fromkeys(built, "OK"), "openvino_bf16": bf16, "trt_fp16": "SKIPPED"}, (
        {n: v.reason for n, v in manifest.variants.items()})
    assert "GPU" in manifest.variants["trt_fp16"].reason or "TensorRT" in manifest.variants["trt_fp16"].reason
    for name in built:
        assert manifest.variants[name].verification.passed and manifest.variants[name].gate_passed, name
    fixed = manifest.variants["onnx"].build_info["fixed_size"]
    assert fixed == {"checked": True, "control_flow": 0, "computed_ranges": 0, "symbols": ["batch"]}
    assert manifest.arch == "dinov3_vits16" and exit_code(manifest) == 0
    # the ensemble calls the fastest gated variant of this run, as for DINOv2
    assert manifest.ensemble.classifier == f"dinov2_{manifest.ensemble.classifier_ranking[0]['variant']}"
