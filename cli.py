"""`penult` command line: argument parsing and printing only; the work is in the packages."""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any

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
  penult count plankton.skops bins/ --sample-level 1 --samples samples.csv --out counts.csv
  penult index birds.h5 && penult neighbors birds.h5 photo.jpg -k 10    similar images, contact sheet
  penult duplicates birds.h5 --threshold 0.95
  penult serve birds.h5                         browse, similar images, uploads at http://127.0.0.1:8765/
"""


def _typed(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a package's parser: its OptionError message becomes argparse's."""
    from penult.core import OptionError

    def typed(text: str):
        try:
            return parse(text)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    typed.__name__ = parse.__name__
    return typed


def _add_options(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """One argument per CLI field of options dataclass ``cls``: its flag, default, parser and help."""
    from penult.core.options import cli_fields

    for f, flag in cli_fields(cls):
        if f.name in skip:
            continue
        names = flag.flags or (f"--{f.name.replace('_', '-')}",)
        kw: dict[str, Any] = {"dest": f.name, "help": (helps or {}).get(f.name, flag.help)}
        if isinstance(f.default, bool):
            kw["action"] = "store_false" if f.default else "store_true"
        else:
            if flag.repeat:
                kw.update(action="append", default=[])
            else:
                kw["default"] = f.default
            if flag.parse:
                kw["type"] = _typed(flag.parse)
            metavar = flag.metavar or (
                None if flag.choices else names[-1].lstrip("-").replace("-", "_").upper()
            )
            kw.update(choices=flag.choices, metavar=metavar)
            if f.default not in (None, ()) and "default" not in kw["help"]:
                kw["help"] += " (default %(default)s)"
        p.add_argument(*names, **kw)


def _options(args: argparse.Namespace, cls: type, **given: Any):
    """``cls`` built from the parsed arguments that ``_add_options`` declared (and ``given``)."""
    from penult.core.options import cli_fields

    values = {
        f.name: tuple(getattr(args, f.name)) if flag.repeat else getattr(args, f.name)
        for f, flag in cli_fields(cls)
        if f.name not in given and hasattr(args, f.name)
    }
    return cls(**values, **given)


# One line per command that builds its arguments from a package (imports torch or sklearn):
# `penult --help` lists them from here, importing neither.
_HELP = {
    "extract": "embed images with a frozen backbone into a feature store",
    "train": "train a head on stored features, score it on the held-out split, save it",
    "evaluate": "score a saved model on a store's held-out split; write a report",
    "compare": "several heads and backbones on the same split, one table",
    "predict": "score new images with a saved model, write a CSV",
    "count": "counts per sample and class, corrected for prior shift, with intervals and mL",
    "mistakes": "rank a store's labelled images by how likely their label is wrong",
    "annotate": "store a model's top 3 labels per image for review (status 'predicted')",
    "next": "the unlabelled images to label next: the model's most doubtful, no near-duplicates",
    "clusters": "group unlabelled images (HDBSCAN) to name a cluster at once",
    "grow": "propose the unlabelled images nearest to a class, to accept or reject",
    "index": "build or update the nearest-neighbour index of a store",
    "neighbors": "find the stored images most similar to images, folders or store keys",
    "duplicates": "groups of near-duplicate images (resized, recompressed copies)",
    "serve": "a local web page to look at a store: browse, similar images, a model's mistakes",
    "finetune": "fine-tune a backbone on the store's labelled images; add it as a new backbone",
}


def _add_extract(sub: argparse._SubParsersAction) -> None:
    from penult.extract.options import ExtractOptions, SampleOptions
    from penult.extract.walk import CHUNK

    p = sub.add_parser(
        "extract",
        help=_HELP["extract"],
        description="Run a frozen ImageNet backbone over images and store global-pooled penultimate-layer "
        "embeddings. Images already stored (same content hash) are skipped; an interrupted run resumes.",
    )
    p.add_argument("store", help="HDF5 feature store (created if missing)")
    p.add_argument(
        "input",
        help="image folder (class = subfolder), a folder of IFCB bins (every ROI a row, the bin "
        "its sample), CSV manifest (path,label,...), EcoTaxa export (.tsv, or its .zip), file "
        "list, or image",
    )
    p.add_argument(
        "--root",
        help="folder that manifest/list paths are relative to (default: the file's folder)",
    )
    p.add_argument("--taxonomy", help="CSV: class,<coarse levels...> joined onto labels")
    p.add_argument("--split", help="CSV: path,split (train/val/test) stored with the labels")
    p.add_argument(
        "--list-chunk", type=int, default=CHUNK, metavar="N",
        help="a folder is listed, planned and committed N images at a time, so the driver's "
        "memory stays bounded whatever the folder holds (about 1.4 KB an image of N while a piece "
        f"is planned; default {CHUNK:,})",
    )  # fmt: skip
    _add_options(p, SampleOptions)
    _add_options(p, ExtractOptions)


def _add_head_options(p: argparse.ArgumentParser, *, compare: bool = False) -> None:
    from penult.classify.options import HEAD_HELP, TrainOptions

    helps = {}
    if compare:
        helps["backbones"] = (
            "a backbone set to compare, repeatable; A+B fuses A and B. Default: the store's only backbone"
        )
    skip = ("head", "refit_all", "quantifier_folds", "unknown_score", "keep") if compare else ()
    # train refits by default (a model for use has seen every labelled image): --no-refit
    _add_options(p, TrainOptions, skip=skip or ("refit_all",), helps=helps)
    if not compare:
        p.add_argument(
            "--no-refit", action="store_true",
            help="save the model fitted on the train split (the one scored), not the default: "
            "scored on the held-out split, then refit on every labelled image and saved (its "
            "manifest keeps the held-out score and says it was refit). `evaluate` can score a "
            "split model on this store; a refit one only on others",
        )  # fmt: skip
        p.add_argument("--refit-all", action="store_true", help=argparse.SUPPRESS)  # the default
    p.epilog = "heads: " + "; ".join(f"{k}: {text}" for k, text in HEAD_HELP.items())


def _add_classify(sub: argparse._SubParsersAction) -> None:
    from penult.classify.options import PredictOptions, StreamOptions
    from penult.extract.featurise import Featuriser

    p = sub.add_parser(
        "train",
        help=_HELP["train"],
        description="Train a classifier head on a store's embeddings (seconds, no CNN), evaluate it on "
        "the stored split (made once, seeded, if the store has none), then refit it on every labelled "
        "image and save that as MODEL plus MODEL.json (the held-out score kept in it; --no-refit "
        "saves the scored split model).",
    )
    p.add_argument("store")
    p.add_argument(
        "--out", required=True, help="model file to write (a manifest MODEL.json goes beside it)"
    )
    p.add_argument("--report", help="also write the evaluation report into this folder")
    g = p.add_argument_group(
        "out of core",
        "for stores whose features do not fit in memory: features are read a block at a time. lr "
        "streams (standardisation in one pass, then log loss over shuffled blocks), "
        "centroid streams (class means); other heads train on a seeded stratified sample",
    )
    g.add_argument("--out-of-core", action="store_true", help="never load the feature matrix")
    _add_options(g, StreamOptions)
    _add_head_options(p)

    p = sub.add_parser(
        "evaluate",
        help=_HELP["evaluate"],
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
        help=_HELP["compare"],
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
        help=_HELP["predict"],
        description="Images, folders, manifests or file lists in; per image the top-k labels with "
        "probabilities (and each level for taxonomy models, 'unknown' for --ovr models) out. Features come "
        "from the model's backbone, or from --store where already embedded there.",
    )
    p.add_argument("model")
    p.add_argument(
        "inputs", nargs="+",
        help="image files, folders (of images or IFCB bins), CSV manifests, EcoTaxa TSVs or file lists",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, help="file to write (written as OUT.partial, then renamed)"
    )
    p.add_argument(
        "--format", dest="fmt", choices=("csv", "ecotaxa", "ifcb"), default="csv",
        help="csv (default: every image, top-k, errors); ecotaxa: an EcoTaxa import TSV "
        "(object_id, img_file_name relative to the TSV, the predicted category, status "
        "predicted, object_score; the typed second header line) of the images scored; ifcb: "
        "--out is a folder of one HDF5 score file per IFCB bin, <bin>_class.h5 (output_scores, "
        "class_labels, roi_numbers: the IFCB Dashboard's class-scores layout, as WHOI's "
        "classifiers and iRfcb write it)",
    )  # fmt: skip
    p.add_argument(
        "--weights", action="append", default=[], help="FILE (or NAME=FILE) if not the default"
    )
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )
    _add_options(p, PredictOptions)
    _add_options(p, Featuriser, skip=("weights",))
    _add_count(sub)


