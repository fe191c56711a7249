"""Model factory and weight conversion (train/model.py) on tiny random DINOv2s."""
from __future__ import annotations

import os

import pytest
import torch

from dinov2_triton.core.records import RecordError
from dinov2_triton.train.checkpoint import read_checkpoint
from dinov2_triton.train.model import ARCHS, WeightsError, build_model, load_classifier
from dinov2_triton.train.weight_layouts import layout_of, read_weights
from tests.fixtures.models import TINY, TINY_IMG, tiny_model, to_official_layout


def _features(model, x):
    with torch.no_grad():
        return model.backbone.forward_features(x)


@pytest.mark.parametrize("arch", ["vits14", "vits14_reg4"])
def test_official_layout_loads_strictly_and_matches(tmp_path, arch):
    """A checkpoint in facebookresearch/dinov2's layout (mask_token,
    register_tokens, class position inside pos_embed) converts in one place
    and reproduces the original backbone (reg4: up to float rounding of the
    class position folded into cls_token)."""
    original = tiny_model(arch, seed=1)
    official = to_official_layout(original.backbone.state_dict())
    assert layout_of(official) == "official"
    path = tmp_path / f"dinov2_{arch}_pretrain.pth"
    torch.save(official, path)

    built = build_model(arch, weights=str(path), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    assert "official layout" in built.weights_source and str(path.resolve()) in built.weights_source
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_features(built.model.eval(), x), _features(original, x), rtol=0, atol=1e-5)
    # the same tensors in timm's own layout load too (and are recognised as such)
    timm_path = tmp_path / "timm_layout.pth"
    torch.save({"model": original.backbone.state_dict()}, timm_path)
    again = build_model(arch, weights=str(timm_path), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    assert "timm layout" in again.weights_source
    assert torch.equal(_features(again.model.eval(), x), _features(original, x))


@pytest.mark.parametrize("wrong_arch,overrides", [("vits14_reg4", TINY),           # registers expected
                                                  ("vits14", dict(TINY, embed_dim=96)),  # other width
                                                  ("vits14", dict(TINY, depth=3))])      # other depth
def test_mismatched_checkpoint_raises_weights_error_naming_file(tmp_path, wrong_arch, overrides):
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(to_official_layout(tiny_model("vits14").backbone.state_dict()), path)
    with pytest.raises(WeightsError, match="dinov2_vits14_pretrain.pth") as info:
        build_model(wrong_arch, weights=str(path), num_classes=3, img_size=TINY_IMG,
                    backbone_overrides=overrides)
    assert "--arch" in str(info.value)


def test_missing_weights_file_is_a_weights_error(tmp_path):
    with pytest.raises(WeightsError, match="nope.pth: file not found"):
        build_model("vits14", weights=str(tmp_path / "nope.pth"), num_classes=3, img_size=TINY_IMG,
                    backbone_overrides=TINY)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds_tiny(arch):
    dinov3 = arch.startswith("dinov3_")
    size = 32 if dinov3 else TINY_IMG          # 2x2 patches of 16 px (DINOv3) or 14 px (DINOv2)
    model = build_model(arch, weights="random", num_classes=4, img_size=size,
                        backbone_overrides=TINY).model.eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
    assert logits.shape == (2, 4) and emb.shape == (2, model.embed_dim)
    assert model.backbone.num_prefix_tokens == (5 if arch.endswith("_reg4") or dinov3 else 1)
    assert model.family == ("dinov3" if dinov3 else "dinov2")


def test_pos_embed_resampled_at_build_not_at_run_time(tmp_path):
    """Weights stored for 56 px (4x4 patches) become a 2x2 grid at 28 px when
    the model is built; the graph then refuses other sizes instead of
    interpolating at run time (docs/field-notes.md #1)."""
    big = tiny_model("vits14_reg4", img_size=56)
    assert big.backbone.pos_embed.shape[1] == 16
    path = tmp_path / "official_56px.pth"
    torch.save(to_official_layout(big.backbone.state_dict()), path)
    model = build_model("vits14_reg4", weights=str(path), num_classes=3, img_size=TINY_IMG,
                        backbone_overrides=TINY).model.eval()
    assert model.backbone.pos_embed.shape == (1, 4, TINY["embed_dim"])   # reg4: no class position
    assert model.backbone.dynamic_img_size is False
    plain = tiny_model("vits14", img_size=TINY_IMG)
    assert plain.backbone.pos_embed.shape == (1, 1 + 4, TINY["embed_dim"])  # class position + 2x2
    with torch.no_grad():
        assert model(torch.randn(1, 3, TINY_IMG, TINY_IMG)).shape == (1, 3)
        with pytest.raises(Exception, match="(?i)input|size|height|width"):
            model(torch.randn(1, 3, 56, 56))


class _RunsShell:
    """Pickles to a call of os.system: what a malicious .pth looks like."""

    def __init__(self, cmd: str):
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class _Arbitrary:
    """An arbitrary class instance (not a tensor/plain type)."""

    def __init__(self):
        self.payload = "anything"


def test_weights_only_load_refuses_malicious_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model_final.pth"
    torch.save({"format_version": 1, "state_dict": _RunsShell(f"touch {marker}")}, evil)
    odd = tmp_path / "odd.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Arbitrary()}, odd)

    for path in (evil, odd):
        with pytest.raises(RecordError, match=path.name):
            read_checkpoint(path)
        with pytest.raises(WeightsError, match=path.name):
            read_weights(path)
        with pytest.raises(RecordError, match=path.name):
            load_classifier(path)
        with pytest.raises(WeightsError, match=path.name):
            build_model("vits14", weights=str(path), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    assert not marker.exists(), "loading the checkpoint executed its payload"
    # The file really is malicious: an unsafe load runs the payload (proves this test can fail).
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_load_classifier_roundtrip(tiny_checkpoint):
    model, record = load_classifier(tiny_checkpoint)
    assert record.arch == "vits14" and record.image_size == TINY_IMG
    assert record.backbone_overrides == TINY
    x = torch.randn(3, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (3, record.num_classes)


def test_img_size_must_be_a_multiple_of_the_patch(tmp_path):
    with pytest.raises(ValueError, match="img_size 100: must be a positive multiple of the patch size 14"):
        build_model("vits14", weights="random", num_classes=3, img_size=100, backbone_overrides=TINY)


def test_hub_weights_are_resampled_with_the_official_interpolation(monkeypatch):
    """--weights hub: timm downloads the 518 px checkpoint; the grid is then
    resampled here (official method), not by timm's own load-time resize.
    The download is replaced by a random 518 px model (no network in tests)."""
    import timm

    from dinov2_triton.train.pos_embed import OFFICIAL_PLAIN, resample_grid

    real_create = timm.create_model
    downloaded = {}

    def fake_create(name, pretrained=False, **kwargs):
        if not pretrained:
            return real_create(name, **kwargs)
        assert kwargs["img_size"] == 518       # asked for the checkpoint's own grid
        torch.manual_seed(5)
        model = real_create(name, **kwargs)
        with torch.no_grad():
            model.pos_embed.normal_()
        downloaded["pos_embed"] = model.pos_embed.detach().clone()
        return model

    monkeypatch.setattr(timm, "create_model", fake_create)
    built = build_model("vits14", weights="hub", num_classes=3, img_size=224, backbone_overrides=TINY)
    assert built.weights_source.startswith("hub ") and built.pos_embed_resampling == OFFICIAL_PLAIN
    grid = downloaded["pos_embed"][:, 1:]
    expected = resample_grid(grid, (16, 16), OFFICIAL_PLAIN)
    got = built.model.backbone.pos_embed.detach()
    assert torch.equal(got[:, :1], downloaded["pos_embed"][:, :1])
    assert torch.equal(got[:, 1:], expected)


def test_weights_folder_errors_name_the_folder(tmp_path):
    folder = tmp_path / "dinov2-small"
    folder.mkdir()
    with pytest.raises(WeightsError, match="dinov2-small: a folder must hold a Hugging Face model"):
        build_model("vits14", weights=str(folder), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    from safetensors.torch import save_file

    save_file({"embeddings.cls_token": torch.zeros(1, 1, TINY["embed_dim"])}, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match="dinov2-small: config.json missing"):
        build_model("vits14", weights=str(folder), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    (folder / "config.json").write_text('{"model_type": "vit"}')
    with pytest.raises(WeightsError, match=r"config\.json: field 'model_type' is 'vit'"):
        build_model("vits14", weights=str(folder), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)


def test_unknown_transformers_keys_are_refused(tmp_path):
    """A transformers file with keys that are no part of a DINOv2 backbone
    (here a pooler) is an error, never a partial load."""
    from safetensors.torch import save_file

    backbone = tiny_model("vits14").backbone
    sd = {"embeddings.cls_token": backbone.cls_token.detach(),
          "encoder.layer.0.norm1.weight": torch.ones(TINY["embed_dim"]),
          "pooler.dense.weight": torch.zeros(2, 2)}
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path))
    with pytest.raises(WeightsError, match=r"model\.safetensors: 1 keys of the transformers layout.*pooler"):
        build_model("vits14", weights=str(path), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)


def _format1_checkpoint(path, *, arch: str, weights_source: str, img_size: int = TINY_IMG):
    """A model_final.pth as written before typed records and before the
    official resampling (format_version 1, no pos_embed_resampling)."""
    from dinov2_triton.core.preprocessing import PreprocessConfig

    model = tiny_model(arch, img_size=img_size)
    torch.save({"format_version": 1, "arch": arch, "img_size": img_size, "num_classes": 3, "head": "cls_mean",
                "class_names": ["a", "b", "c"],
                "preprocessing": PreprocessConfig(image_size=img_size, resize_size=img_size + 4).to_dict(),
                "weights_source": weights_source, "backbone_overrides": TINY,
                "state_dict": model.state_dict(), "metrics": {}, "config": {}, "versions": {},
                "git_revision": "old"}, path)
    return path


@pytest.mark.parametrize("arch,weights_source,warns", [
    ("vits14", "file /w/dinov2_vits14_pretrain.pth (official layout, sha256 0)", True),
    ("vits14_reg4", "file /w/dinov2_vits14_reg4_pretrain.pth (official layout, sha256 0)", False),  # same method
    ("vits14", "random init (NOT pretrained)", False),                                              # nothing resampled
])
def test_checkpoint_before_official_resampling_loads_with_one_warning(tmp_path, caplog, arch, weights_source,
                                                                      warns):
    from dinov2_triton.train.pos_embed import LEGACY_TIMM

    path = _format1_checkpoint(tmp_path / "model_final.pth", arch=arch, weights_source=weights_source)
    with caplog.at_level("WARNING"):
        model, record = load_classifier(path)
    assert record.pos_embed_resampling == LEGACY_TIMM
    lines = [r.getMessage() for r in caplog.records if "position embeddings" in r.getMessage()]
    if warns:
        assert len(lines) == 1 and "\n" not in lines[0]
        assert str(path) in lines[0] and "old resampling" in lines[0] and LEGACY_TIMM in lines[0]
    else:
        assert lines == []
    with torch.no_grad():
        assert model(torch.randn(1, 3, TINY_IMG, TINY_IMG)).shape == (1, 3)


def test_new_checkpoint_records_the_official_resampling(tmp_path, caplog):
    from dinov2_triton.core.preprocessing import PreprocessConfig
    from dinov2_triton.train.checkpoint import make_checkpoint_record, save_checkpoint
    from dinov2_triton.train.pos_embed import OFFICIAL_PLAIN, OFFICIAL_REGISTERS

    for arch, method in (("vits14", OFFICIAL_PLAIN), ("vits14_reg4", OFFICIAL_REGISTERS)):
        built = build_model(arch, weights="random", num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
        assert built.pos_embed_resampling == method
        record = make_checkpoint_record(built.model, arch=arch, class_names=["a", "b", "c"],
                                        preprocessing=PreprocessConfig(image_size=TINY_IMG, resize_size=32),
                                        weights_source=built.weights_source, pretrained=True,
                                        backbone_overrides=TINY, pos_embed_resampling=built.pos_embed_resampling)
        path = save_checkpoint(record, tmp_path / f"{arch}.pth")
        with caplog.at_level("WARNING"):
            assert read_checkpoint(path).pos_embed_resampling == method
        assert not [r for r in caplog.records if "position embeddings" in r.getMessage()]
    raw = torch.load(path, weights_only=True)
    raw["pos_embed_resampling"] = "nearest"
    torch.save(raw, tmp_path / "bad.pth")
    with pytest.raises(RecordError, match=r"bad.pth: field 'pos_embed_resampling': .*'nearest' is not one of"):
        read_checkpoint(tmp_path / "bad.pth")
