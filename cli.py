"""`penult` command line: argument parsing and printing only; the work is in the packages."""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import math
import os
import sys
import traceback

EXAMPLES = """examples:
  penult demo                                   the whole pipeline on the embedded solar-cell images
  penult extract birds.h5 data/cub100           ImageFolder tree; taxonomy.csv/split.csv auto-detected
  penult extract birds.h5 data/cub100 --backbone resnet50 --weights resnet50.pth
  penult info birds.h5
  penult train birds.h5 --out birds.skops --levels family,genus      flat LR, reports family/genus too
  penult train birds.h5 --out h.skops --levels family,genus --hierarchical --report h-report/
  penult compare birds.h5 --head lr --head svm --head knn
  penult evaluate birds.skops birds.h5 --report report/
  penult predict birds.skops new_photos/ --out predictions.csv --store birds.h5
  penult index birds.h5 && penult neighbors birds.h5 photo.jpg -k 10    similar images, contact sheet
  penult duplicates birds.h5 --threshold 0.95
"""


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


def _ranged(
    cast: type, lo: float | None = None, hi: float | None = None, *, open_lo: bool = False,
    open_hi: bool = False,
):  # fmt: skip
    """An argparse type: ``cast`` the text and refuse NaN, inf and values outside [lo, hi]."""
    lo_s = "" if lo is None else ("> " if open_lo else ">= ") + f"{lo:g}"
    hi_s = "" if hi is None else ("< " if open_hi else "<= ") + f"{hi:g}"
    want = " and ".join(x for x in (lo_s, hi_s) if x)

    def parse(text: str):
        try:
            v = cast(text)
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
        bad = isinstance(v, float) and not math.isfinite(v)
        bad |= lo is not None and (v < lo or (open_lo and v == lo))
        bad |= hi is not None and (v > hi or (open_hi and v == hi))
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: must be {want or 'a finite number'}")
        return v

    return parse


_POSITIVE = _ranged(int, 1)
_COUNT = _ranged(int, 0)
_FRACTION = _ranged(float, 0, 1, open_lo=True, open_hi=True)  # strictly between 0 and 1
_CROP = _ranged(float, 0, 1, open_lo=True)
_RATE = _ranged(float, 0)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    from extract import DEFAULT_BACKBONE
    from extract.images import DEFAULT_MAX_PIXELS

    p = sub.add_parser(
        "extract",
        help="embed images with a frozen backbone into a feature store",
        description="Run a frozen ImageNet backbone over images and store global-pooled penultimate-layer "
        "embeddings. Images already stored (same content hash) are skipped; an interrupted run resumes.",
    )
    p.add_argument("store", help="HDF5 feature store (created if missing)")
    p.add_argument(
        "input",
        help="image folder (class = subfolder), CSV manifest (path,label,...), file list, or image",
    )
    p.add_argument(
        "--backbone",
        default=DEFAULT_BACKBONE,
        help=f"registry name (default {DEFAULT_BACKBONE}; see `penult backbones`)",
    )
    p.add_argument(
        "--weights",
        default="pretrained",
        help="'pretrained' (library default/cache), 'random', or a state-dict FILE",
    )
    p.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="allow full pickles in --weights (runs code from the file!)",
    )
    p.add_argument(
        "--name", help="store entry name (default: backbone name, plus weights hash for a file)"
    )
    p.add_argument(
        "--root",
        help="folder that manifest/list paths are relative to (default: the file's folder)",
    )
    p.add_argument(
        "--crop-pct",
        type=_CROP,
        help="centre crop as a fraction of the resized image (default: the weights' own, e.g. 0.875); "
        "1.0 keeps the whole image, for photos already cropped to the subject. Stored as NAME@cropNN",
    )
    p.add_argument("--taxonomy", help="CSV: class,<coarse levels...> joined onto labels")
    p.add_argument("--split", help="CSV: path,split (train/val/test) stored with the labels")
    p.add_argument("--batch-size", type=_POSITIVE, default=32)
    p.add_argument("--workers", type=_COUNT, help="loader processes (default: by device and cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="autocast precision (auto: bf16 on CPUs with native bf16, fp16/bf16 on CUDA)",
    )
    p.add_argument(
        "--optimize",
        default="auto",
        choices=["auto", "eager", "inductor"],
        help="inductor = torch.compile with frozen weights (10-40 s compile, about 1.5x faster on CPU); "
        "auto uses it on CPU from 10,000 images",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16"],
        help="storage dtype of embeddings",
    )
    p.add_argument(
        "--commit-every",
        type=_POSITIVE,
        default=512,
        help="rows per journal commit (the most a crash can lose)",
    )
    p.add_argument(
        "--shard",
        type=_shard,
        metavar="I/N",
        help="embed only shard I of N (0-based; a fixed split of the paths) into a part beside "
        "the store, for job arrays; run `penult merge STORE` when the shards are done. A shard "
        "run again after a kill resumes its part",
    )
    p.add_argument(
        "--cluster",
        metavar="SPEC",
        help="embed on Dask: local[:N] (N worker processes; default one per GPU, else 2), "
        "tcp://HOST:PORT (a running scheduler) or slurm[:JOBS] (dask-jobqueue, configured in "
        "~/.config/dask/jobqueue.yaml). The driver plans, workers write parts, the driver "
        "publishes them; needs `pip install 'penult[dask]'`",
    )
    p.add_argument(
        "--partition-size",
        type=_POSITIVE,
        default=2048,
        metavar="N",
        help="images per Dask task with --cluster: larger means less scheduling, smaller means "
        "less redone when a worker dies (default 2048)",
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="try again images that failed in an earlier run"
    )
    p.add_argument(
        "--max-pixels",
        type=_POSITIVE,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are refused as decompression bombs",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _param(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. C=0.1")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, {"none": None, "true": True, "false": False}.get(value.lower(), value)


