"""`penult serve`: a small local web app to look at a store (Starlette on uvicorn).

``site`` knows the store (rows, files, thumbnails, neighbour queries) and nothing of HTTP;
``app`` maps it to pages and a JSON API. The image side (an ``extract.Featuriser``, to embed
uploads) is handed in by the CLI, as for `penult neighbors`: classify/ never imports torch.
"""

from classify.web.app import MAX_UPLOAD, make_app
from classify.web.site import PAGE, Site, SiteError, Upload

__all__ = ["MAX_UPLOAD", "PAGE", "Site", "SiteError", "Upload", "make_app", "serve"]

LOCAL = ("127.0.0.1", "localhost", "::1")


def serve(site: Site, *, host: str = "127.0.0.1", port: int = 8765, max_upload: int = MAX_UPLOAD,
          announce=print) -> None:  # fmt: skip
    """Run the app until Ctrl-C (uvicorn handles the signal and shuts down cleanly)."""
    import uvicorn

    if host not in LOCAL:
        announce(
            f"WARNING: serving on {host}: anyone who can reach this machine can browse the store's "
            "images and upload files; there is no login"
        )
    shown = f"[{host}]" if ":" in host else host
    announce(
        f"penult serve: http://{shown}:{port}/  ({site.store_path}, {site.backbone}); Ctrl-C stops"
    )
    uvicorn.run(make_app(site, max_upload=max_upload), host=host, port=port, log_level="warning")
