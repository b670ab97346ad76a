"""`penult serve`: a small local web app to look at a store (Starlette on uvicorn).

``site`` knows the store (rows, files, thumbnails, neighbour queries) and nothing of HTTP;
``app`` maps it to pages and a JSON API. The image side (an ``extract.Featuriser``, to embed
uploads) is handed in by the CLI, as for `penult neighbors`: classify/ never imports torch.
"""

import errno
import socket

from penult.classify.web.app import LOCAL_NAMES, MAX_UPLOAD, allowed_hosts, make_app
from penult.classify.web.site import PAGE, Site, SiteError, Upload

__all__ = ["MAX_UPLOAD", "PAGE", "Site", "SiteError", "Upload", "listen", "make_app", "serve"]


def listen(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is announced: a port in use (or an address
    this machine does not have) is one clear error, never another server's URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        why = (
            "is in use by another program"
            if e.errno == errno.EADDRINUSE
            else f"cannot be used ({e.strerror})"
        )
        raise SiteError(
            f"port {port} on {host} {why}; choose another with --port (e.g. --port {port + 1})"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(site: Site, *, host: str = "127.0.0.1", port: int = 8765, max_upload: int = MAX_UPLOAD,
          allow_hosts: tuple[str, ...] = (), announce=print,
          sock: socket.socket | None = None, annotate: bool = False) -> None:  # fmt: skip
    """Run the app until Ctrl-C (uvicorn handles the signal and shuts down cleanly). Requests
    must name this server in ``Host`` (loopback names, ``host`` and ``allow_hosts``). ``sock``:
    a socket already bound by :func:`listen` to ``host`` and ``port``."""
    import uvicorn

    sock = sock or listen(host, port)
    if host not in LOCAL_NAMES:
        announce(
            f"WARNING: serving on {host}: anyone who can reach this machine can browse the store's "
            "images and upload files; there is no login"
        )
    shown = f"[{host}]" if ":" in host else host
    announce(
        f"penult serve: http://{shown}:{port}/  ({site.store_path}, {site.backbone}); Ctrl-C stops"
    )
    if annotate:
        announce("annotating: pages may change this store's labels (validate, move, dubious, undo)")
        site.warm()  # the review page's arrays, read now rather than at the first visit
    app = make_app(
        site, max_upload=max_upload, hosts=allowed_hosts(host, allow_hosts), annotate=annotate
    )
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its clean shutdown
        pass
    finally:
        sock.close()
