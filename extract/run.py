"""The extraction run: plan what is missing, read -> embed -> journal it, commit, summarise."""

from __future__ import annotations

import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from penult.core import OptionError
from penult.core.cluster import ClusterStart
from penult.extract.cluster import run_on_cluster
from penult.extract.embed import build_embedder, embed_into
from penult.extract.engines import cache_notes
from penult.extract.options import ExtractOptions
from penult.extract.plan import hash_listing, plan, resolve_resize
from penult.extract.sources import FolderStream, Listing
from penult.extract.summary import FAILED_KEPT, ExtractSummary
from penult.features import FeatureStore, StoreWriter, TableView
from penult.features.parts import PartWriter, list_parts, merge

log = logging.getLogger(__name__)

# a listing, or anything with its chunks(), sample_files(n), hint, notes, ignored (a FolderStream)
Source = Listing | FolderStream


def extract(
    store_path: str | os.PathLike[str],
    listing: Source,
    opts: ExtractOptions = ExtractOptions(),  # noqa: B008 - frozen
) -> ExtractSummary:
    """Embed every listed image that the store lacks for this backbone; see ExtractOptions.
    A :class:`FolderStream` is extracted a piece at a time, with one embedder."""
    for key in ("batch_size", "commit_every", "max_pixels", "partition_size"):
        if int(getattr(opts, key)) < 1:
            raise OptionError(f"{key} must be at least 1, got {getattr(opts, key)!r}")
    t0 = time.perf_counter()
    with ClusterStart(opts.cluster) if opts.cluster else nullcontext() as cluster:
        s = _extract(store_path, listing, opts, cluster)
    s.seconds = time.perf_counter() - t0
    return s


def _ecotaxa_status(w, listing: Listing, new: np.ndarray) -> None:
    """An EcoTaxa export's statuses for images new to the store (imports come in validated by
    their file): dubious objects marked so, predicted ones stored as the file's prediction (their
    label stays empty, so training leaves them out until someone validates them)."""
    from penult.features import DUBIOUS, current_user

    source = f"file:{listing.origin}"
    dub = [i for i, s in enumerate(listing.status) if s == "dubious" and new[i]]
    if dub:
        paths = [listing.paths[i] for i in dub]
        labels = [listing.labels["label"][i] for i in dub]
        w.review({"label": (paths, labels, [DUBIOUS] * len(dub))}, who=current_user(),
                 source=source)  # fmt: skip
    pred = [i for i, v in enumerate(listing.predicted) if v and new[i]]
    if pred:
        w.predictions(
            "label", [listing.paths[i] for i in pred],
            np.array([[listing.predicted[i]] for i in pred], dtype=str),
            np.full((len(pred), 1), np.nan, np.float32), model=f"ecotaxa:{Path(listing.origin).name}",
        )  # fmt: skip


def _relabelled(store: FeatureStore, listing: Listing, row: np.ndarray) -> dict[str, int]:
    """Per label column, the stored images this listing gives another value (an edited
    manifest or a moved folder): the summary says so instead of "already stored" alone."""
    known = np.flatnonzero(row >= 0)
    if not len(known):
        return {}
    have, out = set(store.label_columns()), {}
    rows = np.unique(row[known])  # this listing's rows only: a piece reads its own, not all
    at = np.searchsorted(rows, row[known])
    for col, values in listing.labels.items():
        if col not in have:
            continue
        codes, names = store.label_codes(col, rows)
        old = np.asarray(names, dtype=object)[codes[at]]
        new = np.asarray(values, dtype=object)[known]
        n = int(((old != new) & (new != "")).sum())
        if n:
            out[col] = n
    return out


