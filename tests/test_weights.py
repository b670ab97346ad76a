"""Weights: the offline default really is ImageNet-trained; files load safely; caches are used."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.extract import WeightsError, build_backbone
from penult.extract.images import decode_image
from penult.extract.loader import preprocess_image
from penult.extract.model import build_network, load_pretrained
from penult.extract.registry import get_spec
from penult.extract.weights import (
    packaged_weights_file,
    read_state_dict,
    state_sha256,
)

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


def test_weights_that_are_not_a_file_or_not_a_checkpoint_say_so(tmp_path: Path) -> None:
    import os

    with pytest.raises(WeightsError, match="/dev/zero: not a regular file"):
        build_backbone("resnet18", weights="/dev/zero")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(os.urandom(4096).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    with pytest.raises(WeightsError, match="junk.pth: not a PyTorch checkpoint"):
        build_backbone("resnet18", weights=junk)


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
    state = read_state_dict(packaged_weights_file("efficientnet_lite0"))
    assert len(state) == 296 and next(iter(state)).startswith("_conv_stem")


def test_a_known_backbone_starts_without_building_its_network(tmp_path: Path, monkeypatch) -> None:
    """The second build of the same weights bytes and options comes from its recorded identity:
    same name, fingerprint and preprocessing; the network is built only when used, and gives the
    same embeddings. Other bytes under the same file name are another identity."""
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(5)
    f = tmp_path / "mine.pth"
    torch.save(build_network(get_spec("resnet18")).state_dict(), f)
    first = build_backbone("resnet18", weights=f, resize="pad")
    again = build_backbone("resnet18", weights=f, resize="pad")
    assert again._module is None  # not built yet
    assert (again.name, again.fingerprint, again.preprocess) == (
        first.name, first.fingerprint, first.preprocess
    )  # fmt: skip
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():  # built here, yet with ordinary weights (export, training)
        torch.testing.assert_close(again.module(x), first.module(x), rtol=0, atol=0)
    assert not any(p.is_inference() for p in again.module.parameters())
    state = torch.load(f, weights_only=True)
    state["fc.bias"] += 1  # not part of the embedding, but other weights all the same
    torch.save(state, f)
    other = build_backbone("resnet18", weights=f, resize="pad")
    assert other._module is not None and other.name != first.name
    # an edited record is not trusted: built again from the weights, and said
    from penult.extract import engines
    from penult.extract.model import _record_digest

    engines.cache_notes()
    for record in (tmp_path / "cache" / "identities").glob("*.json"):
        record.write_text(record.read_text().replace(other.fingerprint["weights_sha256"], "0" * 64))
    edited = build_backbone("resnet18", weights=tmp_path / "mine.pth", resize="pad")
    assert edited._module is not None and edited.fingerprint == other.fingerprint
    assert any("identity record" in n for n in engines.cache_notes())
    # a whole record that no longer matches what the network builds (other library builds)
    # is refused when the network is built
    for record in (tmp_path / "cache" / "identities").glob("*.json"):
        r = json.loads(record.read_text().replace(other.fingerprint["weights_sha256"], "0" * 64))
        key = record.stem
        pre = r["preprocess"]
        pre["mean"], pre["std"] = tuple(pre["mean"]), tuple(pre["std"])
        from penult.extract.registry import Preprocess

        r["digest"] = _record_digest(key, {**r, "preprocess": Preprocess(**pre)})
        record.write_text(json.dumps(r))
    stale = build_backbone("resnet18", weights=tmp_path / "mine.pth", resize="pad")
    with pytest.raises(WeightsError, match="as recorded in .*identities; delete"):
        _ = stale.module
    for garbage in ("{not json", '{"name": "x", "preprocess": {"size": 3}, "fingerprint": {}}'):
        for record in (tmp_path / "cache" / "identities").glob("*.json"):
            record.write_text(garbage)  # unreadable records: built again, and recorded again
        rebuilt = build_backbone("resnet18", weights=f, resize="pad")
        assert rebuilt._module is not None and rebuilt.fingerprint == other.fingerprint


def test_the_cli_extract_of_a_known_backbone_never_imports_timm(
    data_dir, tmp_path, monkeypatch
) -> None:
    """`penult extract` with a runtime engine whose export is cached: no torch network is built,
    so timm and torchvision (2 s of every start) are never imported, and the entry and its
    embeddings are those of a run that built it."""
    import subprocess
    import sys

    from penult import cli
    from penult.features import FeatureStore

    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path / "cache"))
    files = sorted((data_dir / "hymenoptera" / "ants").glob("*.jpg"))[:4]
    (tmp_path / "list.txt").write_text("".join(f"{p}\n" for p in files))

    def args(k: int) -> list[str]:
        return ["extract", str(tmp_path / f"s{k}.h5"), str(tmp_path / "list.txt"), "-q",
                "--engine", "onnxruntime", "--workers", "0"]  # fmt: skip

    assert cli.main(args(0)) == 0  # builds the network, exports it, records its identity
    code = (
        "import sys, cli; r = cli.main(sys.argv[1:]); "
        "print('IMPORTED', 'timm' in sys.modules, 'torchvision' in sys.modules); sys.exit(r)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    r = subprocess.run([sys.executable, "-c", code, *args(1)], env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("IMPORTED")[1].split() == ["False", "False"]
    a, b = (FeatureStore(tmp_path / f"s{k}.h5") for k in range(2))
    fp = [s.backbone("efficientnet_lite0").fingerprint for s in (a, b)]
    assert fp[0] == fp[1]
    np.testing.assert_array_equal(
        a.embeddings("efficientnet_lite0"), b.embeddings("efficientnet_lite0")
    )
