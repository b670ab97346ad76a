"""Batch scoring: images in, one CSV row per image out (top-k labels with probabilities).

Files are processed in chunks, so memory stays flat for any number of images, and the CSV is
written as ``OUT.partial`` and renamed when complete: an interrupted run never leaves a
truncated file under the final name. With a store, images already embedded there (same content
hash, same backbone fingerprint) are not run through the network again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.images import Images
from penult.classify.model import Model, Predictions, resolve_backbones
from penult.classify.options import PredictOptions
from penult.core import SAMPLE, OptionError, atomic_path, check_out_folder, regular_sha256
from penult.features import FeatureStore, HashIndex, sha_raw
from tqdm.auto import tqdm


@dataclass
class PredictSummary:
    out: Path
    listed: int = 0
    scored: int = 0
    from_store: int = 0
    extracted: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def report(self, max_failed: int = 20) -> str:
        rate = self.scored / self.seconds if self.seconds else 0.0
        lines = [
            f"scored {self.scored} of {self.listed} images -> {self.out} in {self.seconds:.1f} s "
            f"({rate:.1f} images/s; {self.from_store} from the store, {self.extracted} extracted)"
        ]
        lines += [f"  FAILED {p}: {why}" for p, why in self.failed[:max_failed]]
        if len(self.failed) > max_failed:
            lines.append(
                f"  ... and {len(self.failed) - max_failed} more (error column of the CSV)"
            )
        return "\n".join(lines)


@dataclass
class Inputs:
    """Every image under the inputs, each file once, in order: (shown path, absolute path); the
    files skipped for their extension (shown paths); the images' sample columns, one value per
    image ("" where an input has no such column); and which input each image came from."""

    files: list[tuple[str, str]]
    ignored: list[str]
    carried: dict[str, list[str]]
    origin: list[int]


def list_inputs(inputs: Sequence[str], images: Images) -> Inputs:
    """The images under ``inputs`` (see :class:`Inputs`), listed by ``images``."""
    seen: set[str] = set()
    out, ignored, origin = [], [], []
    parts: list[tuple[list[int], dict[str, list[str]]]] = []
    for k, src in enumerate(inputs):
        files, skipped, columns = images.list(src)
        kept = []
        for i, (shown, absolute) in enumerate(files):
            if absolute not in seen:
                seen.add(absolute)
                out.append((shown, absolute))
                kept.append(i)
        origin += [k] * len(kept)
        parts.append((kept, columns))
        ignored += skipped
    names = list(dict.fromkeys(c for _, columns in parts for c in columns))
    carried = {c: [] for c in names}
    for kept, columns in parts:
        for c in names:
            values = columns.get(c)
            carried[c] += [values[i] for i in kept] if values else [""] * len(kept)
    return Inputs(out, ignored, carried, origin)


def csv_header(model: Model, top_k: int) -> list[str]:
    levels = model.levels[:-1]
    tops = [f"{k}{i}" for i in range(1, top_k + 1) for k in ("top", "prob")]
    return ["path", "prediction", "probability", "unknown", "novelty", *levels, *tops, "error"]


def answers(
    pred: Predictions, top_k: int
) -> Iterator[tuple[str, float | None, list[str], list[tuple[str, float]]]]:
    """Per image: (label, its probability or None for "unknown" (no class passed its
    threshold), the coarse-to-fine path ([] for a flat model), the top-k (label, probability))."""
    labels, probs = pred.top(top_k)
    col = {c: i for i, c in enumerate(pred.classes)}
    for i, label in enumerate(pred.label):
        j = col.get(label)
        yield (
            str(label),
            None if j is None else float(pred.proba[i, j]),
            [] if pred.path is None else [str(v) for v in pred.path[i]],
            [(str(c), float(p)) for c, p in zip(labels[i], probs[i], strict=True)],
        )


def csv_rows(paths: Sequence[str], pred: Predictions, model: Model, top_k: int) -> list[list[Any]]:
    """One row per image: prediction and its probability, whether the model calls it "not one
    of my classes" (1) and its open-set score, coarse levels, top-k pairs."""
    rows = []
    n = len(paths)
    unknown = pred.flagged if pred.flagged is not None else np.zeros(n, bool)
    novelty = [""] * n if pred.novelty is None else [f"{v:.6g}" for v in pred.novelty]
    for i, (p, (label, prob, path, tops)) in enumerate(
        zip(paths, answers(pred, top_k), strict=True)
    ):
        cells = [v for c, q in tops for v in (c, f"{q:.6f}")]
        prob_cell = "" if prob is None else f"{prob:.6f}"
        flag = int(unknown[i])
        rows.append([p, label, prob_cell, flag, novelty[i], *path[:-1], *cells, ""])
    return rows


