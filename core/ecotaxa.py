"""EcoTaxa's TSV: objects in, predictions out (https://ecotaxa.obs-vlfr.fr, its import format).

One row per object, column names prefixed by table: ``object_id``, ``img_file_name`` (the image,
relative to the TSV), ``object_annotation_category`` (the label), ``object_annotation_hierarchy``
(its lineage, ``>`` between levels, root first), ``object_annotation_status`` (``predicted``,
``validated``, ``dubious``; old exports write P, V, D), ``sample_id`` and any other metadata
(``object_*``, ``sample_*``, ``acq_*``, ``process_*``). A second header line of types (``[t]``
text, ``[f]`` float), which EcoTaxa's import format requires, may follow the names.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from penult.core.errors import PenultError

__all__ = ["EcoTaxaError", "EcoTaxaTable", "STATUS", "TsvWriter", "is_ecotaxa", "read_tsv"]

STATUS = {"p": "predicted", "predicted": "predicted", "v": "validated", "validated": "validated",
          "d": "dubious", "dubious": "dubious", "": ""}  # fmt: skip
TYPES = re.compile(r"^\[[tf]\]$")
ID, IMAGE = "object_id", "img_file_name"
CATEGORY, HIERARCHY, STATE = (
    "object_annotation_category", "object_annotation_hierarchy", "object_annotation_status"
)  # fmt: skip
KNOWN = {ID, IMAGE, CATEGORY, HIERARCHY, STATE, "sample_id"}
# Object columns kept as metadata; the rest (object_area, process_* ...: a number per object,
# thousands of distinct values) are measurements another tool made, not labels, and are left out.
OBJECT_KEPT = ("object_lat", "object_lon", "object_date", "object_time", "object_depth_min",
               "object_depth_max", "object_annotation_person_name", "object_annotation_date")  # fmt: skip


def kept(column: str) -> bool:
    """Whether a column is carried as metadata: sample and acquisition columns, a few of the
    object's."""
    return column.startswith(("sample_", "acq_")) or column in OBJECT_KEPT


class EcoTaxaError(PenultError):
    """A TSV that cannot be read as EcoTaxa's; the message names the file and the line."""


@dataclass
class EcoTaxaTable:
    """The rows of an EcoTaxa TSV, one per object, in file order."""

    path: Path
    ids: list[str]
    images: list[str]  # relative to the TSV's folder
    category: list[str]
    status: list[str]  # "", predicted, validated, dubious
    levels: dict[str, list[str]]  # level0 (the root) ... from the hierarchy, leaf excluded
    sample: list[str]
    metadata: dict[str, list[str]]  # every other column, lower case
    notes: list[str] = field(default_factory=list)


class TsvWriter:
    """Predictions as an EcoTaxa import TSV: ``object_id``, ``img_file_name``, the predicted
    ``object_annotation_category``, status ``predicted``, the model's ``object_score`` and any
    extra columns (``sample_id``), with the typed second header line EcoTaxa's import wants.
    Tabs and line breaks inside a value would break the table: they become spaces."""

    def __init__(self, f, extra: Sequence[str] = ()):
        self.f, self.extra = f, list(extra)
        names = [ID, IMAGE, CATEGORY, STATE, "object_score", *self.extra]
        types = ["[t]", "[t]", "[t]", "[t]", "[f]", *(["[t]"] * len(self.extra))]
        self._line(names)
        self._line(types)

    def _line(self, cells: Sequence[str]) -> None:
        self.f.write("\t".join(re.sub(r"[\t\r\n]", " ", str(c)) for c in cells) + "\n")

    def row(self, object_id: str, image: str, category: str, score: float | None,
            extra: Sequence[str] = ()) -> None:  # fmt: skip
        self._line([object_id, image, category, "predicted",
                    "" if score is None else f"{score:.6f}", *extra])  # fmt: skip


def is_ecotaxa(path: Path) -> bool:
    """Whether the file's header names EcoTaxa's image column (a .tsv, or a .txt export). Only
    a regular file is opened: a FIFO named ``x.txt`` must not block the listing."""
    if not path.is_file():
        return False
    try:
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            head = f.readline()
    except OSError:
        return False
    return IMAGE in [h.strip().lower() for h in head.split("\t")]


def read_tsv(path: str | os.PathLike[str]) -> EcoTaxaTable:
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise EcoTaxaError(f"{path}: cannot read as a TSV ({e})") from None
    if not rows:
        raise EcoTaxaError(f"{path}: empty file")
    header = [h.strip().lower() for h in rows[0]]
    if IMAGE not in header:
        raise EcoTaxaError(f"{path}: no {IMAGE!r} column (has {', '.join(header[:8])} ...)")
    body, first = rows[1:], 2
    if body and all(TYPES.match(c.strip().lower()) for c in body[0] if c.strip()):
        body, first = body[1:], 3  # the typed second header line
    col = {h: i for i, h in enumerate(header)}

    def get(r: list[str], name: str) -> str:
        i = col.get(name)
        return r[i].strip() if i is not None and i < len(r) else ""

    t = EcoTaxaTable(path, [], [], [], [], {}, [], {})
    other = [h for h in header if h not in KNOWN and h and kept(h)]
    dropped = [h for h in header if h not in KNOWN and h and not kept(h)]
    t.metadata = {h: [] for h in other}
    lineages, unknown, seen = [], [], {}
    for n, r in enumerate(body, first):
        if not any(c.strip() for c in r):
            continue
        image = get(r, IMAGE)
        if not image:
            raise EcoTaxaError(f"{path}: line {n} has an empty {IMAGE!r}")
        if image in seen:
            raise EcoTaxaError(f"{path}: line {n} repeats {image!r} (first on line {seen[image]})")
        seen[image] = n
        state = get(r, STATE).lower()
        if state not in STATUS:
            unknown.append((n, state))
            state = "predicted"  # not trusted as validated
        t.ids.append(get(r, ID) or Path(image).stem)
        t.images.append(Path(image).as_posix())
        t.category.append(get(r, CATEGORY))
        t.status.append(STATUS[state] if get(r, CATEGORY) else "")
        t.sample.append(get(r, "sample_id"))
        lineages.append([x.strip() for x in get(r, HIERARCHY).split(">") if x.strip()])
        for h in other:
            t.metadata[h].append(get(r, h))
    if not t.images:
        raise EcoTaxaError(f"{path}: no objects listed")
    depth = max((len(x) - 1 for x in lineages), default=0)
    for k in range(depth):  # the hierarchy's levels above the category, root first
        t.levels[f"level{k}"] = [x[k] if len(x) - 1 > k else "" for x in lineages]
    if dropped:
        t.notes.append(f"{path.name}: {len(dropped)} measurement column(s) not stored, e.g. "
                       f"{dropped[0]}")  # fmt: skip
    if unknown:
        n, v = unknown[0]
        t.notes.append(f"{path.name}: {len(unknown)} object(s) with an unknown status, read as "
                       f"predicted (line {n}: {v!r})")  # fmt: skip
    return t
