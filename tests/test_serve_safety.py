"""`penult serve` against a hostile web and careless use: a page on another site (DNS rebinding,
cross-origin requests) reads nothing, uploads are bounded in bytes and in number while they
arrive, names that are not UTF-8 work on every page, a store that grows or sits on a read-only
share is served, and a thumbnail is never a decompression bomb."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from urllib.parse import quote

import pytest
from penult.classify.web import Site, make_app
from penult.classify.web.app import allowed_hosts
from penult.classify.web.site import placeholder
from penult.extract import ExtractOptions, Featuriser, extract, list_images
from PIL import Image
from servers import live
from starlette.testclient import TestClient

from conftest import copy_hymenoptera

ROOT = Path(__file__).resolve().parents[1]
ODD = b"caf\xe9.jpg"  # Latin-1, not UTF-8: stored as its own bytes
ODD_KEY = ODD.decode("utf-8", "surrogateescape")


@pytest.fixture(scope="module")
def odd_store(data_dir: Path, tmp_path_factory) -> Path:
    """Five ants and five bees, one of the ants under a name that is not UTF-8, and a 144 Mpx
    PNG that extract refused as a decompression bomb (at --max-pixels 50,000,000)."""
    tmp = tmp_path_factory.mktemp("serve_safety")
    root = copy_hymenoptera(data_dir, tmp / "imgs", 5)
    first = sorted((root / "ants").glob("*.jpg"))[0]
    os.rename(first, os.path.join(os.fsencode(root / "ants"), ODD))
    Image.new("1", (12000, 12000)).save(root / "bees" / "bomb.png")
    store = tmp / "s.h5"
    opts = ExtractOptions(progress=False, workers=0, max_pixels=50_000_000)
    extract(store, list_images(str(root)), opts)
    return store


def _site(store: Path, **kw) -> Site:
    return Site(store, "efficientnet_lite0", images=Featuriser(workers=0), k=4, **kw)


def raw(port: int, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    """One request exactly as written (Host and Origin as given): (status, headers, body)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    c.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for k, v in headers.items():
        c.putheader(k, v)
    if body:
        c.putheader("Content-Length", str(len(body)))
    c.endheaders(body or None)
    r = c.getresponse()
    out = r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    c.close()
    return out


def _multipart(name: str, data: bytes, boundary: str = "penultboundary") -> tuple[bytes, str]:
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


# -- who may talk to the server ---------------------------------------------------------------


def test_only_this_servers_names_and_origin_are_answered(odd_store: Path, data_dir: Path) -> None:
    site = _site(odd_store)
    calls = []
    real = site.similar_upload
    site.similar_upload = lambda *a: calls.append(1) or real(*a)
    photo = sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[0].read_bytes()
    body, ctype = _multipart("b.jpg", photo)
    with live(make_app(site)) as port:
        own = f"127.0.0.1:{port}"
        for host in (own, f"localhost:{port}", f"[::1]:{port}", "127.0.0.1"):
            status, headers, text = raw(port, "GET", "/api/info", {"Host": host})
            assert status == 200 and json.loads(text)["rows"] == 11, host
            assert not any(h.startswith("access-control-") for h in headers)
        for host in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.evil.example:{port}"):
            for path in ("/api/info", "/", "/api/images", "/thumb/ants/x.jpg", "/static/penult.js"):
                status, headers, text = raw(port, "GET", path, {"Host": host})
                assert status == 403 and b"not this server's" in text, (host, path)
                assert str(odd_store).encode() not in text
        status, _, text = raw(port, "GET", "/api/info", {})  # no Host at all: HTTP/1.1 says 400
        assert status == 400 and b"rows" not in text
        # cross-origin: a POST from a page elsewhere is refused before its body is read
        for origin in ("http://evil.example", f"http://localhost:{port}", "null", f"https://{own}"):
            status, _, text = raw(port, "POST", "/api/neighbors",
                                  {"Host": own, "Origin": origin, "Content-Type": ctype}, body)  # fmt: skip
            assert status == 403 and b"refused" in text, origin
        status, _, _ = raw(
            port, "GET", "/api/images", {"Host": own, "Origin": "http://evil.example"}
        )
        assert status == 403  # a GET carrying another site's Origin
        status, _, _ = raw(port, "POST", "/api/neighbors",
                           {"Host": own, "Sec-Fetch-Site": "cross-site", "Content-Type": ctype}, body)  # fmt: skip
        assert status == 403
        assert calls == []  # nothing above reached the model
        # the page's own origin, and a script with no Origin at all (curl), are answered
        for extra in ({"Origin": f"http://{own}"}, {}):
            status, headers, text = raw(port, "POST", "/api/neighbors",
                                        {"Host": own, "Content-Type": ctype, **extra}, body)  # fmt: skip
            assert status == 200 and json.loads(text)["hits"], extra
            assert not any(h.startswith("access-control-") for h in headers)
        status, headers, _ = raw(port, "OPTIONS", "/api/predict",
                                 {"Host": own, "Origin": "http://evil.example",
                                  "Access-Control-Request-Method": "POST"})  # fmt: skip
        assert status == 403 and not any(h.startswith("access-control-") for h in headers)
    assert len(calls) == 2


