"""`penult neighbors` and `penult duplicates`: queries against a store's index, tables, contact sheets."""

from __future__ import annotations

import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from penult.classify.csvout import SafeWriter, open_csv
from penult.classify.images import Images
from penult.classify.neighbors import NeighborIndex, NeighborIndexError, open_index
from penult.classify.thumbs import FIGURE_CSS, THUMB, figure
from penult.core import regular_sha256
from penult.features import FeatureStore, sha_raw

__all__ = [
    "Hit",
    "Result",
    "THUMB",
    "contact_sheet",
    "find_duplicates",
    "neighbors",
    "resolve_queries",
    "write_table",
]


@dataclass
class Hit:
    row: int
    path: str  # store key (relative path)
    file: str  # absolute file, for thumbnails
    label: str
    score: float


@dataclass
class Result:
    query: str
    file: str  # absolute image file of the query ("" if none)
    label: str
    hits: list[Hit] = field(default_factory=list)
    error: str = ""


def resolve_queries(
    store: FeatureStore,
    backbone: str,
    queries: list[str],
    images: Images | None = None,
) -> tuple[list[Result], np.ndarray, list[int | None]]:
    """Each query as (result shell, vector, store row or None): a store key, an image file, or a folder."""
    found = store.find(list(queries))  # the queries that are store keys: their rows alone read
    keyed = np.unique(found[found >= 0])
    shown = _shown(store, keyed)
    valid = dict(zip(keyed.tolist(), store.valid(backbone, keyed).tolist(), strict=True))
    shells: list[Result] = []
    rows: list[int | None] = []
    files: list[tuple[int, str]] = []  # (position, file) to embed
    for q, r in zip(queries, found.tolist(), strict=True):
        key = q if r >= 0 else None
        if key is not None and valid[r]:
            shells.append(Result(q, shown[r][1], shown[r][2]))
            rows.append(r)
        elif images is not None and (Path(q).is_dir() or Path(q).is_file()):
            for shown, f in images.list(q)[0]:
                files.append((len(shells), f))
                shells.append(Result(shown, f, ""))
                rows.append(None)
        else:
            why = (
                "in the store but without an embedding"
                if key
                else "not a file, folder or store key"
                if images is not None or not Path(q).exists()
                else "an image file: embedding it needs the image side (extract.Featuriser)"
            )
            raise NeighborIndexError(f"query {q!r}: {why}")
    files = _stored_files(store, backbone, files, shells, rows)
    X = np.zeros((len(shells), store.backbone(backbone).dim), np.float32)
    known = [i for i, r in enumerate(rows) if r is not None]
    if known:
        X[known] = store.embeddings(backbone, [rows[i] for i in known])
    if files:
        _embed(store, backbone, files, X, shells, images)
    return shells, X, rows


def _shown(store: FeatureStore, rows: np.ndarray) -> dict[int, tuple[str, str, str]]:
    """(path, file, label) of the stored ``rows``, read for those rows alone: a lookup in a
    store of millions never reads its whole image table."""
    rows = np.unique(np.asarray(rows, np.int64))
    if not len(rows):
        return {}
    t = store.images(rows.tolist())
    labels = t.labels.get("label", [""] * len(t))
    return {
        int(r): (t.path[i], os.path.join(t.root[i], t.path[i]), labels[i])
        for i, r in enumerate(rows.tolist())
    }


def _stored_files(
    store: FeatureStore, backbone: str, files: list[tuple[int, str]], shells: list[Result],
    rows: list[int | None],
) -> list[tuple[int, str]]:  # fmt: skip
    """Query files whose content is stored (same SHA-256) answered as that stored row: its
    embedding and label, and itself left out of its neighbours. Returns the files to embed."""
    if not files:
        return files
    shas = [regular_sha256(f) for _, f in files]  # "": not a regular file, or unreadable
    found = store.hash_index(backbone).find(sha_raw(shas))
    found[[not h for h in shas]] = -1  # embedding those says why
    shown = _shown(store, found[found >= 0])
    for (pos, _), r in zip(files, found.tolist(), strict=True):
        if r >= 0:
            rows[pos], shells[pos].label = int(r), shown[int(r)][2]
    return [(pos, f) for (pos, f), r in zip(files, found.tolist(), strict=True) if r < 0]


def _embed(
    store: FeatureStore,
    backbone: str,
    files: list[tuple[int, str]],
    X: np.ndarray,
    shells: list[Result],
    images: Images,
) -> None:
    """Embed query files with the store's backbone (same weights and preprocessing, checked)."""
    done = np.zeros(len(files), bool)
    batches = images.embed(backbone, store.backbone(backbone).fingerprint, [f for _, f in files])
    for indices, emb, failed in batches:
        for j, x in zip(indices, emb, strict=True):
            X[files[j][0]] = x
            done[j] = True
        for j, why in failed:
            shells[files[j][0]].error = why
    for j in np.flatnonzero(~done):
        shells[files[j][0]].error = shells[files[j][0]].error or "could not be embedded"


