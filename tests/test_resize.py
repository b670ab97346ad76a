"""Resize modes that keep the subject (crop, whole, pad) and flip test-time augmentation: what
the pixels become, how the entry is named and fingerprinted, and that a stored entry is rebuilt
the same way for scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from penult.core import OptionError
from penult.extract import (
    ExtractOptions,
    Listing,
    backbone_from_fingerprint,
    build_backbone,
    extract,
    list_images,
)
from penult.extract.finetune import FinetuneOptions, resolve_auto
from penult.extract.images import decode_image, looks_greyscale
from penult.extract.loader import make_loader, preprocess_image
from penult.extract.registry import get_spec
from penult.features import FeatureStore
from PIL import Image


def _long_thin(data_dir) -> Image.Image:
    """The most elongated plankton image of a chain-forming class (a diatom chain)."""
    files = sorted((data_dir / "ndsb_plankton" / "diatom_chain_string").glob("*.jpg"))
    f = max(files, key=lambda f: max(Image.open(f).size) / min(Image.open(f).size))
    return decode_image(f.read_bytes())


def test_pad_keeps_the_whole_subject_undistorted_on_its_own_background(data_dir):
    im = _long_thin(data_dir)
    w, h = im.size
    assert max(w, h) / min(w, h) > 2.5
    pre = get_spec("efficientnet_lite0").preprocess(mode="pad")
    x = preprocess_image(im, pre).numpy().transpose(1, 2, 0)
    assert x.shape == (pre.crop, pre.crop, 3) and pre.resize == pre.crop
    a = np.asarray(im)
    border = np.median(np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]]), axis=0)
    inside = round(min(w, h) * pre.crop / max(w, h))  # the short side, scaled with the long one
    pad = (pre.crop - inside) // 2
    strip = x[:, : pad - 1] if w < h else x[: pad - 1]  # the padding beside the short side
    assert np.abs(strip.astype(int) - border).max() <= 2  # filled with the image's border colour
    # the subject is all there: the image scaled down equals the pasted region
    mid = x[:, pad : pad + inside] if w < h else x[pad : pad + inside]
    small = np.asarray(im.resize(mid.shape[1::-1], Image.Resampling.BICUBIC))
    assert np.abs(mid.astype(int) - small).mean() < 3


def test_whole_squashes_everything_and_crop_cuts_the_ends(data_dir):
    im = _long_thin(data_dir)
    spec = get_spec("efficientnet_lite0")
    whole = preprocess_image(im, spec.preprocess(mode="whole")).numpy().transpose(1, 2, 0)
    want = np.asarray(im.resize((whole.shape[1], whole.shape[0]), Image.Resampling.BICUBIC))
    assert np.abs(whole.astype(int) - want).mean() < 0.25  # Pillow's bicubic, but for overshoots
    crop = preprocess_image(im, spec.preprocess()).numpy().transpose(1, 2, 0)
    assert crop.shape == whole.shape and not np.array_equal(crop, whole)
    with pytest.raises(OptionError, match="crop mode"):
        spec.preprocess(0.9, mode="pad")
    with pytest.raises(OptionError, match="resize mode"):
        spec.preprocess(mode="stretch")


def test_modes_and_flips_are_named_and_fingerprinted_and_defaults_keep_old_identities():
    plain = build_backbone("efficientnet_lite0", weights="random")
    assert plain.name == "efficientnet_lite0@random"
    assert not {"mode", "tta"} & set(plain.fingerprint["preprocessing"])  # stores made before
    bb = build_backbone("efficientnet_lite0", weights="random", resize="pad", tta="flip")
    assert bb.name == "efficientnet_lite0@random@pad@flip"
    pre = bb.fingerprint["preprocessing"]
    assert pre["mode"] == "pad" and pre["tta"] == "flip" and pre["resize"] == pre["crop"]
    assert bb.preprocess.matches(pre) and not plain.preprocess.matches(pre)
    assert not bb.preprocess.matches(plain.fingerprint["preprocessing"])


def test_flip_is_the_mean_of_both_views_and_mirror_invariant(data_dir):
    bb = build_backbone("efficientnet_lite0", weights="random", tta="flip")
    one = build_backbone("efficientnet_lite0", weights="random")
    files = sorted(str(p) for p in (data_dir / "hymenoptera" / "ants").glob("*.jpg"))[:4]
    (batch,) = list(make_loader(files, bb.preprocess, batch_size=4, workers=0))
    x = batch.images
    with torch.inference_mode():
        got = bb.module(x)
        want = (one.module(x) + one.module(x.flip(-1))) / 2
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(bb.module(x.flip(-1)), got, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(one.module(x), got, atol=1e-3)


def test_a_padded_flipped_entry_is_stored_and_rebuilt_for_scoring(data_dir, tmp_path):
    store = tmp_path / "s.h5"
    root = data_dir / "hymenoptera"
    listing = Listing(root=root, paths=list_images(str(root)).paths[:24])
    opts = ExtractOptions(weights="random", resize="pad", tta="flip", precision="fp32",
                          workers=0, progress=False)  # fmt: skip
    s = extract(store, listing, opts)
    assert s.backbone == "efficientnet_lite0@random@pad@flip" and s.extracted == 24
    fs = FeatureStore(store)
    entry = fs.backbone(s.backbone)
    rebuilt = backbone_from_fingerprint(entry.fingerprint)  # what predict and neighbors run
    assert rebuilt.preprocess == build_backbone("efficientnet_lite0", resize="pad", tta="flip",
                                                weights="random").preprocess  # fmt: skip
    t = fs.images()
    files = [str(data_dir / "hymenoptera" / p) for p in t.path[:8]]
    (batch,) = list(make_loader(files, rebuilt.preprocess, batch_size=8, workers=0))
    with torch.inference_mode():
        got = rebuilt.module(batch.images).numpy()
    np.testing.assert_allclose(got, fs.embeddings(s.backbone, np.arange(8)), rtol=1e-4, atol=1e-5)


def test_auto_pads_greyscale_imagery_and_keeps_the_crop_for_colour_photos(data_dir, tmp_path):
    plankton = sorted((data_dir / "ndsb_plankton").glob("*/*.jpg"))[::500][:6]
    photos = sorted((data_dir / "hymenoptera").glob("*/*.jpg"))[:6]
    grey = decode_image(plankton[0].read_bytes())
    assert looks_greyscale(grey) and not looks_greyscale(decode_image(photos[0].read_bytes()))
    grey.save(tmp_path / "as_rgb.jpg", quality=70)  # greyscale written as a colour JPEG
    assert Image.open(tmp_path / "as_rgb.jpg").mode == "RGB"
    assert looks_greyscale(decode_image((tmp_path / "as_rgb.jpg").read_bytes()))
    fast = ExtractOptions(weights="random", workers=0, progress=False)  # resize: auto
    s = extract(tmp_path / "p.h5", Listing(root=data_dir, paths=[str(p) for p in plankton]), fast)
    assert s.backbone == "efficientnet_lite0@random@pad" and s.extracted == 6
    assert "resize pad (auto: 6 of 6 sampled images greyscale)" in s.report()
    s = extract(tmp_path / "c.h5", Listing(root=data_dir, paths=[str(p) for p in photos]), fast)
    assert s.backbone == "efficientnet_lite0@random" and "resize crop (auto: 0 of 6" in s.report()
    # fine-tuning decides the same way, from its training images; what is asked is kept
    ft = resolve_auto(FinetuneOptions(), [str(p) for p in plankton])
    assert (ft.resize, ft.augment_style) == ("pad", "plankton")
    ft = resolve_auto(FinetuneOptions(), [str(p) for p in photos])
    assert (ft.resize, ft.augment_style) == ("crop", "photo")
    ft = resolve_auto(FinetuneOptions(resize="whole"), [str(p) for p in plankton])
    assert (ft.resize, ft.augment_style) == ("whole", "plankton")
    ft = resolve_auto(FinetuneOptions(crop_pct=1.0), [str(p) for p in plankton])
    assert ft.resize == "crop"
