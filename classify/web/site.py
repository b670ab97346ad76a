"""What `penult serve` knows about one store: its rows, the files behind them (and only those),
thumbnails, filters and neighbour queries. No HTTP here: the app in ``app.py`` calls these.

The store is opened read-only and never written; thumbnails are cached beside it. Nothing reads
the whole table: a page reads the rows it shows (paths, roots, errors) and the compact
per-row arrays it filters by (label codes, review status), each once per commit, so a
million-row store answers as fast after a label change as before it (issue 32, part 9).
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
from penult.classify.evaluate import Evaluation, evaluate, out_of_fold, refit_here
from penult.classify.images import Images
from penult.classify.model import Model, resolve_backbones
from penult.classify.neighbors import NeighborIndex, ensure_index
from penult.classify.predict import predict_files
from penult.core import DEFAULT_MAX_PIXELS, SAMPLE, PenultError, atomic_path, ifcb
from penult.features import STATUSES, FeatureStore, commit_key
from PIL import Image

__all__ = ["PAGE", "Site", "SiteError", "Upload", "shown", "url_key"]

PAGE = 60  # thumbnails per grid page
KNOWN_KEYS = 200_000  # path -> row lookups remembered per commit (pages look their tiles up)
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
class Snapshot:
    """One commit of the store as the pages read it: the row count, which rows have an
    embedding, the label columns, and what was read since (per-row arrays, rows described),
    all dropped together when a commit replaces it. A request takes it once and reads only it."""

    store: FeatureStore
    commit: tuple[int, int, int]
    n: int
    valid: np.ndarray
    label_columns: list[str]
    segments: tuple[int, list[str]]  # the backbone's segments (valid is read again when they move)
    arrays: dict[str, Any] = field(default_factory=dict)
    row_of: dict[str, int] = field(default_factory=dict)  # paths looked up or shown
    info: dict[int, tuple[str, str, str, str]] = field(
        default_factory=dict
    )  # path, root, sha, error


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
    index: NeighborIndex | None = field(init=False, default=None)
    snap: Snapshot = field(init=False)

    def __post_init__(self) -> None:
        self.store_path = Path(self.store_path)
        self._lock = threading.Lock()
        self._thumbing = threading.BoundedSemaphore(THUMB_WORKERS)
        self._real_roots: dict[str, str] = {}
        self._evaluation: Evaluation | None = None
        self._carried: dict[str, tuple[tuple[str, ...], Any]] = {}  # see _versioned
        self._load()
        if self.model is not None:  # refused now (other store, other features), not on a click
            if refit_here(self.model, self.store_path):  # no held-out split: folds, when asked
                resolve_backbones(self.model, FeatureStore(self.store_path))
            else:
                self._evaluation = evaluate(self.model, self.store_path)
        if self.thumbs is None:
            self.thumbs = _writable(Path(f"{self.store_path}.thumbs"))

    def _load(self) -> None:
        """Take the store as it is now (one commit: the top-level file is replaced atomically)
        as what every request answers from; per-row arrays are read when first asked for."""
        seen = _commit_of(self.store_path)
        store = FeatureStore(self.store_path)
        have = store.backbone_names()
        if self.backbone not in have:
            names = ", ".join(sorted(have)) or "none"
            raise SiteError(f"{self.store_path}: no backbone {self.backbone!r} (it has: {names})")
        # which rows are embedded: read again only when the embeddings' segments changed (a
        # review action changes labels alone)
        segments = store.segment_ids(self.backbone)
        old = getattr(self, "snap", None)
        same = old is not None and old.segments == segments and old.n == len(store)
        valid = old.valid if same else store.valid(self.backbone)
        # one object, swapped at once: a request holding the old one reads it consistently
        self.snap = Snapshot(store, seen, len(store), valid, store.label_columns(), segments)
        if not same:
            self.index = None

    def refresh(self) -> bool:
        """Take up a commit made since the store was read (another `penult extract` into it, a
        label changed): the pages then show the new rows and labels, and the neighbour index is
        brought up to date with them. Cheap when nothing changed (one stat). Returns whether
        anything was reloaded."""
        if _commit_of(self.store_path) == self.snap.commit:
            return False
        with self._lock:
            if _commit_of(self.store_path) == self.snap.commit:
                return False
            self._load()
            if self.model is not None:
                self._evaluation = None  # evaluated again when the Mistakes page asks
            return True

    @property
    def store(self) -> FeatureStore:
        return self.snap.store

    @property
    def n(self) -> int:
        """Rows of the commit being shown."""
        return self.snap.n

    @property
    def evaluation(self) -> Evaluation | None:
        """The model on its held-out split of this commit (made when first asked for)."""
        if self.model is not None and self._evaluation is None:
            with self._lock:
                if self._evaluation is None:
                    self._evaluation = (
                        out_of_fold(self.model, self.store_path)
                        if refit_here(self.model, self.store_path)
                        else evaluate(self.model, self.store_path)
                    )
        return self._evaluation

    # -- rows ----------------------------------------------------------------------------------

    def row(self, key: str) -> int | None:
        """The row of the stored path ``key`` in this commit, or None."""
        s = self.snap
        r = s.row_of.get(key)
        if r is None:
            r = int(s.store.find([key])[0])
            if not 0 <= r < s.n:
                return None
            self._remember(s, {key: r})
        return r

    def rows_of(self, keys: list[str]) -> np.ndarray:
        """Rows of stored paths (all must be rows of this commit: -1 where one is not)."""
        s = self.snap
        rows = s.store.find(list(keys)) if keys else np.zeros(0, np.int64)
        rows = np.where(rows < s.n, rows, -1)
        self._remember(s, {k: int(r) for k, r in zip(keys, rows, strict=True) if r >= 0})
        return rows

    @staticmethod
    def _remember(s: Snapshot, found: dict[str, int]) -> None:
        if len(s.row_of) > KNOWN_KEYS:
            s.row_of.clear()
        s.row_of.update(found)

    def _info(self, rows) -> list[tuple[str, str, str, str]]:
        """(path, root, sha256, error) of each row, read once per commit in one pass."""
        s = self.snap
        want = np.unique(np.asarray([r for r in rows if r not in s.info], np.int64))
        if len(want):
            if len(s.info) > KNOWN_KEYS:
                s.info.clear()
            t = s.store.images(want)
            for r, p, root, sha, err in zip(want.tolist(), t.path, t.root, t.sha256, t.error,
                                            strict=True):  # fmt: skip
                s.info[r] = (p, root, sha, err)
                s.row_of[p] = r
        return [s.info[r] for r in rows]

    # -- files -----------------------------------------------------------------------------

    def file(self, key: str) -> Path | bytes:
        """The image file of the store row ``key``, or for an IFCB ROI (no file of its own) its
        pixels as a PNG; nothing else: a key that is not a row, or a file that resolves (through
        links) outside its image root, is refused."""
        row = self.row(key)
        if row is None:
            raise FileNotFoundError(key)
        _, root, _, _ = self._info([row])[0]
        real_root = self._real_roots.setdefault(root, os.path.realpath(root))
        real = os.path.realpath(os.path.join(root, key))
        roi = ifcb.virtual_roi(real)
        if roi is not None:
            parts = [os.path.realpath(f"{roi[0]}{s}") for s in (".adc", ".roi")]
            if any(os.path.commonpath([p, real_root]) != real_root for p in parts):
                raise FileNotFoundError(key)
            try:
                pgm, _ = ifcb.read_roi(roi[0], roi[1])
            except (ifcb.BinError, OSError):
                raise FileNotFoundError(key) from None
            buf = io.BytesIO()
            with Image.open(io.BytesIO(pgm)) as im:
                im.save(buf, "PNG")
            return buf.getvalue()
        if os.path.commonpath([real, real_root]) != real_root or not os.path.isfile(real):
            raise FileNotFoundError(key)
        return Path(real)

    def thumbnail(self, key: str) -> Path | bytes:
        """A JPEG thumbnail of row ``key``, made once and cached by the file's content hash; a
        placeholder (bytes) for a row that failed in extract or an image over the pixel limit,
        which is never decoded. At most ``THUMB_WORKERS`` are made at once."""
        src = self.file(key)
        _, _, sha, error = self._info([self.row(key)])[0]
        if error:  # extract refused it (a bomb, a corrupt file): not decoded here
            return placeholder()
        if isinstance(src, bytes):
            src_name, src = key, io.BytesIO(src)
        else:
            src_name = str(src)
        name = sha or hashlib.sha256(src_name.encode("utf-8", "surrogateescape")).hexdigest()
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
        return sorted(self.snap.label_columns, key=lambda c: (c != "label", c))

    def has(self, column: str) -> bool:
        return column in self.snap.label_columns

    def _cached(self, key: str, make):
        s = self.snap
        if key not in s.arrays:
            s.arrays[key] = make(s.store)
        return s.arrays[key]

    def _versioned(self, key: str, column: str, parts: tuple[str, ...], make):
        """``make(store)`` once per commit, carried over to later commits while the parts of
        label ``column`` it was read from are unchanged (validating images changes their
        status, not their labels or predictions: only the status is read again)."""
        s = self.snap
        if key not in s.arrays:
            versions = self._cached(f"versions:{column}", lambda st: st.label_versions(column))
            tag = tuple(versions[p] for p in parts)
            hit = self._carried.get(key)
            if hit is None or hit[0] != tag:
                hit = (tag, make(s.store))
                self._carried[key] = hit
            s.arrays[key] = hit[1]
        return s.arrays[key]

    def codes(self, column: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes, names as an object array) of a label column."""
        if not self.has(column):
            raise SiteError(f"no label column {column!r}; the store has {self.columns()}")

        def read(store):
            codes, names = store.label_codes(column)
            return codes, np.asarray(names, dtype=object)

        return self._versioned(f"codes:{column}", column, ("label",), read)

    def values(self, column: str) -> list[str]:
        """The values a column holds (not ""), sorted."""
        if not self.has(column):
            return []

        def read(_):
            codes, names = self.codes(column)
            held = np.bincount(codes, minlength=len(names)) > 0
            return sorted(v for v in names[held].tolist() if v)

        return self._versioned(f"values:{column}", column, ("label",), read)

    def labels_of(self, rows, column: str = "label") -> list[str]:
        if not self.has(column):
            return [""] * len(rows)
        codes, names = self.codes(column)
        return names[codes[np.asarray(rows, np.int64)]].tolist()

    def rows(self, filters: dict[str, str] | None = None, failed: bool | None = None) -> np.ndarray:
        """Rows matching every ``column: value`` filter (and failed / not failed when asked)."""
        keep = np.ones(self.n, bool)
        for column, value in (filters or {}).items():
            codes, names = self.codes(column)
            hit = np.flatnonzero(names == value)
            keep &= codes == (hit[0] if len(hit) else -1)
        if failed is not None:
            keep &= self._cached("failed", lambda st: st.table_view().failed) == failed
        return np.flatnonzero(keep)

    def describe(self, row: int) -> dict[str, Any]:
        return self.describe_rows([row])[0]

    def describe_rows(self, rows) -> list[dict[str, Any]]:
        """Rows as the pages and the API show them (the table read once for all): ``path`` for
        reading (a name that is not UTF-8 shown with ``\\xNN`` escapes) and ``key``, the exact
        name percent-encoded, for ``?key=`` and ``/image/``, ``/thumb/`` URLs."""
        rows = [int(r) for r in rows]
        s = self.snap
        label, split = self.labels_of(rows, "label"), self.labels_of(rows, "split")
        return [
            {"path": shown(p), "key": url_key(p), "label": lab, "split": sp, "error": err,
             "embedded": bool(r < len(s.valid) and s.valid[r])}
            for r, (p, _, _, err), lab, sp in zip(rows, self._info(rows), label, split,
                                                  strict=True)
        ]  # fmt: skip

    # -- review (``serve --annotate``) --------------------------------------------------------

    def review_arrays(self, level: str = "label") -> dict[str, np.ndarray]:
        """Per row, for the review page, as codes into one list of ``names`` (the level's labels
        and every predicted name; ``none`` is the code of ""): ``label`` (n,), ``status``,
        ``pred`` (n, 3) the stored top 3 predictions and their ``scores`` (once per commit)."""

        codes, names = self.codes(level)
        # read again only when the predictions change (a move changes the labels alone)
        stored = self._versioned(f"stored-pred:{level}", level, ("pred",),
                                 lambda store: store.predictions(level))  # fmt: skip

        def predicted(_):
            pred = stored
            known = set(names.tolist())
            extra = [v for v in pred.names.tolist() if v not in known]
            allnames = np.asarray([*names.tolist(), *extra], dtype=object)
            at = {v: i for i, v in enumerate(allnames.tolist())}
            remap = np.asarray([at[v] for v in pred.names.tolist()], np.int32)
            return {"label": codes.astype(np.int32), "pred": remap[pred.codes],
                    "scores": pred.scores, "names": allnames, "none": at.get("", -1)}  # fmt: skip

        a = self._versioned(f"pred:{level}", level, ("label", "pred"), predicted)
        status = self._versioned(f"status:{level}", level, ("label", "review"),
                                 lambda store: store.statuses(level))  # fmt: skip
        return {**a, "status": status}

    def warm(self, level: str = "label") -> None:
        """Read what the review page filters and counts by (labels, statuses, predictions)
        before anyone asks: `penult serve --annotate` does this while it starts."""
        if self.has(level):
            self.review_arrays(level)

    def review(
        self, label: str, *, level: str = "label", status: str = "", order: str = "asc",
        lo: float | None = None, hi: float | None = None, sample: str = "",
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(rows, scores) of one class, validated or predicted: images labelled ``label``, and
        unlabelled images whose model's first choice it is; filtered by status name, score
        range and sample, sorted by score (``asc``: least sure first; no score last)."""
        if not self.has(level):
            raise SiteError(f"no label level {level!r}; the store has {self.columns()}")
        a = self.review_arrays(level)
        code = np.flatnonzero(a["names"] == label)
        code = code[0] if len(code) else -2  # a name nothing holds: no rows
        rows = np.flatnonzero(
            (a["label"] == code) | ((a["label"] == a["none"]) & (a["pred"][:, 0] == code))
        )
        hit = a["pred"][rows] == code
        score = np.where(hit.any(1), np.where(hit, a["scores"][rows], 0).sum(1), np.nan)
        keep = np.ones(len(rows), bool)
        if status:
            if status not in STATUSES[1:]:
                raise SiteError(f"status {status!r} is not one of {', '.join(STATUSES[1:])}")
            keep &= a["status"][rows] == STATUSES.index(status)
        if sample:
            keep &= np.isin(rows, self.rows({SAMPLE: sample}))
        if lo is not None:
            keep &= score >= lo
        if hi is not None:
            keep &= score <= hi
        rows, s = rows[keep], score[keep]
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
        return self.rows_of(list(q.paths)), np.asarray(q.first_p, float), notes

    def suspect_rows(
        self, level: str = "label", n: int = 120
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """`penult mistakes`' ranking (a logistic regression over 3 folds, for a page that
        answers in seconds; made once per commit) as (rows, scores, a note per image)."""
        from penult.classify.mistakes import MistakeOptions, find_mistakes

        opts = MistakeOptions(backbones=(self.backbone,), label=level, head="lr", folds=3)
        res = self._cached(f"mistakes:{level}", lambda _: find_mistakes(self.store_path, opts))
        r = res.ranking
        top = r.order()[:n]
        notes = [f"{res.labels[k]} \u2192 {r.suggested[k]} {r.suggested_p[k]:.2f}" for k in top]
        return self.rows_of([res.paths[k] for k in top]), r.score[top], notes

    def review_counts(self, level: str = "label") -> list[dict[str, Any]]:
        """Per class (validated or predicted as it), images per status, most images first."""
        a = self.review_arrays(level)
        cls = np.where(a["label"] == a["none"], a["pred"][:, 0], a["label"])
        k = len(STATUSES)
        per = np.bincount(cls * k + a["status"], minlength=len(a["names"]) * k).reshape(-1, k)
        out = [
            {"label": name, "total": int(per[i].sum()),
             **{STATUSES[j]: int(per[i, j]) for j in range(1, k)}}
            for i, name in enumerate(a["names"].tolist())
            if name and per[i].any()
        ]  # fmt: skip
        return sorted(out, key=lambda d: (-d["total"], d["label"]))

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
        row = self.row(key)
        if row is None:
            raise SiteError(f"{key!r} is not an image of this store")
        if not self.snap.valid[row]:
            why = self._info([row])[0][3] or "not extracted with this backbone"
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
        n = self.n
        extra = max(0, len(index.rows) - n)  # rows committed since the snapshot
        scores, rows = index.search(np.asarray(x, np.float32)[None], k + 1 + extra)
        hits = [(int(r), float(s)) for s, r in zip(scores[0], rows[0], strict=True)]
        hits = [(r, s) for r, s in hits if 0 <= r < n and r != exclude][:k]
        return [
            {**d, "score": round(s, 6)}
            for d, (_, s) in zip(self.describe_rows([r for r, _ in hits]), hits, strict=True)
        ]

    # -- a model: its mistakes, and uploads scored ----------------------------------------------

    def mistakes(self, per_pair: int = 12) -> dict[str, Any]:
        """The model on its held-out split of this store: headline numbers, the most confused
        pairs by name with the images behind each, and per-class recall, worst first."""
        self.require_model()
        ev = self.evaluation
        m = ev.metrics
        pred = m["predictions"]
        col = {c: i for i, c in enumerate(pred.classes)}
        wrong: dict[tuple[str, str], list[int]] = {}  # the evaluation's mistakes by pair
        for i, (t, p) in enumerate(zip(ev.truth.tolist(), pred.label.tolist(), strict=True)):
            if t != p:
                wrong.setdefault((t, p), []).append(i)
        pairs = []
        for pair in m["confused"]:
            idx = wrong[(pair["true"], pair["predicted"])][:per_pair]
            rows = self.rows_of([ev.paths[i] for i in idx])
            shown = [
                {**d, "predicted": pair["predicted"],
                 "probability": float(pred.proba[i, col[pair["predicted"]]])
                 if pair["predicted"] in col else None}
                for i, d in zip(idx, self.describe_rows(rows), strict=True)
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


def _commit_of(store: Path) -> tuple:
    """What changes when a commit replaces the store's top-level file or a review action is
    journaled (see :func:`penult.features.commit_key`)."""
    return commit_key(store)


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
