"""Extraction throughput: the textbook loop vs `penult extract` vs the model alone per engine vs
`penult predict`, same images, one run.

    .venv/bin/python benchmarks/extract_bench.py --limit 2000

Engines: torch (eager, channels_last, in the precision `auto` gives this CPU: bf16 where it has
native bf16, else fp32), ONNX Runtime and OpenVINO (when installed), each in the precision `auto`
runs it in; where the CPU has native bf16, torch fp32 and OpenVINO fp32 are timed too. `penult extract --engine auto`
runs end to end into a fresh store after a 64-image run has calibrated and exported (the one-off
cost, printed apart), then ``--repeat`` more times, each followed by a model-only timing of the
fastest engine: the best of each is compared too (a shared machine's speed drifts within a run).
`penult predict` scores the same images (no store: every image embedded) with a logistic
regression trained on them. Last, penult's loader feeds the fastest engine with nothing else
running (no store, no hashing): the most any end-to-end run can reach on these cores.

Textbook loop = what the torchvision transfer-learning tutorial teaches: ImageFolder-style dataset
with Resize/CenterCrop/ToTensor/Normalize, DataLoader(batch_size=32, num_workers=2), fp32, NCHW,
``torch.no_grad()``. Same network, same pre-logits layer, same images. resnet50 runs with random
weights (no pretrained file offline); speed does not depend on the weight values.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks_common import cpu_flags, cpu_seconds  # noqa: E402
from penult.extract import ExtractOptions, Featuriser, build_backbone, extract, list_images  # noqa: E402
from penult.extract.embed import make_embedder  # noqa: E402
from penult.extract.embedder import Embedder  # noqa: E402
from penult.extract.engines import RUNTIMES, cache_dir, cpu_has_bf16, installed  # noqa: E402
from penult.extract.loader import default_workers, make_loader  # noqa: E402
from penult.extract.sources import Listing  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cub100"


class _Files(Dataset):
    def __init__(self, files: list[str], tf):
        self.files, self.tf = files, tf

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        return self.tf(Image.open(self.files[i]).convert("RGB")), 0


def textbook(files: list[str], name: str, weights: str) -> float:
    bb = build_backbone(name, weights=weights)
    pre = bb.preprocess
    interp = transforms.InterpolationMode(pre.interpolation)
    tf = transforms.Compose(
        [
            transforms.Resize(pre.resize, interp),
            transforms.CenterCrop(pre.crop),
            transforms.ToTensor(),
            transforms.Normalize(pre.mean, pre.std),
        ]
    )
    model = bb.module.net.eval()
    loader = DataLoader(_Files(files, tf), batch_size=32, num_workers=2)
    n, t = 0, time.perf_counter()
    with torch.no_grad():
        for x, _ in loader:
            model(x)
            n += len(x)
    return n / (time.perf_counter() - t)


def embedder(name: str, weights: str, engine: str, batch: int) -> Embedder:
    """``engine`` is ENGINE or ENGINE/PRECISION (default: auto's precision)."""
    engine, _, precision = engine.partition("/")
    bb = build_backbone(name, weights=weights)
    return make_embedder(bb, engine=engine, precision=precision or "auto", batch_size=batch)


def model_only(name: str, weights: str, engine: str, batch: int = 32, images: int = 256):
    """(images/s of the engine alone on one uint8 batch, run over ``images``, its precision tag)."""
    emb = embedder(name, weights, engine, batch)
    crop = emb.backbone.preprocess.crop
    x = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8)
    emb(x)
    reps = max(1, images // batch)
    t = time.perf_counter()
    for _ in range(reps):
        emb(x)
    return batch * reps / (time.perf_counter() - t), emb.tag


def ceiling(files: list[str], name: str, weights: str, engine: str, batch: int = 32):
    """The loader and the engine alone, nothing else: no store, no hashing, no plan, no start-up
    in the timing. No `extract` on these cores can beat it, so ``ceiling / model-only`` says how
    much of the model-only rate a machine leaves once its cores also decode the images.
    (images/s, network process core-ms per image, loader processes core-ms per image)."""
    emb = embedder(name, weights, engine, batch)
    pre = emb.backbone.preprocess
    emb(torch.zeros((batch, 3, pre.crop, pre.crop), dtype=torch.uint8))
    loader = make_loader(files, pre, batch_size=batch, workers=default_workers(torch.device("cpu")))
    me, kids = cpu_seconds(), cpu_seconds(resource.RUSAGE_CHILDREN)
    n, t = 0, time.perf_counter()
    for b in loader:
        n += len(emb(b.images))
    wall = time.perf_counter() - t  # (the finished loop joined its processes: CPU counted)
    mine = (cpu_seconds() - me) * 1e3 / n
    return n / wall, mine, (cpu_seconds(resource.RUSAGE_CHILDREN) - kids) * 1e3 / n


def penult(listing: Listing, name: str, weights: str, d: Path):
    """(one-off calibration + export seconds, the end-to-end summary, the store)."""
    opts = ExtractOptions(backbone=name, weights=weights, engine="auto", progress=False)
    t = time.perf_counter()
    extract(d / "warm.h5", Listing(root=listing.root, paths=listing.paths[:64]), opts)
    once = time.perf_counter() - t
    return once, extract(d / f"{name}.h5", listing, opts), d / f"{name}.h5"


def best_of(listing: Listing, name: str, weights: str, engine: str, n: int):
    """(best end-to-end rate of ``n`` fresh-store runs, best model-only rate of ``engine`` timed
    before and after each on as many images): the least disturbed run of each. The machines here
    are shared: the same model-only timing drifted from 83 to 153 img/s within one minute, so one
    run of each, minutes apart, compares the machine's moods as much as the code (timeit takes the
    best too). Model-only runs over as many images as end to end: a short burst is likelier to
    catch a quiet moment, which would favour it."""
    k = len(listing)
    mo, e2e = [model_only(name, weights, engine, images=k)[0]], []
    opts = ExtractOptions(backbone=name, weights=weights, engine="auto", progress=False)
    for _ in range(n):
        with tempfile.TemporaryDirectory() as d:
            e2e.append(extract(Path(d) / "s.h5", listing, opts).images_per_s)
        mo.append(model_only(name, weights, engine, images=k)[0])
    return max(e2e), max(mo), e2e, mo


def predict_rate(store: Path, name: str, files: list[str], d: Path) -> float:
    """`penult predict` (no store, every image through the network) over ``files``."""
    from penult.classify import PredictOptions, TrainOptions, predict_images, save_model, train
    from penult.features import StoreWriter

    listing_labels = [Path(f).parent.name for f in files]
    with StoreWriter(store) as w:
        w.set_labels("label", [str(Path(*Path(f).parts[-2:])) for f in files], listing_labels)
    model = train(store, TrainOptions(backbones=(name,), label="label")).model
    save_model(model, d / "m.skops")
    (d / "files.txt").write_text("\n".join(files) + "\n")
    s = predict_images(
        model, [str(d / "files.txt")], d / "out.csv", PredictOptions(progress=False),
        Featuriser(engine="auto"),
    )  # fmt: skip
    assert s.scored == len(files), s.report()
    return s.scored / s.seconds


def as_avx2() -> None:
    """Run on as if this CPU had AVX2 and no native bf16 (see --as-avx2)."""
    global cpu_has_bf16
    held = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
    if any(os.environ.get(k) != v for k, v in held.items()):  # read when the libraries load
        own = {"PENULT_ENGINE_CACHE": str(cache_dir() / "as-avx2")}  # its calibrations apart
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **held, **own})
    import penult.extract.engines as engines
    import penult.extract.model as model

    cpu_has_bf16 = engines.cpu_has_bf16 = model.cpu_has_bf16 = lambda: False


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument(
        "--limit", type=int, default=2000, help="images (every k-th file of the folder)"
    )
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet50"])
    ap.add_argument("--no-predict", action="store_true", help="skip the predict column")
    ap.add_argument(
        "--repeat",
        type=int,
        default=2,
        help="more end-to-end runs, each followed by a model-only timing of the fastest engine: "
        "the best of each compared (shared machines drift)",
    )
    ap.add_argument(
        "--as-avx2",
        action="store_true",
        help="on a CPU with AVX-512/AMX, stand in for an AVX2-only one: oneDNN's and torch's "
        "kernels held to AVX2 (this script runs again with ONEDNN_MAX_CPU_ISA=AVX2 "
        "ATEN_CPU_CAPABILITY=avx2) and penult told there is no native bf16. A proxy, not an "
        "AVX2 machine: the cores, caches and clock are still this CPU's",
    )
    ap.add_argument(
        "--ratio-only",
        action="store_true",
        help="only `extract --engine auto` end to end against the loader and auto's engine "
        "alone (no textbook loop, no other engine, no predict): the ratio on a longer run",
    )
    args = ap.parse_args()
    if args.as_avx2:
        as_avx2()
    full = list_images(args.data)
    step = max(1, len(full) // args.limit)
    keep = list(range(0, len(full), step))[: args.limit]
    listing = Listing(root=full.root, paths=[full.paths[i] for i in keep])
    files = [listing.absolute(i) for i in range(len(listing))]
    print(
        f"{len(files)} images from {args.data}; torch {torch.__version__}, {os.cpu_count()} CPUs "
        f"(flags: {cpu_flags()}), threads {torch.get_num_threads()}"
        + (", held to AVX2 without bf16 (--as-avx2)" if args.as_avx2 else "")
    )
    engines = ["torch", *(e for e in RUNTIMES if installed(e))]
    if cpu_has_bf16():  # what auto's bf16 is weighed against
        engines[1:1] = ["torch/fp32"]
        engines += ["openvino/fp32"] if installed("openvino") else []
    rows = []
    for name in args.backbones:
        weights = "pretrained" if name == "efficientnet_lite0" else "random"
        base = textbook(files, name, weights) if not args.ratio_only else float("nan")
        mo = {e: model_only(name, weights, e) for e in engines if not args.ratio_only}
        with tempfile.TemporaryDirectory() as d:
            once, s, store = penult(listing, name, weights, Path(d))
            skip = args.no_predict or args.ratio_only
            pr = predict_rate(store, s.backbone, files, Path(d)) if not skip else 0.0
        if args.ratio_only:  # auto's engine stands for the fastest
            mo = {s.engine: model_only(name, weights, s.engine)}
        fastest = max(mo, key=lambda e: mo[e][0])
        best = best_of(listing, name, weights, fastest, args.repeat) if args.repeat else None
        top, net_ms, loader_ms = ceiling(files, name, weights, fastest)
        print(f"{name}: loader + {fastest} alone {top:.1f} img/s = {top / mo[fastest][0]:.2f}x "
              f"its model-only; CPU per image: network process {net_ms:.2f} ms, loader processes "
              f"{loader_ms:.2f} ms")  # fmt: skip
        rows.append((name, base, mo, once, s, pr, best, top / mo[fastest][0]))
        runs = [s.images_per_s, *(best[2] if best else [])]
        print(f"{name}: extract end to end / (loader + {fastest} alone): "
              + ", ".join(f"{r / top:.3f}x" for r in runs)
              + f" (runs: {', '.join(f'{r:.1f}' for r in runs)} img/s; best {max(runs) / top:.3f}x)")  # fmt: skip
        if best:
            print(f"{name}: end to end {[round(r, 1) for r in best[2]]}, {fastest} model-only "
                  f"{[round(r, 1) for r in best[3]]}: best / best {best[0] / best[1]:.3f}")  # fmt: skip
        print(f"{name}: textbook {base:.1f}, model-only "
              + ", ".join(f"{e} {r:.1f} ({tag})" for e, (r, tag) in mo.items())
              + f"; extract --engine auto {s.images_per_s:.1f} (steady {s.steady_images_per_s:.1f}, "
              f"{s.engine}; {s.engine_note}); once {once:.1f} s; predict {pr:.1f} img/s", flush=True)  # fmt: skip
    if args.ratio_only:
        return
    cols = " | ".join(f"model only: {e}" for e in engines)
    print(f"\n| backbone | textbook loop (fp32, NCHW) | {cols} | `extract --engine auto` end to end "
          "(engine) | / fastest model-only | best of repeats | / textbook | steady | `predict` "
          "| predict / extract | loader + engine alone / model-only |")  # fmt: skip
    print("|---" * (10 + len(engines)) + "|")
    for name, base, mo, once, s, pr, bo, top in rows:  # once: export + calibration, before the run
        best = max(r for r, _ in mo.values())
        cells = " | ".join(f"{r:.1f} ({tag})" for r, tag in mo.values())
        print(
            f"| {name} | {base:.1f} | {cells} | **{s.images_per_s:.1f}** ({s.precision} {s.engine}, {s.seconds:.1f} s; first run +{once:.0f} s) "
            f"| {s.images_per_s / best:.2f}x | {bo[0] / bo[1] if bo else float('nan'):.2f}x "
            f"| {s.images_per_s / base:.2f}x | {s.steady_images_per_s:.1f} "
            f"| {pr:.1f} | {pr / s.images_per_s:.2f}x | {top:.2f}x |"
        )


if __name__ == "__main__":
    main()
