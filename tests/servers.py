"""A real uvicorn server for a test, in a thread of the test's own process."""

from __future__ import annotations

import contextlib
import shutil
import socket
import threading
import time

import uvicorn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def live(app):
    """``app`` on a real uvicorn server in a thread; yields its port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(10)


def chromium_path() -> str | None:
    """The system's Chromium (the Makefile's test set-up installs Debian's), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return None


@contextlib.contextmanager
def chromium(*args: str):
    """A headless Chromium driven by Playwright; skips the test, saying why, where there is none."""
    import pytest

    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", *args])
        try:
            yield b
        finally:
            b.close()