def _add_review(sub: argparse._SubParsersAction) -> None:
    from penult.classify.options import MistakeOptions
    from penult.core.options import POSITIVE

    p = sub.add_parser(
        "annotate",
        help=_HELP["annotate"],
        description="Score the store's images with a saved model, from the stored embeddings, and "
        "keep each image's top 3 labels and scores in the store. Images without a validated label "
        "get status 'predicted' (their label stays empty: a prediction trains nothing until "
        "validated with `penult label --validate`, which takes the model's first choice).",
    )
    p.add_argument("model")
    p.add_argument("store")
    p.add_argument(
        "--all", dest="everything", action="store_true",
        help="score the images with a validated label too (their status stays validated)",
    )  # fmt: skip
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )

    p = sub.add_parser(
        "next",
        help=_HELP["next"],
        description="A queue of unlabelled or predicted images (their predictions stored by "
        "`penult annotate`) ranked by the model's doubt, the smallest gap between its top two "
        "labels first, skipping any image within --similarity (cosine of the embeddings) of one "
        "already queued, so the queue is not fifty frames of one particle. Label them with "
        "`penult label STORE --from CSV --validate` or --move.",
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument(
        "-n", type=_typed(POSITIVE), default=200, help="images in the queue (default 200)"
    )
    p.add_argument("--level", default="label", help="label level (default label)")
    p.add_argument(
        "--similarity", type=float, default=0.95,
        help="cosine similarity from which two images count as near-duplicates (default 0.95)",
    )  # fmt: skip
    p.add_argument("--backbone", help="whose embeddings judge similarity (default: the only one)")

    p = sub.add_parser(
        "clusters",
        help=_HELP["clusters"],
        description="HDBSCAN on the unlabelled (or only predicted) images' embeddings, L2-"
        "normalised and PCA-reduced. Writes a CSV of clusters, largest first, members most typical "
        "first; name a cluster with `penult label STORE --from CSV --cluster K --move TAXON`.",
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument(
        "--min-size", type=_typed(POSITIVE), default=5, help="smallest cluster (default 5)"
    )
    p.add_argument("--pca", type=int, default=64, help="PCA components (0: none; default 64)")
    p.add_argument(
        "--method", choices=("leaf", "eom"), default="leaf",
        help="HDBSCAN's cluster selection: leaf (default: smaller, purer clusters; on cub100 "
        "99%% of the clusters a reviewer named were one species) or eom (fewer, larger ones)",
    )  # fmt: skip
    p.add_argument("--level", default="label", help="label level (default label)")
    p.add_argument("--backbone", help="whose embeddings (default: the only one)")

    p = sub.add_parser(
        "grow",
        help=_HELP["grow"],
        description="The unlabelled images nearest (cosine) to a class's validated images, "
        "nearest first, leaving out those rejected for it before. Accept with `penult label STORE "
        "--from CSV --move CLASS`, reject with `penult label STORE --from CSV --reject CLASS` "
        "(remembered in the history).",
    )
    p.add_argument("store")
    p.add_argument("label", help="the class to grow")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("-n", type=_typed(POSITIVE), default=20, help="images proposed (default 20)")
    p.add_argument("--level", default="label", help="label level (default label)")
    p.add_argument("--backbone", help="whose embeddings (default: the only one)")

    p = sub.add_parser(
        "mistakes",
        help=_HELP["mistakes"],
        description="Rank the store's labelled images by how likely their label is wrong, from "
        "two signals that never let an image vote on itself: the probability a classifier "
        "fitted on the other folds gives its label (confident learning's self-confidence; "
        "--head), and how much nearer it lies to other labels' images than to its own "
        "label's. Writes a CSV, most suspicious first, with the label the model suggests instead; "
        "fix what you confirm with `penult label STORE --from CSV --move TAXON`.",
        epilog="example:\n  penult mistakes birds.h5 --out suspects.csv --top 200",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="CSV to write")
    p.add_argument("--top", type=_typed(POSITIVE), help="write only the TOP most suspicious images")
    _add_options(p, MistakeOptions)


def _add_count(sub: argparse._SubParsersAction) -> None:
    from penult.classify.options import CountOptions, PredictOptions
    from penult.extract.featurise import Featuriser

    p = sub.add_parser(
        "count",
        help=_HELP["count"],
        description="Per sample and class: the images the model gave the class, the class's share "
        "of the sample corrected for the shift between the training set's class mix and the "
        "sample's (--method), a 95 percent bootstrap interval, and the concentration per mL where "
        "the sample has a volume_ml. Images the model calls 'not one of my classes' are counted "
        "as 'unclassified'. Samples come from a manifest's sample column, --sample-level or "
        "--samples FILE; images without one are a sample per input. Writes OUT (long: one row per "
        "sample and class), OUT_wide.csv, OUT_per_ml.csv (where volumes are known) and OUT.png/"
        ".html (top taxa per sample, or over time).",
        epilog="examples:\n"
        "  penult count plankton.skops bins/ --sample-level 1 --samples samples.csv --out counts.csv\n"
        "  penult count plankton.skops --store plankton.h5 --out counts.csv   the store's samples\n"
        "  penult count birds.skops photos/ --level family --method cc --out families.csv",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model")
    p.add_argument(
        "inputs",
        nargs="*",
        help="image files, folders, CSV manifests or file lists; none: count the --store's images",
    )
    p.add_argument("--out", required=True, help="long CSV to write (the others go beside it)")
    p.add_argument(
        "--weights", action="append", default=[], help="FILE (or NAME=FILE) if not the default"
    )
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )
    _add_options(p, CountOptions)
    g = p.add_argument_group("scoring (as for predict)")
    _add_options(
        g,
        PredictOptions,
        skip=("top_k",),
        helps={"store": "feature store: its cached embeddings are reused; with no INPUTS its "
               "images are counted (by its sample column)"},
    )  # fmt: skip
    _add_options(g, Featuriser, skip=("weights",))


def _add_neighbors(sub: argparse._SubParsersAction) -> None:
    from penult.classify.options import KINDS, METRICS
    from penult.core.options import POSITIVE, ranged

    positive = _typed(POSITIVE)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("store")
        p.add_argument("--backbone", help="store entry (default: the store's only backbone)")

    p = sub.add_parser(
        "index",
        help=_HELP["index"],
        description="Build a faiss index over a backbone's embeddings, saved beside the store "
        "(STORE.<backbone>.<metric>.faiss + .json + .rows.npy). Exact search up to 200,000 rows, then "
        "IVF; the choice is printed. Run again after extracting more images: new rows are added "
        "without a rebuild. A stale index (images changed or removed) is refused: use --rebuild.",
    )
    common(p)
    p.add_argument("--metric", default="cosine", choices=METRICS, help="cosine (default) or l2")
    p.add_argument("--kind", default="auto", choices=KINDS, help="index type (default by size)")
    p.add_argument("--nlist", type=positive, help="IVF lists (default about 4 sqrt(N))")
    p.add_argument("--pq-m", type=positive, help="PQ bytes per vector for --kind ivfpq")
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
        help=_HELP["neighbors"],
        description="A query is a path already in the store (its stored embedding), an image file or "
        "a folder (embedded on the fly with the store's backbone, same weights and preprocessing).",
    )
    common(p)
    p.add_argument("queries", nargs="+", help="store keys, image files or folders")
    p.add_argument("-k", type=positive, default=10, help="neighbours per query (default 10)")
    p.add_argument(
        "--nprobe", type=positive, help="IVF lists searched per query (default: the index's)"
    )
    p.add_argument("--metric", default="cosine", choices=METRICS)
    p.add_argument("--out", default="neighbors.csv", help="table to write (.csv or .json)")
    p.add_argument(
        "--sheet", default="neighbors.html", help="HTML contact sheet (thumbnails beside it)"
    )
    from penult.extract.featurise import Featuriser

    _add_options(
        p.add_argument_group("embedding image queries"),
        Featuriser,
        skip=("trust_checkpoint", "sample_level", "samples"),
    )

    p = sub.add_parser(
        "duplicates",
        help=_HELP["duplicates"],
        description="Link images whose embeddings have cosine similarity >= --threshold, and report the "
        "connected groups as CSV plus a contact sheet. Uses (and updates) the cosine index.",
    )
    common(p)
    p.add_argument(
        "--threshold",
        type=_typed(ranged(float, 0, 1, open_lo=True)),
        default=0.95,
        help="cosine similarity, in (0, 1] (default 0.95)",
    )
    p.add_argument("--out", default="duplicates.csv")
    p.add_argument("--sheet", default="duplicates.html")


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from penult.core.options import POSITIVE, ranged

    p = sub.add_parser(
        "serve",
        help=_HELP["serve"],
        description="Start a small web app on this machine and print its address; Ctrl-C stops it. "
        "Browse the store's images by label, coarse level, split or failure; click an image (or "
        "drop a new one) to see its nearest stored neighbours. Read-only unless --annotate: the "
        "store is never written (the neighbour index and thumbnails are cached beside it). A JSON API behind "
        "the pages (/api/images, /api/neighbors, /api/mistakes, /api/predict, /api/info) serves "
        "scripts too; see the README.",
    )
    p.add_argument("store")
    p.add_argument("--backbone", help="store entry (default: the store's only backbone)")
    p.add_argument(
        "--model",
        help="a saved model (penult train --out): adds Mistakes (its held-out split of this "
        "store: confused pairs by name, recall per class) and Score (upload images, top-k)",
    )
    p.add_argument(
        "--trust-model", action="store_true", help="load types outside sklearn/numpy/penult"
    )
    p.add_argument("--port", type=_typed(ranged(int, 1, 65535)), default=8765, help="default 8765")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; anything else is "
        "reachable by others, with a warning)",
    )
    p.add_argument(
        "--allow-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a name the pages are reached by (repeatable), besides localhost, 127.0.0.1, [::1] "
        "and --host: a request whose Host header names anything else is refused (403), so a web "
        "page elsewhere cannot reach the server by pointing its own name at this machine",
    )
    p.add_argument(
        "--annotate", action="store_true",
        help="let the pages change labels (POST /api/label: validate, move, dubious, reject, "
        "undo; each a journal commit, refused while another process writes the store); "
        "without it the store is never written",
    )  # fmt: skip
    p.add_argument("-k", type=_typed(POSITIVE), default=12, help="neighbours shown (default 12)")
    p.add_argument(
        "--max-upload-mb", type=_typed(POSITIVE), default=20, help="largest upload (default 20)"
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    from penult.classify import load_model
    from penult.classify.web import Site, listen, serve
    from penult.extract import Featuriser

    sock = listen(args.host, args.port)  # a port in use is said before anything loads
    model = load_model(args.model, trust=args.trust_model) if args.model else None
    name = _backbone(args.store, args.backbone)
    site = Site(
        args.store, name, images=Featuriser(workers=0), model=model, model_file=args.model or "",
        k=args.k,
    )  # fmt: skip
    serve(
        site, host=args.host, port=args.port, max_upload=args.max_upload_mb << 20,
        allow_hosts=tuple(args.allow_host), sock=sock, annotate=args.annotate,
    )  # fmt: skip
    return 0


def _add_finetune(sub: argparse._SubParsersAction) -> None:
    from penult.extract.finetune.options import FinetuneOptions

    p = sub.add_parser(
        "finetune",
        help=_HELP["finetune"],
        description="Train the last stage(s) of a pretrained backbone plus a new head on the store's train "
        "split (validation: its 'val' split, else a seeded part of train; test is never touched). The best "
        "epoch is saved as OUT (safetensors) + OUT.json (card: recipe, data, validation curve); an "
        "interrupted run resumes. Then every image is embedded again as backbone <base>@ft-<hash>.",
    )
    p.add_argument("store")
    p.add_argument("--out", required=True, help="checkpoint file (.safetensors)")
    _add_options(p, FinetuneOptions)
    p.add_argument(
        "--no-extract", action="store_true", help="do not embed the store with the result"
    )


def _cmd_finetune(args: argparse.Namespace) -> int:
    from penult.extract.finetune import FinetuneOptions, extract_finetuned, finetune

    opts = _options(args, FinetuneOptions)

    def show(row: dict) -> None:
        aux = f", val {opts.aux_level} acc {row['val_aux_acc']:.3f}" if opts.aux_level else ""
        print(
            f"epoch {row['epoch']}/{opts.epochs}: train loss {row['train_loss']:.3f} "
            f"acc {row['train_acc']:.3f}, val loss {row['val_loss']:.3f} acc {row['val_acc']:.3f}"
            f"{aux}, {row['seconds']:.0f} s",
            flush=True,
        )

    r = finetune(args.store, args.out, opts, on_epoch=show if opts.progress else None)
    best, used = r.card.get("best_epoch"), r.card["options"]
    print(
        f"{args.out}: best epoch {best} of {len(r.curve)}, val acc {r.curve[best - 1]['val_acc']:.3f} (card {args.out}.json)"
        f"; --resize {used['resize']} --augment {used['augment_style']}"
    )
    if not args.no_extract:
        name = extract_finetuned(args.store, args.out, progress=opts.progress, engine=opts.engine,
                                 precision=opts.precision)  # fmt: skip
        print(
            f"embedded the store as backbone {name!r}: `penult train {args.store} --backbone {name}`"
        )
    return 0


def _backbone(store: str, name: str | None) -> str:
    from penult.classify.train import default_backbones
    from penult.features import FeatureStore

    return default_backbones(FeatureStore(store), (name,) if name else ())[0]


def _cmd_index(args: argparse.Namespace) -> int:
    from penult.classify.neighbors import build_index, index_path, open_index

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
    from penult.classify.lookup import contact_sheet, neighbors, write_table
    from penult.classify.neighbors import ensure_index, index_path

    _out_folder(args.out)
    _out_folder(args.sheet)
    name = _backbone(args.store, args.backbone)
    from penult.extract import Featuriser

    ni = None
    if not index_path(args.store, name, args.metric).exists():  # build it, as `penult index` would
        print(f"{args.store} has no {args.metric} index of {name} yet: building it ...", flush=True)
        ni = ensure_index(args.store, name, metric=args.metric)
        print(f"  built {index_path(args.store, name, args.metric)} ({len(ni.rows):,} images)")
    results = neighbors(
        args.store, name, args.queries, k=args.k, metric=args.metric, nprobe=args.nprobe,
        images=_options(args, Featuriser), index=ni,
    )  # fmt: skip
    for r in results[:20]:
        label = f"  [{r.label}]" if r.label else ""
        print(f"{r.query}{label}" + (f"  ERROR {r.error}" if r.error else ""))
        for h in r.hits:
            print(f"    {h.score:8.4f}  {h.path}" + (f"  [{h.label}]" if h.label else ""))
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
    from penult.classify.lookup import contact_sheet, find_duplicates, write_table
    from penult.classify.neighbors import ensure_index

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


# The subcommands each builder declares. `penult CMD` builds only CMD's arguments: the option
# classes of the others import scikit-learn and scipy, 1.5 s of every `penult extract`'s start
# (a job array starts thousands).
_GROUPS: tuple[tuple[Callable[[argparse._SubParsersAction], None], tuple[str, ...]], ...] = (
    (_add_extract, ("extract",)),
    (_add_classify, ("train", "evaluate", "compare", "predict", "count")),
    (_add_review, ("annotate", "next", "clusters", "grow", "mistakes")),
    (_add_neighbors, ("index", "neighbors", "duplicates")),
    (_add_finetune, ("finetune",)),
    (_add_serve, ("serve",)),
)


_COMMON = ("backbones", "merge", "info", "check", "label", "demo")  # cheap: always built


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names; None for none or one unknown (the full parser then lists
    every command)."""
    known = {*_COMMON, *(n for _, names in _GROUPS for n in names)}
    for a in argv:
        if not a.startswith("-"):
            return a if a in known else None
    return None


def build_parser(command: str | None = None, *, outline: bool = False) -> argparse.ArgumentParser:
    """The whole CLI, or (``command``) its common part and that one subcommand in full; with
    ``outline`` and no command, every command by name and one line (what `penult --help` and a
    mistyped command show) without building the arguments of those that import torch or sklearn:
    `penult --help` took 2.7 s."""
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
    for add, names in _GROUPS:
        if command in names or (command is None and not outline):
            add(sub)
        elif command is None:
            for name in names:
                sub.add_parser(name, help=_HELP[name])
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
        "label",
        help="validate, move, mark dubious or undo stored labels; their history",
        description="Review labels in the store: each image's label of each level has a status "
        "(unlabelled, predicted, validated, dubious), who set it, when and from what; every change "
        "is kept in an append-only history, and --undo takes back the newest change (or batch "
        "BATCH) as one more change. Images are store-relative paths, as `penult info` lists them.",
    )
    p.add_argument("store")
    p.add_argument("images", nargs="*", help="image paths (store-relative)")
    p.add_argument(
        "--from", dest="from_file", metavar="FILE",
        help="image paths from a file: one per line, or a CSV with a 'path' column",
    )  # fmt: skip
    act = p.add_mutually_exclusive_group(required=True)
    act.add_argument("--validate", action="store_true", help="mark their labels validated")
    act.add_argument(
        "--move", metavar="TAXON",
        help="give them label TAXON (validated); coarser levels follow the stored taxonomy",
    )  # fmt: skip
    act.add_argument("--dubious", action="store_true", help="mark their labels dubious")
    act.add_argument(
        "--reject", metavar="CLASS",
        help="remember that they are not CLASS (`penult grow` proposes them no more)",
    )  # fmt: skip
    act.add_argument(
        "--undo", nargs="?", const=0, type=int, metavar="BATCH",
        help="take back the newest change not yet undone (or batch BATCH of --history)",
    )  # fmt: skip
    act.add_argument("--history", metavar="CSV", help="write every change as CSV ('-': stdout)")
    p.add_argument("--level", default="label", help="label level (column) to act on")
    p.add_argument("--who", help="annotator recorded with the change (default: your login)")
    p.add_argument(
        "--cluster", type=int, metavar="K",
        help="with --from a `penult clusters` CSV: only the images of cluster K",
    )  # fmt: skip
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
    from penult.extract import DEFAULT_BACKBONE, REGISTRY

    for s in REGISTRY.values():
        mark = "*" if s.name == DEFAULT_BACKBONE else " "
        print(f"{mark} {s.name:20s} {s.dim:5d}-d  {s.source}:{s.arch:22s} {s.description}")
    print(
        "* default; torchvision/timm weights load from their caches (download where online), or --weights FILE\n"
        "  any timm model: timm/<model>.<tag> (e.g. timm/vit_small_patch14_dinov2.lvd142m); "
        "open_clip image towers: open_clip/<arch>:<pretrained> (pip install 'penult[clip]')"
    )
    return 0


def _cmd_extract(args: argparse.Namespace) -> int:
    from penult.core import OptionError
    from penult.extract import ExtractOptions, extract, open_source

    if args.shard and args.cluster:
        raise OptionError("--shard and --cluster are two ways to split a run; use one")
    source = open_source(
        args.input, root=args.root, taxonomy=args.taxonomy, split=args.split,
        sample_level=args.sample_level, samples=args.samples, chunk=args.list_chunk,
    )  # fmt: skip
    opts = _options(args, ExtractOptions)
    summary = extract(args.store, source, opts)
    for note in source.notes:  # (a folder's notes are complete once every piece is listed)
        print(note)
    print(summary.report())
    if args.shard:
        print(
            f"shard {args.shard[0]}/{args.shard[1]} written as a part; `penult merge {args.store}` publishes the finished parts"
        )
    return 130 if summary.interrupted else 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from penult.features import Publishing, merge

    rejected: list[str] = []
    report = Publishing()
    parts, shards = merge(args.store, rejected, report)
    for r in rejected:
        print(f"REJECTED: {r}")
    print(f"{args.store}: merged {parts} part(s) ({shards} journal shards)")
    for line in report.lines():
        print(f"  {line}")
    return 1 if rejected else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from penult.features import describe

    print(describe(args.store))
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from penult.classify.csvout import SafeWriter, open_csv
    from penult.core import OptionError
    from penult.features import review

    if args.history:
        rows = review.history_table(args.store)
        out = sys.stdout if args.history == "-" else open_csv(args.history)
        with contextlib.nullcontext(out) if out is sys.stdout else out:
            w = SafeWriter(out)
            w.writerow(review.HISTORY_FIELDS)
            w.writerows([r[k] for k in review.HISTORY_FIELDS] for r in rows)
        if out is not sys.stdout:
            print(f"{args.history}: {len(rows)} changes")
        return 0
    if args.undo is not None:
        print(review.undo(args.store, args.undo or None, who=args.who).summary())
        return 0
    picked = review.read_paths(args.from_file, cluster=args.cluster) if args.from_file else []
    images = list(args.images) + picked
    if not images:
        raise OptionError("name the images: paths after the store, or --from FILE")
    if args.reject:
        from penult.classify.clusters import reject

        reject(args.store, images, args.reject, level=args.level, who=args.who)
        print(f"{len(images)} images remembered as not {args.reject!r}")
        return 0
    if args.validate:
        b = review.validate(args.store, images, level=args.level, who=args.who)
    elif args.dubious:
        b = review.mark_dubious(args.store, images, level=args.level, who=args.who)
    else:
        b = review.move(args.store, images, args.move, level=args.level, who=args.who)
    print(b.summary())
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from penult.features import check, upgrade

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
    from penult.extract import DEFAULT_BACKBONE

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
    from penult.classify.report import headline_rows

    for k, v in headline_rows(m):
        print(f"  {k:32s} {v}")


def _out_folder(path: str) -> None:
    from penult.core import check_out_folder

    check_out_folder(path)


def _cmd_train(args: argparse.Namespace) -> int:
    from penult.classify import TrainOptions, save_model, train

    _out_folder(args.out)
    if args.report:
        _out_folder(args.report)
    if args.no_refit and args.cv:
        from penult.core import OptionError

        raise OptionError(
            "--cv scores by folds and saves a model fitted on every labelled image; there is no "
            "split model for --no-refit to keep (drop one of them)"
        )
    if args.out_of_core:
        from penult.classify.outofcore import StreamOptions, train_out_of_core

        so = _options(args, StreamOptions)
        r = train_out_of_core(args.store, _options(args, TrainOptions, refit_all=False), so)
        r.notes.append("out of core: the saved model is the train split's (it is not refit)")
    else:
        r = train(args.store, _options(args, TrainOptions, refit_all=not args.no_refit))
    for note in r.notes:
        print(note)
    m = r.model.manifest
    print(
        f"{m.kind} {m.head} on {' + '.join(r.model.backbones)} ({m.feature_dim}-d): "
        f"{len(r.model.classes)} classes, {r.n_train} training images, fit {r.fit_seconds:.1f} s"
    )
    if r.search:
        print(f"  CV search ({r.search['folds']} folds): best {r.search['best']}")
        for row in r.search["results"]:
            print(f"    {row['params']}: CV accuracy {row['cv_accuracy']:.3f}")
    if r.cv:
        print(
            f"{r.cv['folds']}-fold stratified cross-validation over {r.n_eval} labelled images "
            "(each image predicted by the fold model that did not see it):"
        )
        for k in ("top1", "top5", "balanced_accuracy", "macro_f1"):
            if k != "top5" or r.metrics["n_classes"] > 5:  # top-5 of 5 classes or fewer is 1
                print(
                    f"  {k:32s} {r.cv['mean'][k]:.3f} +- {r.cv['std'][k]:.3f} (mean +- sd of folds)"
                )
        print("pooled out-of-fold predictions:")
    else:
        print(f"{r.eval_split} split ({r.n_eval} images):")
    _print_metrics(r.metrics)
    nov = r.model.novelty
    if nov is not None:
        print(
            f"  'not one of my classes': {nov.score} score, threshold {nov.threshold:.4g} keeps "
            f"{nov.keep:.0%} of {nov.images} held-out known images"
        )
    path = save_model(r.model, args.out)
    print(f"saved {path} and {path}.json")
    if r.model.manifest.refit_all:
        print(
            f"  the saved model is refit on all {r.model.manifest.refit_all.images} labelled "
            "images; the scores above are its held-out estimate"
            + ("" if r.cv else " (--no-refit saves the scored split model instead)")
        )
    if args.report:
        _train_report(args, r)
    return 0


def _train_report(args: argparse.Namespace, r) -> None:
    from penult.classify.evaluate import write_training_report

    write_training_report(args.report, r, args.store)
    where = os.path.join(args.report, "report.md")
    print(f"report: {where} (and .html, PNGs, metrics.json, predictions.csv)")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from penult.classify import evaluate, load_model

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

    from penult.classify import HEADS, TrainOptions, compare, compare_table

    sets = [tuple(b.split("+")) for b in args.backbones] or [()]
    rows = compare(args.store, args.heads or list(HEADS), sets, _options(args, TrainOptions))
    print(compare_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def _model_first(command: str, model: str, inputs: list[str]) -> None:
    """Refuse ``penult CMD IMAGES MODEL``: the model (a file with its MODEL.json manifest beside
    it) comes first; said at once, naming both, instead of "no such model file"."""
    from penult.core import OptionError

    def is_model(p: str) -> bool:
        return os.path.isfile(p) and os.path.isfile(p + ".json")

    if is_model(model):
        return
    swapped = [p for p in inputs if is_model(p)]
    if swapped:
        others = " ".join([model, *[p for p in inputs if p != swapped[0]]])
        raise OptionError(
            f"{swapped[0]} is a model and {model} is not: the model comes first "
            f"(penult {command} {swapped[0]} {others} ...)"
        )


def _cmd_predict(args: argparse.Namespace) -> int:
    from penult.core import PenultError

    _out_folder(args.out)
    _model_first("predict", args.model, args.inputs)
    for src in args.inputs:  # said at once, not after seconds of importing torch and sklearn
        if not os.path.exists(os.path.expanduser(src)):
            raise PenultError(f"{src}: no such file or folder")
    from penult.classify import PredictOptions, load_model, predict_images, weights_for
    from penult.extract import Featuriser

    model = load_model(args.model, trust=args.trust_model)
    images = _options(args, Featuriser, weights=weights_for(model, args.weights))
    opts = _options(args, PredictOptions)
    print(predict_images(model, args.inputs, args.out, opts, images, fmt=args.fmt).report())
    for line in images.engines():  # what embedded the images the store did not hold
        print(f"  engine {line}")
    return 0


def _cmd_annotate(args: argparse.Namespace) -> int:
    from penult.classify import annotate_store, load_model

    model = load_model(args.model, trust=args.trust_model)
    print(annotate_store(model, args.store, everything=args.everything).report())
    return 0


def _cmd_next(args: argparse.Namespace) -> int:
    from penult.classify import label_queue, write_queue

    _out_folder(args.out)
    q = label_queue(
        args.store, n=args.n, level=args.level, similarity=args.similarity, backbone=args.backbone
    )
    write_queue(q, args.out)
    print(f"{args.out}: {len(q.paths)} of {q.candidates} unlabelled or predicted images, most "
          f"doubtful first; {q.skipped_similar} as doubtful left out as near-duplicates")  # fmt: skip
    return 0


def _cmd_clusters(args: argparse.Namespace) -> int:
    from penult.classify.clusters import find_clusters, write_clusters

    _out_folder(args.out)
    cs = find_clusters(
        args.store,
        level=args.level,
        backbone=args.backbone,
        min_size=args.min_size,
        pca=args.pca,
        method=args.method,
    )
    write_clusters(cs, args.out)
    print(f"{args.out}: {len(cs.members)} clusters of {cs.images} unlabelled images "
          f"({cs.unclustered} in none), largest first")  # fmt: skip
    for k, m in enumerate(cs.members[:5], 1):
        print(f"  cluster {k}: {len(m)} images, e.g. {m[0]}")
    return 0


def _cmd_grow(args: argparse.Namespace) -> int:
    from penult.classify.clusters import grow, write_proposal

    _out_folder(args.out)
    p = grow(args.store, args.label, n=args.n, level=args.level, backbone=args.backbone)
    write_proposal(p, args.out)
    print(f"{args.out}: {len(p.paths)} of {p.left} unlabelled images nearest to {p.label!r}")
    return 0


def _cmd_mistakes(args: argparse.Namespace) -> int:
    from penult.classify import MistakeOptions, find_mistakes, write_mistakes

    _out_folder(args.out)
    result = find_mistakes(args.store, _options(args, MistakeOptions))
    for note in result.ranking.notes:
        print(note)
    n = write_mistakes(result, args.out, top=args.top)
    r, order = result.ranking, result.ranking.order()
    print(f"{args.out}: {n} of {len(order)} labelled images, most suspicious first")
    for k in order[:5]:
        print(f"  {r.score[k]:.3f}  {result.paths[k]}  labelled {str(result.labels[k])!r}, "
              f"looks like {str(r.suggested[k])!r} ({r.suggested_p[k]:.2f})")  # fmt: skip
    return 0


def _cmd_count(args: argparse.Namespace) -> int:
    from penult.core import OptionError, PenultError

    _out_folder(args.out)
    if not args.inputs and not args.store:
        raise OptionError("name images, folders or manifests to count, or --store STORE")
    _model_first("count", args.model, args.inputs)
    for src in args.inputs:
        if not os.path.exists(os.path.expanduser(src)):
            raise PenultError(f"{src}: no such file or folder")
    from penult.classify import (
        CountOptions,
        PredictOptions,
        count_images,
        count_store,
        load_model,
        weights_for,
    )  # fmt: skip
    from penult.extract import Featuriser

    model = load_model(args.model, trust=args.trust_model)
    opts = _options(args, CountOptions)
    if not args.inputs:
        s = count_store(model, args.store, args.out, opts, chunk=args.chunk, progress=args.progress)
        print(s.report())
        return 0
    images = _options(args, Featuriser, weights=weights_for(model, args.weights))
    s = count_images(model, args.inputs, args.out, opts, _options(args, PredictOptions), images)
    print(s.report())
    for line in images.engines():
        print(f"  engine {line}")
    return 0


_INTERRUPTED = {
    "extract": "finished batches are committed to the store; run the same command again to resume",
    "finetune": "the last finished epoch is saved; run the same command again to resume",
    "predict": "no CSV was written (predict does not resume; with --store, stored embeddings "
    "are reused next time)",
    "count": "no CSV was written (with --store, stored embeddings are reused next time)",
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
    "label": _cmd_label,
    "demo": _cmd_demo,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "compare": _cmd_compare,
    "predict": _cmd_predict,
    "count": _cmd_count,
    "mistakes": _cmd_mistakes,
    "annotate": _cmd_annotate,
    "next": _cmd_next,
    "clusters": _cmd_clusters,
    "grow": _cmd_grow,
    "index": _cmd_index,
    "neighbors": _cmd_neighbors,
    "duplicates": _cmd_duplicates,
    "finetune": _cmd_finetune,
    "serve": _cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # names that are not UTF-8 print escaped, not crash
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    argv = sys.argv[1:] if argv is None else argv
    from penult.core.cluster import freeze_at_exit

    freeze_at_exit()  # `penult extract` exits 1-2 s sooner: no final collection over torch's objects
    args = build_parser(_command(argv), outline=True).parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from penult.core import PenultError

    terminated = []
    previous = _on_sigterm(args.command, terminated)
    try:
        with _warnings_summed_up(args.verbose):
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
        print(f"penult: {'terminated' if terminated else 'interrupted'}; {why}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _warnings_summed_up(verbose: bool):
    """Libraries' warnings (scikit-learn's ConvergenceWarning on every fold, ...) as one line
    per library at the end, with counts and one example, instead of ten lines mid-output; -v
    shows each as it comes."""
    import warnings

    if verbose:
        yield
        return
    seen: dict[str, list] = {}  # library -> [count, {category: count}, first message]

    def count(message, category, filename, lineno, file=None, line=None) -> None:
        parts = os.path.normpath(str(filename)).split(os.sep)
        lib = parts[parts.index("site-packages") + 1] if "site-packages" in parts else "penult"
        entry = seen.setdefault(lib, [0, {}, str(message).strip().split("\n")[0][:150]])
        entry[0] += 1
        entry[1][category.__name__] = entry[1].get(category.__name__, 0) + 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = count
        try:
            yield
        finally:
            for lib, (n, kinds, first) in seen.items():
                what = ", ".join(f"{k} x{c}" for k, c in kinds.items())
                print(f"note: {n} warning{'s' * (n > 1)} from {lib} ({what}), e.g. \"{first}\" "
                      "(-v shows each)", file=sys.stderr)  # fmt: skip


def _on_sigterm(command: str, terminated: list[int]):
    """SIGTERM (a timeout, SLURM preemption, `kill`) ends a command as Ctrl-C does: what it
    finished is kept and what it was writing is removed (no ``OUT.partial`` left), instead of
    the process vanishing mid-write. `serve` keeps uvicorn's own handling. Returns the handler
    it replaced (None where none was installed: not the main thread)."""
    if command == "serve" or threading.current_thread() is not threading.main_thread():
        return None

    def stop(signum, frame):
        terminated.append(signum)
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, stop)


if __name__ == "__main__":
    sys.exit(main())
