"""Fine-tuning on a small real subset (hymenoptera): it learns, frozen layers stay frozen, it resumes,
unsafe resume files are refused, and the result becomes a backbone that heads train on."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch

from classify import TrainOptions, train
from extract import build_backbone
from extract import finetune as ft
from extract.model import _build_full
from extract.registry import get_spec
from extract.weights import load_pretrained, read_state_dict
from features import FeatureStore

pytestmark = pytest.mark.slow
QUICK = ft.FinetuneOptions(epochs=2, batch_size=16, max_train=32, augment=False, balanced=False,
                           lr_backbone=1e-3, lr_head=1e-2, warmup_epochs=0, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tuned(hym_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "hym.safetensors"
    store = out.parent / "hym.h5"
    shutil.copy(hym_store, store)
    return ft.finetune(store, out, QUICK), store


def test_training_loss_falls_and_card_records_the_run(tuned):
    r, _ = tuned
    c = r.curve
    assert len(c) == 2 and c[1]["train_loss"] < c[0]["train_loss"]
    card = json.loads(open(f"{r.checkpoint}.json").read())
    assert card["finished"] and card["base_backbone"] == "efficientnet_lite0"
    assert card["data"]["train"] == 32 - card["data"]["val"] or card["data"]["val"] > 0
    assert card["options"]["unfreeze"] == 1 and len(card["curve"]) == 2
    assert open(f"{r.checkpoint}.curve.png", "rb").read(4) == b"\x89PNG"


def test_frozen_layers_are_bitwise_unchanged_and_embeddings_change(tuned, data_dir):
    r, _ = tuned
    spec = get_spec("efficientnet_lite0")
    base = _build_full(spec)
    load_pretrained(base, spec)
    before = base.state_dict()
    after = read_state_dict(r.checkpoint)
    last = {n for n, _ in ft.stages(base)[-1].named_parameters()}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing was trained"
    assert all(k.startswith(("conv_head", "bn2")) for k in changed), changed[:5]
    assert last  # the last stage is the one that may change
    imgs = sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[:2]
    from extract.images import decode_image
    from extract.loader import preprocess_image

    x = torch.stack(
        [preprocess_image(decode_image(f.read_bytes()), spec.preprocess()) for f in imgs]
    )
    with torch.inference_mode():
        a = build_backbone("efficientnet_lite0").module(x)
        b = build_backbone("efficientnet_lite0", weights=r.checkpoint).module(x)
    assert not torch.allclose(a, b)


def test_result_becomes_a_store_backbone_that_heads_train_on(tuned):
    r, store = tuned
    name = ft.extract_finetuned(store, r.checkpoint, progress=False)
    assert name.startswith("efficientnet_lite0@ft-")
    entry = FeatureStore(store).backbone(name)
    assert entry.count == 397 and entry.fingerprint["weights"] == f"file:{r.checkpoint.name}"
    res = train(store, TrainOptions(backbones=(name,)))
    assert res.metrics["top1"] > 0.8


def test_interrupted_run_resumes(hym_store, tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    shutil.copy(hym_store, store)
    out = tmp_path / "r.safetensors"
    real, calls = ft._run_epoch, []

    def flaky(*a, **k):
        calls.append(k["train"])
        if calls.count(True) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft, "_run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(store, out, QUICK)
    monkeypatch.setattr(ft, "_run_epoch", real)
    r = ft.finetune(store, out, QUICK)
    assert r.card["resumed_at_epoch"] == 1 and [c["epoch"] for c in r.curve] == [1, 2]


def test_planted_pickle_in_resume_file_is_refused(hym_store, tmp_path):
    store = tmp_path / "s.h5"
    shutil.copy(hym_store, store)
    out = tmp_path / "p.safetensors"
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "p.safetensors.resume.pt").write_bytes(pickle.dumps({"model": Boom()}))
    card = {
        "finished": False,
        "options": {"backbone": "efficientnet_lite0"},
        "classes": ["ants", "bees"],
        "curve": [],
    }
    (tmp_path / "p.safetensors.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="refusing to resume"):
        ft.finetune(store, out, QUICK)
    assert not marker.exists()
    np.testing.assert_equal(marker.exists(), False)
