"""Folder trees listed in bounded memory.

``walk_runs`` visits a tree in the sorted order of its files' relative paths (the order sorting the
whole list would give), holding one folder's entries per level. ``survey`` is a first pass for
what every piece must know of the whole tree (how deep its labels go, images or IFCB bins, an even
sample for ``--resize auto`` and int8 calibration). ``FolderStream`` is then the tree as listings
of ``chunk`` images each, in the order and with the labels one whole listing would have: a tree
of 100 M images is never a list of 100 M names. ``scan_folder`` is the whole listing at once.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from penult.core import ifcb
from penult.core.labels import SAMPLE
from penult.extract.images import IMAGE_SUFFIXES, spread
from penult.extract.listing import Listing, SourceError

__all__ = ["CHUNK", "FolderStream", "sample_of", "scan_folder", "walk_runs"]

CHUNK = 1_000_000  # images a streamed listing hands on at a time (a few hundred MB to plan)
IGNORED_KEPT = 1000  # non-image files a stream names (the rest are counted)
SAMPLE_KEPT = 4096  # a survey keeps every k-th image, k doubling so that at most 2x this stay


def _entries(folder: str, seen: set[tuple[int, int]]) -> list[str]:
    """A folder's visible entries' names, a folder's with "/" after it, sorted so that a folder
    comes where its files would in the sorted list of every path."""
    try:
        st = os.stat(folder)
        if (st.st_dev, st.st_ino) in seen:  # a link back up must not loop forever
            return []
        seen.add((st.st_dev, st.st_ino))
        out = []
        with os.scandir(folder) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                try:
                    sub = e.is_dir()  # (follows a link, as os.walk(followlinks=True) does)
                except OSError:
                    sub = False
                out.append(e.name + "/" if sub else e.name)
    except OSError:  # an unreadable folder is left out, as os.walk leaves it
        return []
    out.sort()
    return out


def walk_runs(root: Path) -> Iterator[tuple[str, list[str]]]:
    """The visible files under ``root`` (names starting with "." left out) as runs (a folder's
    relative prefix, its file names between two of its subfolders): prefix + name, run after run,
    is the sorted list of every file's path relative to ``root``. Links to folders are followed,
    each folder once."""
    seen: set[tuple[int, int]] = set()
    stack = [("", iter(_entries(str(root), seen)))]
    while stack:
        prefix, entries = stack[-1]
        run = []
        for name in entries:
            if name[-1] == "/":
                if run:
                    yield prefix, run
                sub = prefix + name
                stack.append((sub, iter(_entries(os.path.join(root, sub), seen))))
                break
            run.append(name)
        else:
            if run:
                yield prefix, run
            stack.pop()


@dataclass
class Survey:
    """What one pass over a tree found; ``paths`` every image's while there are at most the
    ``keep`` asked for (None past that)."""

    images: int = 0
    depth: int = 0  # folders above the deepest image, plus one
    paths: list[str] | None = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    ignored_count: int = 0
    parts: dict[Path, set[str]] = field(default_factory=dict)  # IFCB bins' files
    sample: list[str] = field(default_factory=list)  # every stride-th image
    stride: int = 1
    classes: set[str] = field(default_factory=set)  # each image's own folder name
    shallow: str = ""  # the first image with fewer folders above it than --sample-level asks


def survey(
    root: Path, sample_level: int | None = None, *, keep: float = 0, all_ignored: bool = False
) -> Survey:
    s = Survey()
    level = sample_level or 0
    for prefix, names in walk_runs(root):
        folder = prefix[:-1]
        depth, cls = prefix.count("/"), folder.rpartition("/")[2]
        for name in names:
            suffix = os.path.splitext(name)[1]
            if suffix in ifcb.PARTS and ifcb.add_part(s.parts, root / folder, name):
                continue
            if suffix.lower() not in IMAGE_SUFFIXES:
                s.ignored_count += 1
                if all_ignored or len(s.ignored) < IGNORED_KEPT:
                    s.ignored.append(prefix + name)
                continue
            if depth < level and not s.shallow:
                s.shallow = prefix + name
            if s.paths is not None:  # (a tree that fits in one piece is walked once)
                if s.images < keep:
                    s.paths.append(prefix + name)
                else:
                    s.paths = None
            if s.images % s.stride == 0:
                s.sample.append(prefix + name)
                if len(s.sample) > 2 * SAMPLE_KEPT:
                    s.sample, s.stride = s.sample[::2], 2 * s.stride
            s.images += 1
            s.depth = max(s.depth, depth + 1)
            s.classes.add(cls)
    return s


def _check(root: Path, s: Survey, sample_level: int | None) -> None:
    if s.parts and s.images:
        raise SourceError(
            f"{root}: holds both image files ({s.images}) and IFCB bins; point penult "
            "at a folder of one kind"
        )
    if not s.parts and not s.images:
        raise SourceError(
            f"{root}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    if s.shallow and not s.parts:
        sample_of(root, s.shallow, sample_level or 0)  # raises, naming the image


def sample_of(root: Path, path: str, level: int) -> tuple[str, tuple[str, ...]]:
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
    found = [sample_of(root, p, level) for p in paths]
    labels = {SAMPLE: [s for s, _ in found]}
    inner = level - 1  # folders between the sample and the image
    if inner:
        labels["label"] = [q[-1] for _, q in found]
        for k in range(inner - 1):  # coarse levels, outermost first
            labels[f"level{k}"] = [q[k] for _, q in found]
    return labels


def _folder_labels(paths: list[str], depth: int) -> dict[str, list[str]]:
    """The class (an image's folder) and coarse levels (the folders above it, top first) of a
    tree whose deepest image has ``depth - 1`` folders above it."""
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
    return labels


def _labels(root: Path, paths: list[str], depth: int, level: int | None) -> dict[str, list[str]]:
    return _folder_labels(paths, depth) if level is None else _folder_samples(root, paths, level)


def _bin_order(root: Path, parts: dict[Path, set[str]]) -> list[tuple[Path, bool]]:
    """(bin, readable so far) in the order of their rows' sorted paths (``<bin>_<nnnnn>``; a bin
    lacking a file is one row named by the bin)."""
    bins, problems = ifcb.group_bins(parts)
    items = [(b, True) for b in bins] + [(Path(p), False) for p, _ in problems]

    def key(item: tuple[Path, bool]) -> str:
        return item[0].relative_to(root).as_posix() + ("_" if item[1] else "")

    return sorted(items, key=key)


def _bin_listing(root: Path, rows: ifcb.BinRows, ignored: list[str]) -> Listing:
    """IFCB bins' rows as a listing: every ROI a row, unlabelled, its bin the sample, with the
    bin's time, instrument and volume analysed (``core.ifcb``)."""
    order = sorted(range(len(rows.paths)), key=rows.paths.__getitem__)
    return Listing(
        root=root, paths=[rows.paths[i] for i in order],
        labels={k: [v[i] for i in order] for k, v in rows.meta.items()}, ignored=ignored,
    )  # fmt: skip


