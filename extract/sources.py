"""Turning what the user points at into a sorted list of images with their labels.

Accepted: an ImageFolder tree (class = folder, deeper folders become coarse levels), a flat folder
(unlabelled), a CSV manifest (path,label plus any coarse columns such as genus,family,split), or a
text file list (one path per line). A taxonomy CSV (class -> coarse levels) and a split CSV
(path -> split) are joined onto the labels; ``taxonomy.csv`` and ``split.csv`` in a folder's root
are picked up automatically.

Samples (an IFCB bin, a net tow, a day: what counts are made per) come from a manifest's
``sample`` column, or from a folder level (``sample_level``: 1 is each image's own folder), and a
sample-metadata CSV (``samples``: a ``sample`` column plus ``volume_ml``, ``time``, ...) is joined
onto them by sample id. They are stored and carried like labels.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from penult.core import ecotaxa
from penult.core.labels import SAMPLE
from penult.extract.images import IMAGE_SUFFIXES
from penult.extract.listing import Listing, SourceError
from penult.extract.walk import CHUNK, FolderStream, sample_of, scan_folder

__all__ = ["FolderStream", "Listing", "SourceError", "list_images", "open_source"]


_PATH_COLUMNS = ("path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class", "species")


def _read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    _regular(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            header = [h.strip() for h in (reader.fieldnames or [])]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise SourceError(f"{path}: cannot read CSV ({e})") from None
    if not header:
        raise SourceError(f"{path}: empty CSV (no header row)")
    rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k is not None} for r in rows]
    return header, rows


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    low = {h.lower(): h for h in header}
    return next((low[n] for n in names if n in low), None)


def _check_level(level: int | None) -> None:
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 1):
        raise SourceError(f"--sample-level {level!r}: give 1 (each image's folder) or more")


def _from_manifest(csv_path: Path, root: Path | None) -> Listing:
    header, rows = _read_csv(csv_path)
    pcol = _pick(header, _PATH_COLUMNS) or header[0]
    lcol = _pick(header, _LABEL_COLUMNS)
    base = root or csv_path.parent
    seen: dict[str, int] = {}
    paths: list[str] = []
    labels: dict[str, list[str]] = {}
    others = [h for h in header if h not in (pcol, lcol)]
    for n, r in enumerate(rows, start=2):
        raw = r.get(pcol, "")
        if not raw:
            raise SourceError(f"{csv_path}: line {n} has an empty {pcol!r}")
        rel = Path(raw)
        rel = rel.relative_to(base) if rel.is_absolute() and rel.is_relative_to(base) else rel
        key = rel.as_posix()
        if key in seen:
            raise SourceError(f"{csv_path}: line {n} repeats {key!r} (first on line {seen[key]})")
        seen[key] = n
        paths.append(key)
        if lcol:
            labels.setdefault("label", []).append(r.get(lcol, ""))
        for h in others:
            labels.setdefault(h.lower(), []).append(r.get(h, ""))
    if not paths:
        raise SourceError(f"{csv_path}: manifest lists no images")
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return Listing(
        root=base.resolve(),
        paths=[paths[i] for i in order],
        labels={k: [v[i] for i in order] for k, v in labels.items()},
    )


def _from_ecotaxa(tsvs: list[Path], root: Path) -> Listing:
    """EcoTaxa TSVs (``core.ecotaxa``) as one listing: images relative to ``root``; the category
    as the label of validated and dubious objects, the hierarchy's levels, the sample, the
    object id and the sample and acquisition metadata."""
    rows: list[tuple[str, dict[str, str], str, str]] = []  # path, columns, status, predicted
    notes: list[str] = []
    for tsv in tsvs:
        try:
            t = ecotaxa.read_tsv(tsv)
        except ecotaxa.EcoTaxaError as e:
            raise SourceError(str(e)) from None
        notes += t.notes
        folder = tsv.parent.relative_to(root)
        for i, image in enumerate(t.images):
            st = t.status[i]
            cols = {"label": t.category[i] if st in ("validated", "dubious") else "",
                    "object_id": t.ids[i], SAMPLE: t.sample[i]}  # fmt: skip
            cols |= {k: v[i] for k, v in t.levels.items()}
            cols |= {k: v[i] for k, v in t.metadata.items()}
            pred = t.category[i] if st == "predicted" else ""
            rows.append(((folder / image).as_posix(), cols, st, pred))
    seen: dict[str, int] = {}
    for k, (p, *_) in enumerate(rows):
        if p in seen:
            raise SourceError(f"{root}: {p!r} is listed twice in the EcoTaxa files")
        seen[p] = k
    rows.sort(key=lambda r: r[0])
    names = sorted({c for _, cols, _, _ in rows for c in cols})
    if not any(cols[SAMPLE] for _, cols, _, _ in rows):
        names.remove(SAMPLE)
    counts = {s: sum(r[2] == s for r in rows) for s in ("validated", "predicted", "dubious", "")}
    notes.insert(0, f"EcoTaxa: {len(rows)} objects from {len(tsvs)} file(s): "
                    f"{counts['validated']} validated, {counts['predicted']} predicted, "
                    f"{counts['dubious']} dubious, {counts['']} without a category")  # fmt: skip
    return Listing(
        root=root, paths=[r[0] for r in rows],
        labels={c: [cols.get(c, "") for _, cols, _, _ in rows] for c in names},
        notes=notes, status=[r[2] for r in rows], predicted=[r[3] for r in rows],
    )  # fmt: skip


def _unzip(archive: Path) -> Path:
    """An EcoTaxa export zip unpacked beside it (once: a folder already there is used), refusing
    members that would land outside that folder."""
    import zipfile

    out = archive.with_suffix("")
    if out.is_dir():
        return out
    tmp = out.with_name(f".{out.name}.unpacking")
    try:
        with zipfile.ZipFile(archive) as z:
            for m in z.namelist():
                target = (tmp / m).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise SourceError(f"{archive}: member {m!r} would land outside {out}")
            z.extractall(tmp)
    except (zipfile.BadZipFile, OSError) as e:
        raise SourceError(f"{archive}: cannot unpack ({e})") from None
    tmp.rename(out)
    return out


def _ecotaxa_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in (".tsv", ".txt") and ecotaxa.is_ecotaxa(p)
    )


def _regular(path: Path) -> None:
    """Refuse a FIFO or device given as a manifest or list: reading it could block forever."""
    if not path.is_file():
        raise SourceError(f"{path}: not a regular file (a FIFO, device or missing file)")


def _from_file_list(list_path: Path, root: Path | None) -> Listing:
    _regular(list_path)
    base = root or list_path.parent
    try:
        lines = [ln.strip() for ln in list_path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{list_path}: cannot read file list ({e})") from None
    paths = sorted({ln for ln in lines if ln and not ln.startswith("#")})
    if not paths:
        raise SourceError(f"{list_path}: file list is empty")
    return Listing(root=base.resolve(), paths=paths)


class _Joins:
    """A taxonomy (class -> coarse levels), a split CSV (path -> split) and sample metadata
    (sample -> columns) joined onto a listing, or onto a stream's listings one after another;
    the input's own columns win. ``notes`` say what was joined over all of them."""

    def __init__(self, taxonomy: Path | None, split: Path | None, samples: Path | None):
        from penult.core.labels import read_taxonomy

        self.taxonomy = (taxonomy, read_taxonomy(taxonomy)) if taxonomy else None
        self.split = (split, self._split_table(split)) if split else None
        self.samples = samples
        self._sample_rows: tuple[list[str], str, dict[str, dict[str, str]]] | None = None
        self.added: dict[str, list[str]] = {}
        self.assigned = self.unmatched = 0
        self.missing: set[str] = set()

    @staticmethod
    def _split_table(split: Path) -> dict[str, str]:
        header, rows = _read_csv(split)
        pcol = _pick(header, _PATH_COLUMNS) or header[0]
        scol = _pick(header, ("split", "subset", "set"))
        if scol is None:
            raise SourceError(
                f"{split}: split CSV needs a 'split' column (has {', '.join(header)})"
            )
        return {Path(r[pcol]).as_posix(): r[scol] for r in rows}

    @staticmethod
    def _sample_table(path: Path) -> tuple[list[str], str, dict[str, dict[str, str]]]:
        header, rows = _read_csv(path)
        scol = _pick(header, (SAMPLE, "sample_id", "bin"))
        if scol is None:
            raise SourceError(
                f"{path}: a samples CSV needs a 'sample' column (has {', '.join(header)})"
            )
        table: dict[str, dict[str, str]] = {}
        for n, r in enumerate(rows, start=2):
            key = r.get(scol, "")
            if key in table:
                raise SourceError(f"{path}: line {n} repeats sample {key!r}")
            table[key] = r
        return header, scol, table

    def check(self, classes: set[str]) -> None:
        """Refuse a taxonomy that lacks some of ``classes`` before any piece is joined."""
        if self.taxonomy is not None:
            self.taxonomy[1].check(sorted(c for c in classes if c))

    def __call__(self, listing: Listing) -> None:
        if self.taxonomy is not None:
            self._taxonomy(listing, *self.taxonomy)
        if self.split is not None:
            table = self.split[1]
            listing.labels["split"] = [table.get(p, "") for p in listing.paths]
            unmatched = sum(1 for v in listing.labels["split"] if not v)
            self.assigned += len(listing) - unmatched
            self.unmatched += unmatched
        if self.samples is not None:
            self._samples(listing, self.samples)

    def _taxonomy(self, listing: Listing, path: Path, taxonomy) -> None:
        if "label" not in listing.labels:
            raise SourceError(
                f"{path}: a taxonomy needs labelled images, but the input has no labels"
            )
        columns = taxonomy.columns(listing.labels["label"])
        added = [c for c in columns if c not in listing.labels]  # a manifest's own columns win
        for c in added:
            listing.labels[c] = columns[c]
        self.added.setdefault("taxonomy", added)

    def _samples(self, listing: Listing, path: Path) -> None:
        """Each image gets its sample's row; samples without a row are named in a note."""
        if SAMPLE not in listing.labels:
            raise SourceError(
                f"{path}: sample metadata is joined by sample, but the images have none; give a "
                "manifest with a 'sample' column or --sample-level"
            )
        if self._sample_rows is None:
            self._sample_rows = self._sample_table(path)
        header, scol, table = self._sample_rows
        samples = listing.labels[SAMPLE]
        added = []
        for h in header:
            col = h.lower()
            if h == scol or col in listing.labels:
                continue
            listing.labels[col] = [table.get(s, {}).get(h, "") for s in samples]
            added.append(col)
        self.added.setdefault("samples", added)
        self.missing |= {s for s in set(samples) if s and s not in table}

    def notes(self) -> list[str]:
        out = []
        if self.taxonomy is not None and "taxonomy" in self.added:
            out.append(
                f"taxonomy {self.taxonomy[0].name}: added {', '.join(self.added['taxonomy'])}"
            )
        if self.split is not None:
            out.append(
                f"split {self.split[0].name}: {self.assigned} images assigned"
                + (f", {self.unmatched} not in the split file" if self.unmatched else "")
            )
        if self.samples is not None and "samples" in self.added:
            first = min(self.missing) if self.missing else ""
            out.append(
                f"samples {self.samples.name}: added {', '.join(self.added['samples']) or 'nothing'}"
                + (
                    f"; {len(self.missing)} sample(s) have no row, e.g. {first!r}"
                    if self.missing
                    else ""
                )
            )
        return out


