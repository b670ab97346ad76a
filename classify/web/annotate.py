"""What `penult serve --annotate` writes: one review action from a page's JSON, and retraining
in the background. The routes that call these live in ``app.py``."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from penult.classify.web.site import SiteError
from penult.core import PenultError

log = logging.getLogger(__name__)

PUBLISH_IDLE = 2.0  # seconds without a review action before the server publishes them


class Publisher:
    """Publishes the review actions this server journals (each is durable, and read by every
    reader, as soon as its journal shard is written: see features/format2/overlay.py) once no
    action came for ``idle`` seconds, and when the server stops. Publishing rewrites whole
    blocks of the label columns (a few hundred ms on a million rows), so it is kept off the
    request that the user waits for. A kill loses nothing: the next writer publishes them."""

    def __init__(self, store: Path, idle: float | None = None):
        self.store, self.idle = store, PUBLISH_IDLE if idle is None else idle
        self._last = 0.0
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._mutex = threading.Lock()

    def touch(self) -> None:
        """An action was journaled: publish after the next quiet spell."""
        self._last = time.monotonic()
        with self._mutex:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, daemon=True)
                self._thread.start()
        self._wake.set()

    def _loop(self) -> None:
        while True:
            self._wake.wait()
            while (left := self._last + self.idle - time.monotonic()) > 0:
                time.sleep(left)
            self._wake.clear()
            self.flush()

    def flush(self) -> int:
        """Publish now; 0 where another process writes the store (it publishes them itself)."""
        from penult.features import StoreLockedError, publish

        try:
            return publish(self.store)
        except StoreLockedError:
            return 0
        except (PenultError, OSError) as e:  # kept in the journal: the next writer publishes
            log.warning("%s: review actions not yet published (%s)", self.store, e)
            return 0


__all__ = [
    "ACTIONS",
    "MAX_LABELLED",
    "Publisher",
    "REVIEW_PAGE",
    "Retrain",
    "label_action",
    "metrics_of",
    "number",
]


class Retrain:
    """`penult train` on the store's validated labels in a background thread (one at a time):
    its stage and share done for the page's progress bar, and the held-out numbers of the
    newest run beside those before it (the served model's, or the previous run's). Each run's
    model is saved beside the store as ``STORE-retrained-<time>.skops``."""

    def __init__(self, store: Path, before: dict[str, float] | None):
        self.store, self.before, self.after = store, before, None
        self.state, self.stage, self.share, self.error, self.model_file = "idle", "", 0.0, "", ""
        self._lock = threading.Lock()

    def start(self) -> bool:
        with self._lock:
            if self.state == "running":
                return False
            if self.after is not None:
                self.before = self.after
            self.state, self.stage, self.share, self.error = "running", "starting", 0.0, ""
        threading.Thread(target=self._run, daemon=True).start()
        return True

    def _run(self) -> None:
        from penult.classify import TrainOptions, save_model, train

        def progress(stage: str, share: float) -> None:
            self.stage, self.share = stage, share

        try:
            r = train(self.store, TrainOptions(), progress=progress)
            out = self.store.with_name(
                f"{self.store.stem}-retrained-{time.strftime('%Y%m%d-%H%M%S')}.skops"
            )
            save_model(r.model, out)
            self.after = {**metrics_of(r.model), "images": r.n_train}
            self.model_file, self.state = str(out), "done"
        except (PenultError, OSError) as e:  # said on the page; the server goes on
            self.error, self.state = str(e), "failed"

    def status(self) -> dict[str, Any]:
        return {"state": self.state, "stage": self.stage, "share": self.share, "error": self.error,
                "before": self.before, "after": self.after, "model": self.model_file}  # fmt: skip


def metrics_of(model: Any) -> dict[str, float] | None:
    """The held-out numbers a saved model's manifest records (None without a model)."""
    if model is None:
        return None
    m = model.manifest.metrics or {}
    keys = ("top1", "balanced_accuracy", "macro_f1")
    return {k: float(m[k]) for k in keys if isinstance(m.get(k), int | float)}


ACTIONS = ("validate", "move", "dubious", "reject", "undo")


def label_action(store: Path, body: dict[str, Any], *, publish: bool = True) -> dict[str, Any]:
    """One review action from a page's JSON (see ``features.review``): what changed, what was
    left and why. A bad request is a PenultError (400) naming the problem. ``publish=False``
    journals it (a server's :class:`Publisher` publishes)."""
    from penult.classify.clusters import reject
    from penult.features import review

    action, level = body.get("action"), body.get("level", "label")
    if action not in ACTIONS:
        raise SiteError(f"action {action!r} is not one of {', '.join(ACTIONS)}")
    if not isinstance(level, str):
        raise SiteError("level must be a label column's name")
    if action == "undo":
        batch = body.get("batch")
        if batch is not None and not isinstance(batch, int):
            raise SiteError("batch must be a number from the history")
        b = review.undo(store, batch, publish=publish)
        return {"action": b.action, "changed": b.changed, "skipped": b.skipped}
    paths = body.get("paths")
    keys = body.get("keys")  # a page's tiles: names percent-encoded byte for byte (lossless)
    if isinstance(keys, list) and all(isinstance(k, str) for k in keys):
        paths = [unquote_to_bytes(k).decode("utf-8", "surrogateescape") for k in keys]
    if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
        raise SiteError("paths must be a non-empty list of the store's image paths")
    if len(paths) > MAX_LABELLED:
        raise SiteError(f"at most {MAX_LABELLED} images in one action")
    to = body.get("to")
    if action in ("move", "reject") and not isinstance(to, str):
        raise SiteError(f"{action} needs 'to': a label name")
    if action == "reject":
        reject(store, paths, to, level=level, publish=publish)
        return {"action": f"reject as {to!r}", "changed": {}, "skipped": []}
    do = {"validate": review.validate, "dubious": review.mark_dubious}
    b = (
        review.move(store, paths, to, level=level, publish=publish)
        if action == "move"
        else do[action](store, paths, level=level, publish=publish)
    )
    return {"action": b.action, "changed": b.changed, "skipped": b.skipped}


MAX_LABELLED = 10_000  # images one action may change (a page shows a few hundred)
REVIEW_PAGE = 120  # thumbnails a review screen shows


def number(text: str, what: str) -> float | None:
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise SiteError(f"score {what} {text!r} is not a number") from None
