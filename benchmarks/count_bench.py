"""How close `penult count` gets to a sample's true composition (issue 31, part 6).

A logistic regression is trained (with its quantifier calibration, as `penult train` makes it)
on the training split of a real data set; then 100 samples of 500 images are drawn from the
held-out split with class frequencies from a Dirichlet(0.5) over the classes (every sample a
prior shift away from the balanced-ish training set; images of a class drawn with replacement,
the held-out split having 3-30 per class). Per method: the mean absolute error of the class
proportions and the Bray-Curtis dissimilarity to the true composition, the share of (sample,
class) pairs whose 95% bootstrap interval holds the true proportion, and seconds per sample
(point estimate; with the bootstrap).

    .venv/bin/python benchmarks/count_bench.py                 # ndsb_plankton and cub100
    .venv/bin/python benchmarks/count_bench.py --data ndsb_plankton --samples 20

Stores are extracted into bench-out/ on first use (minutes on a 2-core CPU).
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
from penult.classify import TrainOptions, load_dataset, train  # noqa: E402
from penult.classify.quantify import METHODS, Calibration, Tally  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent.parent / "shared" / "data"))


def held_out(store: Path, seed: int) -> tuple[np.ndarray, np.ndarray, list[str], Calibration]:
    """Posteriors and true labels of the held-out split, the classes, and the calibration of a
    model trained on the training split only."""
    r = train(store, TrainOptions(seed=seed, unknown_score="none"))  # posteriors are what count
    model = r.model
    d = load_dataset(store, model.backbones)
    row = {p: i for i, p in enumerate(d.paths)}
    idx = np.array([row[p] for p in r.paths])
    post = model.predict(d.X[idx]).proba
    cal = Calibration.from_json(model.manifest.quantifier)
    print(
        f"  {store.name}: {len(model.classes)} classes, {r.n_train} training images, "
        f"{len(idx)} held out, top-1 {r.metrics['top1']:.3f}, calibration over {cal.folds} folds"
    )
    return post, np.asarray(r.truth).astype(str), model.classes.tolist(), cal


def run(store: Path, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    post, truth, classes, cal = held_out(store, args.seed)
    c = len(classes)
    y = np.searchsorted(np.asarray(classes), truth)
    by_class = [np.flatnonzero(y == j) for j in range(c)]
    present = np.array([len(b) > 0 for b in by_class])
    rng = np.random.default_rng(args.seed)
    rows: dict[str, dict[str, list[float]]] = {
        m: {"mae": [], "bc": [], "cover": [], "point_s": [], "boot_s": []} for m in METHODS
    }
    for _ in range(args.samples):
        mix = np.zeros(c)
        mix[present] = rng.dirichlet(np.full(int(present.sum()), args.alpha))
        n = rng.multinomial(args.size, mix)
        idx = np.concatenate([rng.choice(by_class[j], n[j]) for j in range(c) if n[j]])
        t = n / n.sum()
        p_img = post[idx]
        win = p_img.argmax(1)
        for m in METHODS:
            tally = Tally(c, args.size, np.random.default_rng(0), args.size)
            tally.add(p_img, win)
            t0 = time.perf_counter()
            point = tally.estimate(m, cal, 0).proportion[:c]
            t1 = time.perf_counter()
            e = tally.estimate(m, cal, args.bootstrap)
            t2 = time.perf_counter()
            r = rows[m]
            r["mae"].append(np.abs(point - t).mean())
            r["bc"].append(np.abs(point - t).sum() / (point + t).sum())
            lo, hi = e.low[:c], e.high[:c]
            r["cover"].append(((lo - 1e-9 <= t) & (t <= hi + 1e-9)).mean())
            r["point_s"].append(t1 - t0)
            r["boot_s"].append(t2 - t1)
    return {m: {k: float(np.mean(v)) for k, v in r.items()} for m, r in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", action="append", help="data set under ../shared/data (repeatable)")
    ap.add_argument("--out", default="bench-out", help="folder of the benchmark's stores")
    ap.add_argument("--samples", type=int, default=100)
    ap.add_argument("--size", type=int, default=500, help="images per sample")
    ap.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    print(
        f"{args.samples} samples of {args.size} images per data set, class mix ~ "
        f"Dirichlet({args.alpha}), {args.bootstrap} bootstrap resamples"
    )
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    for name in args.data or ["ndsb_plankton", "cub100"]:
        store = out / f"count_{name}.h5"
        if not store.exists():
            src = DATA / name
            tax = src / "taxonomy.csv"
            split = src / "split.csv"
            listing = list_images(
                src,
                taxonomy=tax if tax.exists() else None,
                split=split if split.exists() else None,
            )
            extract(store, listing, ExtractOptions(progress=False))
        res = run(store, args)
        cc = res["cc"]["mae"]
        print(f"\n{name}")
        print(f"  {'method':6s} {'MAE':>8s} {'x CC':>6s} {'Bray-Curtis':>12s} {'95% cover':>10s} "
              f"{'ms/sample':>10s} {'with bootstrap':>15s}")  # fmt: skip
        for m, r in res.items():
            print(
                f"  {m:6s} {r['mae']:8.5f} {r['mae'] / cc:6.2f} {r['bc']:12.4f} "
                f"{r['cover']:10.3f} {1000 * r['point_s']:10.1f} {r['boot_s']:13.2f} s"
            )


if __name__ == "__main__":
    main()
