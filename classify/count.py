"""`penult count`: from one label per image to what an ecologist publishes, counts per sample.

Per sample and class: the images the classifier gave the class, the class's share of the sample
estimated by a quantification method (corrected for the shift between the training set's class
mix and the sample's: :mod:`classify.quantify`), its 95% bootstrap interval, and the
concentration per mL where the sample's ``volume_ml`` is known. Images the model calls "not one
of my classes" are a row of their own, ``unclassified``. Files are listed first and scored
sample by sample, so memory holds one sample's tally, never the run's images; the CSVs are
written as ``.partial`` files, each sample as it completes, and renamed at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.images import Images
from penult.classify.model import Model, Predictions, resolve_backbones
from penult.classify.options import DEFAULT_METHOD, CountOptions, PredictOptions
from penult.classify.predict import list_inputs, stream_predictions
from penult.classify.quantify import Calibration, Tally, check_method
from penult.core import NOT_METADATA, SAMPLE, OptionError, atomic_path, check_out_folder
from penult.features import FeatureStore
from tqdm.auto import tqdm

__all__ = ["CountOptions", "CountSummary", "count_images", "count_store", "UNCLASSIFIED"]

UNCLASSIFIED = "unclassified"  # the row of the images no class took
VOLUME = "volume_ml"  # the sample column holding the volume its images were taken from
TIME = "time"
NO_CALIBRATION = (
    "the model has no quantifier calibration (made before penult recorded one, or trained with "
    "--quantifier-folds 0): classify and count"
)


@dataclass
class Sample:
    """One sample: its id, its metadata as given, and what happened to its images."""

    name: str
    meta: dict[str, str]
    volume: float | None = None
    listed: int = 0
    failed: int = 0
    reasons: list[str] = field(default_factory=list)  # the first few failures, with the file
    notes: list[str] = field(default_factory=list)


@dataclass
class Level:
    """The classes counted: the model's own, or the groups of a coarser taxonomy level."""

    name: str
    classes: list[str]
    group: np.ndarray  # (model classes,) index into ``classes``
    calibration: Calibration | None

    @cached_property
    def _sum(self) -> np.ndarray:
        """(model classes, classes) 0/1: what sums the model's posteriors per group."""
        G = np.zeros((len(self.group), len(self.classes)), np.float32)
        G[np.arange(len(self.group)), self.group] = 1.0
        return G

    def apply(
        self, model: Model, pred: Predictions
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """((n, c) posteriors summed per group, (n,) group of each image's answer, -1 where the
        model said "not one of my classes", and whether the answer is below its class
        threshold)."""
        col = {k: i for i, k in enumerate(model.classes.tolist())}
        fine = np.array([col.get(str(lab), -1) for lab in pred.label], np.int64)
        win = np.where(fine >= 0, self.group[np.maximum(fine, 0)], -1)
        if pred.unknown is not None:  # "not one of my classes": unclassified
            win[pred.unknown] = -1
        return np.asarray(pred.proba, np.float32) @ self._sum, win, pred.below


def count_level(model: Model, level: str | None) -> tuple[Level, list[str]]:
    """The classes ``--level`` counts, with the model's calibration brought to that level;
    and notes (a calibration that does not fit the model is not used)."""
    notes: list[str] = []
    cal = None
    if model.manifest.quantifier:
        cal = Calibration.from_json(model.manifest.quantifier)
        if cal.classes != model.classes.tolist():
            notes.append("the model's quantifier calibration names other classes: not used")
            cal = None
    classes = model.classes.tolist()
    if level is None or level == model.manifest.label:
        return Level(model.manifest.label, classes, np.arange(len(classes)), cal), notes
    levels = model.levels
    if model.paths is None or level not in levels:
        have = ", ".join(levels[:-1]) or "none: a flat model trained without --levels"
        raise OptionError(f"--level {level}: the model has no such taxonomy level (it has {have})")
    groups = model.paths[:, levels.index(level)].tolist()
    names = list(dict.fromkeys(sorted(groups)))
    index = {g: k for k, g in enumerate(names)}
    coarse = cal.coarsen(groups, names) if cal is not None else None
    return Level(level, names, np.array([index[g] for g in groups]), coarse), notes


def choose_method(opts: CountOptions, level: Level) -> tuple[str, list[str]]:
    """The method the counts use, and a note where the model left no choice."""
    if opts.method is None:
        if level.calibration is None:
            return "cc", [NO_CALIBRATION]
        return DEFAULT_METHOD, []
    if opts.method not in ("cc", "pcc") and level.calibration is None:
        raise OptionError(
            f"--method {opts.method} needs the model's quantifier calibration, and this model has "
            "none: retrain it (penult train records it unless --quantifier-folds 0), or count "
            "with --method cc or pcc"
        )
    check_method(opts.method, level.calibration)
    return opts.method, []


def parse_volume(sample: str, text: str) -> tuple[float | None, str | None]:
    """A sample's ``volume_ml`` and, where its concentration is left empty, why. Missing or
    zero (an imager run that analysed nothing) leaves it empty; a negative, infinite or
    non-numeric volume is an error (a damaged metadata file), raised before any image is scored."""
    t = text.strip()
    if t.lower() in ("", "na", "nan", "none", "null"):
        return None, f"sample {sample!r} has no {VOLUME}: its concentration is left empty"
    try:
        v = float(t)
    except ValueError:
        raise OptionError(f"sample {sample!r}: {VOLUME} {text!r} is not a number") from None
    if not math.isfinite(v) or v < 0:
        raise OptionError(
            f"sample {sample!r}: {VOLUME} {text!r} is not a volume (a positive number of mL)"
        )
    if v == 0:
        return (
            None,
            f"sample {sample!r} has {VOLUME} 0 (nothing analysed): concentration left empty",
        )
    return v, None


Coded = tuple[np.ndarray, Sequence[str]]  # per-image codes into names: a few bytes per image


def _coded(values: Sequence[str]) -> Coded:
    names, codes = np.unique(np.asarray(values, dtype=str), return_inverse=True)
    return codes, names.tolist()


def samples_from_columns(
    ids: Sequence[str], columns: dict[str, Sequence[str]]
) -> tuple[list[Sample], np.ndarray, list[str], list[str]]:
    """:func:`samples_from_codes` for columns given as one text value per image."""
    return samples_from_codes(_coded(ids), {c: _coded(v) for c, v in columns.items()})


def samples_from_codes(
    ids: Coded, columns: dict[str, Coded]
) -> tuple[list[Sample], np.ndarray, list[str], list[str]]:
    """The samples of images whose sample ids are ``ids`` (first appearance order), each image's
    sample index, the metadata columns (those with one value for all images of each sample, as
    ``core.sample_columns`` has it) and warnings. A ``volume_ml`` that differs between a
    sample's images is an error naming the sample. Works on codes (a store's label columns as
    stored), so a store of many images is grouped without its text."""
    codes, names = ids
    uniq, first, inv = np.unique(codes, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    which = rank[inv]
    first_row = first[order]  # each sample's first image, in sample order
    meta_cols = []
    for c, (cc, cn) in columns.items():
        if c == SAMPLE or c in NOT_METADATA:
            continue
        ref = cc[first_row][which]  # the value of each image's sample's first image
        same = cc == ref
        if same.all():
            meta_cols.append(c)
        elif c == VOLUME:
            bad = int(np.flatnonzero(~same)[0])
            raise OptionError(
                f"sample {str(names[codes[bad]])!r}: its images give two volumes "
                f"({VOLUME} {str(cn[ref[bad]])!r} and {str(cn[cc[bad]])!r})"
            )
    samples = []
    warnings: list[str] = []
    for i in first_row:
        meta = {c: str(columns[c][1][columns[c][0][i]]) for c in meta_cols}
        s = Sample(str(names[codes[i]]), meta)
        if VOLUME in meta:
            s.volume, why = parse_volume(s.name, meta[VOLUME])
            if why:
                warnings.append(why)
        samples.append(s)
    return samples, which, meta_cols, warnings


@dataclass
class CountSummary:
    out: Path
    method: str
    level: str
    files: list[Path] = field(default_factory=list)
    samples: int = 0
    listed: int = 0
    scored: int = 0
    failed: int = 0
    unclassified: int = 0
    from_store: int = 0
    extracted: int = 0
    empty: list[str] = field(default_factory=list)  # samples without one scorable image
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def report(self, max_lines: int = 20) -> str:
        lines = [
            f"counted {self.scored} of {self.listed} images in {self.samples} samples at level "
            f"{self.level!r} by {self.method} -> {self.out} in {self.seconds:.1f} s "
            f"({self.unclassified} unclassified, {self.failed} unreadable; {self.from_store} "
            f"from the store, {self.extracted} extracted)"
        ]
        lines += [f"  wrote {p}" for p in self.files[1:]]
        if self.empty:
            shown = ", ".join(self.empty[:10]) + (" ..." if len(self.empty) > 10 else "")
            lines.append(f"  {len(self.empty)} sample(s) without one scorable image: {shown}")
        notes = list(dict.fromkeys(self.notes))
        lines += [f"  note: {n}" for n in notes[:max_lines]]
        if len(notes) > max_lines:
            lines.append(f"  ... and {len(notes) - max_lines} more notes (note column of the CSV)")
        return "\n".join(lines)


class _Counter:
    """Tallies samples as their images arrive (in sample order) and writes each sample's rows
    when it is complete: the long CSV, the wide one, the wide concentrations."""

    def __init__(
        self,
        samples: list[Sample],
        meta_cols: list[str],
        level: Level,
        method: str,
        opts: CountOptions,
        writers: dict[str, SafeWriter],
        summary: CountSummary,
        notes: list[str],
    ):
        self.samples, self.meta_cols, self.level = samples, meta_cols, level
        self.method, self.opts, self.w, self.s = method, opts, writers, summary
        self.notes = notes
        self.tallies: dict[int, Tally] = {}
        self.done = 0  # samples before this one are written
        self.shares: list[np.ndarray] = []  # per written sample: (c + 1,) proportions (plot)
        self.images: list[int] = []  # per written sample: images scored
        names = [*level.classes, UNCLASSIFIED]
        self.w["long"].writerow(
            [SAMPLE, *meta_cols, level.name, "count", "proportion", "low", "high", "abundance",
             "per_ml", "per_ml_low", "per_ml_high", "images", "failed", "method", "note"]
        )  # fmt: skip
        self.w["wide"].writerow([SAMPLE, *meta_cols, "images", "failed", "method", *names])
        if "per_ml" in self.w:
            self.w["per_ml"].writerow([SAMPLE, *meta_cols, *names])  # volume_ml is among meta

    def tally(self, k: int) -> Tally:
        if k not in self.tallies:
            rng = np.random.default_rng([self.opts.seed, k])
            self.tallies[k] = Tally(
                len(self.level.classes), self.opts.em_images, rng, self.samples[k].listed
            )
        return self.tallies[k]

    def add(
        self, which: np.ndarray, post: np.ndarray, win: np.ndarray, below: np.ndarray | None
    ) -> None:
        """Images of samples ``which`` (sorted: a chunk holds runs of samples)."""
        cuts = np.flatnonzero(np.diff(which)) + 1
        for part in np.split(np.arange(len(which)), cuts):
            if len(part):
                low = None if below is None else below[part]
                self.tally(int(which[part[0]])).add(post[part], win[part], low)

    def fail(self, k: int, shown: str, why: str) -> None:
        s = self.samples[k]
        s.failed += 1
        if len(s.reasons) < 3:
            s.reasons.append(f"{shown}: {why}")

    def finish_before(self, k: int) -> None:
        """Write every sample before sample ``k`` (their images have all arrived)."""
        while self.done < min(k, len(self.samples)):
            self._write(self.done)
            self.done += 1

    def _write(self, k: int) -> None:
        s = self.samples[k]
        tally = self.tallies.pop(k, None)
        c = len(self.level.classes)
        est = (
            tally.estimate(self.method, self.level.calibration, self.opts.bootstrap)
            if tally is not None
            else None
        )
        meta = [s.meta.get(m, "") for m in self.meta_cols]
        notes = [*self.notes, *s.notes, *(est.notes if est else [])]
        self.s.samples += 1
        self.s.failed += s.failed
        self.s.notes += [n for n in notes if n not in self.notes]
        if est is None or est.images == 0:
            why = "no scorable image" + (
                f" ({s.failed} unreadable; first: {s.reasons[0]})" if s.reasons else ""
            )
            self.s.empty.append(s.name)
            note = "; ".join([why, *notes])
            self.w["long"].writerow(
                [s.name, *meta, "", 0, "", "", "", "", "", "", "", 0, s.failed, self.method, note]
            )
            self.w["wide"].writerow([s.name, *meta, 0, s.failed, self.method, *[""] * (c + 1)])
            if "per_ml" in self.w:
                self.w["per_ml"].writerow([s.name, *meta, *[""] * (c + 1)])
            self.shares.append(np.full(c + 1, np.nan))
            self.images.append(0)
            return
        self.s.scored += est.images
        self.s.unclassified += int(est.counts[c])
        note = "; ".join(notes)
        per_image = None if s.volume is None else est.images / s.volume  # images per mL
        for j, name in enumerate([*self.level.classes, UNCLASSIFIED]):
            p, lo, hi = est.proportion[j], est.low[j], est.high[j]
            conc = [""] * 3 if per_image is None else [_num(v * per_image) for v in (p, lo, hi)]
            self.w["long"].writerow(
                [s.name, *meta, name, int(est.counts[j]), _share(p), _share(lo), _share(hi),
                 _num(p * est.images), *conc, est.images, s.failed, self.method, note]
            )  # fmt: skip
        self.w["wide"].writerow(
            [s.name, *meta, est.images, s.failed, self.method, *map(_share, est.proportion)]
        )
        if "per_ml" in self.w:
            per_ml = (
                [""] * (c + 1)
                if per_image is None
                else [_num(p * per_image) for p in est.proportion]
            )
            self.w["per_ml"].writerow([s.name, *meta, *per_ml])
        self.shares.append(est.proportion.copy())
        self.images.append(est.images)


def _num(v: float | None, digits: int = 6) -> str:
    """A number for the CSV ("" for none: never "nan" or "inf" in a cell)."""
    return "" if v is None or not np.isfinite(v) else format(float(v), f".{digits}g")


def _share(v: float) -> str:
    """A proportion to six decimals (EM leaves absent classes at 1e-13, not 0)."""
    return _num(round(float(v), 6)) if np.isfinite(v) else ""


def output_paths(out: str | os.PathLike[str], per_ml: bool, plot: bool) -> dict[str, Path]:
    """``counts.csv`` (long), ``counts_wide.csv``, ``counts_per_ml.csv`` (where volumes are
    known), ``counts.png`` and ``counts.html`` beside it."""
    p = Path(out)
    stem = p.with_suffix("") if p.suffix.lower() == ".csv" else p
    paths = {"long": p, "wide": Path(f"{stem}_wide.csv")}
    if per_ml:
        paths["per_ml"] = Path(f"{stem}_per_ml.csv")
    if plot:
        paths["png"], paths["html"] = Path(f"{stem}.png"), Path(f"{stem}.html")
    return paths


@contextlib.contextmanager
def _writers(paths: dict[str, Path]) -> Iterator[dict[str, SafeWriter]]:
    """A SafeWriter per CSV, each written as ``.partial`` and renamed only when all are done."""
    with contextlib.ExitStack() as stack:
        out = {}
        for key, path in paths.items():
            if path.suffix == ".csv":
                tmp = stack.enter_context(atomic_path(path, tmp=Path(f"{path}.partial")))
                out[key] = SafeWriter(stack.enter_context(open_csv(tmp)))
        yield out


def _plot(counter: _Counter, paths: dict[str, Path], summary: CountSummary, top: int) -> None:
    from penult.classify.countplot import plot_counts

    if "png" not in paths:
        return
    plot_counts(
        paths["png"],
        paths["html"],
        samples=[s.name for s in counter.samples],
        shares=np.vstack(counter.shares),
        images=counter.images,
        classes=[*counter.level.classes, UNCLASSIFIED],
        volumes=[s.volume for s in counter.samples],
        times=[s.meta.get(TIME, "") for s in counter.samples],
        top=top,
        title=f"penult count: {summary.level} by {summary.method}",
        info=summary.report().splitlines(),
    )
    summary.files += [paths["png"], paths["html"]]


@dataclass
class _Chunk:
    """Images of consecutive samples: each one's sample (sorted), the model's answers for the
    positions ``good`` and (position, shown name, why) for the others."""

    which: np.ndarray
    good: np.ndarray
    pred: Predictions | None
    errors: list[tuple[int, str, str]]
    from_store: int = 0
    extracted: int = 0


def _count(
    model: Model,
    chunks: Iterator[_Chunk],
    samples: list[Sample],
    meta_cols: list[str],
    level: Level,
    method: str,
    opts: CountOptions,
    notes: list[str],
    s: CountSummary,
    bar: tqdm,
) -> None:
    paths = output_paths(s.out, VOLUME in meta_cols, opts.plot)
    s.notes[:0] = notes  # the run's notes (every row's too) before the samples' own
    with bar, _writers(paths) as w:
        counter = _Counter(samples, meta_cols, level, method, opts, w, s, notes)
        for c in chunks:
            if c.pred is not None:
                post, win, below = level.apply(model, c.pred)
                counter.add(c.which[c.good], post, win, below)
            for i, shown, why in c.errors:
                counter.fail(int(c.which[i]), shown, why)
            s.from_store += c.from_store
            s.extracted += c.extracted
            counter.finish_before(int(c.which[-1]))  # the last sample may go on in the next chunk
            bar.update(len(c.which))
        counter.finish_before(len(samples))
    s.files = [p for k, p in paths.items() if k not in ("png", "html")]
    _plot(counter, paths, s, opts.top)


def _listed(samples: list[Sample], which: np.ndarray) -> None:
    for s, n in zip(samples, np.bincount(which, minlength=len(samples)), strict=True):
        s.listed = int(n)


def _prepare(model: Model, out: str | os.PathLike[str], opts: CountOptions):
    check_out_folder(out)
    level, notes = count_level(model, opts.level)
    method, more = choose_method(opts, level)
    return level, method, notes + more


def count_images(
    model: Model,
    inputs: Sequence[str],
    out: str | os.PathLike[str],
    opts: CountOptions,
    predict: PredictOptions,
    images: Images,
) -> CountSummary:
    """Count the images under ``inputs`` (folders, manifests, file lists, images, as for
    `penult predict`) per sample; write the CSVs and the plot (see :func:`output_paths`).
    Images without a sample are counted as one sample per input, named by the input."""
    t0 = time.perf_counter()
    level, method, notes = _prepare(model, out, opts)
    listed = list_inputs(inputs, images)
    ids = list(listed.carried.get(SAMPLE, [""] * len(listed.files)))
    lacking = sorted({str(inputs[listed.origin[i]]) for i, v in enumerate(ids) if not v})
    ids = [v or str(inputs[listed.origin[i]]) for i, v in enumerate(ids)]
    columns = {c: v for c, v in listed.carried.items() if c not in (SAMPLE, "object_id")}
    samples, which, meta_cols, warn = samples_from_columns(ids, columns)
    for x in samples:
        if x.name in lacking:
            x.notes.append("images without a sample: the input they were listed from is the sample")
    order = np.argsort(which, kind="stable")  # each sample's files together, in input order
    which, files = which[order], [listed.files[i] for i in order]
    _listed(samples, which)
    s = CountSummary(Path(out), method, level.name, listed=len(files) + len(listed.ignored))
    s.notes += warn
    if listed.ignored:
        s.notes.append(f"{len(listed.ignored)} file(s) skipped: not an image type")
    stream = stream_predictions(model, files, predict, images)  # networks checked before writing

    def chunks() -> Iterator[_Chunk]:
        at = 0
        for n, c in stream:
            errors = [(i, files[at + i][0], why) for i, why in c.errors.items()]
            yield _Chunk(which[at : at + n], c.good, c.pred, errors, c.from_store, c.extracted)
            at += n

    quiet = not predict.progress or bool(predict.cluster)  # the cluster has its own bar
    bar = tqdm(total=len(files), desc="count", unit="img", disable=quiet)
    _count(model, chunks(), samples, meta_cols, level, method, opts, notes, s, bar)
    s.seconds = time.perf_counter() - t0
    return s


def count_store(
    model: Model,
    store_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    opts: CountOptions,
    *,
    chunk: int = 2048,
    progress: bool = True,
) -> CountSummary:
    """Count the images of a feature store per sample (its ``sample`` column, stored by
    `penult extract` with the labels), from the stored embeddings: no network runs. A stored
    image of a sample without the model's embeddings is counted as unreadable."""
    t0 = time.perf_counter()
    level, method, notes = _prepare(model, out, opts)
    store = FeatureStore(store_path)
    names = resolve_backbones(model, store)
    if SAMPLE not in store.label_columns():
        raise OptionError(
            f"{store_path} has no {SAMPLE!r} column: extract with a manifest column {SAMPLE!r}, "
            "--sample-level or --samples FILE, or count image folders instead of the store"
        )
    codes, code_names = store.label_codes(SAMPLE)
    n_rows = len(codes)
    blank = code_names.index("") if "" in code_names else -1
    has = np.flatnonzero(codes != blank)
    rows, _ = store.fused_rows(names)
    columns = {}
    for c in store.label_columns():
        if c != SAMPLE:
            cc, cn = store.label_codes(c)
            columns[c] = (cc[has], cn)
    samples, which_has, meta_cols, warn = samples_from_codes((codes[has], code_names), columns)
    which = np.full(n_rows, -1, np.int64)
    which[has] = which_has
    pos = np.full(n_rows, -1, np.int64)  # table row -> its index in the fused rows (-1: none)
    pos[rows[0]] = np.arange(len(rows[0]))
    order = has[np.argsort(which[has], kind="stable")]
    _listed(samples, which[order])
    s = CountSummary(Path(out), method, level.name, listed=len(order))
    s.notes += warn
    if len(has) < n_rows:
        s.notes.append(f"{n_rows - len(has)} stored image(s) have no sample: not counted")
    missing = f"no embedding from {' + '.join(names)} in the store"

    def chunks() -> Iterator[_Chunk]:
        for at in range(0, len(order), chunk):
            part = order[at : at + chunk]
            embedded = pos[part] >= 0
            good = np.flatnonzero(embedded)
            pred = None
            if len(good):
                sel = pos[part[good]]
                pred = model.predict(store.fused_embeddings(names, [r[sel] for r in rows]))
            bad = [(i, f"row {part[i]}", missing) for i in np.flatnonzero(~embedded)]
            yield _Chunk(which[part], good, pred, bad, from_store=len(good))

    bar = tqdm(total=len(order), desc="count", unit="img", disable=not progress)
    _count(model, chunks(), samples, meta_cols, level, method, opts, notes, s, bar)
    s.seconds = time.perf_counter() - t0
    return s
