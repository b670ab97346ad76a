"""Backbone registry: every entry builds, yields its stated dim and exports to ONNX with the same
embeddings; preprocessing follows the weights."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from penult.extract import REGISTRY, UnknownBackboneError, build_backbone, get_spec
from penult.extract.embed import make_embedder
from penult.extract.engines import EngineError, lowest_cosine, onnx_file

from conftest import real_batch

# Registry entries the ONNX exporter cannot take, and why (none today: every entry exports).
DOES_NOT_EXPORT: dict[str, str] = {}
# One entry of each network family (one library class at another depth or width: the same
# operators, the same cut) is exported and compared; the others of the family need not be, and
# exporting VGG-19 after VGG-16 alone took half a minute of the suite on a slow machine.
EXPORTED_FOR_FAMILY = {
    "vgg19": "vgg16",
    "resnet50": "resnet18",
    "resnet101": "resnet18",
    "efficientnet_b1": "efficientnet_b0",
    "efficientnet_b2": "efficientnet_b0",
    "efficientnet_b3": "efficientnet_b0",
    "efficientnet_b4": "efficientnet_b0",
    "efficientnet_lite1": "efficientnet_lite0",
    "efficientnet_lite2": "efficientnet_lite0",
}


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_entry_builds_random_and_yields_stated_dim(
    name: str, data_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    bb = build_backbone(name, weights="random")
    x = torch.randint(0, 256, (2, 3, 112, 112), dtype=torch.uint8)
    with torch.inference_mode():
        out = bb.module(x)
    assert out.shape == (2, REGISTRY[name].dim)
    assert torch.isfinite(out).all()
    assert not any(p.requires_grad for p in bb.module.parameters())
    assert bb.fingerprint["dim"] == REGISTRY[name].dim and bb.name == f"{name}@random"

    # ... and exported to ONNX, ONNX Runtime gives torch fp32's embeddings on real images
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path))
    same = EXPORTED_FOR_FAMILY.get(name)
    if same is not None:  # its family's exported entry: the same library, builder and cut
        a, b = REGISTRY[name], get_spec(same)
        assert (a.source, a.layer) == (b.source, b.layer)
        assert re.sub(r"\d+$", "", a.arch) == re.sub(r"\d+$", "", b.arch)
        return
    if name in DOES_NOT_EXPORT:
        with pytest.raises(EngineError, match=DOES_NOT_EXPORT[name]):
            onnx_file(bb)
        return
    images = real_batch(data_dir, bb.preprocess)
    ref = make_embedder(bb, engine="torch", precision="fp32")(images)
    got = make_embedder(bb, engine="onnxruntime")(images)
    assert got.shape == ref.shape and lowest_cosine(ref, got) >= 0.999


def test_preprocessing_is_taken_from_the_weights() -> None:
    from torchvision.models import ResNet50_Weights

    t = ResNet50_Weights.IMAGENET1K_V2.transforms()
    pre = get_spec("resnet50").preprocess()
    assert (pre.resize, pre.crop, pre.mean) == (t.resize_size[0], t.crop_size[0], tuple(t.mean))
    lite = get_spec("efficientnet_lite0").preprocess()
    assert lite.mean == (0.5, 0.5, 0.5) and lite.std == (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1]
    assert get_spec("inception_v3").preprocess().crop == 299


def test_unknown_backbone_suggests_names() -> None:
    with pytest.raises(UnknownBackboneError, match="Did you mean resnet50"):
        get_spec("resnet05")
    assert get_spec("efficientnet_lite0@ft-abc123").name == "efficientnet_lite0"


def test_embeddings_are_the_pooled_penultimate_layer() -> None:
    """resnet18: our embedding equals torchvision's own avgpool output on the same input."""
    import torchvision

    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    bb = build_backbone("resnet18", weights="random", seed=0)
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    pre = bb.preprocess
    xf = (x.float() / 255 - torch.tensor(pre.mean).view(1, 3, 1, 1)) / torch.tensor(pre.std).view(
        1, 3, 1, 1
    )
    with torch.inference_mode():
        trunk = torch.nn.Sequential(*list(ref.children())[:-1])
        want = trunk(xf).flatten(1)
        got = bb.module(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite2", "resnet18"])
def test_crop_pct_is_part_of_the_fingerprint_and_rebuilds(name):
    from penult.extract import backbone_from_fingerprint, build_backbone

    default = build_backbone(name, weights="random")
    full = build_backbone(name, weights="random", crop_pct=1.0)
    pre, pre_full = default.fingerprint["preprocessing"], full.fingerprint["preprocessing"]
    assert pre_full["resize"] == pre_full["crop"] == pre["crop"] and pre["resize"] > pre["crop"]
    assert full.name == f"{name}@random@crop100" and default.name == f"{name}@random"
    for bb in (default, full):  # batch scoring rebuilds exactly what a model was trained on
        again = backbone_from_fingerprint(bb.fingerprint)
        assert again.fingerprint == bb.fingerprint
    with pytest.raises(ValueError, match="between 0.3 and 1.0"):
        build_backbone(name, weights="random", crop_pct=1.5)
