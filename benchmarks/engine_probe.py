"""CPU engines model-only (issue 15): penult's pre-logits module exported to ONNX (as `--engine`
does) and run by ONNX Runtime and OpenVINO (when installed) beside torch eager, in one process.

    .venv/bin/python benchmarks/engine_probe.py [BACKBONE] [--weights random]

Model only (uint8 batch of 32 in, embeddings out; normalisation is inside the graph), 2 threads,
two rounds each so drift shows. Prints the export time, the lowest cosine between the engines'
embeddings, and each round's rates and ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402
from penult.extract import build_backbone  # noqa: E402


def rate(f, batch: int, n: int = 4) -> float:
    f()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        f()
    return batch * n / (time.perf_counter() - t)


def main() -> None:
    import onnxruntime as ort
    from penult.extract.engines import RUNTIMES, installed, lowest_cosine, make_runner, onnx_file

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone", nargs="?", default="efficientnet_lite0")
    ap.add_argument("--weights", default="pretrained", help="pretrained, random or a file")
    a = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}; onnxruntime {ort.__version__}", flush=True)  # fmt: skip
    torch.set_num_threads(2)
    os.environ.setdefault("PENULT_ENGINE_CACHE", tempfile.mkdtemp())
    bb = build_backbone(a.backbone, weights=a.weights)
    m = bb.module.eval()
    size = bb.preprocess.crop
    x = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8)
    t = time.perf_counter()
    path = onnx_file(bb)  # penult's own export (what --engine uses)
    print(f"export {time.perf_counter() - t:.1f} s, {path.stat().st_size >> 20} MiB")
    with torch.inference_mode():
        ref = m(x).numpy()
    runners = {e: make_runner(e, path, 2) for e in RUNTIMES if installed(e)}
    for e, run in runners.items():
        print(f"lowest cosine, {e} vs torch: {lowest_cosine(ref, run(x.numpy())):.7f}")
    for r in range(2):
        with torch.inference_mode():
            r_t = rate(lambda: m(x), len(x))
        rates = {e: rate(lambda run=run: run(x.numpy()), len(x)) for e, run in runners.items()}
        print(f"round {r}: torch eager {r_t:.1f} img/s, "
              + ", ".join(f"{e} {v:.1f} img/s (x{v / r_t:.2f})" for e, v in rates.items()))  # fmt: skip


if __name__ == "__main__":
    main()
