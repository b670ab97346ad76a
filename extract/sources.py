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
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from penult.core import ecotaxa, ifcb
from penult.core.errors import PenultError
from penult.core.labels import SAMPLE
from penult.extract.images import IMAGE_SUFFIXES

__all__ = ["Listing", "SourceError", "list_images"]


_PATH_COLUMNS = ("path", "file", "filename", "image")
_LABEL_COLUMNS = ("label", "class", "species")


class SourceError(PenultError):
    """The input cannot be listed (missing, empty, malformed manifest)."""


@dataclass
class Listing:
    root: Path
    paths: list[str]
    labels: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    origin: str = ""  # the folder or file the labels came from (their provenance in the store)
    # An EcoTaxa export's per-image status ("", predicted, validated, dubious) and the category
    # of a predicted one (whose label stays empty: a prediction trains nothing until validated)
    status: list[str] = field(default_factory=list)
    predicted: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i])

    def shard(self, i: int, n: int) -> Listing:
        """Shard ``i`` of ``n``: the paths whose CRC-32 is ``i`` modulo ``n`` (the same split for
        every process and every run, whatever else the folder holds)."""
        if not 0 <= i < n:
            raise SourceError(f"shard {i}/{n}: need 0 <= I < N")
        keep = [
            k
            for k, p in enumerate(self.paths)
            if zlib.crc32(p.encode("utf-8", "surrogateescape")) % n == i
        ]
        return Listing(
            root=self.root,
            paths=[self.paths[k] for k in keep],
            labels={c: [v[k] for k in keep] for c, v in self.labels.items()},
            ignored=self.ignored,
            notes=self.notes,
            origin=self.origin,
            status=[self.status[k] for k in keep] if self.status else [],
            predicted=[self.predicted[k] for k in keep] if self.predicted else [],
        )


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