def _folder_inputs(src: Path, taxonomy, split) -> tuple[Path | None, Path | None, set[str]]:
    """A folder's own ``taxonomy.csv`` and ``split.csv`` unless others are given, and the names
    of those in its root (used, so not reported as ignored)."""
    if taxonomy is None and (src / "taxonomy.csv").is_file():
        taxonomy = src / "taxonomy.csv"
    if split is None and (src / "split.csv").is_file():
        split = src / "split.csv"
    used = {Path(f).name for f in (taxonomy, split) if f is not None and Path(f).parent == src}
    return taxonomy, split, used


def open_source(
    source: str | os.PathLike[str], *, chunk: int = CHUNK, **kw: Any
) -> Listing | FolderStream:
    """What ``penult extract`` runs over (``kw``: ``root``, ``taxonomy``, ``split``,
    ``sample_level`` and ``samples`` as for :func:`list_images`): a folder tree as a
    :class:`FolderStream` (listed in pieces of ``chunk`` images, memory bounded whatever its
    size), anything else as :func:`list_images` lists it."""
    src = Path(source).expanduser()
    sample_level, samples = kw.get("sample_level"), kw.get("samples")
    _check_level(sample_level)
    if not src.is_dir():
        return list_images(source, **kw)
    taxonomy, split = kw.get("taxonomy"), kw.get("split")
    taxonomy, split, used = _folder_inputs(src, taxonomy, split)
    joins = _Joins(*(Path(f) if f is not None else None for f in (taxonomy, split, samples)))
    stream = FolderStream(
        src.resolve(), sample_level=sample_level, join=joins, join_notes=joins.notes,
        chunk=chunk, origin=str(src.resolve()),
    )  # fmt: skip
    if sample_level is None and stream.survey.depth >= 2 and not stream.survey.parts:
        joins.check(stream.survey.classes)
    stream.ignored = [f for f in stream.ignored if f not in used]
    stream.ignored_count -= len(used)
    return stream