def _pca(text: str) -> int | float:
    """PCA size: components (an integer >= 1) or the variance to keep (a fraction in (0, 1))."""
    if "." in text or "e" in text.lower():
        return _FRACTION(text)
    return _POSITIVE(text)


def _threshold(text: str) -> str | float:
    """--ovr threshold: 'f1', or one probability strictly between 0 and 1."""
    return text if text == "f1" else _FRACTION(text)


def _add_head_options(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    from classify import HEADS

    p.add_argument(
        "--backbone",
        action="append",
        default=[],
        help=(
            "a backbone set to compare, repeatable; A+B fuses A and B"
            if compare
            else "store entry to train on; repeat to fuse several (rows joined by content hash)"
        )
        + ". Default: the store's only backbone",
    )
    p.add_argument("--label", default="label", help="label column to predict (default label)")
    p.add_argument(
        "--levels",
        type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
        default=(),
        help="coarse label columns, coarse first (e.g. family,genus), or 'auto' for nested folders; "
        "reported per level, and used top-down with --hierarchical",
    )
    p.add_argument(
        "--hierarchical", action="store_true", help="coarse classifier, then one per group"
    )
    p.add_argument("--taxonomy", help="CSV class,<coarse columns...> to join at training time")
    p.add_argument(
        "--ovr", action="store_true", help="one-vs-rest with per-class thresholds and 'unknown'"
    )
    p.add_argument(
        "--threshold",
        default="f1",
        type=_threshold,
        help="--ovr thresholds: 'f1' (tuned per class on out-of-fold scores) or a probability",
    )
    p.add_argument("--class-weight", choices=["balanced"], help="reweight rare classes (lr, svm)")
    p.add_argument(
        "--preprocess", choices=["standard", "l2", "l2+standard", "none"], help="default per head"
    )
    p.add_argument("--pca", type=_pca, help="PCA components (int) or kept variance (0-1)")
    p.add_argument("--whiten", action="store_true", help="whiten the PCA components")
    p.add_argument(
        "--search", action="store_true", help="grid-search the head's main parameter by CV"
    )
    p.add_argument(
        "--cv", type=_ranged(int, 2), default=3, help="folds for --search and --ovr thresholds"
    )
    p.add_argument(
        "--param", type=_param, action="append", default=[], help="classifier KEY=VALUE, repeatable"
    )
    p.add_argument(
        "--split-column", default="split", help="label column with train/test (made if missing)"
    )
    p.add_argument("--eval-split", help="split to score on (default test, else val)")
    p.add_argument(
        "--test-size", type=_FRACTION, default=0.3, help="test fraction when a split is made"
    )
    p.add_argument("--seed", type=_COUNT, default=0, help="seed of a split made here")
    p.add_argument("--jobs", type=_POSITIVE, help="parallel processes (default: all cores)")
    p.epilog = "heads: " + "; ".join(f"{k}: {s.description}" for k, s in HEADS.items())


def _train_options(args: argparse.Namespace, head: str):
    from classify import TrainOptions

    return TrainOptions(
        head=head, backbones=tuple(args.backbone), label=args.label, levels=args.levels,
        hierarchical=args.hierarchical, taxonomy=args.taxonomy, ovr=args.ovr, threshold=args.threshold,
        class_weight=args.class_weight, preprocess=args.preprocess, pca=args.pca, whiten=args.whiten,
        search=args.search, cv=args.cv, split=args.split_column, eval_split=args.eval_split,
        test_size=args.test_size, seed=args.seed, n_jobs=args.jobs, params=tuple(args.param),
    )  # fmt: skip


def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a head on stored features, score it on the held-out split, save it",
        description="Train a classifier head on a store's embeddings (seconds, no CNN), evaluate it on "
        "the stored split (made once, seeded, if the store has none) and save MODEL plus MODEL.json.",
    )
    p.add_argument("store")
    p.add_argument(
        "--out", required=True, help="model file to write (a manifest MODEL.json goes beside it)"
    )
    p.add_argument("--head", default="lr", help="lr (default), svm, mlp, knn, centroid")
    p.add_argument("--report", help="also write the evaluation report into this folder")
    g = p.add_argument_group(
        "out of core",
        "for stores whose features do not fit in memory: features are read a block at a time. lr "
        "streams (standardisation in one pass, then log loss over shuffled blocks), "
        "centroid streams (class means); other heads train on a seeded stratified sample",
    )
    g.add_argument("--out-of-core", action="store_true", help="never load the feature matrix")
    g.add_argument(
        "--memory-mb", type=_POSITIVE, default=256, help="features held at once (default 256)"
    )
    g.add_argument(
        "--epochs", type=_POSITIVE, default=20, help="passes of the streamed lr (default 20)"
    )
    g.add_argument(
        "--subsample",
        type=_POSITIVE,
        default=50_000,
        help="training images for heads that cannot stream (default 50,000)",
    )
    _add_head_options(p)

    p = sub.add_parser(
        "evaluate",
        help="score a saved model on a store's held-out split; write a report",
        description="Top-1/top-5, balanced accuracy, macro-F1, per-class precision/recall/AUC, calibration, "
        "per-level accuracy and tree distance for taxonomies, rare classes apart. The store's backbone "
        "must have the fingerprint the model was trained on.",
    )
    p.add_argument("model")
    p.add_argument("store")
    p.add_argument("--split", help="split to score (default: the one the model was scored on)")
    p.add_argument(
        "--report", help="folder for report.md/.html, PNG plots, metrics.json, predictions.csv"
    )
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )

    p = sub.add_parser(
        "compare",
        help="several heads and backbones on the same split, one table",
        description="Train each --head on each --backbone set (A+B fuses) on the store's split and print "
        "one table.",
    )
    p.add_argument("store")
    p.add_argument(
        "--head", dest="heads", action="append", help="repeat; default lr, svm, mlp, knn, centroid"
    )
    p.add_argument("--json", help="also write the rows as JSON")
    _add_head_options(p, compare=True)

    p = sub.add_parser(
        "predict",
        help="score new images with a saved model, write a CSV",
        description="Images, folders, manifests or file lists in; per image the top-k labels with "
        "probabilities (and each level for taxonomy models, 'unknown' for --ovr models) out. Features come "
        "from the model's backbone, or from --store where already embedded there.",
    )
    p.add_argument("model")
    p.add_argument("inputs", nargs="+", help="image files, folders, CSV manifests or file lists")
    p.add_argument(
        "--out", required=True, help="CSV to write (written as OUT.partial, then renamed)"
    )
    p.add_argument("--store", help="feature store whose cached embeddings to reuse")
    p.add_argument("--top-k", type=_POSITIVE, default=5)
    p.add_argument(
        "--weights", action="append", default=[], help="FILE (or NAME=FILE) if not the default"
    )
    p.add_argument(
        "--trust-checkpoint", action="store_true", help="allow full pickles in --weights"
    )
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )
    p.add_argument("--batch-size", type=_POSITIVE, default=32)
    p.add_argument("--workers", type=_COUNT)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument(
        "--cluster",
        metavar="SPEC",
        help="score on Dask, as `extract --cluster` (local[:N], tcp://HOST:PORT, slurm[:JOBS]); "
        "the CSV is still in input order and written only when every image is scored",
    )
    p.add_argument(
        "--partition-size",
        type=_POSITIVE,
        default=2048,
        metavar="N",
        help="images per step (per Dask task with --cluster; default 2048)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    from classify.neighbors import KINDS, METRICS

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("store")
        p.add_argument("--backbone", help="store entry (default: the store's only backbone)")

    p = sub.add_parser(
        "index",
        help="build or update the nearest-neighbour index of a store",
        description="Build a faiss index over a backbone's embeddings, saved beside the store "
        "(STORE.<backbone>.<metric>.faiss + .json + .rows.npy). Exact search up to 200,000 rows, then "
        "IVF; the choice is printed. Run again after extracting more images: new rows are added "
        "without a rebuild. A stale index (images changed or removed) is refused: use --rebuild.",
    )
    common(p)
    p.add_argument("--metric", default="cosine", choices=METRICS, help="cosine (default) or l2")
    p.add_argument("--kind", default="auto", choices=KINDS, help="index type (default by size)")
    p.add_argument("--nlist", type=_POSITIVE, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--pq-m", type=_POSITIVE, help="PQ bytes per vector for --kind ivfpq")
    p.add_argument(
        "--rebuild", action="store_true", help="build from scratch even if an index exists"
    )
    p.add_argument(
        "--cluster",
        metavar="SPEC",
        help="add the shards of an ivf-disk index (one per million rows, all from one trained "
        "quantiser) as parallel Dask tasks, as `extract --cluster`; merged on disk here",
    )

    p = sub.add_parser(
        "neighbors",
        help="find the stored images most similar to images, folders or store keys",
        description="A query is a path already in the store (its stored embedding), an image file or "
        "a folder (embedded on the fly with the store's backbone, same weights and preprocessing).",
    )
    common(p)
    p.add_argument("queries", nargs="+", help="store keys, image files or folders")
    p.add_argument("-k", type=_POSITIVE, default=10, help="neighbours per query (default 10)")
    p.add_argument(
        "--nprobe", type=_POSITIVE, help="IVF lists searched per query (default: the index's)"
    )
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--out", default="neighbors.csv", help="table to write (.csv or .json)")
    p.add_argument(
        "--sheet", default="neighbors.html", help="HTML contact sheet (thumbnails beside it)"
    )

    p = sub.add_parser(
        "duplicates",
        help="groups of near-duplicate images (resized, recompressed copies)",
        description="Link images whose embeddings have cosine similarity >= --threshold, and report the "
        "connected groups as CSV plus a contact sheet. Uses (and updates) the cosine index.",
    )
    common(p)
    p.add_argument(
        "--threshold",
        type=_ranged(float, 0, 1, open_lo=True),
        default=0.95,
        help="cosine similarity, in (0, 1] (default 0.95)",
    )
    p.add_argument("--out", default="duplicates.csv")
    p.add_argument("--sheet", default="duplicates.html")


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from extract.finetune import FinetuneOptions

    d = FinetuneOptions()
    p = sub.add_parser(
        "finetune",
        help="fine-tune a backbone on the store's labelled images; add it as a new backbone",
        description="Train the last stage(s) of a pretrained backbone plus a new head on the store's train "
        "split (validation: its 'val' split, else a seeded part of train; test is never touched). The best "
        "epoch is saved as OUT (safetensors) + OUT.json (card: recipe, data, validation curve); an "
        "interrupted run resumes. Then every image is embedded again as backbone <base>@ft-<hash>.",
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    p.add_argument("--backbone", default=d.backbone)
    p.add_argument("--label", default=d.label)
    p.add_argument(
        "--unfreeze",
        type=_COUNT,
        default=d.unfreeze,
        help="stages trained, from the deepest (default 1)",
    )
    p.add_argument("--epochs", type=_POSITIVE, default=d.epochs)
    p.add_argument("--batch-size", type=_POSITIVE, default=d.batch_size)
    p.add_argument(
        "--accumulate", type=_POSITIVE, default=d.accumulate, help="batches per optimiser step"
    )
    p.add_argument("--lr-backbone", type=_RATE, default=d.lr_backbone)
    p.add_argument("--lr-head", type=_RATE, default=d.lr_head)
    p.add_argument(
        "--schedule", choices=["cosine", "plateau"], default=d.schedule, help="after warm-up"
    )
    p.add_argument(
        "--label-smoothing", type=_ranged(float, 0, 1, open_hi=True), default=d.label_smoothing
    )
    p.add_argument(
        "--no-augment", action="store_true", help="no random crops, flips, rotation, jitter"
    )
    p.add_argument(
        "--no-balance",
        action="store_true",
        help="plain shuffling instead of class-balanced sampling",
    )
    p.add_argument(
        "--patience", type=_COUNT, default=d.patience, help="early stopping on validation loss"
    )
    p.add_argument("--max-train", type=_POSITIVE, help="use at most this many training images")
    p.add_argument(
        "--crop-pct",
        type=_CROP,
        help="centre crop / resize for training and the new embeddings (1.0: whole image)",
    )
    p.add_argument(
        "--head-init",
        choices=["probe", "random"],
        default=d.head_init,
        help="new head from a logistic regression on the frozen embeddings (default), or random",
    )
    p.add_argument(
        "--bn-train",
        action="store_true",
        help="update BatchNorm statistics in the trained stages (default: keep the pretrained ones)",
    )
    p.add_argument(
        "--hard-mining",
        type=_ranged(float, 0, 1),
        default=d.hard_mining,
        metavar="FRACTION",
        help="online hard-example mining: learn from this fraction of each batch's highest losses",
    )
    p.add_argument(
        "--aux-level",
        metavar="COLUMN",
        help="auxiliary coarse-label loss (e.g. genus, family): a store label column or --taxonomy column",
    )
    p.add_argument("--taxonomy", metavar="CSV", help="class,<coarse levels...> for --aux-level")
    p.add_argument("--aux-weight", type=_RATE, default=d.aux_weight)
    p.add_argument(
        "--aux-stage",
        type=_POSITIVE,
        default=d.aux_stage,
        help="stage (from the deepest) the coarse head reads; must be trainable (default 2)",
    )
    p.add_argument(
        "--no-extract", action="store_true", help="do not embed the store with the result"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from extract.finetune import FinetuneOptions, extract_finetuned, finetune

    opts = FinetuneOptions(
        backbone=args.backbone, label=args.label, unfreeze=args.unfreeze, epochs=args.epochs,
        batch_size=args.batch_size, accumulate=args.accumulate, lr_backbone=args.lr_backbone, lr_head=args.lr_head, schedule=args.schedule,
        label_smoothing=args.label_smoothing, augment=not args.no_augment, balanced=not args.no_balance,
        patience=args.patience, max_train=args.max_train, device=args.device, progress=not args.quiet,
        crop_pct=args.crop_pct, head_init=args.head_init, bn_train=args.bn_train, hard_mining=args.hard_mining, aux_level=args.aux_level,
        taxonomy=args.taxonomy, aux_weight=args.aux_weight, aux_stage=args.aux_stage,
    )  # fmt: skip

    def show(row: dict) -> None:
        aux = f", val {opts.aux_level} acc {row['val_aux_acc']:.3f}" if opts.aux_level else ""
        print(
            f"epoch {row['epoch']}/{opts.epochs}: train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.3f}, val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}"
            f"{aux}, {row['seconds']:.0f} s",
            flush=True,
        )

    r = finetune(args.store, args.out, opts, on_epoch=None if args.quiet else show)
    best = r.card.get("best_epoch")
    print(
        f"{args.out}: best epoch {best} of {len(r.curve)}, val acc {r.curve[best - 1]['val_acc']:.3f} (card {args.out}.json)"
    )
    if not args.no_extract:
        name = extract_finetuned(args.store, args.out, progress=not args.quiet)
        print(
            f"embedded the store as backbone {name!r}: `penult train {args.store} --backbone {name}`"
        )
    return 0


def _backbone(store: str, name: str | None) -> str:
    from classify.train import default_backbones
    from features import FeatureStore

    return default_backbones(FeatureStore(store), (name,) if name else ())[0]


def _cmd_index(args: argparse.Namespace) -> int:
    from classify.neighbors import build_index, index_path, open_index

    name = _backbone(args.store, args.backbone)
    path = index_path(args.store, name, args.metric)
    if path.exists() and not args.rebuild:
        ni, added = open_index(
            args.store, name, metric=args.metric, update=True, cluster=args.cluster
        )
        print(f"{path}: added {added} new rows, {len(ni.rows):,} in all ({ni.meta['kind']})")
        return 0
    ni, plan = build_index(
        args.store, name, metric=args.metric, kind=args.kind, nlist=args.nlist, pq_m=args.pq_m,
        cluster=args.cluster,
    )  # fmt: skip
    print(
        f"{path}: {plan.describe(len(ni.rows), ni.index.d)}; built in {ni.meta['build_seconds']:.1f} s"
    )
    return 0


def _cmd_neighbors(args: argparse.Namespace) -> int:
    from classify.lookup import contact_sheet, neighbors, write_table

    _out_folder(args.out)
    _out_folder(args.sheet)
    name = _backbone(args.store, args.backbone)
    from extract import Featuriser

    results = neighbors(
        args.store, name, args.queries, k=args.k, metric=args.metric, nprobe=args.nprobe,
        images=Featuriser(),
    )  # fmt: skip
    for r in results[:20]:
        print(f"{r.query} [{r.label}]" + (f"  ERROR {r.error}" if r.error else ""))
        for h in r.hits:
            print(f"    {h.score:8.4f}  {h.path}  [{h.label}]")
    if len(results) > 20:
        print(f"... {len(results) - 20} more queries in {args.out}")
    write_table(results, args.out)
    score = "similarity" if args.metric == "cosine" else "squared distance"
    contact_sheet(
        results,
        args.sheet,
        title=f"neighbours in {args.store} ({name}, {args.metric})",
        score_name=score,
    )
    print(f"wrote {args.out} and {args.sheet}")
    return 0


def _cmd_duplicates(args: argparse.Namespace) -> int:
    from classify.lookup import contact_sheet, find_duplicates, write_table
    from classify.neighbors import ensure_index

    _out_folder(args.out)
    _out_folder(args.sheet)
    name = _backbone(args.store, args.backbone)
    ni = ensure_index(args.store, name)
    groups = find_duplicates(args.store, name, threshold=args.threshold, index=ni)
    n = sum(1 + len(g.hits) for g in groups)
    print(f"{len(groups)} groups of near-duplicates ({n} images) at cosine >= {args.threshold}")
    for g in groups[:20]:
        print(f"  {g.query}: " + ", ".join(f"{h.path} ({h.score:.3f})" for h in g.hits))
    write_table(groups, args.out)
    contact_sheet(
        groups,
        args.sheet,
        title=f"near-duplicates in {args.store} (cosine >= {args.threshold})",
        score_name="similarity",
    )
    print(f"wrote {args.out} and {args.sheet}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="penult",
        description="Two-stage image classification: extract CNN embeddings once, train heads in seconds.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser(
        "backbones", help="list available backbones", description="List the backbone registry."
    )
    _add_extract(sub)
    _add_classify(sub)
    _add_neighbors(sub)
    _add_finetune(sub)
    p = sub.add_parser(
        "merge",
        help="publish the parts written by `extract --shard`",
        description="Move every finished part (STORE.parts/) into the store under its writer's "
        "lock and commit; parts still being written are left for a later merge. Safe to run again "
        "after a kill.",
    )
    p.add_argument("store")
    p = sub.add_parser(
        "info",
        help="summarise a feature store",
        description="Backbones, counts, dims, fingerprints, labels, failed images, size.",
    )
    p.add_argument("store")
    p = sub.add_parser(
        "check",
        help="verify a store's integrity",
        description="Exit 0 if the store is sound, 1 with a list of problems otherwise.",
    )
    p.add_argument("store")
    p.add_argument(
        "--repair",
        action="store_true",
        help="merge a journal left by an interrupted run; drop missing or damaged segments whose "
        "rows can be made again (embeddings, sizes, failures, labels); rebuild the path index",
    )
    p.add_argument(
        "--upgrade",
        action="store_true",
        help="convert a store written by an older penult (format 1, read-only here) to the "
        "segmented format 2 in one pass; the old file stays until the new one is complete",
    )
    p = sub.add_parser(
        "demo",
        help="run the pipeline on the embedded default data set",
        description="Extract the elpv solar-cell images (PyPI elpv-dataset), or --data DIR, and print what happened.",
    )
    p.add_argument("--data", help="any image folder instead of the embedded elpv images")
    p.add_argument("--out", default="demo-out", help="output folder (default demo-out)")
    p.add_argument("--backbone", default=None, help="backbone (default efficientnet_lite0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return parser


def _cmd_backbones(args: argparse.Namespace) -> int:
    from extract import DEFAULT_BACKBONE, REGISTRY

    for s in REGISTRY.values():
        mark = "*" if s.name == DEFAULT_BACKBONE else " "
        print(f"{mark} {s.name:20s} {s.dim:5d}-d  {s.source}:{s.arch:22s} {s.description}")
    print(
        "* default; torchvision/timm weights load from their caches (download where online), or --weights FILE"
    )
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from extract import ExtractOptions, extract, list_images
    from features import OptionError

    if args.shard and args.cluster:
        raise OptionError("--shard and --cluster are two ways to split a run; use one")
    listing = list_images(args.input, root=args.root, taxonomy=args.taxonomy, split=args.split)
    for note in listing.notes:
        print(note)
    opts = ExtractOptions(
        backbone=args.backbone, weights=args.weights, name=args.name, trust_checkpoint=args.trust_checkpoint, crop_pct=args.crop_pct,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision, optimize=args.optimize,
        dtype=args.dtype, commit_every=args.commit_every, retry_failed=args.retry_failed,
        max_pixels=args.max_pixels, progress=not args.quiet, shard=args.shard, cluster=args.cluster,
        partition_size=args.partition_size,
    )  # fmt: skip

    summary = extract(args.store, listing, opts)
    print(summary.report())
    if args.shard:
        print(
            f"shard {args.shard[0]}/{args.shard[1]} written as a part; `penult merge {args.store}` publishes the finished parts"
        )
    return 130 if summary.interrupted else 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from features import merge

    parts, shards = merge(args.store)
    print(f"{args.store}: merged {parts} part(s) ({shards} journal shards)")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from features import describe

    print(describe(args.store))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from features import check, upgrade

    if args.upgrade:
        print(upgrade(args.store))
    problems = check(args.store, repair=args.repair)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{args.store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    # penult.demo when installed, demo when run from the repository (python -m cli)
    run_demo = importlib.import_module(f"{__package__}.demo" if __package__ else "demo").run_demo
    from extract import DEFAULT_BACKBONE

    print(
        run_demo(
            data=args.data,
            out=args.out,
            backbone=args.backbone or DEFAULT_BACKBONE,
            progress=not args.quiet,
        )
    )
    return 0


def _print_metrics(m: dict) -> None:
    from classify.report import headline_rows

    for k, v in headline_rows(m):
        print(f"  {k:32s} {v}")


def _out_folder(path: str) -> None:
    """Refuse an output whose folder is missing: a typo should not create directories."""
    from features import OptionError

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{path}: folder {folder} does not exist (create it first)")


def _cmd_train(args: argparse.Namespace) -> int:
    from classify import save_model, train
    from classify.evaluate import evaluate

    _out_folder(args.out)
    if args.report:
        _out_folder(args.report)
    if args.out_of_core:
        from classify.outofcore import StreamOptions, train_out_of_core

        so = StreamOptions(memory_mb=args.memory_mb, epochs=args.epochs, subsample=args.subsample)
        r = train_out_of_core(
            args.store, _train_options(args, args.head), so, report_dir=args.report
        )
    else:
        r = train(args.store, _train_options(args, args.head))
    for note in r.notes:
        print(note)
    m = r.model.manifest
    print(
        f"{m['kind']} {m['head']} on {' + '.join(r.model.backbones)} ({m['feature_dim']}-d): "
        f"{len(r.model.classes)} classes, {r.n_train} training images, fit {r.fit_seconds:.1f} s"
    )
    if r.search:
        print(f"  CV search ({r.search['folds']} folds): best {r.search['best']}")
        for row in r.search["results"]:
            print(f"    {row['params']}: CV accuracy {row['cv_accuracy']:.3f}")
    print(f"{r.eval_split} split ({r.n_eval} images):")
    _print_metrics(r.metrics)
    path = save_model(r.model, args.out)
    print(f"saved {path} and {path}.json")
    if args.report:
        if not args.out_of_core:  # (out of core, the streamed evaluation wrote it)
            evaluate(r.model, args.store, report_dir=args.report)
        print(f"report: {args.report}/report.md (and .html, PNGs, metrics.json, predictions.csv)")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from classify import evaluate, load_model

    if args.report:
        _out_folder(args.report)
    model = load_model(args.model, trust=args.trust_model)
    ev = evaluate(model, args.store, split=args.split, report_dir=args.report)
    print(f"{args.model} on {args.store}, {ev.split} split ({ev.n} images):")
    for note in ev.metrics.get("notes", []):
        print(f"  note: {note}")
    _print_metrics(ev.metrics)
    if ev.report_dir:
        print(f"report: {ev.report_dir}/report.md (and .html, PNGs, metrics.json, predictions.csv)")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import json

    from classify import HEADS, compare, compare_table

    sets = [tuple(b.split("+")) for b in args.backbone] or [()]
    rows = compare(args.store, args.heads or list(HEADS), sets, _train_options(args, "lr"))
    print(compare_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from classify import PredictOptions, load_model, predict_images, weights_for
    from extract import Featuriser

    _out_folder(args.out)
    model = load_model(args.model, trust=args.trust_model)
    images = Featuriser(
        weights=weights_for(model, args.weights), trust_checkpoint=args.trust_checkpoint,
        device=args.device, precision=args.precision, batch_size=args.batch_size, workers=args.workers,
    )  # fmt: skip
    opts = PredictOptions(
        top_k=args.top_k, store=args.store, progress=not args.quiet, cluster=args.cluster,
        chunk=args.partition_size,
    )  # fmt: skip
    print(predict_images(model, args.inputs, args.out, opts, images).report())
    return 0


_INTERRUPTED = {
    "extract": "finished batches are committed to the store; run the same command again to resume",
    "finetune": "the last finished epoch is saved; run the same command again to resume",
    "predict": "no CSV was written (predict does not resume; with --store, stored embeddings "
    "are reused next time)",
}


def _os_error(e: OSError, args: argparse.Namespace) -> str:
    """One line for an OS failure; for a full disk, what was kept and how to finish."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno != errno.ENOSPC:
        return f"{e.strerror or e}{where}"
    store = getattr(args, "store", None)
    kept = (
        f" Finished work is kept in {store}.journal; once space is free, `penult check --repair "
        f"{store}` merges it (or run the same command again)."
        if store and args.command in ("extract", "finetune", "train")
        else ""
    )
    return f"no space left on device{where}.{kept}"


_HANDLERS = {
    "backbones": _cmd_backbones,
    "extract": _cmd_extract,
    "merge": _cmd_merge,
    "info": _cmd_info,
    "check": _cmd_check,
    "demo": _cmd_demo,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "compare": _cmd_compare,
    "predict": _cmd_predict,
    "index": _cmd_index,
    "neighbors": _cmd_neighbors,
    "duplicates": _cmd_duplicates,
    "finetune": _cmd_finetune,
}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # names that are not UTF-8 print escaped, not crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from features import PenultError

    try:
        return _HANDLERS[args.command](args)
    except BrokenPipeError:  # `penult info STORE | head`: the reader left; exit quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except PenultError as e:  # raised on purpose: one line; anything else shows its traceback
        if args.verbose:
            traceback.print_exc()
        print(f"penult: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file that cannot be read or written, a full disk: one line too
        if args.verbose:
            traceback.print_exc()
        print(f"penult: error: {_os_error(e, args)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        why = _INTERRUPTED.get(args.command, "nothing more was written")
        print(f"penult: interrupted; {why}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