def _scan_folder(root: Path, sample_level: int | None = None) -> Listing:
    paths, ignored, bins = [], [], 0
    seen: set[tuple[int, int]] = set()  # folders visited: a link back up must not loop forever
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # the folder's relative prefix once, not a Path per file (a tenth of the time)
        prefix = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if prefix == "." else prefix + "/"
        for name in filenames:
            if name.startswith("."):
                continue
            rel = prefix + name
            stem, suffix = os.path.splitext(name)
            if suffix in ifcb.PARTS and ifcb.is_bin_name(stem):
                bins += 1
                continue
            (paths if Path(name).suffix.lower() in IMAGE_SUFFIXES else ignored).append(rel)
    paths.sort()
    if bins:
        if paths:
            raise SourceError(
                f"{root}: holds both image files ({len(paths)}) and IFCB bins; point penult "
                "at a folder of one kind"
            )
        return _bin_listing(root, ignored)
    if not paths:
        raise SourceError(
            f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if sample_level is not None:
        return Listing(
            root=root, paths=paths, labels=_folder_samples(root, paths, sample_level),
            ignored=sorted(ignored),
        )  # fmt: skip
    depth = max(p.count("/") for p in paths) + 1
    labels: dict[str, list[str]] = {}
    if depth >= 2:
        # one tuple of folder names per folder, shared by its files (8 bytes a file a column)
        folders: dict[str, tuple[str, ...]] = {}
        parts = [
            folders.setdefault(d, tuple(d.split("/")) if d else ())
            for d in (p.rpartition("/")[0] for p in paths)
        ]
        labels["label"] = [q[-1] if q else "" for q in parts]
        for level in range(depth - 2):  # ancestors of the class folder, top level first
            labels[f"level{level}"] = [q[level] if len(q) > level + 1 else "" for q in parts]
    return Listing(root=root, paths=paths, labels=labels, ignored=sorted(ignored))


def _bin_listing(root: Path, ignored: list[str]) -> Listing:
    """IFCB bins: every ROI a row (``<folder>/<bin>_<nnnnn>``), unlabelled, its bin the sample,
    with the bin's time, instrument and volume analysed (``extract.ifcb``)."""
    paths, meta, notes = ifcb.list_bins(root)
    order = sorted(range(len(paths)), key=paths.__getitem__)
    return Listing(
        root=root, paths=[paths[i] for i in order],
        labels={k: [v[i] for i in order] for k, v in meta.items()},
        ignored=sorted(ignored), notes=notes,
    )  # fmt: skip


def _sample_of(root: Path, path: str, level: int) -> tuple[str, tuple[str, ...]]:
    """(the sample: the folder ``level`` steps above the image, the folders below it)."""
    folders = PurePosixPath(path).parts[:-1]
    if len(folders) < level:
        raise SourceError(
            f"{root / path}: --sample-level {level} takes the folder {level} step(s) above each "
            f"image as its sample, but this image has {len(folders)} folder(s) above it in {root}"
        )
    return folders[-level], folders[len(folders) - level + 1 :]


def _folder_samples(root: Path, paths: list[str], level: int) -> dict[str, list[str]]:
    """Labels of a folder whose samples are folders: folders below a sample's are the class
    (the innermost) and its coarse levels; the sample's folder and those above it are not."""
    found = [_sample_of(root, p, level) for p in paths]
    labels = {SAMPLE: [s for s, _ in found]}
    inner = level - 1  # folders between the sample and the image
    if inner:
        labels["label"] = [q[-1] for _, q in found]
        for k in range(inner - 1):  # coarse levels, outermost first
            labels[f"level{k}"] = [q[k] for _, q in found]
    return labels


def _check_level(level: int | None) -> None:
    if level is not None and (isinstance(level, bool) or not isinstance(level, int) or level < 1):
        raise SourceError(f"--sample-level {level!r}: give 1 (each image's folder) or more")


def _join_samples(listing: Listing, path: Path) -> None:
    """Each image gets its sample's row of ``path`` (a CSV with a ``sample`` column); the
    input's own columns win. Samples without a row are named in a note."""
    header, rows = _read_csv(path)
    scol = _pick(header, (SAMPLE, "sample_id", "bin"))
    if scol is None:
        raise SourceError(
            f"{path}: a samples CSV needs a 'sample' column (has {', '.join(header)})"
        )
    if SAMPLE not in listing.labels:
        raise SourceError(
            f"{path}: sample metadata is joined by sample, but the images have none; give a "
            "manifest with a 'sample' column or --sample-level"
        )
    table: dict[str, dict[str, str]] = {}
    for n, r in enumerate(rows, start=2):
        key = r.get(scol, "")
        if key in table:
            raise SourceError(f"{path}: line {n} repeats sample {key!r}")
        table[key] = r
    samples = listing.labels[SAMPLE]
    added = []
    for h in header:
        col = h.lower()
        if h == scol or col in listing.labels:
            continue
        listing.labels[col] = [table.get(s, {}).get(h, "") for s in samples]
        added.append(col)
    missing = sorted({s for s in samples if s and s not in table})
    listing.notes.append(
        f"samples {path.name}: added {', '.join(added) or 'nothing'}"
        + (f"; {len(missing)} sample(s) have no row, e.g. {str(missing[0])!r}" if missing else "")
    )


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


def _join_taxonomy(listing: Listing, taxonomy: Path) -> None:
    from penult.core.labels import read_taxonomy

    if "label" not in listing.labels:
        raise SourceError(
            f"{taxonomy}: a taxonomy needs labelled images, but the input has no labels"
        )
    columns = read_taxonomy(taxonomy).columns(listing.labels["label"])
    added = [c for c in columns if c not in listing.labels]  # a manifest's own columns win
    for c in added:
        listing.labels[c] = columns[c]
    listing.notes.append(f"taxonomy {taxonomy.name}: added {', '.join(added)}")


def _join_split(listing: Listing, split: Path) -> None:
    header, rows = _read_csv(split)
    pcol = _pick(header, _PATH_COLUMNS) or header[0]
    scol = _pick(header, ("split", "subset", "set"))
    if scol is None:
        raise SourceError(f"{split}: split CSV needs a 'split' column (has {', '.join(header)})")
    table = {Path(r[pcol]).as_posix(): r[scol] for r in rows}
    listing.labels["split"] = [table.get(p, "") for p in listing.paths]
    unmatched = sum(1 for s in listing.labels["split"] if not s)
    listing.notes.append(
        f"split {split.name}: {len(listing) - unmatched} images assigned"
        + (f", {unmatched} not in the split file" if unmatched else "")
    )


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
        listing = _scan_folder(src.resolve(), sample_level)
        if taxonomy is None and (src / "taxonomy.csv").is_file():
            taxonomy = src / "taxonomy.csv"
        if split is None and (src / "split.csv").is_file():
            split = src / "split.csv"
        used = {Path(f).name for f in (taxonomy, split) if f is not None and Path(f).parent == src}
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
            _sample_of(listing.root, p, sample_level)[0] for p in listing.paths
        ]
    if taxonomy is not None:
        _join_taxonomy(listing, Path(taxonomy))
    if split is not None:
        _join_split(listing, Path(split))
    if samples is not None:
        _join_samples(listing, Path(samples))
    listing.origin = str(src.resolve())
    return listing
