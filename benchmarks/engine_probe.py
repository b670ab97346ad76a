"""Groundwork for issue 15 (CPU engines): penult's pre-logits module exported to ONNX and run by
ONNX Runtime's CPU provider, against the same module in torch eager, in one process.

    .venv/bin/pip install onnxruntime==1.32.0 onnx==1.23.2 onnxscript==0.7.2   # not yet a dependency
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

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402

from extract import build_backbone  # noqa: E402


def rate(f, batch: int, n: int = 4) -> float:
    f()  # warm-up
    t = time.perf_counter()
    for _ in range(n):
        f()
    return batch * n / (time.perf_counter() - t)


def main() -> None:
    import onnxruntime as ort

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("backbone", nargs="?", default="efficientnet_lite0")
    ap.add_argument("--weights", default="pretrained", help="pretrained, random or a file")
    a = ap.parse_args()
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}; onnxruntime {ort.__version__}", flush=True)  # fmt: skip
    torch.set_num_threads(2)
    bb = build_backbone(a.backbone, weights=a.weights)
    m = bb.module.eval()
    size = bb.preprocess.crop
    x = torch.randint(0, 256, (32, 3, size, size), dtype=torch.uint8)
    path = Path(tempfile.mkdtemp()) / f"{a.backbone}.onnx"
    t = time.perf_counter()
    torch.onnx.export(m, (x,), path, input_names=["images"], output_names=["embedding"],
                      dynamic_axes={"images": {0: "n"}, "embedding": {0: "n"}}, dynamo=False,
                      opset_version=17)  # fmt: skip
    print(f"export {time.perf_counter() - t:.1f} s, {path.stat().st_size >> 20} MiB")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 2, 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        ref = m(x).numpy()
    got = sess.run(None, {"images": x.numpy()})[0]
    cos = (ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)
    print(f"lowest cosine, onnxruntime vs torch: {cos.min():.7f}")
    for r in range(2):
        with torch.inference_mode():
            r_t = rate(lambda: m(x), len(x))
        r_o = rate(lambda: sess.run(None, {"images": x.numpy()}), len(x))
        print(
            f"round {r}: torch eager {r_t:.1f} img/s, onnxruntime {r_o:.1f} img/s, x{r_o / r_t:.2f}"
        )


if __name__ == "__main__":
    main()
