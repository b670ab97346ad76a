"""Fine-tuning on a small real subset (hymenoptera): it learns, frozen layers stay frozen, it resumes,
unsafe resume files are refused, and the result becomes a backbone that heads train on."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from penult.classify import TrainOptions, train
from penult.extract import build_backbone
from penult.extract import finetune as ft
from penult.extract.finetune import data as ft_data
from penult.extract.finetune import loop as ft_loop
from penult.extract.model import build_network, load_pretrained
from penult.extract.registry import get_spec
from penult.extract.weights import read_state_dict
from penult.features import FeatureStore

from conftest import copy_store

pytestmark = pytest.mark.slow
# A random head, so that the training loss has somewhere to fall from in two short epochs.
QUICK = ft.FinetuneOptions(epochs=2, batch_size=16, max_train=32, max_val=48, augment=False,
                           balanced=False, lr_backbone=1e-3, lr_head=1e-2, warmup_epochs=0,
                           head_init="random", progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def tuned(hym_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "hym.safetensors"
    store = out.parent / "hym.h5"
    copy_store(hym_store, store)
    return ft.finetune(store, out, QUICK), store


def test_training_loss_falls_and_card_records_the_run(tuned):
    r, _ = tuned
    c = r.curve
    assert len(c) == 2 and c[1]["train_loss"] < c[0]["train_loss"]
    card = json.loads(open(f"{r.checkpoint}.json").read())
    assert card["finished"] and card["base_backbone"] == "efficientnet_lite0"
    assert card["data"]["train"] == 32 - card["data"]["val"] or card["data"]["val"] > 0
    assert card["data"]["val"] == 48  # --max-val: 48 of the 153 images of the val split
    assert card["options"]["unfreeze"] == 1 and len(card["curve"]) == 2
    assert open(f"{r.checkpoint}.curve.png", "rb").read(4) == b"\x89PNG"


def test_frozen_layers_are_bitwise_unchanged_and_embeddings_change(tuned, data_dir):
    r, _ = tuned
    spec = get_spec("efficientnet_lite0")
    base = build_network(spec)
    load_pretrained(base, spec)
    before = base.state_dict()
    after = read_state_dict(r.checkpoint)
    last = {n for n, _ in base.named_parameters() if n.startswith(ft.stages(base)[-1])}
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed, "nothing was trained"
    assert all(k.startswith(("conv_head", "bn2")) for k in changed), changed[:5]
    # BatchNorm statistics stay pretrained even in the trained stage (train-mode batch statistics
    # of these TF-ported weights differ so much that one pass without any update cost cub100 20 points)
    assert not any(k.endswith(("running_mean", "running_var")) for k in changed), changed
    assert last  # the last stage is the one that may change
    imgs = sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[:2]
    from penult.extract.images import decode_image
    from penult.extract.loader import preprocess_image

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


def test_info_and_compare_show_frozen_and_finetuned_side_by_side(tuned, capsys):
    from penult import cli

    r, store = tuned
    name = ft.extract_finetuned(store, r.checkpoint, progress=False)  # already there: a no-op
    assert cli.main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    sha = FeatureStore(store).backbone(name).fingerprint["weights_sha256"]
    assert name in out and "efficientnet_lite0 " in out
    assert sha[:8] == name.split("@ft-")[1]
    args = ["compare", str(store), "--head", "lr", "--backbone", "efficientnet_lite0"]
    assert cli.main([*args, "--backbone", name]) == 0
    table = capsys.readouterr().out
    rows = [ln for ln in table.splitlines() if ln.startswith("| efficientnet_lite0")]
    assert len(rows) == 2 and any(name in ln for ln in rows)


def test_interrupted_run_resumes(hym_store, tmp_path, monkeypatch):
    store = tmp_path / "s.h5"
    copy_store(hym_store, store)
    out = tmp_path / "r.safetensors"
    real, calls = ft_loop.run_epoch, []

    def flaky(*a, **k):
        calls.append(k["train"])
        if calls.count(True) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ft_loop, "run_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        ft.finetune(store, out, QUICK)
    monkeypatch.setattr(ft_loop, "run_epoch", real)
    r = ft.finetune(store, out, QUICK)
    assert r.card["resumed_at_epoch"] == 1 and [c["epoch"] for c in r.curve] == [1, 2]


def test_planted_pickle_in_resume_file_is_refused(hym_store, tmp_path):
    store = tmp_path / "s.h5"
    copy_store(hym_store, store)
    out = tmp_path / "p.safetensors"
    marker = tmp_path / "pwned"

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "p.safetensors.resume.pt").write_bytes(pickle.dumps({"model": Boom()}))
    card = {
        "finished": False,
        # a card records the options a run used: ``auto`` resolved (colour photos: crop)
        "options": dataclasses.asdict(dataclasses.replace(QUICK, resize="crop")),
        "classes": ["ants", "bees"],
        "curve": [],
    }
    (tmp_path / "p.safetensors.json").write_text(json.dumps(card))
    with pytest.raises(ValueError, match="refusing to resume"):
        ft.finetune(store, out, QUICK)
    assert not marker.exists()
    np.testing.assert_equal(marker.exists(), False)


def test_probe_initialised_head_starts_where_the_linear_probe_is(hym_store, tmp_path):
    """With every learning rate at zero the network is exactly its initial state: the probe-
    initialised head already classifies like logistic regression on the frozen embeddings (read
    from the store), while a random head is at chance."""
    store = tmp_path / "s.h5"
    copy_store(hym_store, store)
    still = dataclasses.replace(QUICK, epochs=1, lr_backbone=0.0, lr_head=0.0, weight_decay=0.0)
    probe = ft.finetune(
        store, tmp_path / "p.safetensors", dataclasses.replace(still, head_init="probe")
    )
    rand = ft.finetune(store, tmp_path / "r.safetensors", still)
    assert probe.card["head_init"].startswith("probe (store embeddings")
    # the same logistic regression, fitted here on the stored embeddings, scores the same images
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    d = ft_data.load(store, still)
    fs = FeatureStore(store)
    t = fs.images()
    row = {os.path.join(r, p): i for i, (r, p) in enumerate(zip(t.root, t.path, strict=True))}
    x = fs.embeddings("efficientnet_lite0")
    lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=300, tol=1e-3))
    lr.fit(x[d.rows], d.train.y)
    want = lr.score(x[[row[f] for f in d.val.files]], d.val.y)
    assert want >= 0.85 and abs(probe.curve[0]["val_acc"] - want) <= 0.02
    assert rand.curve[0]["val_acc"] <= 0.75


def test_hard_example_mining_learns_only_from_the_hardest_fraction():
    torch.manual_seed(0)
    logits = torch.randn(8, 5, requires_grad=True)
    target = torch.arange(8) % 5
    opts = dataclasses.replace(QUICK, hard_mining=0.25, label_smoothing=0.0)
    loss, full = ft_loop.batch_loss(logits, None, target, None, opts, train=True)
    per = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    hardest = per.topk(2).indices
    assert torch.isclose(loss, per[hardest].mean()) and torch.isclose(full, per.mean())
    loss.backward()
    has_grad = logits.grad.abs().sum(1) > 0
    assert has_grad.sum() == 2 and has_grad[hardest].all()
    off, _ = ft_loop.batch_loss(
        logits, None, target, None, dataclasses.replace(opts, hard_mining=0.0), train=True
    )
    assert torch.isclose(off, per.mean())


def test_auxiliary_coarse_loss_trains_an_intermediate_stage(cub_store, tmp_path):
    """A genus head on the last MBConv stage: it learns genus, and that stage's weights move."""
    store = tmp_path / "c.h5"
    copy_store(cub_store, store)
    opts = dataclasses.replace(
        QUICK, unfreeze=2, aux_level="genus", aux_stage=2, max_train=96, epochs=2
    )
    r = ft.finetune(store, tmp_path / "a.safetensors", opts)
    assert r.card["coarse_classes"] and len(r.card["coarse_classes"]) < len(r.card["classes"])
    assert (
        r.curve[-1]["train_aux_acc"] > r.curve[0]["train_aux_acc"]
        or r.curve[-1]["val_aux_acc"] > 0.3
    )
    spec = get_spec("efficientnet_lite0")
    base = build_network(spec)
    load_pretrained(base, spec)
    after = read_state_dict(r.checkpoint)
    mid = {f"blocks.{len(base.blocks) - 1}.{n}" for n, _ in base.blocks[-1].named_parameters()}
    assert any(not torch.equal(base.state_dict()[k], after[k]) for k in mid)


