"""Model factory and weight conversion (train/model.py) on tiny random DINOv2s."""
from __future__ import annotations

import os

import pytest
import torch

from tests.fixtures.models import TINY, TINY_IMG, tiny_model, to_official_layout
from train.model import (ARCHS, WeightsError, build_model, checkpoint_layout, load_classifier,
                         load_weights_file, read_checkpoint)


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
    assert checkpoint_layout(official) == "official"
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
    model = build_model(arch, weights="random", num_classes=4, img_size=TINY_IMG,
                        backbone_overrides=TINY).model.eval()
    x = torch.randn(2, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
    assert logits.shape == (2, 4) and emb.shape == (2, model.embed_dim)
    assert model.backbone.num_prefix_tokens == (5 if arch.endswith("_reg4") else 1)


def test_pos_embed_resampled_at_build_not_at_run_time(tmp_path):
    """Weights stored for 56 px (4x4 patches) become a 2x2 grid at 28 px when
    the model is built; the graph then refuses other sizes instead of
    interpolating at run time (FIELD_NOTES 1)."""
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
        with pytest.raises(WeightsError, match=path.name):
            read_checkpoint(path)
        with pytest.raises(WeightsError, match=path.name):
            load_weights_file(path)
        with pytest.raises(WeightsError, match=path.name):
            load_classifier(path)
        with pytest.raises(WeightsError, match=path.name):
            build_model("vits14", weights=str(path), num_classes=3, img_size=TINY_IMG, backbone_overrides=TINY)
    assert not marker.exists(), "loading the checkpoint executed its payload"
    # The file really is malicious: an unsafe load runs the payload (proves this test can fail).
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_load_classifier_roundtrip(tiny_checkpoint):
    model, record = load_classifier(tiny_checkpoint)
    assert record["arch"] == "vits14" and record["img_size"] == TINY_IMG
    assert record["backbone_overrides"] == TINY
    x = torch.randn(3, 3, TINY_IMG, TINY_IMG)
    with torch.no_grad():
        logits, emb = model.forward_with_embedding(x)
        assert torch.equal(model(x), logits)
    assert logits.shape == (3, len(record["class_names"]))
