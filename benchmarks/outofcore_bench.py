"""Out-of-core training vs in-memory training on real features (issue 9: within 1.5 points).

    .venv/bin/python benchmarks/outofcore_bench.py        # cub100 and ndsb_plankton, ~5 minutes here

Stores are extracted into bench-out/ when missing (EfficientNet-Lite0, as in classify_bench.py).
Each head is trained in memory (``penult train``) and out of core (``penult train --out-of-core``,
64 MB of features held at once) on the same stored split; the table printed is the one in
docs/BENCHMARKS.md. Also shown: ``SGDClassifier`` (log loss, the same passes and buffers), which is
one-vs-rest and was measured here as the first candidate for the streamed linear head.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from classify_bench import DATA, OUT, ensure_store  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.classify.data import stream_dataset  # noqa: E402
from penult.classify.outofcore import StreamOptions, shuffle_buffers, train_out_of_core  # noqa: E402
from sklearn.linear_model import SGDClassifier  # noqa: E402


def sgd_top1(store: Path, so: StreamOptions) -> tuple[float, float]:
    """The SGDClassifier alternative, streamed exactly like the default streamed lr."""
    from sklearn.preprocessing import StandardScaler

    d = stream_dataset(store, ["efficientnet_lite0"])
    y, split = d.column("label"), d.column("split")
    tr, ev = np.flatnonzero(split == "train"), np.flatnonzero(split == "test")
    t = time.perf_counter()
    sc = StandardScaler()
    for _, X in d.blocks(tr, block_rows=4096):
        sc.partial_fit(X)
    clf = SGDClassifier(loss="log_loss", alpha=1 / (0.1 * len(tr)), random_state=0)
    rng = np.random.default_rng(0)
    classes = np.unique(y[tr])
    for _ in range(so.epochs):
        for X, yb in shuffle_buffers(d, tr, y, 1024, rng):
            clf.partial_fit(sc.transform(X), yb, classes=classes)
    secs = time.perf_counter() - t
    hits = [clf.predict(sc.transform(X)) == y[p] for p, X in d.blocks(ev, block_rows=4096)]
    return float(np.concatenate(hits).mean()), secs


def row(store: Path, head: str, so: StreamOptions) -> dict:
    mem = train(store, TrainOptions(head=head))
    t = time.perf_counter()
    ooc = train_out_of_core(store, TrainOptions(head=head), so)
    return {
        "head": head,
        "n_train": mem.n_train,
        "n_test": mem.n_eval,
        "in_memory_top1": mem.metrics["top1"],
        "in_memory_fit_s": mem.fit_seconds,
        "out_of_core_top1": ooc.metrics["top1"],
        "out_of_core_fit_s": ooc.fit_seconds,
        "out_of_core_call_s": time.perf_counter() - t,
        "difference_points": 100 * (ooc.metrics["top1"] - mem.metrics["top1"]),
    }


def main() -> None:
    warnings.filterwarnings("ignore")
    so = StreamOptions(memory_mb=64)
    results = {
        "cpu": open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": ")
    }
    for name, folder in (("cub100", "cub100"), ("plankton", "ndsb_plankton")):
        store = OUT / f"{name}.h5"
        ensure_store(store, DATA / folder, "efficientnet_lite0")
        rows = [row(store, h, so) for h in ("lr", "centroid")]
        rows[0]["sgd_top1"], rows[0]["sgd_fit_s"] = sgd_top1(store, so)
        results[name] = rows
        for r in rows:
            print(
                f"{name:9s} {r['head']:9s} in-memory {r['in_memory_top1']:.4f} ({r['in_memory_fit_s']:.1f} s)"
                f"  out-of-core {r['out_of_core_top1']:.4f} ({r['out_of_core_fit_s']:.1f} s)"
                f"  diff {r['difference_points']:+.2f} pt"
                + (
                    f"  [SGDClassifier {r['sgd_top1']:.4f}, {r['sgd_fit_s']:.1f} s]"
                    if "sgd_top1" in r
                    else ""
                ),
                flush=True,
            )
    OUT.mkdir(exist_ok=True)
    (OUT / "outofcore.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