def scan_folder(root: Path, sample_level: int | None = None) -> Listing:
    """The whole listing of a folder tree at once (``FolderStream`` for one in pieces)."""
    s = survey(root, sample_level, keep=math.inf, all_ignored=True)
    _check(root, s, sample_level)
    assert s.paths is not None  # (kept without a limit)
    if s.parts:
        rows = ifcb.BinRows(root)
        for stem, readable in _bin_order(root, s.parts):
            (rows.add_bin if readable else rows.add_bad)(stem)
        listing = _bin_listing(root, rows, s.ignored)
        listing.notes = [rows.count_note(), *rows.notes]
        return listing
    labels = _labels(root, s.paths, s.depth, sample_level)
    return Listing(root=root, paths=s.paths, labels=labels, ignored=s.ignored)


class FolderStream:
    """A folder tree as listings of about ``chunk`` images each, in sorted order, labelled as
    one whole listing would be (``join`` adds a taxonomy, split and sample metadata to each).
    ``notes`` are complete once ``chunks`` has run; ``ignored`` names at most IGNORED_KEPT."""

    def __init__(
        self,
        root: Path,
        *,
        sample_level: int | None = None,
        join: Callable[[Listing], None] | None = None,
        join_notes: Callable[[], list[str]] = list,
        chunk: int = CHUNK,
        origin: str = "",
    ):
        if chunk < 1:
            raise SourceError(f"chunk must be at least 1 image, got {chunk}")
        self.root, self.chunk, self.level = root, chunk, sample_level
        self._join, self._join_notes = join or (lambda listing: None), join_notes
        self.survey = s = survey(root, sample_level, keep=chunk)
        _check(root, s, sample_level)
        self.ignored, self.ignored_count = s.ignored, s.ignored_count
        self.origin = origin  # (the labels' provenance in the store)
        self._rows = ifcb.BinRows(root) if s.parts else None
        self._head: tuple[Listing | None, Iterator[Listing]] | None = None
        self._sample, self._hint = s.sample, s.images
        if s.parts:  # a bin's ROIs are known once it is read: the first chunk is the sample
            gen = self._bin_chunks()
            head = next(gen, None)
            self._head = (head, gen)
            if head is not None:
                self._sample = [head.paths[i] for i in spread(len(head), SAMPLE_KEPT)]
                self._hint = len(head)

    @property
    def hint(self) -> int:
        """How many images there are (of a bin tree: the first chunk's, at least)."""
        return self._hint

    def sample_files(self, n: int) -> list[str]:
        """Up to ``n`` files spread evenly over the tree (absolute paths)."""
        return [os.path.join(self.root, self._sample[i]) for i in spread(len(self._sample), n)]

    @property
    def notes(self) -> list[str]:
        bins = [self._rows.count_note(), *self._rows.notes] if self._rows else []
        return bins + self._join_notes()

    def chunks(self) -> Iterator[Listing]:
        if self._head is not None:
            head, gen = self._head
            self._head = None
            if head is not None:
                yield head
            yield from gen
        elif self._rows is not None:
            yield from self._bin_chunks()
        else:
            yield from self._image_chunks()

    def _piece(self, listing: Listing) -> Listing:
        listing.origin = self.origin
        self._join(listing)
        return listing

    def _image_chunks(self) -> Iterator[Listing]:
        if self.survey.paths is not None:  # the survey kept them all: one piece, one walk
            yield self._image_piece(list(self.survey.paths))
            return
        paths: list[str] = []
        for prefix, names in walk_runs(self.root):
            paths += [prefix + n for n in names if os.path.splitext(n)[1].lower() in IMAGE_SUFFIXES]
            while len(paths) >= self.chunk:
                yield self._image_piece(paths[: self.chunk])
                paths = paths[self.chunk :]
        if paths:
            yield self._image_piece(paths)

    def _image_piece(self, paths: list[str]) -> Listing:
        labels = _labels(self.root, paths, self.survey.depth, self.level)
        return self._piece(Listing(root=self.root, paths=paths, labels=labels))

    def _bin_chunks(self) -> Iterator[Listing]:
        rows = self._rows
        assert rows is not None
        for stem, readable in _bin_order(self.root, self.survey.parts):
            (rows.add_bin if readable else rows.add_bad)(stem)
            if len(rows.paths) >= self.chunk:
                yield self._piece(_bin_listing(self.root, rows, []))
                rows.clear()
        if rows.paths:
            yield self._piece(_bin_listing(self.root, rows, []))
            rows.clear()
