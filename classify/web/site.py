"""What `penult serve` knows about one store: its rows, the files behind them (and only those),
thumbnails, filters and neighbour queries. No HTTP here: the app in ``app.py`` calls these.

The store is opened read-only and never written; thumbnails are cached beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from penult.classify.evaluate import Evaluation, evaluate
from penult.classify.images import Images
from penult.classify.model import Model
from penult.classify.neighbors import NeighborIndex, ensure_index
from penult.classify.predict import predict_files
from penult.core import DEFAULT_MAX_PIXELS, SAMPLE, PenultError, atomic_path
from penult.features import STATUSES, FeatureStore
from PIL import Image

__all__ = ["PAGE", "Site", "SiteError", "Upload", "shown", "url_key"]

PAGE = 60  # thumbnails per grid page
THUMB = 192  # longest side of a thumbnail, pixels
THUMB_WORKERS = 2  # thumbnails decoded at once (first visits to a page ask for 60 together)
UPLOAD_SUFFIXES = frozenset(".jpg .jpeg .png .gif .bmp .tif .tiff .webp".split())


class SiteError(PenultError):
    """A request that cannot be answered; the message is shown to the user as it is."""


@dataclass
class Upload:
    """An uploaded image: its name as sent and its bytes."""

    name: str
    data: bytes


@dataclass
class Site:
    """One store, opened once: rows, labels, the index of ``backbone`` and the thumbnail cache."""

    store_path: Path
    backbone: str
    images: Images | None = None  # embeds uploads (an extract.Featuriser, from the CLI)
    model: Model | None = None  # for Mistakes (its held-out split in this store) and Score
    model_file: str = ""  # its file, for the pages
    k: int = 12
    thumbs: Path | None = None
    store: FeatureStore = field(init=False)
    index: NeighborIndex | None = field(init=False, default=None)
    evaluation: Evaluation | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.store_path = Path(self.store_path)
        self._lock = threading.Lock()
        self._thumbing = threading.BoundedSemaphore(THUMB_WORKERS)
        self._real_roots: dict[str, str] = {}
        self._load()
        if self.thumbs is None:
            self.thumbs = _writable(Path(f"{self.store_path}.thumbs"))

    def _load(self) -> None:
        """Read the store as it is now (one commit: the top-level file is replaced atomically)
        and make it what every request answers from."""
        seen = _commit_of(self.store_path)
        store = FeatureStore(self.store_path)
        if self.backbone not in store.backbones():
            have = ", ".join(sorted(store.backbones())) or "none"
            raise SiteError(f"{self.store_path}: no backbone {self.backbone!r} (it has: {have})")
        t = store.images()
        # refused now (other store, other features), not on a click
        evaluation = evaluate(self.model, self.store_path) if self.model is not None else None
        row_of, valid = t.index(), store.valid(self.backbone)
        failed = np.asarray([bool(e) for e in t.error], bool)
        # A request running meanwhile may see some attributes old and some new. Rows are only
        # ever added, so what is read by row (paths, labels, ...) is replaced before what hands
        # out rows (lookups, masks, the index): an old row number is always a row of the new.
        self.store, self.paths, self.roots, self.sha = store, t.path, t.root, t.sha256
        self.errors = t.error
        self.labels: dict[str, list[str]] = t.labels
        self._arrays: dict[str, np.ndarray] = {}  # label columns as arrays, made on first filter
        self._ranked: dict[str, Any] = {}  # `penult mistakes` rankings of this commit
        self._wrong: dict[tuple[str, str], list[int]] | None = None
        self.evaluation = evaluation
        self.row_of, self.valid, self.failed = row_of, valid, failed
        self.index, self._commit = None, seen

    def refresh(self) -> bool:
        """Take up a commit made since the store was read (another `penult extract` into it):
        the pages then show the new rows, and the neighbour index is brought up to date with
        them. Cheap when nothing changed (one stat). Returns whether anything was reloaded."""
        if _commit_of(self.store_path) == self._commit:
            return False
        with self._lock:
            if _commit_of(self.store_path) == self._commit:
                return False
            self._load()
            return True

    # -- files -----------------------------------------------------------------------------

    def file(self, key: str) -> Path:
        """The image file of the store row ``key``, and nothing else: a key that is not a row, or
        a file that resolves (through links) outside its image root, is refused."""
        row = self.row_of.get(key)
        if row is None:
            raise FileNotFoundError(key)
        root = self.roots[row]
        real_root = self._real_roots.setdefault(root, os.path.realpath(root))
        real = os.path.realpath(os.path.join(root, key))
        if os.path.commonpath([real, real_root]) != real_root or not os.path.isfile(real):
            raise FileNotFoundError(key)
        return Path(real)

    def thumbnail(self, key: str) -> Path | bytes:
        """A JPEG thumbnail of row ``key``, made once and cached by the file's content hash; a
        placeholder (bytes) for a row that failed in extract or an image over the pixel limit,
        which is never decoded. At most ``THUMB_WORKERS`` are made at once."""
        src = self.file(key)
        row = self.row_of[key]
        if self.errors[row]:  # extract refused it (a bomb, a corrupt file): not decoded here
            return placeholder()
        name = (
            self.sha[row] or hashlib.sha256(str(src).encode("utf-8", "surrogateescape")).hexdigest()
        )
        out = self.thumbs / name[:2] / f"{name}_{THUMB}.jpg"
        if out.exists():
            return out
        with self._thumbing:
            if out.exists():  # made by another request while this one waited
                return out
            try:  # written beside and renamed in: readers never see half a thumbnail
                with Image.open(src) as im:
                    if im.width * im.height > DEFAULT_MAX_PIXELS:
                        return placeholder()
                    im.draft("RGB", (THUMB, THUMB))
                    small = im.convert("RGB")
                small.thumbnail((THUMB, THUMB))
                out.parent.mkdir(parents=True, exist_ok=True)
                with atomic_path(out) as tmp:
                    small.save(tmp, "JPEG", quality=85)
            except (OSError, ValueError, Image.DecompressionBombError):
                return placeholder()
        return out

    # -- browsing ----------------------------------------------------------------------------

    def columns(self) -> list[str]:
        """Label columns a user can filter by (the class label first)."""
        return sorted(self.labels, key=lambda c: (c != "label", c))

    def values(self, column: str) -> list[str]:
        return sorted({v for v in self.labels.get(column, []) if v})

    def rows(self, filters: dict[str, str] | None = None, failed: bool | None = None) -> np.ndarray:
        """Rows matching every ``column: value`` filter (and failed / not failed when asked)."""
        keep = np.ones(len(self.paths), bool)
        for column, value in (filters or {}).items():
            if column not in self.labels:
                raise SiteError(f"no label column {column!r}; the store has {self.columns()}")
            if column not in self._arrays:
                self._arrays[column] = np.asarray(self.labels[column], dtype=object)
            keep &= self._arrays[column] == value
        if failed is not None:
            keep &= self.failed == failed
        return np.flatnonzero(keep)

    def describe(self, row: int) -> dict[str, Any]:
        """One row as the pages and the API show it: ``path`` for reading (a name that is not
        UTF-8 shown with ``\\xNN`` escapes) and ``key``, the exact name percent-encoded, for
        ``?key=`` and ``/image/``, ``/thumb/`` URLs."""
        return {
            "path": shown(self.paths[row]),
            "key": url_key(self.paths[row]),
            "label": self.labels["label"][row] if "label" in self.labels else "",
            "split": self.labels["split"][row] if "split" in self.labels else "",
            "error": self.errors[row],
            "embedded": bool(row < len(self.valid) and self.valid[row]),
        }

    # -- review (``serve --annotate``) --------------------------------------------------------

    def review_arrays(self, level: str = "label") -> dict[str, np.ndarray]:
        """Per row, for the review page: label, status, the stored first prediction and its
        score (made once per commit)."""
        key = f"review:{level}"
        if key not in self._arrays:
            prov = self.store.provenance(level)
            pred = self.store.predictions(level)
            self._arrays[key] = np.asarray(self.labels[level], dtype=object)
            self._arrays[key + ":status"] = prov.status
            self._arrays[key + ":pred"] = pred.labels.astype(object)
            self._arrays[key + ":scores"] = pred.scores
        return {k: self._arrays[f"{key}{s}"] for k, s in
                (("label", ""), ("status", ":status"), ("pred", ":pred"), ("scores", ":scores"))}  # fmt: skip

    def review(
        self, label: str, *, level: str = "label", status: str = "", order: str = "asc",
        lo: float | None = None, hi: float | None = None, sample: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(rows, scores) of one class, validated or predicted: images labelled ``label``, and
        unlabelled images whose model's first choice it is; filtered by status name, score
        range and sample, sorted by score (``asc``: least sure first; no score last)."""
        if level not in self.labels:
            raise SiteError(f"no label level {level!r}; the store has {self.columns()}")
        a = self.review_arrays(level)
        mine = (a["label"] == label) | ((a["label"] == "") & (a["pred"][:, 0] == label))
        hit = a["pred"] == label
        score = np.where(hit.any(1), np.where(hit, a["scores"], 0).sum(1), np.nan)
        if status:
            if status not in STATUSES[1:]:
                raise SiteError(f"status {status!r} is not one of {', '.join(STATUSES[1:])}")
            mine &= a["status"] == STATUSES.index(status)
        if sample:
            in_sample = np.zeros(len(mine), bool)
            in_sample[self.rows({SAMPLE: sample})] = True
            mine &= in_sample
        if lo is not None:
            mine &= score >= lo
        if hi is not None:
            mine &= score <= hi
        rows = np.flatnonzero(mine)
        s = score[rows]
        key = np.where(np.isnan(s), np.inf, s if order == "asc" else -s)
        o = np.argsort(key, kind="stable")
        return rows[o], s[o]

    def queue_rows(
        self, level: str = "label", n: int = 120
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """The `penult next` queue as (rows, first-choice scores, a note per image)."""
        from penult.classify.tolabel import label_queue

        q = label_queue(self.store_path, n=n, level=level, backbone=self.backbone)
        notes = [f"{a} {pa:.2f} / {b} {np.nan_to_num(pb):.2f}"
                 for a, pa, b, pb in zip(q.first, q.first_p, q.second, q.second_p, strict=True)]  # fmt: skip
        return (
            np.array([self.row_of[p] for p in q.paths], np.int64),
            np.asarray(q.first_p, float),
            notes,
        )

    def suspect_rows(
        self, level: str = "label", n: int = 120
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """`penult mistakes`' ranking (a logistic regression over 3 folds, for a page that
        answers in seconds; made once per commit) as (rows, scores, a note per image)."""
        from penult.classify.mistakes import MistakeOptions, find_mistakes

        key = f"mistakes:{level}"
        if key not in self._ranked:
            opts = MistakeOptions(backbones=(self.backbone,), label=level, head="lr", folds=3)
            self._ranked[key] = find_mistakes(self.store_path, opts)
        res = self._ranked[key]
        r = res.ranking
        top = r.order()[:n]
        notes = [f"{res.labels[k]} \u2192 {r.suggested[k]} {r.suggested_p[k]:.2f}" for k in top]
        return np.array([self.row_of[res.paths[k]] for k in top], np.int64), r.score[top], notes

    def review_counts(self, level: str = "label") -> list[dict[str, Any]]:
        """Per class (validated or predicted as it), images per status, most images first."""
        a = self.review_arrays(level)
        cls = np.where(a["label"] == "", a["pred"][:, 0], a["label"])
        out = []
        names, inv = np.unique(cls.astype(str), return_inverse=True)
        for i, name in enumerate(names):
            if not name:
                continue
            st = np.bincount(a["status"][inv == i], minlength=len(STATUSES))
            out.append({"label": name, "total": int(st.sum()),
                        **{STATUSES[k]: int(st[k]) for k in range(1, len(STATUSES))}})  # fmt: skip
        return sorted(out, key=lambda d: -d["total"])

    # -- neighbours --------------------------------------------------------------------------

    def open_index(self) -> NeighborIndex:
        """The store's saved index for the backbone (built beside it on first use, as
        `penult neighbors` does; the store itself is not written). Where the store's folder
        cannot be written (a read-only share), the index is built and kept in memory."""
        if self.index is None:
            with self._lock:
                if self.index is None:
                    self.index = ensure_index(self.store_path, self.backbone, save="if-writable")
        return self.index

    def similar(self, key: str, k: int | None = None) -> list[dict[str, Any]]:
        """The k nearest stored images of the stored image ``key`` (not itself)."""
        row = self.row_of.get(key)
        if row is None:
            raise SiteError(f"{key!r} is not an image of this store")
        if not self.valid[row]:
            why = self.errors[row] or "not extracted with this backbone"
            raise SiteError(f"{key!r} has no embedding ({why})")
        return self._search(self.store.embeddings(self.backbone, [row])[0], k, exclude=row)

    def similar_upload(self, up: Upload, k: int | None = None) -> list[dict[str, Any]]:
        """The k nearest stored images of an uploaded picture, embedded with the store's backbone
        (rebuilt from its fingerprint: same weights and preprocessing, as `penult neighbors`)."""
        return self._search(self.embed_upload(up), k)

    def embed_upload(self, up: Upload) -> np.ndarray:
        self.require_images()
        fingerprint = self.store.backbone(self.backbone).fingerprint
        with _uploaded(up) as f:
            for _, X, failed in self.images.embed(self.backbone, fingerprint, [str(f)]):
                if failed:
                    raise SiteError(f"{up.name}: {failed[0][1]}")
                if len(X):
                    return X[0]
        raise SiteError(f"{up.name}: could not be embedded")

    def _search(self, x: np.ndarray, k: int | None, exclude: int = -1) -> list[dict[str, Any]]:
        k = k or self.k
        index = self.open_index()
        extra = max(0, len(index.rows) - len(self.paths))  # rows committed since the snapshot
        scores, rows = index.search(np.asarray(x, np.float32)[None], k + 1 + extra)
        hits = [(int(r), float(s)) for s, r in zip(scores[0], rows[0], strict=True)]
        n = len(self.paths)
        return [
            {**self.describe(r), "score": round(s, 6)}
            for r, s in hits
            if 0 <= r < n and r != exclude
        ][:k]

    # -- a model: its mistakes, and uploads scored ----------------------------------------------

    def mistakes(self, per_pair: int = 12) -> dict[str, Any]:
        """The model on its held-out split of this store: headline numbers, the most confused
        pairs by name with the images behind each, and per-class recall, worst first."""
        self.require_model()
        ev = self.evaluation
        m = ev.metrics
        pred = m["predictions"]
        col = {c: i for i, c in enumerate(pred.classes)}
        if self._wrong is None:  # the evaluation is fixed: group its mistakes once
            self._wrong = {}
            for i, (t, p) in enumerate(zip(ev.truth.tolist(), pred.label.tolist(), strict=True)):
                if t != p:
                    self._wrong.setdefault((t, p), []).append(i)
        pairs = []
        for pair in m["confused"]:
            idx = self._wrong[(pair["true"], pair["predicted"])][:per_pair]
            shown = [
                {**self.describe(self.row_of[ev.paths[i]]), "predicted": pair["predicted"],
                 "probability": float(pred.proba[i, col[pair["predicted"]]])
                 if pair["predicted"] in col else None}
                for i in idx
            ]  # fmt: skip
            pairs.append({**pair, "images": shown})
        per_class = sorted(
            ({"class": c, **{k: v[k] for k in ("recall", "precision", "support", "train")}}
             for c, v in m["per_class"].items()),
            key=lambda r: (r["recall"], r["class"]),
        )  # fmt: skip
        return {
            "split": ev.split, "n": ev.n, "top1": m["top1"],
            "balanced_accuracy": m["balanced_accuracy"], "classes": len(m["per_class"]),
            "pairs": pairs, "per_class": per_class,
        }  # fmt: skip

    def score_uploads(self, ups: list[Upload], top_k: int = 5) -> list[dict[str, Any]]:
        """The model's top-k for each uploaded image (and the path of a hierarchical model,
        "unknown" for one-vs-rest when no class passes), as `penult predict` would say."""
        self.require_model()
        self.require_images()
        if not ups:
            raise SiteError("no image was sent")
        refused: dict[int, str] = {}  # a bad name or an empty file: that image's error only
        with contextlib.ExitStack() as stack:
            files = []
            for i, u in enumerate(ups):
                try:
                    files.append(str(stack.enter_context(_uploaded(u))))
                except SiteError as e:
                    refused[i] = str(e)
            out = iter(predict_files(self.model, files, self.images, top_k) if files else [])
            said = [_unscored(refused[i]) if i in refused else next(out) for i in range(len(ups))]
        return [{"upload": u.name, **r} for u, r in zip(ups, said, strict=True)]

    @property
    def model_name(self) -> str:
        if self.model is None:
            return ""
        kind = f"{self.model.manifest.kind} {self.model.manifest.head}"
        return f"{Path(self.model_file).name} ({kind})" if self.model_file else f"the {kind} model"

    def require_model(self) -> None:
        if self.model is None:
            raise SiteError("start the server with --model MODEL to see its mistakes and scores")

    def require_images(self) -> None:
        if self.images is None:
            raise SiteError("this server was started without the image side; uploads are off")


def shown(name: str) -> str:
    """A stored name for reading: bytes that are not UTF-8 (kept surrogate-escaped) as ``\\xNN``."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def url_key(name: str) -> str:
    """A stored name percent-encoded byte for byte: exact for ``?key=`` and path lookups."""
    return quote(name.encode("utf-8", "surrogateescape"), safe="")


def _unscored(error: str) -> dict[str, Any]:
    """What ``predict_files`` says of an image it could not score."""
    return {"label": "", "probability": None, "path": [], "top": [], "unknown": False,
            "error": error}  # fmt: skip


def _commit_of(store: Path) -> tuple[int, int, int]:
    """What changes when a commit replaces the store's top-level file."""
    st = os.stat(store)
    return st.st_ino, st.st_mtime_ns, st.st_size


_PLACEHOLDER: list[bytes] = []


def placeholder() -> bytes:
    """The thumbnail of an image that cannot be shown: a plain grey JPEG."""
    if not _PLACEHOLDER:
        buf = io.BytesIO()
        Image.new("RGB", (THUMB, THUMB), (200, 200, 200)).save(buf, "JPEG", quality=85)
        _PLACEHOLDER.append(buf.getvalue())
    return _PLACEHOLDER[0]


def _writable(folder: Path) -> Path:
    """``folder`` if it can be made and written, else a private temporary one."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".probe"
        probe.write_bytes(b"")
        probe.unlink()
        return folder
    except OSError:
        return Path(tempfile.mkdtemp(prefix="penult-thumbs-"))


class _uploaded:
    """The upload as a temporary file with a safe name (its suffix only), removed afterwards."""

    def __init__(self, up: Upload):
        suffix = Path(up.name).suffix.lower()
        if suffix not in UPLOAD_SUFFIXES:
            kinds = ", ".join(sorted(UPLOAD_SUFFIXES))
            raise SiteError(f"{up.name or 'upload'}: not an image file name (use one of {kinds})")
        if not up.data:
            raise SiteError(f"{up.name}: empty file")
        self.up, self.suffix = up, suffix

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(prefix="penult-upload-", suffix=self.suffix)
        with os.fdopen(fd, "wb") as f:
            f.write(self.up.data)
        self.path = Path(name)
        return self.path

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)
