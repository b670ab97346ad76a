"""How long `penult CMD --help` and an argument error take to answer (issue 34, part 1: under
1 s), each command in a fresh process as a user types it, median of 3; beside them, in the same
run, what importing torch and scikit-learn costs: what every one of those answers paid before the
options moved to modules that import neither.

    .venv/bin/python benchmarks/startup_bench.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from benchmarks_common import cpu_flags  # noqa: E402

PENULT = str(Path(sys.executable).with_name("penult"))


def timed(argv: list[str], repeat: int = 3) -> tuple[float, int]:
    """Median wall seconds of a fresh process, and its exit code."""
    times, code = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        code = subprocess.run(argv, capture_output=True).returncode
        times.append(time.perf_counter() - t)
    return statistics.median(times), code


def main() -> None:
    print(f"cpu flags: {cpu_flags()}  ({os.cpu_count()} cores)")
    from penult import cli

    commands = sorted(cli.build_parser()._subparsers._group_actions[0].choices)
    py = [sys.executable, "-c"]
    floor, _ = timed([*py, "pass"])
    heavy, _ = timed([*py, "import torch, sklearn"])
    print(f"python alone {floor:.2f} s; importing torch + scikit-learn {heavy:.2f} s")
    print(f"{'command':12s} {'--help':>10s} {'--no-such-flag':>15s}")
    worst = 0.0
    for c in ["(none)", *commands]:
        args = [] if c == "(none)" else [c]
        cells = []
        for extra in (["--help"], ["--no-such-flag"]):
            s, code = timed([PENULT, *args, *extra])
            worst = max(worst, s)
            cells.append(f"{s:.2f} s ({code})")
        print(f"{c:12s} {cells[0]:>10s} {cells[1]:>15s}")
    for argv in (["train", "s.h5"], ["predict", "m.skops"], ["count", "m.skops"]):  # no --out
        s, code = timed([PENULT, *argv])
        worst = max(worst, s)
        print(f"penult {' '.join(argv)} (forgotten --out): {s:.2f} s ({code})")
    print(f"slowest answer: {worst:.2f} s (exit codes in brackets: 0 help, 2 argument error)")


if __name__ == "__main__":
    main()
