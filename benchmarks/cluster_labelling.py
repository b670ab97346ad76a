"""Labelling a data set from scratch by clusters and growing (issue 32, part 5), with a scripted
reviewer that only accepts or rejects what penult proposes.

cub100's store (EfficientNet-Lite0, 5,902 images) is copied and every label level hidden. The
reviewer knows the true species (the original labels) and looks only at what a proposal shows:

1. clusters (`classify.find_clusters`), largest first: it names a cluster with the species of
   its most typical members (up to --show of them) when at least --pure of those shown are one
   species (one action labels every member), else passes (one action);
2. then rounds of growing (`classify.grow`): each labelled species proposes its --batch nearest
   unlabelled images; the reviewer accepts the batch when at least --pure of it is that species
   (one action labels them all) and rejects it otherwise (one action; remembered). It stops
   when a round accepts nothing or after --max-actions.

Reported: actions, images labelled, images per action, and the precision of the labels made
(against the hidden truth). The same actions go through the store as `penult label` makes them.

    .venv/bin/python benchmarks/cluster_labelling.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from mistakes_bench import store_for  # noqa: E402
from penult.classify.clusters import find_clusters, grow, reject  # noqa: E402
from penult.features import FeatureStore, StoreWriter, review  # noqa: E402


def hidden_copy(src: Path, dst: Path) -> dict[str, str]:
    """``src`` copied to ``dst`` with every label level emptied; returns path -> true label."""
    for old in dst.parent.glob(dst.name + "*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    shutil.copy(src, dst)
    shutil.copytree(f"{src}.segments", f"{dst}.segments")
    t = FeatureStore(dst).images()
    truth = dict(zip(t.path, t.labels["label"], strict=True))
    with StoreWriter(dst) as w:
        for col in t.labels:
            if col not in ("split", "sample"):
                w.set_labels(col, t.path, [""] * len(t.path))
    return truth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="cub100")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--show", type=int, default=50, help="typical members a cluster shows")
    ap.add_argument("--batch", type=int, default=20, help="images a grow proposal shows")
    ap.add_argument("--pure", type=float, default=0.9, help="share the reviewer needs to accept")
    ap.add_argument("--max-actions", type=int, default=400)
    args = ap.parse_args()
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    out = Path(args.out)
    store = out / "cluster_labelling" / f"{args.data}.h5"
    store.parent.mkdir(parents=True, exist_ok=True)
    truth = hidden_copy(store_for(args.data, out), store)
    t0 = time.perf_counter()
    actions, made, log = 0, {}, []

    cs = find_clusters(store)
    for members in cs.members:
        if actions >= args.max_actions:
            break
        shown = [truth[p] for p in members[: args.show]]
        species, count = np.unique(shown, return_counts=True)
        actions += 1
        if count.max() / len(shown) >= args.pure:
            name = str(species[count.argmax()])
            review.move(store, members, name)
            made |= dict.fromkeys(members, name)
    log.append(("clusters", actions, len(made)))

    while actions < args.max_actions:
        accepted = 0
        for name in sorted(set(made.values())):
            if actions >= args.max_actions:
                break
            p = grow(store, name, n=args.batch)
            if not p.paths:
                continue
            actions += 1
            if np.mean([truth[q] == name for q in p.paths]) >= args.pure:
                review.move(store, p.paths, name)
                made |= dict.fromkeys(p.paths, name)
                accepted += 1
            else:
                reject(store, p.paths, name)
        log.append(("grow round", actions, len(made)))
        if not accepted:
            break
    secs = time.perf_counter() - t0
    right = sum(truth[p] == v for p, v in made.items())
    print(f"\n{args.data}: {len(truth)} images, labels hidden; {len(cs.members)} clusters "
          f"({cs.unclustered} images unclustered)")  # fmt: skip
    for what, a, n in log:
        print(f"  after {what:10s}: {a:4d} actions, {n:5d} images labelled")
    print(f"  images per action {len(made) / max(actions, 1):.1f}, precision "
          f"{right / max(len(made), 1):.3f}, {secs / max(actions, 1):.2f} s per action "
          f"(proposal + write)")  # fmt: skip


if __name__ == "__main__":
    main()