def test_auxiliary_loss_errors_name_the_problem(cub_store, tmp_path):
    store = tmp_path / "c.h5"
    copy_store(cub_store, store)
    out = tmp_path / "x.safetensors"
    with pytest.raises(ValueError, match="aux-stage 2 is frozen"):
        ft.finetune(store, out, dataclasses.replace(QUICK, unfreeze=1, aux_level="genus"))
    with pytest.raises(ValueError, match="no label column 'tribe'.*genus"):
        ft.finetune(store, out, dataclasses.replace(QUICK, unfreeze=2, aux_level="tribe"))
    tax = tmp_path / "tax.csv"
    tax.write_text("class,genus\nsomething,else\n")
    with pytest.raises(ValueError, match="classes are not in the taxonomy"):
        ft.finetune(
            store, out, dataclasses.replace(QUICK, unfreeze=2, aux_level="genus", taxonomy=str(tax))
        )


class _Tiny(torch.nn.Module):
    """Pooled colour -> logits: the training loop's fp16 path without a CNN's CPU cost."""

    def __init__(self, n: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, n)

    def forward(self, x):
        return self.fc(x.float().mean((2, 3)) / 255.0), None


def test_fp16_trains_through_a_gradient_scaler(data_dir):
    """The CUDA fp16 path (older GPUs) needs loss scaling; run the same loop on CPU, where autocast
    has fp16: the scaler starts at 65536, backs off on overflow, and the weights still learn."""
    files = sorted(str(p) for p in (data_dir / "hymenoptera").rglob("*.jpg"))[:32]
    y = np.array([int("bees" in f) for f in files])
    model = _Tiny(2)
    before = model.fc.weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    opts = dataclasses.replace(QUICK, batch_size=8, workers=0)
    pre = get_spec("efficientnet_lite0").preprocess()
    run = ft_loop.Run(model, opts, pre, torch.device("cpu"), "fp16", opt=opt, scaler=scaler)
    for seed in range(2):
        run.rng = np.random.default_rng(seed)
        r = ft_loop.run_epoch(run, ft_data.Split(files, y), train=True)
        assert np.isfinite(r["loss"])
    assert 0 < scaler.get_scale() <= 65536
    assert not torch.equal(before, model.fc.weight)


