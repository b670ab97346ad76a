"""What every benchmark prints first: the CPU, so that figures from different machines are never
compared as if they were one. And a clean start for a benchmark's own store."""

from __future__ import annotations

import platform
import resource
import shutil
from pathlib import Path


def remove_store(store: Path) -> None:
    """Delete a store with everything beside it (.segments, .journal, .lock, parts): a new store
    made under the same name must not find the old one's journal or segments."""
    for p in store.parent.glob(store.name + "*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def cpu_flags() -> str:
    """The instruction-set flags that decide the fast paths (AVX2, AVX-512, native bf16, AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(ln for ln in f if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return platform.processor()
    keep = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
    return " ".join(f for f in flags if f in keep) or "none of avx2/avx512/amx"


def cpu_seconds(who: int = resource.RUSAGE_SELF) -> float:
    """User + system CPU seconds of this process (``RUSAGE_SELF``: all its threads) or of its
    finished, reaped children (``RUSAGE_CHILDREN``: a DataLoader's processes once it is done)."""
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime
