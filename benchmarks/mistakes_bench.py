"""How well `penult mistakes` finds planted label noise (issue 32, part 4).

Flip 5% of a data set's labels, each to another class drawn uniformly (seeded), then rank every
image with `classify.rank_labels` and report precision and recall at k = the number flipped (the
two are equal there), for penult's ranking and for each of its two signals alone. The plain
ranking by out-of-fold self-confidence of a 5-fold logistic regression (the probability it gives the
stored label) is the baseline the issue names; it is measured here in the same run.

    .venv/bin/python benchmarks/mistakes_bench.py                  # cub100 and ndsb_plankton
    .venv/bin/python benchmarks/mistakes_bench.py --data cub100 --noise 0.1

Stores are extracted into bench-out/ on first use (minutes on a 2-core CPU), shared with
count_bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from count_bench import DATA  # noqa: E402
from penult.classify import MistakeOptions, load_dataset, rank_labels  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402


def store_for(name: str, out: Path) -> Path:
    store = out / f"count_{name}.h5"
    if not store.exists():
        src = DATA / name
        tax, split = src / "taxonomy.csv", src / "split.csv"
        listing = list_images(
            src, taxonomy=tax if tax.exists() else None, split=split if split.exists() else None
        )
        extract(store, listing, ExtractOptions(progress=False))
    return store


def planted(y: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with ``share`` of them flipped to another class (uniform), and which were."""
    classes, code = np.unique(y, return_inverse=True)
    rng = np.random.default_rng(seed)
    flip = rng.choice(len(y), int(round(share * len(y))), replace=False)
    noisy = code.copy()
    noisy[flip] = (code[flip] + rng.integers(1, len(classes), len(flip))) % len(classes)
    wrong = np.zeros(len(y), bool)
    wrong[flip] = True
    return classes[noisy], wrong


def precision_at_k(score: np.ndarray, wrong: np.ndarray) -> float:
    """Share of the k = wrong.sum() highest scores that are planted (NaN scores last)."""
    s = np.where(np.isnan(score), -np.inf, score)
    top = np.argsort(-s, kind="stable")[: int(wrong.sum())]
    return float(wrong[top].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="data set under ../shared/data (repeatable)")
    ap.add_argument("--out", default="bench-out", help="folder of the benchmark's stores")
    ap.add_argument("--noise", type=float, default=0.05, help="share of labels flipped")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for name in args.data or ["cub100", "ndsb_plankton"]:
        store = store_for(name, out)
        backbone = sorted(FeatureStore(store).backbones())[0]
        d = load_dataset(store, [backbone])
        noisy, wrong = planted(np.asarray(d.column("label")).astype(str), args.noise, args.seed)
        t0 = time.perf_counter()
        r = rank_labels(d.X, noisy, MistakeOptions(seed=args.seed))
        secs = time.perf_counter() - t0
        base = rank_labels(d.X, noisy, MistakeOptions(seed=args.seed, head="lr"))
        k = int(wrong.sum())
        print(f"\n{name}: {len(noisy)} images, {len(np.unique(noisy))} labels, {k} flipped "
              f"({args.noise:.0%}), ranked in {secs:.1f} s")  # fmt: skip
        print(f"  {'ranking':54s} {'precision = recall at k':>24s}")
        for what, s in (
            ("baseline: 5-fold logistic regression, self-confidence", -base.self_confidence),
            ("5-fold calibrated SVM, self-confidence", -r.self_confidence),
            ("neighbour margin alone", r.neighbour_margin),
            ("penult mistakes with --head lr", base.score),
            ("penult mistakes (default: SVM + neighbours)", r.score),
        ):
            print(f"  {what:54s} {precision_at_k(s, wrong):24.3f}")


if __name__ == "__main__":
    main()