def test_trained_network_embeds_exactly_what_extract_stores_for_its_weights(
    tuned, hym_store, tmp_path
):
    """One pre-logits path: the training module, holding the checkpoint's weights, gives the
    embeddings `penult extract` stored for that checkpoint."""
    from penult.extract.loader import make_loader

    r, _ = tuned
    store = tmp_path / "own.h5"  # not the shared store, which other tests embed in precision auto
    copy_store(hym_store, store)
    # fp32: compared exactly (on a CPU with native bf16, precision auto would embed in bf16)
    name = ft.extract_finetuned(store, r.checkpoint, progress=False, precision="fp32")
    model = r.model.cpu().eval()
    trunk = model.embedder.net
    saved = read_state_dict(r.checkpoint)
    trunk.load_state_dict({k: saved[k] for k in trunk.state_dict()})  # strict: every trunk key
    fs = FeatureStore(store)
    t = fs.images()
    rows = np.arange(0, len(t.path), 50)
    files = [os.path.join(t.root[i], t.path[i]) for i in rows]
    pre = get_spec("efficientnet_lite0").preprocess()
    (batch,) = [b for b in make_loader(files, pre, batch_size=len(files), workers=0)]
    with torch.inference_mode():
        got = model.embed(batch.images).numpy()
    np.testing.assert_allclose(got, fs.embeddings(name, rows), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("backbone", "tap", "channels"),
    [("resnet18", "layer3", 256), ("efficientnet_lite0", "bn2", 1280)],
)
def test_coarse_head_taps_any_stage_without_changing_the_embedding(
    backbone, tap, channels, data_dir
):
    """The tap (through the torchvision graph or a timm hook) adds an output and changes nothing."""
    from penult.extract.model import PreLogits

    spec = get_spec(backbone)
    torch.manual_seed(0)
    tapped = PreLogits(build_network(spec), spec, spec.preprocess(), taps=(tap,)).eval()
    plain = build_backbone(backbone, weights="random").module
    x = torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8)
    with torch.inference_mode():
        emb, taps = tapped.forward_taps(x)
        torch.testing.assert_close(emb, plain(x))
    assert emb.shape == (2, spec.dim) and taps[tap].shape[:2] == (2, channels)
    assert tapped.forward_taps(x)[1].keys() == {tap}  # none kept from the call before


