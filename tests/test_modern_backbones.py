"""Modern backbones by name: any timm model (`timm/<model>.<tag>`) and open_clip image towers
(`open_clip/<arch>:<pretrained>`), built offline with random weights: their dimension, the
preprocessing from their own configs in the fingerprint, `--weights FILE`, and a store round
trip that `predict` and `neighbors` rebuild from the fingerprint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.extract import (
    ExtractOptions,
    Listing,
    UnknownBackboneError,
    backbone_from_fingerprint,
    build_backbone,
    extract,
    get_spec,
    list_images,
)
from penult.extract.loader import make_loader
from penult.features import FeatureStore

CONVNEXT = "timm/convnextv2_tiny.fcmae_ft_in22k_in1k"
DINO = "timm/vit_small_patch14_dinov2.lvd142m"
CLIP = "open_clip/ViT-B-32:laion2b_s34b_b79k"


def _round_trip(name: str, data_dir: Path, tmp_path: Path, n: int = 6) -> tuple[str, dict]:
    """Extract ``n`` real images with random weights; the rebuilt backbone embeds them the same."""
    store = tmp_path / "s.h5"
    root = data_dir / "hymenoptera"
    listing = Listing(root=root, paths=list_images(str(root)).paths[:n])
    # fp32: on a CPU with native bf16, precision auto would store bf16 rows (compared by
    # test_precision), and this compares the rebuilt network exactly
    s = extract(store, listing, ExtractOptions(backbone=name, weights="random", workers=0,
                                               engine="torch", precision="fp32", progress=False))  # fmt: skip
    fs = FeatureStore(store)
    entry = fs.backbone(s.backbone)
    rebuilt = backbone_from_fingerprint(entry.fingerprint)
    files = [str(root / p) for p in fs.images().path]
    (batch,) = list(make_loader(files, rebuilt.preprocess, batch_size=n, workers=0))
    with torch.inference_mode():
        got = rebuilt.module(batch.images).numpy()
    np.testing.assert_allclose(got, fs.embeddings(s.backbone), rtol=1e-4, atol=1e-5)
    return s.backbone, entry.fingerprint


def test_any_timm_model_by_name_with_its_own_preprocessing(data_dir, tmp_path):
    import timm

    spec = get_spec(CONVNEXT)
    cfg = timm.models.get_pretrained_cfg("convnextv2_tiny.fcmae_ft_in22k_in1k")
    assert spec.dim == 768 and spec.name == "timm:convnextv2_tiny.fcmae_ft_in22k_in1k"
    name, fp = _round_trip(CONVNEXT, data_dir, tmp_path)
    assert name == "timm:convnextv2_tiny.fcmae_ft_in22k_in1k@random" and fp["dim"] == 768
    pre = fp["preprocessing"]
    assert tuple(pre["mean"]) == cfg.mean and tuple(pre["std"]) == cfg.std
    assert pre["crop"] == 224 and pre["resize"] == int(224 / cfg.crop_pct)
    assert pre["interpolation"] == cfg.interpolation
    assert get_spec(name) == spec  # the stored entry name resolves to the same model


def test_dinov2_embeds_its_pooled_output_at_its_own_resolution():
    spec = get_spec(DINO)
    pre = spec.preprocess()
    assert spec.dim == 384 and (pre.resize, pre.crop) == (518, 518)  # crop_pct 1.0 in its config
    bb = build_backbone(DINO, weights="random")
    with torch.inference_mode():
        out = bb.module(torch.randint(0, 255, (1, 3, 518, 518), dtype=torch.uint8))
    assert out.shape == (1, 384) and torch.isfinite(out).all()


def test_weights_file_for_a_timm_model(tmp_path):
    from penult.extract.model import build_network
    from safetensors.torch import save_file

    torch.manual_seed(3)
    net = build_network(get_spec(CONVNEXT))
    f = tmp_path / "mine.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(f))
    bb = build_backbone(CONVNEXT, weights=f)
    assert bb.name.startswith("timm:convnextv2_tiny.fcmae_ft_in22k_in1k@")
    assert bb.fingerprint["weights"] == "file:mine.safetensors"
    x = torch.randint(0, 255, (2, 3, 224, 224), dtype=torch.uint8)
    from penult.extract.model import PreLogits

    spec = get_spec(CONVNEXT)
    with torch.inference_mode():
        want = PreLogits(net, spec, spec.preprocess()).eval()(x)
        torch.testing.assert_close(bb.module(x), want)


def test_open_clip_image_tower_by_name(data_dir, tmp_path):
    pytest.importorskip("open_clip")
    import open_clip

    spec = get_spec(CLIP)
    assert spec.dim == 512 and spec.source == "open_clip"
    name, fp = _round_trip(CLIP, data_dir, tmp_path, n=4)
    assert name == "open_clip:ViT-B-32:laion2b_s34b_b79k@random"
    pre = fp["preprocessing"]
    assert tuple(pre["mean"]) == tuple(open_clip.OPENAI_DATASET_MEAN)
    assert (pre["resize"], pre["crop"]) == (224, 224) and fp["architecture"] == "open_clip:ViT-B-32"


def test_bad_names_and_a_missing_open_clip_say_what_to_do():
    with pytest.raises(UnknownBackboneError, match="timm has no model"):
        get_spec("timm/no_such_net.x")
    pytest.importorskip("open_clip")
    with pytest.raises(UnknownBackboneError, match="name the weights"):
        get_spec("open_clip/ViT-B-32")
    code = (
        "import sys; sys.modules['open_clip'] = None\n"
        "from extract import get_spec\n"
        "try:\n    get_spec('open_clip/ViT-B-16:openai')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert "UnknownBackboneError" in out.stdout and "pip install 'penult[clip]'" in out.stdout


def test_offline_hub_weights_fail_with_a_clear_message(tmp_path):
    code = (
        "from extract import build_backbone\n"
        f"try:\n    build_backbone({CONVNEXT!r})\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env=env, timeout=120)  # fmt: skip
    assert "WeightsError" in out.stdout and "--weights FILE" in out.stdout, out.stdout + out.stderr
