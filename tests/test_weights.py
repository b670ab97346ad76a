"""Weights: the offline default really is ImageNet-trained; files load safely; caches are used."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from extract import WeightsError, build_backbone
from extract.images import decode_image
from extract.loader import preprocess_image
from extract.model import build_network
from extract.registry import get_spec
from extract.weights import lite0_package_file, load_pretrained, read_state_dict, state_sha256

IMAGENET_BEE, IMAGENET_ANT, IMAGENET_ALBATROSS = 309, 310, 146


@pytest.mark.parametrize("name", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
@pytest.mark.parametrize(
    "folder, want",
    [
        ("hymenoptera/bees", IMAGENET_BEE),
        ("hymenoptera/ants", IMAGENET_ANT),
        ("cub100/001.Black_footed_Albatross", IMAGENET_ALBATROSS),
    ],
)
def test_offline_packaged_weights_classify_real_photos(
    data_dir: Path, folder: str, want: int, name: str
) -> None:
    """The package checkpoints, key-mapped in order into timm, keep their own 1000-class head working."""
    spec = get_spec(name)
    net = build_network(spec)
    load_pretrained(net, spec)
    pre = spec.preprocess()
    files = sorted(p for p in (data_dir / folder).iterdir() if p.suffix == ".jpg")[:20]
    x = (
        torch.stack([preprocess_image(decode_image(f.read_bytes()), pre) for f in files]).float()
        / 255
    )
    with torch.inference_mode():
        top1 = net.eval()((x - 0.5) / 0.5).argmax(1)
    assert (top1 == want).float().mean() >= 0.7, top1.tolist()


def test_weights_file_loads_and_names_the_entry(tmp_path: Path) -> None:
    torch.manual_seed(123)
    import torchvision

    ref = torchvision.models.resnet18()
    f = tmp_path / "mine.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, f)
    bb = build_backbone("resnet18", weights=f)
    assert bb.fingerprint["weights_sha256"] == state_sha256(ref.state_dict())
    assert bb.name == f"resnet18@{bb.fingerprint['weights_sha256'][:8]}"
    assert (
        bb.fingerprint["weights_sha256"]
        != build_backbone("resnet18", weights="random").fingerprint["weights_sha256"]
    )


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PENULT_MARKER']}",))


def test_pickle_payload_in_weights_file_is_refused(tmp_path: Path, monkeypatch) -> None:
    marker = tmp_path / "pwned"
    monkeypatch.setenv("PENULT_MARKER", str(marker))
    f = tmp_path / "evil.pth"
    torch.save({"state_dict": {}, "x": _Payload()}, f)
    with pytest.raises(WeightsError, match="refused.*--trust-checkpoint"):
        build_backbone("resnet18", weights=f)
    assert not marker.exists()


def test_wrong_architecture_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "r18.pth"
    torch.save(build_network(get_spec("resnet18")).state_dict(), f)
    with pytest.raises(WeightsError, match="does not fit"):
        build_backbone("resnet50", weights=f)
    with pytest.raises(WeightsError, match="not found"):
        build_backbone("resnet50", weights=tmp_path / "nope.pth")


def test_torchvision_weights_come_from_the_hub_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WeightsError, match="Offline\\? Put the file at .*resnet18-f37072fd.pth"):
        build_backbone("resnet18")
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(7)
    state = build_network(get_spec("resnet18")).state_dict()
    torch.save(state, ckpt / "resnet18-f37072fd.pth")
    bb = build_backbone("resnet18")
    assert bb.name == "resnet18" and bb.fingerprint["weights_sha256"] == state_sha256(state)
    assert bb.fingerprint["weights"] == "torchvision:ResNet18_Weights.IMAGENET1K_V1"


def test_lite0_package_file_maps_every_tensor() -> None:
    state = read_state_dict(lite0_package_file())
    assert len(state) == 296 and next(iter(state)).startswith("_conv_stem")
