"""Fine-tuning benchmark on cub100: frozen vs fine-tuned EfficientNet-Lite0 embeddings, LR heads.

    .venv/bin/python benchmarks/finetune_bench.py                  # every run in RUNS (hours on CPU)
    .venv/bin/python benchmarks/finetune_bench.py --runs lpft3     # one run, plus the frozen baselines

Each run is one `penult finetune` command on bench-out/cub100.h5 (made by classify_bench.py); a run
whose card says it finished is not trained again. Then a flat and a hierarchical (family > genus >
species) logistic regression is trained on the stored split for the frozen entries and for every
run's `<base>@ft-<hash>` entry. Results go to bench-out/finetune.json; the table printed is the one
in docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from penult.classify import TrainOptions, train  # noqa: E402
from penult.classify.data import eval_mask, load_dataset  # noqa: E402
from scipy.stats import binomtest  # noqa: E402

OUT = ROOT / "bench-out"
STORE = OUT / "cub100.h5"
FROZEN = {"efficientnet_lite0": "weights' crop", "efficientnet_lite0@crop100": "whole image"}
RUNS: dict[str, list[str]] = {  # name -> extra `penult finetune` arguments, in the order tried
    "ft1": ["--epochs", "5", "--head-init", "random", "--bn-train"],
    "ft2": ["--unfreeze", "2", "--epochs", "8", "--head-init", "random", "--bn-train"],
    "ft3": ["--unfreeze", "2", "--epochs", "8", "--crop-pct", "1.0", "--bn-train"],
    "lpft2": ["--unfreeze", "2", "--epochs", "8", "--crop-pct", "1.0"],
    "lpft7": ["--unfreeze", "7", "--epochs", "10", "--crop-pct", "1.0"],
    "lpft7aux": [
        "--unfreeze",
        "7",
        "--epochs",
        "10",
        "--crop-pct",
        "1.0",
        "--aux-level",
        "genus",
        "--aux-stage",
        "3",
        "--hard-mining",
        "0.5",
    ],  # fmt: skip
}


def finetuned(name: str, args: list[str]) -> tuple[str, dict]:
    """Run (or reuse) one fine-tune; returns its store entry and its card."""
    ckpt = OUT / f"cub100_{name}.safetensors"
    card_path = Path(f"{ckpt}.json")
    done = card_path.exists() and json.loads(card_path.read_text()).get("finished")
    if not done:
        cmd = [sys.executable, "-m", "cli", "finetune", str(STORE), "--out", str(ckpt), *args]
        subprocess.run(cmd, check=True, cwd=ROOT)
    card = json.loads(card_path.read_text())
    return f"{card['base_backbone']}@ft-{card['weights_sha256'][:8]}", card


def heads(entry: str) -> dict:
    """Flat and hierarchical LR accuracies, plus which test images the flat head got right."""
    flat = train(STORE, TrainOptions(backbones=(entry,), levels=("family", "genus")))
    hier = train(
        STORE, TrainOptions(backbones=(entry,), levels=("family", "genus"), hierarchical=True)
    )
    acc = {}
    for kind, r in (("flat", flat), ("hierarchical", hier)):
        lv = r.metrics["levels"]["accuracy"]
        acc[kind] = {"species": r.metrics["top1"], "genus": lv["genus"], "family": lv["family"]}
    data = load_dataset(STORE, (entry,))
    ev, _ = eval_mask(data.column("split"))
    right = flat.metrics["predictions"].label == data.column("label")[ev]
    acc["right"] = dict(zip(np.array(data.paths)[ev].tolist(), right.tolist(), strict=True))
    return acc


def mcnemar(a: dict[str, bool], b: dict[str, bool]) -> tuple[int, int, float]:
    """(images only a got right, only b got right, exact two-sided McNemar p)."""
    only_a = sum(a[k] and not b[k] for k in a)
    only_b = sum(b[k] and not a[k] for k in a)
    return only_a, only_b, binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    args = ap.parse_args()
    rows = [{"entry": e, "what": f"frozen ({w})", **heads(e)} for e, w in FROZEN.items()]
    for name in args.runs:
        entry, card = finetuned(name, RUNS[name])
        curve = card["curve"]
        rows.append(
            {
                "entry": entry,
                "what": f"{name}: {' '.join(RUNS[name])}",
                "epochs": len(curve),
                "best_val_acc": max(c["val_acc"] for c in curve),
                "min_per_epoch": sorted(c["seconds"] for c in curve)[len(curve) // 2] / 60,
                **heads(entry),
            }
        )
    base = rows[1]["right"]  # frozen whole-image embeddings: what fine-tuning has to beat
    for r in rows[2:]:
        r["vs_frozen"] = mcnemar(r["right"], base)
    (OUT / "finetune.json").write_text(
        json.dumps([{k: v for k, v in r.items() if k != "right"} for r in rows], indent=1)
    )
    print(
        "| embeddings | flat LR species | genus | family | hierarchical species | genus | family "
        "| only ft right / only frozen right, McNemar p |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        f, h = r["flat"], r["hierarchical"]
        mc = "{} / {}, p={:.2g}".format(*r["vs_frozen"]) if "vs_frozen" in r else ""
        print(
            f"| {r['what']} (`{r['entry']}`) | {f['species']:.3f} | {f['genus']:.3f} | "
            f"{f['family']:.3f} | {h['species']:.3f} | {h['genus']:.3f} | {h['family']:.3f} | {mc} |"
        )
    for r in rows[2:]:
        print(
            f"{r['what']}: {r['epochs']} epochs, {r['min_per_epoch']:.1f} min/epoch, "
            f"best val acc {r['best_val_acc']:.3f}"
        )


if __name__ == "__main__":
    main()
