"""What listing a folder tree costs the driver (issue 35): peak memory per file and files/s of
`extract.list_images` on a synthetic tree of empty image files (names only: `stat` is the work).

    .venv/bin/python benchmarks/listing_memory.py --files 2000000 --chunk 100000

The tree is IFCB-like: one folder per day, one per bin inside it, ROI names such as
``D20260105T120000_IFCB109_00042.png``; made once under bench-out/listing (kept for reruns).
Each listing runs in a fresh process; its peak resident memory (VmHWM) above the interpreter's
with penult imported is divided by the files. Two ways: ``list_images`` (every path at once, what
the API and ``predict`` list) and ``open_source`` (what ``penult extract`` runs over: a survey
pass, then pieces of ``--chunk`` files, each dropped before the next).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from benchmarks_common import cpu_flags

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench-out" / "listing"

RUN = """
import time
from penult.extract import list_images, open_source

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

base = status("VmRSS")
t = time.perf_counter()
if {chunk}:  # the folder in pieces, as `penult extract` lists it: each piece dropped in turn
    n = sum(len(piece) for piece in open_source({tree!r}, chunk={chunk}).chunks())
else:
    n = len(list_images({tree!r}))
print("RESULT", n, time.perf_counter() - t, status("VmHWM") - base)
"""


def make_tree(root: Path, files: int, per_bin: int = 1000, bins_per_day: int = 50) -> None:
    """``files`` empty .png files in day/bin folders (skipped when the tree is there already)."""
    done = root / ".complete"
    if done.exists() and int(done.read_text()) == files:
        return
    t = time.perf_counter()
    n = 0
    b = 0
    while n < files:
        day = root / f"D2026{1 + b // (bins_per_day * 28) % 12:02d}{1 + b // bins_per_day % 28:02d}"
        folder = day / f"D2026T{b % bins_per_day:06d}_IFCB109"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_bin, files - n)):
            (folder / f"D2026T{b % bins_per_day:06d}_IFCB109_{i:05d}.png").touch()
        n += min(per_bin, files - n)
        b += 1
    done.write_text(str(files))
    print(f"made {files:,} files in {b:,} folders in {time.perf_counter() - t:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=2_000_000)
    ap.add_argument("--chunk", type=int, default=100_000, help="files per piece of the stream")
    a = ap.parse_args()
    tree = OUT / f"tree-{a.files}"
    make_tree(tree, a.files)
    print("cpu:", cpu_flags())
    for chunk in (0, a.chunk):
        code = RUN.format(tree=str(tree), chunk=chunk)
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
        if r.returncode or line is None:
            raise SystemExit(f"failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
        _, n, secs, peak = line.split()
        n, secs, peak = int(n), float(secs), int(peak)
        what = f"open_source, pieces of {chunk:,}" if chunk else "list_images"
        print(f"{what}: {n:,} files in {secs:.1f} s ({n / secs:,.0f} files/s), peak "
              f"{peak / 2**20:,.0f} MiB above the interpreter: {peak / n:.0f} B a file")  # fmt: skip


if __name__ == "__main__":
    main()
