"""The ASGI app of `penult serve` (Starlette): server-rendered pages, a JSON API that the pages
and scripts use, and the store's image files with nothing else reachable.

Routes:
    /                       Browse: the store's images by label / coarse level / split / failed
    /similar?key=K          Similar: neighbours of a stored image, or of an uploaded one
    /image/<key>, /thumb/<key>   a store row's file and its cached thumbnail (404 for anything else)
    /api/info               the store, backbone, label columns
    /api/images?...         Browse's rows as JSON (same filters, ``page``)
    /api/neighbors?key=K&k=N    GET for a stored image; POST a multipart ``file`` for an upload
    /mistakes, /api/mistakes    (with a model) its held-out split: confused pairs, recall per class
    /score, /api/predict?k=N    (with a model) POST multipart ``file`` fields: top-k per image
    /review?label=&status=&order=&lo=&hi=&sample=   one class's images (validated or predicted)
                            by score, with counts per class and status; actions with --annotate
    /api/retrain            GET its state; POST (``--annotate``, CSRF) trains on the validated
                            labels in the background: stage, share, held-out numbers before/after
    /api/label              (``--annotate`` only) POST JSON {action, paths, to, level, batch}:
                            validate, move, dubious, reject or undo; needs the page's CSRF token
                            in ``X-CSRF-Token`` (also in /api/info)
    /clusters?page=         HDBSCAN clusters of the unlabelled images, largest first
    /clusters?view=grow&grow=<class>&n=   the unlabelled images nearest to a class's validated
                            ones, to accept or reject (through /api/label)
    /api/cluster            (``--annotate`` only) POST JSON {cluster, to} names a cluster's open
                            members; {cluster, skip: true} hides it; {recluster: true}
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, unquote_to_bytes, urlencode, urlsplit

import jinja2
from penult.classify.web.annotate import (
    REVIEW_PAGE,
    Publisher,
    Retrain,
    label_action,
    metrics_of,
    number,
)
from penult.classify.web.board import CLUSTERS_PAGE, GROW, SHOW, ClusterBoard
from penult.classify.web.site import PAGE, Site, SiteError, Upload, shown
from penult.core import PenultError
from penult.features import STATUSES, StoreLockedError
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

__all__ = ["LOCAL_NAMES", "MAX_UPLOAD", "allowed_hosts", "make_app"]

HERE = Path(__file__).parent
MAX_UPLOAD = 20 << 20  # bytes of one uploaded image
MAX_FILES = 20  # images scored in one request
MAX_INFLIGHT = 256 << 20  # bytes of upload bodies held at once, all requests together
MAX_DECODING = 2  # upload requests read and embedded at once (two cores); more get a 503
ENVELOPE = 64 << 10  # multipart headers and boundaries, per file
LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
WILDCARDS = frozenset({"", "0.0.0.0", "::"})
CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "object-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


class _Headers:
    """Security headers on every response: no inline script, no sniffing, no framing."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def send_with(message):
            if message["type"] == "http.response.start":
                h = message.setdefault("headers", [])
                h.append((b"content-security-policy", CSP.encode()))
                h.append((b"x-content-type-options", b"nosniff"))
                h.append((b"referrer-policy", b"no-referrer"))
            await send(message)

        await self.app(scope, receive, send_with)


def allowed_hosts(host: str = "127.0.0.1", extra: tuple[str, ...] = ()) -> frozenset[str]:
    """The names a request's ``Host`` may carry: this machine's loopback names, the address
    served on and ``extra``. Serving on every address (0.0.0.0, ::) adds this machine's own
    names; an IP literal is always accepted then, since DNS rebinding needs a name."""
    names = set(LOCAL_NAMES) | {_bare(h) for h in (host, *extra) if h}
    if host in WILDCARDS:
        names |= {socket.gethostname().lower(), socket.getfqdn().lower(), "*ip"}
    return frozenset(names - {""})


