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
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from classify.web.site import PAGE, Site, Upload
from features import PenultError

__all__ = ["MAX_UPLOAD", "make_app"]

HERE = Path(__file__).parent
MAX_UPLOAD = 20 << 20  # bytes of one uploaded image
MAX_FILES = 20  # images scored in one request
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


def make_app(site: Site, *, max_upload: int = MAX_UPLOAD) -> Starlette:
    """The app for one store (``site``); ``max_upload`` caps an uploaded file's bytes."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, enable_async=False
    )
    env.filters["q"] = lambda s: quote(s, safe="")
    env.filters["qpath"] = lambda s: quote(s, safe="/")
    templates = Jinja2Templates(env=env)
    common = {
        "store_name": site.store_path.name,
        "backbone": site.backbone,
        "rows": len(site.paths),
        "has_model": site.model is not None,
        "model_name": site.model_name,
    }

    def page(request: Request, name: str, **context: Any) -> Response:
        return templates.TemplateResponse(
            request, f"{name}.html", {**common, "page_name": name, **context}
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
        key = request.query_params.get("key") or ""
        if key and key not in site.row_of:
            raise HTTPException(404, f"{key!r} is not an image of this store")
        label = site.describe(site.row_of[key])["label"] if key else ""
        return page(request, "similar", key=key, label=label, k=site.k)

    async def image(request: Request) -> Response:
        return FileResponse(_file(site.file, request.path_params["key"]))

    async def thumb(request: Request) -> Response:
        path = _file(site.thumbnail, request.path_params["key"])
        return FileResponse(
            path, media_type="image/jpeg", headers={"cache-control": "max-age=3600"}
        )

    async def api_info(request: Request) -> Response:
        return JSONResponse(
            {**common, "store": str(site.store_path), "columns": site.columns(), "page_size": PAGE}
        )

    async def api_images(request: Request) -> Response:
        f, total, items, page_no, pages = _browse(site, request)
        return JSONResponse(
            {"total": total, "page": page_no, "pages": pages, "filters": f, "items": items}
        )

    async def api_neighbors(request: Request) -> Response:
        k = _int(request.query_params.get("k"), site.k, 1, 200)
        if request.method == "POST":
            up = await _upload(request, max_upload)
            hits = await _threaded(site.similar_upload, up, k)
            return JSONResponse({"query": {"upload": up.name, "label": ""}, "hits": hits})
        key = request.query_params.get("key") or ""
        if not key:
            raise HTTPException(400, "say which stored image: ?key=<path in the store>")
        hits = await _threaded(site.similar, key, k)
        return JSONResponse({"query": site.describe(site.row_of[key]), "hits": hits})

    async def mistakes(request: Request) -> Response:
        return page(request, "mistakes", m=await _threaded(site.mistakes))

    async def score(request: Request) -> Response:
        site.require_model()
        return page(request, "score", top_k=5, n_classes=len(site.model.classes))

    async def api_mistakes(request: Request) -> Response:
        per_pair = _int(request.query_params.get("images"), 12, 0, 200)
        return JSONResponse(await _threaded(site.mistakes, per_pair))

    async def api_predict(request: Request) -> Response:
        k = _int(request.query_params.get("k"), 5, 1, 100)
        ups = await _uploads(request, max_upload, MAX_FILES)
        return JSONResponse({"results": await _threaded(site.score_uploads, ups, k)})

    async def on_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 400)
        text = exc.detail if isinstance(exc, HTTPException) else str(exc)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": text}, status_code=status)
        return Response(f"{status}: {text}", status_code=status, media_type="text/plain")

    routes = [
        Route("/", browse),
        Route("/similar", similar),
        Route("/image/{key:path}", image),
        Route("/thumb/{key:path}", thumb),
        Route("/api/info", api_info),
        Route("/api/images", api_images),
        Route("/api/neighbors", api_neighbors, methods=["GET", "POST"]),
        Route("/mistakes", mistakes),
        Route("/score", score),
        Route("/api/mistakes", api_mistakes),
        Route("/api/predict", api_predict, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    return Starlette(
        routes=routes,
        middleware=[Middleware(_Headers)],
        exception_handlers={HTTPException: on_error, PenultError: on_error},  # never a traceback
    )


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
    items = [site.describe(int(r)) for r in rows[(page - 1) * PAGE : page * PAGE]]
    return f, len(rows), items, page, pages


def _int(text: str | None, default: int, lo: int, hi: int) -> int:
    try:
        return min(hi, max(lo, int(text))) if text else default
    except ValueError:
        raise HTTPException(400, f"not a whole number: {text!r}") from None


def _file(get, key: str) -> Path:
    try:
        return get(key)
    except FileNotFoundError:
        raise HTTPException(404, "no such image in this store") from None


async def _upload(request: Request, max_upload: int) -> Upload:
    return (await _uploads(request, max_upload, 1))[0]


async def _uploads(request: Request, max_upload: int, max_files: int) -> list[Upload]:
    """The multipart ``file`` fields, refused with a clear message when missing or too large
    (by the declared length before anything is read; by the parser's part limit while reading)."""
    limit = f"larger than the {max_upload / (1 << 20):g} MiB upload limit"
    declared = request.headers.get("content-length", "")
    envelope = 64 << 10  # multipart headers and boundaries, per file
    if declared.isdigit() and int(declared) > max_files * (max_upload + envelope):
        raise HTTPException(413, f"upload refused: {limit}")
    try:
        form = await request.form(max_files=max_files, max_fields=4, max_part_size=max_upload)
    except Exception as e:  # noqa: BLE001 - Starlette says why (too large, malformed) in its text
        too_big = "exceed" in str(e).lower()
        raise HTTPException(
            413 if too_big else 400, f"upload refused: {limit if too_big else e}"
        ) from None
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise HTTPException(400, "send the image as a multipart form field named 'file'")
    out = []
    for f in files:
        data = await f.read(max_upload + 1)
        if len(data) > max_upload:
            raise HTTPException(413, f"{f.filename}: {limit}")
        out.append(Upload(f.filename or "upload", data))
    return out


async def _threaded(fn, *args):
    """Blocking work (faiss, the network) off the event loop, so other requests go on."""
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn, *args)