def list_images(
    source: str | os.PathLike[str],
    *,
    root: str | os.PathLike[str] | None = None,
    taxonomy: str | os.PathLike[str] | None = None,
    split: str | os.PathLike[str] | None = None,
    sample_level: int | None = None,
    samples: str | os.PathLike[str] | None = None,
) -> Listing:
    """List images with labels from a folder, CSV manifest or file list (see module docstring)."""
    src = Path(source).expanduser()
    base = Path(root).expanduser().resolve() if root else None
    _check_level(sample_level)
    if not src.exists():
        raise SourceError(f"{src}: no such file or folder")
    if src.is_dir():
        taxonomy, split, used = _folder_inputs(src, taxonomy, split)
        listing = scan_folder(src.resolve(), sample_level)
        listing.ignored = [f for f in listing.ignored if f not in used]  # used, not ignored
    elif src.suffix.lower() == ".csv":
        listing = _from_manifest(src.resolve(), base)
    elif src.suffix.lower() == ".tsv" or (src.suffix.lower() == ".txt" and ecotaxa.is_ecotaxa(src)):
        _regular(src)
        listing = _from_ecotaxa([src.resolve()], (base or src.parent).resolve())
    elif src.suffix.lower() == ".zip":
        _regular(src)
        folder = _unzip(src.resolve())
        tsvs = _ecotaxa_files(folder)
        if not tsvs:
            raise SourceError(f"{src}: no EcoTaxa TSV inside (a file with an img_file_name column)")
        listing = _from_ecotaxa(tsvs, folder)
        listing.notes.append(f"unpacked {src.name} to {folder}")
    elif src.suffix.lower() in IMAGE_SUFFIXES:
        listing = Listing(root=src.resolve().parent, paths=[src.name])
    else:
        listing = _from_file_list(src.resolve(), base)
    if sample_level is not None and not src.is_dir():  # a manifest's or list's folders
        listing.labels[SAMPLE] = [
            sample_of(listing.root, p, sample_level)[0] for p in listing.paths
        ]
    joins = _Joins(*(Path(f) if f is not None else None for f in (taxonomy, split, samples)))
    joins(listing)
    listing.notes += joins.notes()
    listing.origin = str(src.resolve())
    return listing
