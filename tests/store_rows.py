"""Synthetic store rows for store tests, importable without torch: the kill tests' writer
processes start in a fraction of a second instead of importing torch through conftest."""

from __future__ import annotations

import contextlib
import random
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from penult.features import StoreWriter

ROOT = Path(__file__).resolve().parents[1]

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


def kill_loop(
    script: str,
    target: Path,
    *,
    kills: int,
    after_kill: Callable[[], None],
    wait: tuple[float, float] = (0.0, 0.6),
    args: Sequence[str] = (),
) -> None:
    """Start ``script`` (formatted with ``root`` and ``tests``) on ``target`` (then ``args``)
    and SIGKILL it at a random moment ``wait`` seconds after it prints "ready", ``kills``
    times."""
    code = script.format(root=str(ROOT), tests=str(ROOT / "tests"))
    rng = random.Random(0)
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", code, str(target), *args], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(*wait))
        proc.kill()
        proc.wait()
        after_kill()


@contextlib.contextmanager
def writer_held(store: Path) -> Iterator[None]:
    """Another process holds ``store``'s writer lock for the body of the ``with``."""
    code = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{str(ROOT)!r}]
        from penult.features import StoreWriter
        with StoreWriter(sys.argv[1]):
            print("ready", flush=True)
            time.sleep(30)
    """)
    hold = subprocess.Popen(
        [sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert hold.stdout.readline().strip() == "ready"
        yield
    finally:
        hold.kill()
        hold.wait()
