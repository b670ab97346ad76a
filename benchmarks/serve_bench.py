"""How fast `penult serve` answers on cub100 (5,902 images): a neighbour query for a stored image,
a Browse page of 60 thumbnails (cold: made on demand; warm: cached), an upload end to end.

    .venv/bin/python benchmarks/resize_bench.py --only cub     # makes bench-out/resize/cub100.h5
    .venv/bin/python benchmarks/serve_bench.py

A real uvicorn server on 127.0.0.1 and a keep-alive HTTP client in this process, as a browser
would ask (page HTML, then each thumbnail). The thumbnail cache is a fresh folder, so "cold" is
honest. Results: bench-out/serve.json.
"""

from __future__ import annotations

import http.client
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import uvicorn  # noqa: E402
from benchmarks_common import cpu_flags  # noqa: E402
from penult.classify.web import Site, make_app  # noqa: E402
from penult.extract import Featuriser  # noqa: E402

STORE = ROOT / "bench-out" / "resize" / "cub100.h5"
BACKBONE = "efficientnet_lite0"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ms(f) -> float:
    t = time.perf_counter()
    f()
    return 1000 * (time.perf_counter() - t)


def main() -> None:
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"flags: {cpu_flags()}", flush=True)  # fmt: skip
    thumbs = Path(tempfile.mkdtemp(prefix="serve-bench-thumbs-"))
    t = time.perf_counter()
    site = Site(STORE, BACKBONE, images=Featuriser(workers=0), thumbs=thumbs)
    site.open_index()
    start_s = time.perf_counter() - t
    port = _port()
    server = uvicorn.Server(uvicorn.Config(make_app(site), port=port, log_level="error"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def get(path: str) -> bytes:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        assert r.status == 200, (path, r.status, body[:200])
        return body

    keys = site.store.paths(np.arange(0, site.n, max(1, site.n // 60))[:60])
    from urllib.parse import quote

    nn = [ms(lambda k=k: get(f"/api/neighbors?k=12&key={quote(k, safe='')}")) for k in keys]

    def grid(page: int) -> None:
        html = get(f"/?page={page}").decode()
        for src in re.findall(r'<img src="(/thumb/[^"]+)"', html):
            get(src)

    cold = [ms(lambda p=p: grid(p)) for p in (2, 3, 4)]
    warm = [ms(lambda p=p: grid(p)) for p in (2, 3, 4) for _ in range(3)]
    html_only = [ms(lambda: get("/?page=2")) for _ in range(10)]

    t100 = site.store.images([100])
    photo = Path(t100.root[0]) / t100.path[0]
    body, boundary = _multipart(photo.name, photo.read_bytes())

    def upload() -> None:
        c.request("POST", "/api/neighbors?k=12", body=body,
                  headers={"content-type": f"multipart/form-data; boundary={boundary}"})  # fmt: skip
        r = c.getresponse()
        out = json.loads(r.read())
        assert r.status == 200 and out["hits"], out

    first_upload = ms(upload)  # builds the backbone from the store's fingerprint
    uploads = [ms(upload) for _ in range(10)]
    server.should_exit = True
    res = {
        "rows": site.n, "startup_s": start_s,
        "neighbors_ms": {"median": statistics.median(nn), "p95": sorted(nn)[int(0.95 * len(nn))],
                         "max": max(nn)},
        "grid60_cold_ms": cold, "grid60_warm_ms": {"median": statistics.median(warm), "max": max(warm)},
        "grid_html_ms": statistics.median(html_only),
        "upload_first_ms": first_upload,
        "upload_ms": {"median": statistics.median(uploads), "max": max(uploads)},
    }  # fmt: skip
    (ROOT / "bench-out" / "serve.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "penultbench"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode()  # fmt: skip
    return head + data + f"\r\n--{boundary}--\r\n".encode(), boundary


if __name__ == "__main__":
    main()
