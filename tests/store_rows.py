"""Synthetic store rows for store tests, importable without torch: the kill tests' writer
processes start in a fraction of a second instead of importing torch through conftest."""

from __future__ import annotations

import numpy as np
from penult.features import StoreWriter

# A made-up backbone fingerprint for store tests that write synthetic rows.
FP = {
    "architecture": "test:net",
    "weights_sha256": "ab" * 32,
    "preprocessing": {"crop": 4},
    "layer": "x",
    "dim": 8,
    "precision": "fp32",
}


def synthetic_rows(k: int, n: int = 20) -> tuple[list[str], list[str], np.ndarray]:
    ids = range(k * n, k * n + n)
    x = np.stack([np.random.default_rng(i).normal(size=8) for i in ids]).astype(np.float32)
    return [f"d{i % 7}/{i:05d}.jpg" for i in ids], [f"{i + 1:064x}" for i in ids], x


def add_rows(w: StoreWriter, k: int) -> None:
    paths, sha, x = synthetic_rows(k)
    n = len(paths)
    w.upsert_images(
        paths, ["/r"] * n, sha, np.arange(n), np.arange(n), {"label": [p[:2] for p in paths]}
    )
    w.register_backbone("net", {**FP, "dim": 8})
    w.append("net", paths, sha, x, width=np.full(n, 3), height=np.full(n, 4))