def weights_for(model: Model, weights: Sequence[str]) -> dict[str, str]:
    """``--weights`` values (FILE, or NAME=FILE for a model that fuses backbones) by entry name."""
    out: dict[str, str] = {}
    for w in weights:
        name, sep, path = w.partition("=")
        if not sep:
            if len(model.backbones) != 1:
                raise OptionError(
                    f"model fuses {', '.join(model.backbones)}: give --weights NAME=FILE"
                )
            name, path = model.backbones[0], w
        out[name] = path
    return out


class _Features:
    """Features of a chunk of files: from the store where cached, else from the network."""

    def __init__(self, model: Model, opts: PredictOptions, images: Images):
        self.model, self.opts, self.images = model, opts, images
        self.store = FeatureStore(opts.store) if opts.store else None
        self._cache: list[tuple[str, dict[str, int]]] | None = None
        if self.store is not None:
            self.names = resolve_backbones(model, self.store)  # checked before anything runs
        else:  # every image goes through the network: build (and check) it before writing anything
            for spec in model.manifest.backbones:
                images.check(spec.name, spec.fingerprint)

    def stored_rows(self) -> list[tuple[str, HashIndex]]:
        """Per backbone: (store entry, its rows by content hash). Read on first use, so a
        driver that only hands chunks to Dask workers never reads the store's hash table."""
        if self._cache is None:
            self._cache = [(name, self.store.hash_index(name)) for name in self.names]
        return self._cache

    def __call__(
        self, files: list[str], s: PredictSummary
    ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
        """((n, D) features, (n,) ok mask, position -> failure reason)."""
        n, blocks, ok, errors = len(files), [], np.ones(len(files), bool), {}
        sha = [""] * n
        if self.store is not None:
            with ThreadPoolExecutor(4) as pool:
                sha = list(pool.map(regular_sha256, files))
        for k, spec in enumerate(self.model.manifest.backbones):
            x = np.zeros((n, spec.dim), np.float32)
            have = np.zeros(n, bool)
            if self.store is not None:
                name, index = self.stored_rows()[k]
                rows = index.find(sha_raw(sha))
                hit = np.flatnonzero((rows >= 0) & np.array([bool(h) for h in sha]))
                if len(hit):
                    x[hit] = self.store.embeddings(name, rows[hit])
                    have[hit] = True
            cached = int(have.sum())
            todo = np.flatnonzero(~have & ok)
            if len(todo):
                batches = self.images.embed(spec.name, spec.fingerprint, [files[i] for i in todo])
                for idx, X, failed in batches:
                    x[todo[idx]] = X
                    have[todo[idx]] = True
                    for j, why in failed:
                        errors[int(todo[j])] = why
            if k == 0:
                s.from_store += cached
                s.extracted += int(have.sum()) - cached
            ok &= have
            blocks.append(x)
        return np.concatenate(blocks, axis=1), ok, errors


@dataclass
class Scored:
    """The CSV rows of one chunk of files, in the chunk's order, and what happened to them."""

    rows: list[list[Any]]
    failed: list[tuple[str, str]]
    scored: int
    from_store: int
    extracted: int


@dataclass
class ChunkPredictions:
    """What the model says about one chunk of files: ``pred`` covers the positions ``good``
    (None where no file could be used); ``errors`` says why each other position failed."""

    good: np.ndarray
    pred: Predictions | None
    errors: dict[int, str]
    from_store: int
    extracted: int


def predict_chunk(model: Model, feats: _Features, files: list[str]) -> ChunkPredictions:
    """Features of ``files`` (absolute paths; from the store where cached), then the model."""
    counts = PredictSummary(Path())
    X, ok, errors = feats(files, counts)
    good = np.flatnonzero(ok)
    pred = model.predict(X[good]) if len(good) else None
    bad = {int(i): errors.get(int(i), "no features") for i in np.flatnonzero(~ok)}
    return ChunkPredictions(good, pred, bad, counts.from_store, counts.extracted)


def score_chunk(model: Model, feats: _Features, part: list[tuple[str, str]], top_k: int) -> Scored:
    """Score one chunk of (shown path, absolute path); unreadable files get a row with why."""
    width = len(csv_header(model, top_k))
    c = predict_chunk(model, feats, [a for _, a in part])
    rows: list[list[Any]] = [[]] * len(part)
    if c.pred is not None:
        shown = [part[i][0] for i in c.good]
        for i, row in zip(c.good, csv_rows(shown, c.pred, model, top_k), strict=True):
            rows[i] = row
    failed = []
    for i, why in c.errors.items():
        rows[i] = [part[i][0]] + [""] * (width - 2) + [why]
        failed.append((part[i][0], why))
    return Scored(rows, failed, len(c.good), c.from_store, c.extracted)


_WORKER_FEATURES: dict[str, _Features] = {}  # per Dask worker: networks built once per job


def _score_task(
    job: str, model: Model, opts: PredictOptions, images: Images, part: list, top_k: int | None
) -> Scored | ChunkPredictions:
    """One chunk on a Dask worker (threads, loader and GPU fitted to the worker's share): its
    CSV rows, or with ``top_k`` None (`penult count`) the model's raw predictions."""
    from penult.core.cluster import ONE_AT_A_TIME

    with ONE_AT_A_TIME:
        if job not in _WORKER_FEATURES:
            _WORKER_FEATURES.clear()
            _WORKER_FEATURES[job] = _Features(model, opts, images.for_worker())
        return _chunk(model, _WORKER_FEATURES[job], part, top_k)


def _chunk(
    model: Model, feats: _Features, part: list[tuple[str, str]], top_k: int | None
) -> Scored | ChunkPredictions:
    """One chunk's CSV rows, or with ``top_k`` None the model's raw predictions."""
    if top_k is None:
        return predict_chunk(model, feats, [a for _, a in part])
    return score_chunk(model, feats, part, top_k)


def _chunks(
    model: Model,
    files: list[tuple[str, str]],
    opts: PredictOptions,
    feats: _Features,
    top_k: int | None,
) -> Iterator[Scored | ChunkPredictions]:
    """:func:`_chunk` for each chunk of ``files`` in order, here or on ``opts.cluster``."""
    if opts.cluster:
        yield from scored_on_cluster(model, files, opts, feats.images, top_k)
        return
    for i in range(0, len(files), opts.chunk):
        yield _chunk(model, feats, files[i : i + opts.chunk], top_k)


def scored_on_cluster(
    model: Model,
    files: list[tuple[str, str]],
    opts: PredictOptions,
    images: Images,
    top_k: int | None,
):
    """Yield each chunk's :class:`Scored` (``top_k`` None: :class:`ChunkPredictions`) in input
    order, scored as Dask tasks (retried when a worker dies); chunks that finish early wait in
    memory for the ones before them."""
    import uuid

    from penult.core.cluster import balanced_size, client_for, close, run_tasks

    client = client_for(opts.cluster)
    try:
        size = balanced_size(len(files), opts.chunk, len(client.scheduler_info()["workers"]))
        chunks = [files[i : i + size] for i in range(0, len(files), size)]
        shared = client.scatter(model, broadcast=True)  # sent once, not with every task
        o = PredictOptions(**{**opts.__dict__, "progress": False, "cluster": None})
        job = uuid.uuid4().hex
        args = [(job, shared, o, images, c, top_k) for c in chunks]
        waiting: dict[int, Scored] = {}
        at = 0
        for i, r in run_tasks(
            client, _score_task, args, [len(c) for c in chunks], "predict (cluster)", opts.progress
        ):
            waiting[i] = r
            while at in waiting:
                yield waiting.pop(at)
                at += 1
    finally:
        close(client)


def stream_predictions(
    model: Model, files: list[tuple[str, str]], opts: PredictOptions, images: Images
) -> Iterator[tuple[int, ChunkPredictions]]:
    """(chunk length, :class:`ChunkPredictions`) for each chunk of ``files`` ((shown, absolute)
    paths), in order, scored here or on ``opts.cluster``. The networks and the store are
    checked when this is called, before any chunk is asked for."""
    feats = _Features(model, opts, images)
    return ((len(c.good) + len(c.errors), c) for c in _chunks(model, files, opts, feats, None))


def predict_files(
    model: Model, files: list[str], images: Images, top_k: int = 5
) -> list[dict[str, Any]]:
    """Each file's prediction as a dict: label (the model's unknown label when no class passes a
    one-vs-rest threshold), its probability, the coarse-to-fine path of a hierarchical model,
    the top-k and an error for a file that could not be used. Same features and model as
    `penult predict`; what `penult serve` shows for uploads."""
    feats = _Features(model, PredictOptions(progress=False), images)
    X, ok, errors = feats(files, PredictSummary(Path()))
    out: list[dict[str, Any]] = [
        {"label": "", "probability": None, "path": [], "top": [], "unknown": False,
         "error": errors.get(i, "no features")}
        for i in range(len(files))
    ]  # fmt: skip
    good = np.flatnonzero(ok)
    if not len(good):
        return out
    pred = model.predict(X[good])
    k = max(1, min(top_k, len(pred.classes)))
    flagged = pred.flagged if pred.flagged is not None else np.zeros(len(good), bool)
    for j, (i, (label, prob, path, tops)) in enumerate(
        zip(good.tolist(), answers(pred, k), strict=True)
    ):
        out[i] = {
            "label": label, "probability": prob, "path": path,
            "top": [{"label": c, "probability": q} for c, q in tops],
            "unknown": bool(prob is None or flagged[j]), "error": "",
        }  # fmt: skip
    return out


def predict_images(
    model: Model,
    inputs: Sequence[str],
    out: str | os.PathLike[str],
    opts: PredictOptions,
    images: Images,
    fmt: str = "csv",
) -> PredictSummary:
    """Score every image under ``inputs`` and write ``out`` as CSV (see module docstring), with
    ``fmt="ecotaxa"`` as an EcoTaxa import TSV, or with ``fmt="ifcb"`` as a folder of per-bin
    score files; ``images`` lists the inputs and embeds what the store does not hold (the CLI
    builds it as an ``extract.Featuriser``)."""
    if fmt not in FORMATS:
        raise OptionError(f"format {fmt!r} is not one of {', '.join(FORMATS)}")
    t0 = time.perf_counter()
    out = Path(out)
    if fmt == "ifcb" and out.exists() and not out.is_dir():
        raise OptionError(f"{out}: --format ifcb writes a folder of score files; this is a file")
    listed = list_inputs(inputs, images)
    files, ignored, carried = listed.files, listed.ignored, listed.carried
    s = PredictSummary(out, listed=len(files) + len(ignored))
    check_out_folder(out)
    feats = _Features(model, opts, images)  # networks and store checked before anything runs
    if fmt == "ifcb":
        _write_ifcb(model, files, out, feats, opts, s)
    else:
        with atomic_path(out, tmp=Path(f"{out}.partial")) as tmp:  # a failed run leaves none
            if fmt == "ecotaxa":
                _write_ecotaxa(model, files, tmp, feats, opts, s, carried, out.parent)
            else:
                _write(model, files, ignored, tmp, feats, opts, s, carried)
    if fmt != "csv":  # the CSV gives each skipped file a row; the other formats name them here
        s.failed += [(shown, _unsupported(shown)) for shown in ignored]
    s.seconds = time.perf_counter() - t0
    return s


FORMATS = ("csv", "ecotaxa", "ifcb")


def _unsupported(shown: str) -> str:
    return f"unsupported file type {Path(shown).suffix or '(no extension)'!r}, not an image"


def _scored(
    model: Model, files: list[tuple[str, str]], opts: PredictOptions, feats: _Features,
    top_k: int, s: PredictSummary,
) -> Iterator[tuple[int, list[Any]]]:  # fmt: skip
    """(index into ``files``, its CSV row) for every file in order, chunk by chunk, with the
    progress bar and the summary's counts kept as they go."""
    quiet = not opts.progress or bool(opts.cluster)  # the cluster's own bar counts all workers
    done = 0
    with tqdm(total=len(files), desc="predict", unit="img", disable=quiet) as bar:
        for r in _chunks(model, files, opts, feats, top_k):
            yield from enumerate(r.rows, done)
            done += len(r.rows)
            s.failed += r.failed
            s.scored += r.scored
            s.from_store += r.from_store
            s.extracted += r.extracted
            bar.update(len(r.rows))


def _write_ifcb(
    model: Model, files: list[tuple[str, str]], out: Path, feats: _Features,
    opts: PredictOptions, s: PredictSummary,
) -> None:  # fmt: skip
    """One score file per IFCB bin in the folder ``out`` (``features.write_scores``, the IFCB
    Dashboard's class-scores layout: ``<bin>_class.h5``): every class's score for every ROI
    scored. Inputs that are not IFCB ROIs, and ROIs that could not be scored, are in the
    summary only."""
    from penult.core import ifcb
    from penult.features import write_scores

    classes = [str(c) for c in model.classes]
    col = {c: i for i, c in enumerate(classes)}
    start = 5 + len(model.levels[:-1])  # csv_rows: path, label, prob, unknown, novelty, levels
    per_bin: dict[str, tuple[list[int], list[np.ndarray]]] = {}
    for i, row in _scored(model, files, opts, feats, len(classes), s):
        if row[-1]:  # an error: not scored (in the summary already)
            continue
        roi = ifcb.roi_source(files[i][1])
        if roi is None:
            s.failed.append((files[i][0], "not an IFCB ROI: no bin to write it to"))
            continue
        v = np.zeros(len(classes), np.float32)
        cells = row[start:-1]
        for c, p in zip(cells[::2], cells[1::2], strict=True):
            v[col[str(c)]] = float(p)
        numbers, scores = per_bin.setdefault(roi[0].name, ([], []))
        numbers.append(roi[1])
        scores.append(v)
    out.mkdir(parents=True, exist_ok=True)
    tag = str(model.manifest.model_sha256 or "unsaved")[:12]  # the model file's hash
    for name, (numbers, scores) in sorted(per_bin.items()):
        order = np.argsort(numbers, kind="stable")
        write_scores(out / f"{name}_class.h5", np.asarray(numbers)[order], classes,
                     np.stack(scores)[order], classifier=f"penult {tag}")  # fmt: skip


def _write_ecotaxa(
    model: Model, files: list[tuple[str, str]], partial: Path, feats: _Features,
    opts: PredictOptions, s: PredictSummary, carried: dict[str, list[str]], base: Path,
) -> None:  # fmt: skip
    """Score ``files`` into an EcoTaxa import TSV (``core.ecotaxa.TsvWriter``): a row per
    scored image, its ``object_id`` the input's (an EcoTaxa export's) or the image's name, its
    ``img_file_name`` relative to the TSV's folder where the image lies under it. Images that
    could not be scored are not objects EcoTaxa can import: they are in the summary only."""
    from penult.core.ecotaxa import TsvWriter

    ids, sample = carried.get("object_id"), carried.get(SAMPLE)
    base = base.resolve()
    with open(partial, "w", encoding="utf-8", newline="") as fh:
        w = TsvWriter(fh, ["sample_id"] if sample else [])
        for i, row in _scored(model, files, opts, feats, 1, s):
            if row[-1]:  # an error: not scored
                continue
            absolute = files[i][1]
            oid = ids[i] if ids and ids[i] else Path(absolute).stem
            rel = os.path.relpath(absolute, base)
            image = Path(rel).as_posix() if not rel.startswith("..") else absolute
            score = float(row[2]) if row[2] != "" else None
            w.row(oid, image, row[1], score, [sample[i]] if sample else [])


def _write(
    model: Model,
    files: list[tuple[str, str]],
    ignored: list[str],
    partial: Path,
    feats: _Features,
    opts: PredictOptions,
    s: PredictSummary,
    carried: dict[str, list[str]] | None = None,
) -> None:
    """Score ``files`` chunk by chunk into ``partial``; skipped files get a row with the reason.
    ``carried`` columns (the sample and its metadata) follow the path, as the input gave them."""
    top_k = max(1, min(opts.top_k, len(model.classes)))
    carried = carried or {}
    header = csv_header(model, top_k)
    header = [header[0], *carried, *header[1:]]
    with open_csv(partial) as fh:
        w = SafeWriter(fh)
        w.writerow(header)
        for i, row in _scored(model, files, opts, feats, top_k, s):
            w.writerow([row[0], *(v[i] for v in carried.values()), *row[1:]])
        for shown in ignored:
            why = _unsupported(shown)
            w.writerow([shown] + [""] * (len(header) - 2) + [why])
            s.failed.append((shown, why))
