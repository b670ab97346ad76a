"""How well "not one of my classes" works (issue 31, part 4): classes the model never saw.

20 of ndsb_plankton's 121 classes are held out entirely (seeded). A logistic regression (the
default head) is trained on the training split of the other 101. Its threshold per open-set
score is calibrated as `penult train` does it, on training data only (5 folds for
``mahalanobis``, leave-one-out for ``knn``, out-of-fold posteriors for ``msp``) to keep 95% of
known images. Then the known
classes' held-out split is scored (known) against every image of the 20 unseen classes (novel).
Per score: AUROC (known vs novel), the share of novel images flagged, the share of known images
kept at the calibrated threshold, and novel flagged at a threshold that keeps exactly 95% of the
held-out known images (the score's quality apart from its calibration).

    .venv/bin/python benchmarks/novelty_bench.py             # the count benchmark's ndsb store
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
from penult.classify import TrainOptions, load_dataset  # noqa: E402
from penult.classify.novelty import fit_novelty  # noqa: E402
from penult.classify.quantify import OutOfFold  # noqa: E402
from penult.classify.train import build_estimator  # noqa: E402
from penult.extract import ExtractOptions, extract, list_images  # noqa: E402
from penult.features import FeatureStore  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

DATA = Path(os.environ.get("PENULT_DATA", ROOT.parent.parent / "shared" / "data"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="bench-out/count_ndsb_plankton.h5")
    ap.add_argument("--data", default=str(DATA / "ndsb_plankton"))
    ap.add_argument("--novel", type=int, default=20, help="classes held out entirely")
    ap.add_argument("--keep", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    store = Path(args.store)
    if not store.exists():
        store.parent.mkdir(parents=True, exist_ok=True)
        extract(store, list_images(args.data), ExtractOptions(progress=False))
    backbone = sorted(FeatureStore(store).backbones())[0]
    d = load_dataset(store, [backbone])
    y = d.labels["label"].astype(str)
    split = d.labels["split"] if "split" in d.labels else None
    if split is None:  # the split `penult train` would make
        from penult.classify.train import train

        train(store, TrainOptions(quantifier_folds=0, unknown_score="none"))
        d = load_dataset(store, [backbone])
        split = d.labels["split"]
    classes = np.unique(y)
    novel_classes = np.random.default_rng(args.seed).choice(classes, args.novel, replace=False)
    novel = np.isin(y, novel_classes)
    tr = (split == "train") & ~novel
    known = (split != "train") & ~novel
    print(
        f"{store.name} ({backbone}): {len(classes) - args.novel} known classes, "
        f"{int(tr.sum())} training images, {int(known.sum())} held-out known, "
        f"{int(novel.sum())} novel images of {args.novel} unseen classes"
    )
    est = build_estimator(TrainOptions(), None, [])
    t = time.perf_counter()
    oof = OutOfFold.of(est, d.X[tr], y[tr], folds=5, seed=args.seed)
    est.fit(d.X[tr], y[tr])
    print(f"  fit + 5-fold out-of-fold posteriors: {time.perf_counter() - t:.1f} s")
    Xt = np.concatenate([d.X[known], d.X[novel]])
    is_novel = np.r_[np.zeros(int(known.sum()), bool), np.ones(int(novel.sum()), bool)]
    proba = est.predict_proba(Xt)
    print(
        f"  closed-set top-1 on held-out known: {(est.predict(d.X[known]) == y[known]).mean():.3f}"
    )
    candidates = (
        [("msp", {})]
        + [("knn", {"k": k, "dims": 128}) for k in (1, 10, 50)]
        + [("mahalanobis", {"dims": p}) for p in (64, 128, 256)]
    )
    print(
        f"\n  {'score':22s} {'AUROC':>6s} {'novel flagged':>14s} {'known kept':>11s} "
        f"{'flagged @95% kept (oracle)':>27s} {'fit s':>6s} {'ms/1k img':>9s}"
    )
    for score, kw in candidates:
        t0 = time.perf_counter()
        nov = fit_novelty(
            score, d.X[tr], args.keep, y=y[tr], out_of_fold=oof.posteriors, seed=args.seed, **kw
        )
        t1 = time.perf_counter()
        s = nov.scores(Xt, proba)
        t2 = time.perf_counter()
        auroc = roc_auc_score(is_novel, s)
        flagged = (s[is_novel] > nov.threshold).mean()
        kept = (s[~is_novel] <= nov.threshold).mean()
        oracle = (s[is_novel] > np.quantile(s[~is_novel], args.keep)).mean()
        name = score + "".join(f" {k}={v}" for k, v in kw.items())
        print(
            f"  {name:22s} {auroc:6.3f} {flagged:14.3f} {kept:11.3f} {oracle:27.3f} "
            f"{t1 - t0:6.1f} {1000 * (t2 - t1) / len(Xt) * 1000:9.1f}"
        )


if __name__ == "__main__":
    main()