def test_names_served_on_every_address_and_named_hosts() -> None:
    assert allowed_hosts() == {"localhost", "127.0.0.1", "::1"}
    assert "lab-server.example" in allowed_hosts("127.0.0.1", ("Lab-Server.example",))
    wide = allowed_hosts("0.0.0.0")
    assert socket.gethostname().lower() in wide and "*ip" in wide


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


ATTACK = """<!doctype html><html><body><pre id="out">running</pre><script>
async function attempt(url, init) {
  try { const r = await fetch(url, init); return r.status + " " + (await r.text()).slice(0, 300); }
  catch (e) { return "blocked: " + e; }
}
(async () => {
  const said = {};
  said.rebound = await attempt("/api/info");
  said.images = await attempt("/api/images");
  said.cross = await attempt("http://127.0.0.1:PORT/api/info");
  const form = new FormData();
  form.append("file", new Blob([new Uint8Array([255, 216, 255])], {type: "image/jpeg"}), "x.jpg");
  said.post = await attempt("http://127.0.0.1:PORT/api/neighbors", {method: "POST", body: form, mode: "no-cors"});
  document.getElementById("out").textContent = JSON.stringify(said);
})();
</script></body></html>"""


def test_a_page_elsewhere_reads_nothing_in_chromium(odd_store: Path) -> None:
    """DNS rebinding as Chromium does it: the attacker's page comes from evil.test, whose name
    then resolves to 127.0.0.1 (--host-resolver-rules), so its fetches go to penult as
    same-origin requests; plus a plain cross-origin read and POST to 127.0.0.1."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = _chromium()
    if exe is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    site = _site(odd_store)
    calls = []
    site.similar_upload = lambda *a: calls.append(1)
    with live(make_app(site)) as port, sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=exe,
            args=[
                "--no-sandbox",
                "--host-resolver-rules=MAP evil.test 127.0.0.1",
                # as a browser without Chromium's own local-network blocking (Firefox, Safari,
                # older Chromium): what stops the page must be the server
                "--disable-features=BlockInsecurePrivateNetworkRequests,PrivateNetworkAccess"
                "SendPreflights,PrivateNetworkAccessRespectPreflightResults,LocalNetworkAccess"
                "Checks,LocalNetworkAccessChecksWebRTC",
            ],
        )
        try:
            page = b.new_page()
            # the first answer for evil.test is the attacker's page; every later request of the
            # page goes to the network, where evil.test now means 127.0.0.1
            page.route(f"http://evil.test:{port}/",
                       lambda route: route.fulfill(status=200, content_type="text/html",
                                                   body=ATTACK.replace("PORT", str(port))))  # fmt: skip
            page.goto(f"http://evil.test:{port}/")
            page.wait_for_function("document.getElementById('out').textContent !== 'running'")
            said = json.loads(page.text_content("#out"))
        finally:
            b.close()
    assert said["rebound"].startswith("403") and said["images"].startswith("403")
    assert "rows" not in said["rebound"] and ".jpg" not in said["images"]
    assert said["cross"].startswith("blocked")  # no CORS header: the browser keeps it from the page
    assert calls == []  # the no-cors POST was refused before it reached the model


# -- what one request, or many, may hold -------------------------------------------------------


def _dir_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_a_chunked_body_is_refused_at_the_cap_while_it_arrives(odd_store, tmp_path, monkeypatch):
    import tempfile

    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))  # where Starlette spools file parts
    peak = [0]
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _dir_bytes(spool))
            time.sleep(0.01)

    app = make_app(_site(odd_store), max_upload=1 << 20)  # one image: at most 1 MiB + envelope
    sent = 0
    with live(app) as port:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        s = socket.create_connection(("127.0.0.1", port), timeout=20)
        head = (
            f"POST /api/neighbors HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        s.sendall(head.encode())
        part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n\r\n'
        s.sendall(b"%x\r\n%s\r\n" % (len(part), part))
        chunk = b"\xff" * (256 << 10)
        try:
            while sent < 300 << 20:  # 300 MiB offered
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.settimeout(10)
        answer = b""
        with contextlib.suppress(OSError):
            while data := s.recv(65536):
                answer += data
        s.close()
        stop.set()
        watcher.join()
    assert answer.startswith(b"HTTP/1.1 413") and b"upload refused" in answer
    assert sent < 40 << 20  # stopped long before 300 MiB (socket buffers take some)
    assert peak[0] <= 2 << 20 and _dir_bytes(spool) == 0  # spooled no more than the cap


def test_parallel_uploads_are_bounded_in_number_and_bytes(odd_store: Path) -> None:
    app = make_app(_site(odd_store), max_upload=1 << 20, max_inflight=3 << 20, max_decoding=2)
    with live(app) as port:
        own = f"127.0.0.1:{port}"

        def hold(n_bytes: int) -> socket.socket:
            """A request that declares 10 MiB of files and sends ``n_bytes`` of them."""
            s = socket.create_connection(("127.0.0.1", port), timeout=20)
            s.sendall(
                f"POST /api/predict HTTP/1.1\r\nHost: {own}\r\nContent-Length: {10 << 20}\r\n"
                "Content-Type: multipart/form-data; boundary=b\r\n\r\n".encode()
            )
            s.sendall(
                b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
            )
            s.sendall(b"\xff" * n_bytes)
            return s

        first = hold(2 << 20)
        time.sleep(0.5)
        second = hold(2 << 20)  # 4 MiB held together is over the 3 MiB budget: refused
        second.settimeout(10)
        assert second.recv(4096).startswith(b"HTTP/1.1 503")
        second.close()
        third = hold(1 << 10)
        time.sleep(0.3)
        status, headers, text = raw(port, "POST", "/api/predict", {"Host": own}, b"x")
        assert status == 503 and b"busy" in text and headers["retry-after"] == "2"  # 2 at once
        first.close()
        third.close()
        time.sleep(0.5)  # the held requests end: room again
        status, _, text = raw(port, "GET", "/api/info", {"Host": own})
        assert status == 200
    limits = app.state.uploads
    assert limits.peak <= 3 << 20 and limits.held == 0 and limits.active == 0


def test_memory_stays_bounded_under_parallel_uploads(odd_store: Path, data_dir: Path) -> None:
    """Eight clients send 20 images of nearly 1 MiB each at once (160 MiB in all): Python's
    allocations stay within a few times the 8 MiB in-flight budget."""
    app = make_app(_site(odd_store), max_upload=1 << 20, max_inflight=8 << 20)
    files = [("file", (f"{i}.jpg", os.urandom((1 << 20) - 100), "image/jpeg")) for i in range(20)]
    statuses = []
    with live(app) as port:
        import httpx

        def send():
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:
                statuses.append(c.post("/api/predict", files=files).status_code)

        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        clients = [threading.Thread(target=send) for _ in range(8)]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    assert 503 in statuses and len(statuses) == 8  # the budget, not the memory, said no
    assert app.state.uploads.peak <= 8 << 20
    assert peak < 80 << 20, peak  # the requests' own copies of what they sent count here too


# -- what the store allows, the server shows ---------------------------------------------------


def test_a_name_that_is_not_utf8_works_on_every_page(odd_store: Path) -> None:
    site = _site(odd_store)
    c = TestClient(make_app(site), base_url="http://127.0.0.1")
    key = quote(ODD, safe="")  # caf%E9.jpg: the name's own bytes
    items = c.get("/api/images", params={"label": "ants"}).json()["items"]
    odd = [it for it in items if it["key"] == f"ants%2F{key}"]
    assert len(odd) == 1 and odd[0]["path"] == "ants/caf\\xe9.jpg"
    page = c.get("/", params={"label": "ants"})
    assert page.status_code == 200 and f"/thumb/ants/{key}" in page.text
    assert "ants/caf\\xe9.jpg" in page.text  # shown escaped
    src = Path(site.store.images([0]).root[0]) / "ants"
    exact = os.path.join(os.fsencode(src), ODD)
    assert c.get(f"/image/ants/{key}").content == open(exact, "rb").read()
    assert c.get(f"/thumb/ants/{key}").headers["content-type"] == "image/jpeg"
    assert c.get(f"/similar?key=ants%2F{key}").status_code == 200
    r = c.get(f"/api/neighbors?key=ants%2F{key}&k=10")
    assert r.status_code == 200 and r.json()["query"]["key"] == f"ants%2F{key}"
    other = next(it["key"] for it in items if it["key"] != odd[0]["key"] and not it["error"])
    hits = c.get(f"/api/neighbors?key={other}&k=10").json()["hits"]
    assert odd[0]["key"] in [h["key"] for h in hits]  # a neighbour list that contains it
    assert c.get("/api/neighbors?key=ants%2Fcaf%EF%BF%BD.jpg").status_code == 400  # not U+FFFD


def test_a_failed_row_gets_a_placeholder_never_a_decode(odd_store: Path, monkeypatch) -> None:
    site = _site(odd_store)
    c = TestClient(make_app(site), base_url="http://127.0.0.1")
    bomb = c.get("/api/images", params={"failed": "yes"}).json()["items"]
    assert [it["path"] for it in bomb] == ["bees/bomb.png"] and "too large" in bomb[0]["error"]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a) or real_open(*a, **k))
    r = c.get("/thumb/bees/bomb.png")
    assert r.status_code == 200 and r.content == placeholder() and opened == []
    assert not list(site.thumbs.rglob("*.jpg")) or all(
        "bomb" not in p.name for p in site.thumbs.rglob("*.jpg")
    )


def test_a_store_that_grows_while_served_is_taken_up(odd_store, data_dir, tmp_path) -> None:
    from conftest import copy_store

    store = copy_store(odd_store, tmp_path / "grow.h5")
    site = _site(store)
    c = TestClient(make_app(site), base_url="http://127.0.0.1")
    first = c.get("/api/images").json()["items"][1]["key"]
    assert c.get(f"/api/neighbors?key={first}").status_code == 200  # the index is built
    more = tmp_path / "more" / "bees"
    more.mkdir(parents=True)
    for f in sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[10:16]:
        shutil.copy(f, more / f.name)
    extract(store, list_images(str(more.parent)), ExtractOptions(progress=False, workers=0))
    assert c.get("/api/info").json()["rows"] == 17
    for key in (first, "bees%2F" + quote(sorted(os.listdir(more))[0])):
        r = c.get(f"/api/neighbors?key={key}&k=16")
        assert r.status_code == 200 and len(r.json()["hits"]) == 15, (
            key
        )  # all 16 valid rows but itself
    assert c.get("/api/images").json()["total"] == 17


@pytest.fixture
def read_only_store(odd_store: Path, tmp_path: Path):
    """A copy of the store on a read-only bind mount (root), or in a folder without write
    permission (another user); skipped where neither can be made."""
    from conftest import copy_store

    src = tmp_path / "src"
    src.mkdir()
    copy_store(odd_store, src / "s.h5")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:
        ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True)
        if ok.returncode != 0:
            pytest.skip(f"cannot make a read-only mount here: {ok.stderr.decode().strip()}")
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        try:
            yield ro / "s.h5"
        finally:
            subprocess.run(["umount", str(ro)], check=True)
    else:
        for f in [src, *src.rglob("*")]:
            f.chmod(f.stat().st_mode & ~0o222)
        yield src / "s.h5"
        for f in [src, *src.rglob("*")]:
            f.chmod(f.stat().st_mode | 0o200)


def test_a_read_only_store_is_served_and_index_says_why_it_cannot_save(read_only_store) -> None:
    assert not os.access(read_only_store.parent, os.W_OK)
    site = _site(read_only_store)
    c = TestClient(make_app(site), base_url="http://127.0.0.1")
    key = c.get("/api/images", params={"failed": "no"}).json()["items"][0]["key"]
    r = c.get(f"/api/neighbors?key={key}&k=3")
    assert r.status_code == 200 and len(r.json()["hits"]) == 3  # built in memory
    assert c.get(f"/thumb/{key}").status_code == 200  # thumbnails in a temporary folder
    p = subprocess.run(
        [sys.executable, "-m", "penult.cli", "index", str(read_only_store)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    assert "not writable" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_a_port_in_use_is_one_line_and_exit_2(odd_store: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        p = subprocess.run(
            [sys.executable, "-m", "penult.cli", "serve", str(odd_store), "--port", str(port)],
            capture_output=True, text=True, cwd=ROOT, timeout=60,
        )  # fmt: skip
    assert p.returncode == 2 and p.stdout == "", (p.stdout, p.stderr)
    assert f"port {port}" in p.stderr and "--port" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_an_empty_file_is_that_images_error_not_the_batchs(odd_store, data_dir, tmp_path):
    from penult.classify import TrainOptions, load_model, save_model, train

    from conftest import copy_store

    store = copy_store(odd_store, tmp_path / "m.h5")
    save_model(train(store, TrainOptions(test_size=0.3)).model, tmp_path / "m.skops")
    site = _site(store, model=load_model(tmp_path / "m.skops"))
    c = TestClient(make_app(site), base_url="http://127.0.0.1")
    photo = sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[20].read_bytes()
    files = [("file", ("a.jpg", photo, "image/jpeg")), ("file", ("empty.jpg", b"", "image/jpeg")),
             ("file", ("b.txt", b"hello", "text/plain"))]  # fmt: skip
    r = c.post("/api/predict", files=files)
    assert r.status_code == 200
    res = r.json()["results"]
    assert [x["upload"] for x in res] == ["a.jpg", "empty.jpg", "b.txt"]
    assert res[0]["label"] in ("ants", "bees") and not res[0]["error"]
    assert "empty file" in res[1]["error"] and "not an image file name" in res[2]["error"]