def _extract(store_path, source: Source, opts: ExtractOptions, cluster) -> ExtractSummary:
    opts, resize_why = resolve_resize(opts, source)
    backbone, embedder, name, fingerprint = build_embedder(opts, source, store_path)
    opts = replace(opts, int8_digest=embedder.int8.get("calibration_sha256", ""))
    s = ExtractSummary(Path(store_path), name, str(embedder.device), embedder.precision)
    s.resize, s.engine, s.engine_note = resize_why, embedder.engine, embedder.engine_note
    s.cache_notes = cache_notes()
    if opts.cluster and list_parts(store_path):  # a killed driver's parts: publish, then plan
        merge(store_path)
    writer: StoreWriter | PartWriter = StoreWriter(store_path)
    if opts.shard is not None:
        writer = PartWriter(store_path, f"shard-{opts.shard[0]}-of-{opts.shard[1]}")
    run = _Run(embedder, backbone.preprocess, name, fingerprint, opts, cluster, s)
    with writer as w:
        # what is stored is read once: each piece's own rows are new to the store, so the
        # pieces before it change nothing a later one plans against
        run.stored = w.store.table_view()
        for listing in source.chunks():
            if opts.shard is not None:
                listing = listing.shard(*opts.shard)
            s.listed += len(listing)
            run.piece(w, listing)
            if s.interrupted:
                break
    s.ignored = source.ignored
    s.ignored_count = getattr(source, "ignored_count", len(source.ignored))
    return s


@dataclass
class _Run:
    """What every piece of a listing is extracted with (the embedder is built once)."""

    embedder: object
    pre: object
    name: str
    fingerprint: dict
    opts: ExtractOptions
    cluster: object
    s: ExtractSummary
    valid: np.ndarray | None = None
    stored: TableView | None = None

    def piece(self, w, listing: Listing) -> None:
        """Hash, plan, store the rows of and embed one listing (a whole one or a piece)."""
        s, opts, name = self.s, self.opts, self.name
        row = w.store.find(listing.paths)
        if len(row) and row.max() >= len(self.stored.nbytes):  # (a merge by another process)
            self.stored = w.store.table_view()
        stored = self.stored
        sha, err, nbytes, mtime = hash_listing(listing, row, stored, progress=opts.progress)
        for col, n in _relabelled(w.store, listing, row).items():
            s.relabelled[col] = s.relabelled.get(col, 0) + n
        w.upsert_images(
            listing.paths,
            [str(listing.root)] * len(listing),
            sha,
            nbytes,
            mtime,
            listing.labels,
            origin=listing.origin,
        )
        if listing.status and isinstance(w, StoreWriter):  # (a shard's part has no history)
            w.commit()  # the rows first: the statuses name them
            _ecotaxa_status(w, listing, row < 0)
        if self.valid is None:
            w.register_backbone(name, self.fingerprint, dtype=opts.dtype)
            have = name in w.store.backbones()
            self.valid = w.store.valid(name) if have else np.zeros(0, bool)
        p = plan(sha, err, row, stored, self.valid, retry_failed=opts.retry_failed)
        s.skipped += p.skipped
        s.previously_failed += p.previously_failed
        if p.unreadable:
            w.record_failures(
                [listing.paths[i] for i in p.unreadable],
                [""] * len(p.unreadable),
                [err[i] for i in p.unreadable],
            )
            s.add_failed([(listing.paths[i], err[i]) for i in p.unreadable[:FAILED_KEPT]],
                         len(p.unreadable))  # fmt: skip
        if p.reuse:
            x = w.store.embeddings(name, [r for _, r in p.reuse])
            w.append(name, [listing.paths[i] for i, _ in p.reuse], [sha[i] for i, _ in p.reuse], x)
            s.reused += len(p.reuse)
        if isinstance(w, PartWriter):  # a shard run again after a kill: resume its part
            p.todo = w.not_done(name, listing.paths, sha, p.todo)
        if p.todo and opts.cluster:
            run_on_cluster(self.cluster.client(), w, listing, sha, p.todo, opts, s)
        elif p.todo:
            embed_into(w, name, listing, sha, p.todo, self.embedder, self.pre, opts, s)
        if isinstance(w, StoreWriter):
            w.commit()  # this piece's rows: the next piece starts from a committed store