def neighbors(
    store_path: str | os.PathLike[str], backbone: str, queries: list[str], *, k: int = 10, metric: str = "cosine",
    index: NeighborIndex | None = None, nprobe: int | None = None, images: Images | None = None,
) -> list[Result]:  # fmt: skip
    """The k nearest stored images of each query (a query that is a store key does not find itself).

    ``nprobe`` (IVF indexes): lists searched per query; more is slower and closer to exact.
    ``images`` (an ``extract.Featuriser``) lists and embeds queries that are image files or
    folders; without it only store keys can be queried.
    """
    store = FeatureStore(store_path)
    ni = index or open_index(store_path, backbone, metric=metric)[0]
    if nprobe and ni.meta.get("nprobe"):
        ni.meta["nprobe"] = int(nprobe)
    if k > len(ni.rows):
        raise NeighborIndexError(
            f"-k {k}: the index holds {len(ni.rows):,} images; ask for at most that many"
        )
    shells, X, rows = resolve_queries(store, backbone, queries, images)
    ok = [i for i, s in enumerate(shells) if not s.error]
    if not ok:
        return shells
    scores, ids = ni.search(X[ok], k + 1)
    shown = _shown(store, ids[ids >= 0])
    for i, sc, rr in zip(ok, scores, ids, strict=True):
        hits = [
            Hit(int(r), *shown[int(r)], float(s))
            for s, r in zip(sc, rr, strict=True)
            if r >= 0 and r != rows[i]
        ]
        shells[i].hits = hits[:k]
    return shells


def write_table(results: list[Result], out: str | os.PathLike[str]) -> Path:
    """One row per (query, neighbour): CSV, or JSON when ``out`` ends in .json."""
    out = Path(out)
    rows, failed = [], []  # queries without neighbours (failed ones) are listed last
    for r in results:
        base = {"query": r.query, "query_label": r.label}
        for j, h in enumerate(r.hits):
            rows.append(
                {
                    **base,
                    "rank": j + 1,
                    "neighbor": h.path,
                    "label": h.label,
                    "score": round(h.score, 6),
                    "error": r.error,
                }
            )
        if not r.hits:
            failed.append(
                {**base, "rank": "", "neighbor": "", "label": "", "score": "", "error": r.error}
            )
    rows += failed
    if out.suffix.lower() == ".json":
        out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    else:
        fields = ["query", "query_label", "rank", "neighbor", "label", "score", "error"]
        with open_csv(out) as f:
            w = SafeWriter(f)
            w.writerow(fields)
            w.writerows([r[k] for k in fields] for r in rows)
    return out


def contact_sheet(
    results: list[Result], out: str | os.PathLike[str], *, title: str, score_name: str = "score"
) -> Path:
    """An offline HTML page: each query's image beside its neighbours, with labels and scores.

    Thumbnails are written into ``<out stem>_files/`` next to the page and linked relatively, so the
    page and its folder can be moved together and opened without a server.
    """
    out = Path(out)
    folder = out.with_name(out.stem + "_files")
    folder.mkdir(exist_ok=True)
    n = 0

    def cell(file: str, name: str, label: str, note: str, query: bool = False) -> str:
        nonlocal n
        n += 1
        lines = [f'<div class="label">{html.escape(label)}</div>'] if label else []
        lines += [f'<div class="note">{html.escape(note)}</div>'] if note else []
        tag = '<div class="tag">query</div>' if query else ""
        return figure(file, folder, f"{n:06d}.jpg", name, lines, kind="q" if query else "hit",
                      tag=tag)  # fmt: skip

    rows = []
    for r in results:
        q = cell(r.file, r.query, r.label or "unlabelled", "", query=True)
        hits = "".join(
            cell(h.file, h.path, h.label or "unlabelled", f"{score_name} {h.score:.3f}")
            for h in r.hits
        )
        err = f'<p class="err">{html.escape(r.error)}</p>' if r.error else ""
        rows.append(f'<div class="row">{q}{hits}{err}</div>')
    style = (
        "body{font-family:sans-serif;margin:1em}"
        ".row{display:flex;flex-wrap:wrap;gap:10px;border-bottom:1px solid #ccc;padding:10px 0}"
        + FIGURE_CSS
        + "figure.q{outline:3px solid #36c;outline-offset:2px}"
        ".tag{font-size:12px;font-weight:bold;color:#fff;background:#36c;padding:1px 6px;"
        "display:inline-block;margin-bottom:2px}"
        ".label{font-weight:bold}.note{color:#666}.err{color:#b00;flex-basis:100%}"
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{''.join(rows)}</body></html>\n"
    )
    out.write_text(page, encoding="utf-8", errors="backslashreplace")
    return out


def find_duplicates(
    store_path: str | os.PathLike[str], backbone: str, *, threshold: float = 0.95, k: int = 10,
    index: NeighborIndex | None = None,
) -> list[Result]:  # fmt: skip
    """Groups of images whose cosine similarity to another member is >= ``threshold``.

    Each group comes back as a Result: its first image as the query, the others as hits scored by
    their similarity to the image that linked them in.
    """
    store = FeatureStore(store_path)
    ni = index or open_index(store_path, backbone, metric="cosine")[0]
    if ni.metric != "cosine":
        raise NeighborIndexError("duplicates need a cosine index")
    parent = {int(r): int(r) for r in ni.rows}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    best: dict[int, float] = {}
    for start in range(0, len(ni.rows), 4096):
        part = ni.rows[start : start + 4096]
        scores, ids = ni.search(store.embeddings(backbone, part), k)
        for r, sc, rr in zip(part.tolist(), scores, ids, strict=True):
            for s, o in zip(sc.tolist(), rr.tolist(), strict=True):
                if o >= 0 and o != r and s >= threshold:
                    parent[find(r)] = find(o)
                    best[r] = max(best.get(r, 0.0), s)
                    best[o] = max(best.get(o, 0.0), s)
    groups: dict[int, list[int]] = {}
    for r in best:
        groups.setdefault(find(r), []).append(r)
    shown = _shown(store, np.fromiter(best, np.int64, len(best)))
    out = []
    for members in sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0])):
        first, rest = members[0], members[1:]
        res = Result(*shown[first])
        res.hits = [Hit(r, *shown[r], best[r]) for r in rest]
        out.append(res)
    return out