def test_plankton_augmentation_turns_and_flips_on_its_own_background_without_colour(data_dir):
    from penult.extract.loader import make_loader

    files = sorted((data_dir / "ndsb_plankton" / "diatom_chain_string").glob("*.jpg"))[:8]
    pre = get_spec("efficientnet_lite0").preprocess(mode="pad")
    (batch,) = list(make_loader([str(f) for f in files], pre, batch_size=8, workers=0))
    x = batch.images
    a = ft.augment(x, pre.crop, torch.Generator().manual_seed(0), "plankton")
    assert torch.equal(a, ft.augment(x, pre.crop, torch.Generator().manual_seed(0), "plankton"))
    assert a.shape == x.shape and not torch.equal(a, x)
    assert (a[:, 0] == a[:, 1]).all() and (a[:, 1] == a[:, 2]).all()  # greyscale stays grey
    for img, src in zip(a, x, strict=True):  # corners turned in from outside: background, not black
        edge = torch.cat([src[0, 0], src[0, -1], src[0, :, 0], src[0, :, -1]]).float()
        corners = img[0, [0, 0, -1, -1], [0, -1, 0, -1]].float()
        assert (corners - edge.median()).abs().max() <= 12
    photo = ft.augment(x, pre.crop, torch.Generator().manual_seed(0))
    assert photo.shape == x.shape


def test_finetune_cli_takes_the_plankton_recipe():
    from penult import cli

    a = cli.build_parser().parse_args(
        ["finetune", "s.h5", "--out", "f", "--augment", "plankton", "--resize", "pad"]
    )
    opts = cli._options(a, ft.FinetuneOptions)
    assert opts.augment_style == "plankton" and opts.resize == "pad" and opts.augment


def test_finetune_makes_the_split_train_would_and_stores_it(tmp_path):
    """A store without a split: fine-tuning makes the seeded split itself (no head trained first)
    and stores it, and `train` then uses that same split (it makes none of its own)."""
    from penult.classify.data import ensure_split, load_dataset
    from penult.features import StoreWriter
    from store_rows import add_rows

    store = tmp_path / "s.h5"
    for k in range(6):  # 120 images, 7 classes
        with StoreWriter(store) as w:
            add_rows(w, k)
    assert "split" not in FeatureStore(store).images().labels
    d = ft_data.load(store, ft.FinetuneOptions(backbone="resnet18", val_fraction=0.2))
    stored = np.array(FeatureStore(store).images().labels["split"])
    assert set(stored) == {"train", "test"} and (stored == "test").mean() == pytest.approx(
        0.3, abs=0.05
    )
    assert len(d.train.files) + len(d.val.files) == (stored == "train").sum()  # test kept out
    data = load_dataset(store, ("net",))
    assert (ensure_split(store, data) == stored).all() and data.notes == []  # the same split


def test_the_probe_reads_only_the_base_networks_own_embeddings(tmp_path):
    """Stored embeddings seed the probe only from an entry with the base network's identity:
    not one with the same weights and preprocessing that is int8 (other numbers), nor another
    layer; the float entry itself is used."""
    from penult.extract.model import network_fingerprint
    from penult.features import StoreWriter
    from store_rows import synthetic_rows

    spec = get_spec("resnet18")
    pre = spec.preprocess()
    base = network_fingerprint(spec, pre, "cd" * 32)
    paths, sha, _ = synthetic_rows(0)
    x = np.random.default_rng(0).normal(size=(len(paths), spec.dim)).astype(np.float32)
    store = tmp_path / "s.h5"
    int8 = {
        **base,
        "precision": "int8/openvino",
        "quantization": {"method": "m", "calibration_sha256": "ab"},
    }
    other_layer = {**base, "layer": "layer3"}
    with StoreWriter(store) as w:
        w.upsert_images(paths, ["/r"] * 20, sha, np.arange(20), np.arange(20), {})
        for name, fp in (("r18@int8", int8), ("r18-l3", other_layer)):
            w.register_backbone(name, fp)
            w.append(name, paths, sha, x + 1)
    rows = np.arange(20)
    assert ft_data.stored_embeddings(store, rows, base) is None
    with StoreWriter(store) as w:
        w.register_backbone("r18", base)
        w.append("r18", paths, sha, x)
    np.testing.assert_array_equal(ft_data.stored_embeddings(store, rows, base), x)