def _bare(host: str) -> str:
    """``Host``/netloc text without its port or IPv6 brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


class _Guard:
    """What a web page elsewhere must not do (Jupyter's rules): a request whose ``Host`` is not
    one of this server's names (a DNS-rebinding page that resolved its own name to 127.0.0.1)
    gets 403, and so does one whose ``Origin`` is another site: every non-GET request is
    checked, and a GET that carries an Origin. No CORS headers are ever sent."""

    def __init__(self, app, hosts: frozenset[str]):
        self.app, self.hosts = app, hosts

    def _known(self, name: str) -> bool:
        return name in self.hosts or ("*ip" in self.hosts and _is_ip(name))

    def refusal(self, scope) -> str:
        h = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
        host = h.get("host", "")
        if not self._known(_bare(host)):
            return (
                f"host {host!r} is not this server's (allowed: {', '.join(sorted(self.hosts - {'*ip'}))}"
                "; serve with --allow-host NAME to add a name)"
            )
        origin = h.get("origin")
        if origin is not None:
            o = urlsplit(origin)
            if o.scheme != scope.get("scheme", "http") or o.netloc.lower() != host.lower():
                return f"cross-origin request from {origin!r} refused"
        elif scope.get("method", "GET") not in ("GET", "HEAD"):
            if h.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
                return "cross-site request refused"
        return ""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (why := self.refusal(scope)):
            await _refuse(scope, send, 403, why)
            return
        await self.app(scope, receive, send)


@dataclass
class UploadLimits:
    """What uploads may hold, and what they hold now (``peak``: the most bytes held at once)."""

    max_upload: int  # bytes of one file
    inflight: int  # bytes of upload bodies held at once, all requests together
    decoding: int  # upload requests read and embedded at once
    active: int = 0
    held: int = 0
    peak: int = 0

    def cap(self, path: str) -> int:
        """Most bytes one request's body may carry: its files and their multipart envelopes."""
        files = 1 if path == "/api/neighbors" else MAX_FILES
        return files * (self.max_upload + ENVELOPE)


class _Uploads:
    """Bounds on uploads: at most ``decoding`` upload requests are read and embedded at once,
    and at most ``inflight`` bytes of their bodies are held together (beyond either, a 503 that
    says so); one request's body is counted as it arrives and refused (413) at its cap, declared
    length or not (a chunked body too), so nothing larger is ever spooled."""

    def __init__(self, app, limits: UploadLimits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        lim = self.limits
        if lim.active >= lim.decoding:
            await _refuse(
                scope, send, 503,
                f"busy: {lim.active} uploads are being read and embedded; try again in a moment",
            )  # fmt: skip
            return
        cap = lim.cap(scope.get("path", ""))
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > cap:  # refused before anything is read
            limit = f"{lim.max_upload / (1 << 20):g} MiB"
            await _refuse(scope, send, 413, f"upload refused: larger than the {limit} upload limit")
            return
        lim.active += 1
        mine = 0

        async def counted():
            nonlocal mine
            message = await receive()
            n = len(message.get("body", b""))
            if n:
                if mine + n > cap:
                    raise HTTPException(
                        413, f"upload refused: more than {cap / (1 << 20):.1f} MiB sent"
                    )
                if lim.held + n > lim.inflight:
                    raise HTTPException(
                        503, f"busy: {lim.held / (1 << 20):.0f} MiB of uploads are held "
                        "already; try again in a moment",
                    )  # fmt: skip
                mine += n
                lim.held += n
                lim.peak = max(lim.peak, lim.held)
            return message

        try:
            await self.app(scope, counted, send)
        finally:
            lim.active -= 1
            lim.held -= mine


def _error(path: str, status: int, text: str) -> Response:
    """Every error the server answers: JSON for the API, one line of text otherwise; a refused
    upload's connection ends (the rest of its body is not read), a 503 says when to retry."""
    if path.startswith("/api/"):
        r: Response = _JSON({"error": text}, status_code=status)
    else:
        body = f"{status}: {text}".encode("utf-8", "backslashreplace")
        r = Response(body, status_code=status, media_type="text/plain")
    if status in (413, 503):
        r.headers["connection"] = "close"
    if status == 503:
        r.headers["retry-after"] = "2"
    return r


async def _refuse(scope, send, status: int, text: str) -> None:
    """A refusal from a middleware, before any route ran."""

    async def nothing():
        return {"type": "http.disconnect"}

    await _error(scope.get("path", ""), status, text)(scope, nothing, send)


class _JSON(JSONResponse):
    """JSON that never fails on a name that is not UTF-8 (escaped as JSON allows)."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except UnicodeEncodeError:
            return json.dumps(content, separators=(",", ":")).encode("ascii")


def _finalize(value: Any) -> Any:
    """Every value a page shows: a name that is not UTF-8 with ``\\xNN`` escapes."""
    return shown(value) if isinstance(value, str) else value


def make_app(
    site: Site,
    *,
    max_upload: int = MAX_UPLOAD,
    hosts: frozenset[str] | None = None,
    max_inflight: int = MAX_INFLIGHT,
    max_decoding: int = MAX_DECODING,
    annotate: bool = False,
) -> Starlette:
    """The app for one store (``site``); ``max_upload`` caps an uploaded file's bytes,
    ``hosts`` the names it answers to (default: this machine's loopback names), and
    ``max_inflight`` / ``max_decoding`` what all uploads together may hold. ``annotate`` lets
    POST /api/label change labels (with the CSRF token this app made)."""
    csrf = secrets.token_urlsafe(32) if annotate else ""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, enable_async=False,
        finalize=_finalize,
    )  # fmt: skip
    env.filters["q"] = lambda s: quote(s, safe="", errors="surrogateescape")
    env.filters["qpath"] = lambda s: quote(s, safe="/", errors="surrogateescape")
    env.filters["slashes"] = lambda key: key.replace("%2F", "/")  # a row's key in a URL path
    templates = Jinja2Templates(env=env)
    for name in env.list_templates(extensions=["html"]):  # compiled now, not at a first visit
        env.get_template(name)

    def common() -> dict[str, Any]:
        return {
            "store_name": site.store_path.name,
            "backbone": site.backbone,
            "rows": site.n,  # of the commit being shown
            "has_model": site.model is not None,
            "model_name": site.model_name,
            "annotate": annotate,
            "csrf": csrf,
        }

    def page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(
            request, f"{name}.html", {**common(), "page_name": name, **context}
        )

    async def browse(request: Request) -> Response:
        f, total, items, page_no, pages = _browse(site, request)
        coarse = [c for c in site.columns() if c not in ("label", "split")]

        def query(n: int) -> str:
            return urlencode({**{k: v for k, v in f.items() if v}, "page": n})

        return page(
            request, "browse", f=f, items=items, total=total, page=page_no, pages=pages,
            label_values=site.values("label"), coarse=coarse, splits=site.values("split"),
            query=query,
        )  # fmt: skip

    async def similar(request: Request) -> Response:
        key = _query(request, "key")
        row = site.row(key) if key else None
        if key and row is None:
            raise HTTPException(404, f"{key!r} is not an image of this store")
        label = site.describe(row)["label"] if key else ""
        return page(request, "similar", key=key, label=label, k=site.k)

    async def image(request: Request) -> Response:
        got = await _threaded(_file, site.file, _path_key(request))
        if isinstance(got, bytes):  # an IFCB ROI: its pixels, as a PNG made now
            return Response(got, media_type="image/png")
        return FileResponse(got)

    async def thumb(request: Request) -> Response:
        made = await _threaded(_file, site.thumbnail, _path_key(request))
        headers = {"cache-control": "max-age=3600"}
        if isinstance(made, bytes):  # a placeholder: the row failed, or is over the pixel limit
            return Response(made, media_type="image/jpeg", headers=headers)
        return FileResponse(made, media_type="image/jpeg", headers=headers)

    async def api_info(request: Request) -> Response:
        return _JSON(
            {
                **common(),  # the CSRF token too: no other site can read this (no CORS)
                "store": str(site.store_path),
                "columns": site.columns(),
                "page_size": PAGE,
            }
        )

    async def api_images(request: Request) -> Response:
        f, total, items, page_no, pages = _browse(site, request)
        return _JSON(
            {"total": total, "page": page_no, "pages": pages, "filters": f, "items": items}
        )

    async def api_neighbors(request: Request) -> Response:
        k = _int(request.query_params.get("k"), site.k, 1, 200)
        if request.method == "POST":
            up = await _upload(request, max_upload)
            hits = await _threaded(site.similar_upload, up, k)
            return _JSON({"query": {"upload": up.name, "label": ""}, "hits": hits})
        key = _query(request, "key")
        if not key:
            raise HTTPException(400, "say which stored image: ?key=<path in the store>")
        hits = await _threaded(site.similar, key, k)
        return _JSON({"query": site.describe(site.row(key)), "hits": hits})

    async def mistakes(request: Request) -> Response:
        return page(request, "mistakes", m=await _threaded(site.mistakes))

    async def score(request: Request) -> Response:
        site.require_model()
        return page(request, "score", top_k=5, n_classes=len(site.model.classes))

    async def api_mistakes(request: Request) -> Response:
        per_pair = _int(request.query_params.get("images"), 12, 0, 200)
        return _JSON(await _threaded(site.mistakes, per_pair))

    async def api_predict(request: Request) -> Response:
        k = _int(request.query_params.get("k"), 5, 1, 100)
        ups = await _uploads(request, max_upload, MAX_FILES)
        return _JSON({"results": await _threaded(site.score_uploads, ups, k)})

    async def review_page(request: Request) -> Response:
        level = _query(request, "level") or "label"
        counts = await _threaded(site.review_counts, level)
        f = {
            "label": _query(request, "label") or (counts[0]["label"] if counts else ""),
            "level": level,
            "status": _query(request, "status"),
            "order": "desc" if _query(request, "order") == "desc" else "asc",
            "lo": _query(request, "lo"),
            "hi": _query(request, "hi"),
            "sample": _query(request, "sample"),
        }
        lo, hi = number(f["lo"], "from"), number(f["hi"], "to")
        view = _query(request, "view")
        notes: list[str] | None = None
        if view == "next":  # the `penult next` queue
            rows, scores, notes = await _threaded(lambda: site.queue_rows(level, REVIEW_PAGE))
        elif view == "mistakes":  # `penult mistakes`' most suspicious labels
            rows, scores, notes = await _threaded(lambda: site.suspect_rows(level, REVIEW_PAGE))
        elif view:
            raise SiteError(f"view {view!r} is not one of: next, mistakes (or none: by class)")
        else:
            rows, scores = await _threaded(
                lambda: site.review(f["label"], level=level, status=f["status"], order=f["order"],
                                    lo=lo, hi=hi, sample=f["sample"])
            )  # fmt: skip
        f["view"] = view

        pages = max(1, math.ceil(len(rows) / REVIEW_PAGE))
        page_no = min(_int(request.query_params.get("page"), 1, 1, 10**9), pages)
        part = slice((page_no - 1) * REVIEW_PAGE, page_no * REVIEW_PAGE)
        status = site.review_arrays(level)["status"]
        items = [
            {**d, "status": STATUSES[status[r]], "score": None if math.isnan(s) else float(s),
             "note": notes[part.start + i] if notes is not None else ""}
            for i, (d, r, s) in enumerate(zip(site.describe_rows(rows[part]), rows[part],
                                              scores[part], strict=True))
        ]  # fmt: skip

        def query(n: int) -> str:
            return urlencode({**{k: v for k, v in f.items() if v}, "page": n})

        return page(
            request, "review", f=f, items=items, total=len(rows), page=page_no, pages=pages,
            counts=counts, statuses=STATUSES[1:], taxa=_taxa(site, counts), query=query,
            samples=site.values("sample"),
        )  # fmt: skip

    def may_write(request: Request) -> None:
        if not annotate:
            raise HTTPException(403, "read-only: serve with --annotate to change labels")
        sent = request.headers.get("x-csrf-token", "")
        if not hmac.compare_digest(sent.encode(), csrf.encode()):
            raise HTTPException(403, "missing or wrong CSRF token (reload the page)")

    retraining = Retrain(site.store_path, metrics_of(site.model))
    publisher = Publisher(site.store_path)

    async def api_retrain(request: Request) -> Response:
        if request.method == "POST":
            may_write(request)
            if not retraining.start():
                raise HTTPException(409, "a retraining is running already; wait for it")
        return _JSON(retraining.status())

    async def api_label(request: Request) -> Response:
        may_write(request)
        body = await _json_object(request, "{action, paths, to, level}")
        try:
            done = await _threaded(lambda: label_action(site.store_path, body, publish=False))
        except StoreLockedError as e:
            raise HTTPException(409, f"{e}; nothing was changed") from None
        publisher.touch()
        return _JSON(done)

    board = ClusterBoard(site.store_path, site.backbone)

    async def clusters_page(request: Request) -> Response:
        label = _query(request, "grow")
        taxa = []
        if annotate and site.has(board.level):
            taxa = _taxa(site, await _threaded(site.review_counts, board.level))
        if label or _query(request, "view") == "grow":
            classes = await _threaded(board.growable, site)
            label = label or (classes[0] if classes else "")
            n = _int(request.query_params.get("n"), GROW, 1, REVIEW_PAGE)
            p = await _threaded(board.proposal, label, n) if label else None
            items = [] if p is None else [
                {**d, "score": float(x)}
                for d, x in zip(site.describe_rows(site.rows_of(p.paths)), p.distance, strict=True)
            ]  # fmt: skip
            return page(
                request, "clusters", view="grow", label=label, classes=classes, items=items,
                left=p.left if p else 0, n=n, level=board.level, taxa=taxa,
            )  # fmt: skip
        cards, cs = await _threaded(board.cards, site)
        pages = max(1, math.ceil(len(cards) / CLUSTERS_PAGE))
        page_no = min(_int(request.query_params.get("page"), 1, 1, 10**9), pages)
        part = cards[(page_no - 1) * CLUSTERS_PAGE : page_no * CLUSTERS_PAGE]
        return page(
            request, "clusters", view="clusters", cards=part, total=len(cards), cs=cs,
            page=page_no, pages=pages, query=lambda k: urlencode({"page": k}), show=SHOW,
            taxa=taxa,
        )  # fmt: skip

    async def api_cluster(request: Request) -> Response:
        may_write(request)
        body = await _json_object(request, "{cluster, to} or {cluster, skip} or {recluster}")
        if body.get("recluster") is True:
            board.recluster()
            await _threaded(board.ensure)
            return _JSON({"action": "clustered again", "changed": {}})
        number, to = body.get("cluster"), body.get("to")
        if not isinstance(number, int) or isinstance(number, bool):
            raise HTTPException(400, "cluster must be a cluster's number (1 = largest)")
        if body.get("skip") is True:
            await _threaded(board.members, site, number)  # refuses a number that is no cluster
            board.skipped.add(number)
            return _JSON({"action": f"skipped cluster {number}", "changed": {}})
        if not isinstance(to, str):
            raise HTTPException(400, "to must be the taxon to name the cluster")
        members = await _threaded(board.members, site, number)
        if not members:
            raise HTTPException(409, f"cluster {number} has no unlabelled images left")
        try:
            done = await _threaded(board.name, members, to)
        except StoreLockedError as e:
            raise HTTPException(409, f"{e}; nothing was changed") from None
        publisher.touch()
        return _JSON(done)

    async def on_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 400)
        text = exc.detail if isinstance(exc, HTTPException) else str(exc)
        return _error(request.url.path, status, text)

    def fresh(endpoint):
        """The endpoint, answering from the store's latest commit (reloaded when it moved)."""

        async def answer(request: Request) -> Response:
            await _threaded(site.refresh)
            return await endpoint(request)

        return answer

    routes = [
        Route("/", fresh(browse)),
        Route("/similar", fresh(similar)),
        Route("/image/{key:path}", fresh(image)),
        Route("/thumb/{key:path}", fresh(thumb)),
        Route("/api/info", fresh(api_info)),
        Route("/api/images", fresh(api_images)),
        Route("/api/neighbors", fresh(api_neighbors), methods=["GET", "POST"]),
        Route("/mistakes", fresh(mistakes)),
        Route("/score", fresh(score)),
        Route("/api/mistakes", fresh(api_mistakes)),
        Route("/api/predict", fresh(api_predict), methods=["POST"]),
        Route("/api/label", fresh(api_label), methods=["POST"]),
        Route("/review", fresh(review_page)),
        Route("/api/retrain", api_retrain, methods=["GET", "POST"]),
        Route("/clusters", fresh(clusters_page)),
        Route("/api/cluster", fresh(api_cluster), methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    limits = UploadLimits(max_upload, max(max_inflight, max_upload + ENVELOPE), max_decoding)

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette):
        yield
        if annotate:  # what was journaled is published before the server goes
            await _threaded(publisher.flush)

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        middleware=[
            Middleware(_Guard, hosts=hosts or allowed_hosts()),
            Middleware(_Headers),
            Middleware(_Uploads, limits=limits),
        ],
        exception_handlers={HTTPException: on_error, PenultError: on_error},  # never a traceback
    )
    app.state.uploads = limits
    return app


def _browse(site: Site, request: Request) -> tuple[dict[str, str], int, list[dict], int, int]:
    """(filters as given, matching rows, the page's rows described, page number, page count)
    from Browse's query string."""
    p = request.query_params
    f = {k: p.get(k, "") for k in ("label", "level", "value", "split", "failed")}
    filters = {c: f[c] for c in ("label", "split") if f[c]}
    if f["level"] and f["value"]:
        filters[f["level"]] = f["value"]
    failed = {"yes": True, "no": False}.get(f["failed"])
    rows = site.rows(filters, failed)
    pages = max(1, math.ceil(len(rows) / PAGE))
    page = _int(p.get("page"), 1, 1, pages)
    items = site.describe_rows(rows[(page - 1) * PAGE : page * PAGE])
    return f, len(rows), items, page, pages


def _taxa(site: Site, counts: list[dict[str, Any]]) -> list[str]:
    """Names the taxon pickers offer: the classes and every coarser level's values."""
    return sorted(
        {c["label"] for c in counts}
        | {v for c in site.columns() if c not in ("split", "sample") for v in site.values(c)}
    )


async def _json_object(request: Request, shape: str) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise HTTPException(400, f"the body must be JSON: {shape}") from None
    if not isinstance(body, dict):
        raise HTTPException(400, f"the body must be a JSON object: {shape}")
    return body


def _int(text: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return min(hi, max(lo, int(text))) if text else default
    except ValueError:
        raise HTTPException(400, f"not a whole number: {text!r}") from None


def _query(request: Request, name: str) -> str:
    """A query parameter decoded losslessly: percent-escaped bytes that are not UTF-8 come back
    surrogate-escaped, as the store keeps such names (Starlette's own parsing would replace
    them with U+FFFD, which names no row)."""
    text = request.scope.get("query_string", b"").decode("latin-1")
    for k, v in parse_qsl(text, keep_blank_values=True, errors="surrogateescape"):
        if k == name:
            return v
    return ""


def _path_key(request: Request) -> str:
    """The store key of ``/image/<key>`` or ``/thumb/<key>``, from the raw path (lossless)."""
    raw = request.scope.get("raw_path")
    if not raw:
        return request.path_params["key"]
    head = raw.split(b"?", 1)[0]
    rest = head.split(b"/", 2)[2] if head.count(b"/") >= 2 else b""
    return unquote_to_bytes(rest).decode("utf-8", "surrogateescape")


def _file(get, key: str):
    try:
        return get(key)
    except FileNotFoundError:
        raise HTTPException(404, "no such image in this store") from None


async def _upload(request: Request, max_upload: int) -> Upload:
    return (await _uploads(request, max_upload, 1))[0]


async def _uploads(request: Request, max_upload: int, max_files: int) -> list[Upload]:
    """The multipart ``file`` fields, refused with a clear message when missing or too large
    (the body's length is the _Uploads middleware's to bound; each file's here)."""
    limit = f"larger than the {max_upload / (1 << 20):g} MiB upload limit"
    try:
        form = await request.form(max_files=max_files, max_fields=4, max_part_size=max_upload)
    except HTTPException:
        raise  # the byte count's own refusal (413, 503)
    except Exception as e:  # noqa: BLE001 - Starlette says why (too large, malformed) in its text
        too_big = "exceed" in str(e).lower()
        raise HTTPException(
            413 if too_big else 400, f"upload refused: {limit if too_big else e}"
        ) from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(400, "send the image as a multipart form field named 'file'")
    out = []
    try:
        for f in files:
            data = await f.read(max_upload + 1)
            if len(data) > max_upload:
                raise HTTPException(413, f"{f.filename}: {limit}")
            out.append(Upload(f.filename or "upload", data))
    finally:
        await form.close()  # the spooled parts' temporary files go now, not at collection
    return out


async def _threaded(fn, *args):
    """Blocking work (faiss, the network) off the event loop, so other requests go on."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
