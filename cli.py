"""`penult` command line: argument parsing and printing only; the work is in the packages."""

from __future__ import annotations

import argparse
import logging
import sys

EXAMPLES = """examples:
  penult demo                                   extract the embedded solar-cell images, print results
  penult extract birds.h5 data/cub100           ImageFolder tree; taxonomy.csv/split.csv auto-detected
  penult extract birds.h5 data/cub100 --backbone resnet50 --weights resnet50.pth
  penult info birds.h5
"""


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
    p.add_argument("--taxonomy", help="CSV: class,<coarse levels...> joined onto labels")
    p.add_argument("--split", help="CSV: path,split (train/val/test) stored with the labels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, help="loader processes (default: by device and cores)")
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
        type=int,
        default=512,
        help="rows per journal commit (the most a crash can lose)",
    )
    p.add_argument(
        "--retry-failed", action="store_true", help="try again images that failed in an earlier run"
    )
    p.add_argument(
        "--max-pixels",
        type=int,
        default=DEFAULT_MAX_PIXELS,
        help="larger images are refused as decompression bombs",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


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
        "--repair", action="store_true", help="merge a journal left by an interrupted run"
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

    listing = list_images(args.input, root=args.root, taxonomy=args.taxonomy, split=args.split)
    for note in listing.notes:
        print(note)
    opts = ExtractOptions(
        backbone=args.backbone, weights=args.weights, name=args.name, trust_checkpoint=args.trust_checkpoint,
        batch_size=args.batch_size, workers=args.workers, device=args.device, precision=args.precision, optimize=args.optimize,
        dtype=args.dtype, commit_every=args.commit_every, retry_failed=args.retry_failed,
        max_pixels=args.max_pixels, progress=not args.quiet,
    )  # fmt: skip
    summary = extract(args.store, listing, opts)
    print(summary.report())
    return 130 if summary.interrupted else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from features import describe

    print(describe(args.store))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from features import check

    problems = check(args.store, repair=args.repair)
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{args.store}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from demo import run_demo
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    from extract import SourceError, UnknownBackboneError, WeightsError
    from features import StoreError

    handler = {
        "backbones": _cmd_backbones,
        "extract": _cmd_extract,
        "info": _cmd_info,
        "check": _cmd_check,
        "demo": _cmd_demo,
    }
    try:
        return handler[args.command](args)
    except (
        SourceError,
        StoreError,
        WeightsError,
        UnknownBackboneError,
        ValueError,
        RuntimeError,
    ) as e:
        print(f"penult: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("penult: interrupted; committed work is kept, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
