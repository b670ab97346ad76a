"""The extraction run: plan what is missing, read -> embed -> journal it, commit, summarise."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from penult.core import OptionError
from penult.core.cluster import ClusterStart
from penult.core.options import COUNT, CROP, POSITIVE, option, parse_shard
from penult.extract.engines import ENGINES, cache_notes
from penult.extract.images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    auto_resize,
    mostly_greyscale,
    read_image_bytes,
    spread,
)
from penult.extract.loader import default_workers, make_loader, to_device
from penult.extract.model import OPTIMIZE, PRECISIONS, Embedder, build_backbone, pick_optimize
from penult.extract.quantize import CALIBRATION_IMAGES
from penult.extract.registry import DEFAULT_BACKBONE, RESIZE_MODES, TTA_MODES
from penult.extract.sources import Listing
from penult.features import StoreWriter, TableView, sha_raw
from penult.features.parts import PartWriter, list_parts, merge
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractOptions:
    backbone: str = option(DEFAULT_BACKBONE, "registry name (see `penult backbones`)")
    weights: str = option(
        "pretrained", "'pretrained' (library default/cache), 'random', or a state-dict FILE"
    )
    name: str | None = option(
        None, "store entry name (default: backbone name, plus weights hash for a file)"
    )
    crop_pct: float | None = option(
        None,
        "centre crop as a fraction of the resized image (default: the weights' own, e.g. 0.875); "
        "1.0 keeps the whole image, for photos already cropped to the subject. Stored as NAME@cropNN",
        parse=CROP,
    )
    resize: str = option(
        "auto",
        "how images become squares: crop (the weights' resize + centre crop: photos), whole (the "
        "whole image squashed: photos already cropped to the subject) or pad (aspect kept, padded "
        "with the image's border colour: plankton, microscope images, long thin subjects); auto = "
        "pad when most of a sample of the images is greyscale, else crop. Stored as NAME@whole / "
        "NAME@pad",
        choices=("auto", *RESIZE_MODES),
    )
    tta: str = option(
        "none",
        "flip: store the mean embedding of each image and its mirror image (decoded once, twice "
        "the network time). Stored as NAME@flip",
        choices=TTA_MODES,
    )
    trust_checkpoint: bool = option(
        False, "allow full pickles in --weights (runs code from the file!)"
    )
    batch_size: int = option(32, "images per batch", parse=POSITIVE)
    workers: int | None = option(
        None, "loader processes (default: by device and cores)", parse=COUNT
    )
    device: str = option("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = option(
        "auto",
        "auto: bf16 on CPUs with native bf16 (AVX-512 BF16, AMX: torch and OpenVINO; ONNX "
        "Runtime stays fp32), fp16/bf16 on CUDA, else fp32. int8: "
        "OpenVINO NNCF quantization calibrated on 256 of your images, into an entry of its own "
        "(NAME@int8; needs penult[openvino]); on cub100 it kept linear-probe top-1 within 0.5 "
        "points of fp32 (docs/BENCHMARKS.md)",
        choices=PRECISIONS,
    )
    engine: str = option(
        "auto",
        "what runs the network: torch, onnxruntime or openvino (CPU; the same module exported to "
        "ONNX once, cached beside torch's weights); auto = on CPU the fastest of torch, ONNX "
        "Runtime and OpenVINO where installed, timed on a few batches (cached per CPU model and "
        "architecture; PENULT_AUTO_ENGINES=onnxruntime limits the runtimes it tries), torch on CUDA",
        choices=ENGINES,
    )
    optimize: str = option(
        "auto",
        "inductor = torch.compile with frozen weights (10-40 s compile, about 1.5x faster on "
        "CPU); auto uses it on CPU from 10,000 images",
        choices=OPTIMIZE,
    )
    dtype: str = option("float32", "storage dtype of embeddings", choices=("float32", "float16"))
    commit_every: int = option(
        512, "rows per journal commit (the most a crash can lose)", parse=POSITIVE
    )
    retry_failed: bool = option(False, "try again images that failed in an earlier run")
    max_pixels: int = option(
        DEFAULT_MAX_PIXELS, "larger images are refused as decompression bombs", parse=POSITIVE
    )
    progress: bool = option(True, "no progress bar", flags=("-q", "--quiet"))
    shard: tuple[int, int] | None = option(
        None,
        "embed only shard I of N (0-based; a fixed split of the paths) into a part beside the "
        "store, for job arrays; run `penult merge STORE` when the shards are done. A shard run "
        "again after a kill resumes its part",
        parse=parse_shard,
        metavar="I/N",
    )
    cluster: str | None = option(
        None,
        "embed on Dask: local[:N] (N worker processes; default one per GPU, else 2), "
        "tcp://HOST:PORT (a running scheduler) or slurm[:JOBS] (dask-jobqueue, configured in "
        "~/.config/dask/jobqueue.yaml). The driver plans, workers write parts, the driver "
        "publishes them; needs `pip install 'penult[dask]'`",
        metavar="SPEC",
    )
    partition_size: int = option(
        2048,
        "images per Dask task with --cluster: larger means less scheduling, smaller means less "
        "redone when a worker dies",
        parse=POSITIVE,
        metavar="N",
    )
    int8_digest: str = ""  # an int8 entry's calibration (set by the driver for its workers)


@dataclass
class ExtractSummary:
    store: Path
    backbone: str
    device: str = ""
    precision: str = ""
    listed: int = 0
    extracted: int = 0
    reused: int = 0  # same bytes already embedded under another path: copied, not recomputed
    skipped: int = 0  # already in the store
    previously_failed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    optimize: str = "eager"
    seconds: float = 0.0
    loop_seconds: float = 0.0
    compile_seconds: float = 0.0
    warmup_seconds: float = 0.0  # loader start + first batch (compile is timed apart, before)
    warmup_images: int = 0
    interrupted: bool = False
    resize: str = ""  # what --resize auto chose, and why
    engine: str = ""
    engine_note: str = ""  # what --engine auto measured
    cache_notes: list[str] = field(default_factory=list)  # engine cache entries found bad, remade

    @property
    def images_per_s(self) -> float:
        """End to end: model build, hashing, compile and commits included."""
        return self.extracted / self.seconds if self.seconds else 0.0

    @property
    def steady_images_per_s(self) -> float:
        """After the first batch: the rate a long run settles at."""
        t = self.loop_seconds - self.warmup_seconds
        return (self.extracted - self.warmup_images) / t if t > 0 else 0.0

    def report(self, max_failed: int = 20) -> str:
        lines = [
            f"{self.backbone} -> {self.store} on {self.device} ({self.precision}, {self.engine}"
            + (f", {self.optimize})" if self.engine == "torch" else ")")
            + (
                "  INTERRUPTED: finished batches are saved; run again to resume"
                if self.interrupted
                else ""
            ),
            f"  listed {self.listed}: extracted {self.extracted}, already stored {self.skipped}, "
            f"copied from identical files {self.reused}, failed {len(self.failed)}"
            + (
                f", skipped as failed before {self.previously_failed} (--retry-failed)"
                if self.previously_failed
                else ""
            ),
            f"  time {self.seconds:.1f} s, {self.images_per_s:.1f} images/s"
            + (
                f" ({self.steady_images_per_s:.1f}/s after the first batch)"
                if self.warmup_images and self.extracted > self.warmup_images  # one batch: no rate
                else ""
            )
            + (f", compile {self.compile_seconds:.0f} s" if self.compile_seconds else ""),
        ]
        if self.resize:
            lines.append(f"  resize {self.resize}; pin it with --resize")
        if self.engine_note:
            lines.append(f"  engine {self.engine} ({self.engine_note}); pin it with --engine")
        lines += [f"  engine cache: {n}" for n in self.cache_notes]
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} non-image files, e.g. {self.ignored[0]}")
        for p, why in self.failed[:max_failed]:
            lines.append(f"  FAILED {p}: {why}")
        if len(self.failed) > max_failed:
            lines.append(f"  ... and {len(self.failed) - max_failed} more (see `penult info`)")
        return "\n".join(lines)


def _hash_one(path: str) -> tuple[str, str]:
    try:
        return hashlib.sha256(read_image_bytes(path)).hexdigest(), ""
    except ImageError as e:
        return "", str(e)


def hash_listing(
    listing: Listing, row: np.ndarray, stored: TableView, *, progress: bool
) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """Content hashes of every listed file (``row``: its stored row or -1); a stored hash is
    reused while size and mtime are unchanged."""
    n = len(listing)
    sha, err = [""] * n, [""] * n
    nbytes, mtime = np.zeros(n, np.int64), np.zeros(n, np.int64)
    todo = []
    for i in range(n):
        try:
            st = os.stat(listing.absolute(i))
            nbytes[i], mtime[i] = st.st_size, st.st_mtime_ns
        except OSError:
            pass
        r = int(row[i])
        if (
            r >= 0
            and stored.sha256[r].any()
            and stored.nbytes[r] == nbytes[i]
            and stored.mtime_ns[r] == mtime[i]
        ):
            sha[i] = stored.sha256[r].tobytes().hex()
        else:
            todo.append(i)
    quiet = not progress or len(todo) < 1000
    results = _hash_files([listing.absolute(i) for i in todo])
    for i, (h, e) in tqdm(
        zip(todo, results, strict=True), total=len(todo), desc="hashing", unit="file", disable=quiet
    ):
        sha[i], err[i] = h, e
    return sha, err, nbytes, mtime


SLOW_READ_S = 0.002  # a file slower than this to read and hash: storage that waits (network, disk)
# Reads judged together: one stall (another process had the core) is not slow storage.
SLOW_WINDOW = 8


def _hash_files(paths: list[str]) -> Iterator[tuple[str, str]]:
    """``_hash_one`` of each path, in order: in this thread while files come fast (from the page
    cache threads only add lock hand-offs: 3x slower measured on 2,000 cached photos), on 8 threads
    once most of the last ``SLOW_WINDOW`` reads were slow, so reads from network storage overlap.
    One slow read alone does not switch: on a busy machine any read may wait for the core once,
    and the threads' hand-offs then cost the run 0.3 s of CPU per 2,000 files."""
    recent: deque[bool] = deque(maxlen=SLOW_WINDOW)
    for k, path in enumerate(paths):
        t = time.perf_counter()
        got = _hash_one(path)
        recent.append(time.perf_counter() - t > SLOW_READ_S)
        yield got
        if 2 * sum(recent) > SLOW_WINDOW and k + 1 < len(paths):
            with ThreadPoolExecutor(max_workers=8) as pool:
                yield from pool.map(_hash_one, paths[k + 1 :])
            return


@dataclass
class _Plan:
    todo: list[int] = field(default_factory=list)  # listing indices to run through the model
    reuse: list[tuple[int, int]] = field(default_factory=list)  # (listing index, stored row)
    skipped: int = 0
    previously_failed: int = 0
    unreadable: list[int] = field(default_factory=list)


def plan(
    sha: list[str],
    err: list[str],
    row: np.ndarray,
    stored: TableView,
    valid: np.ndarray,
    *,
    retry_failed: bool,
) -> _Plan:
    """What to do with each listed file (``row``: its stored row or -1), decided with array
    operations (no per-file Python work): skip it (stored with this hash), skip it as failed
    before, copy the embedding of an identical file already stored, run it through the model,
    or record it as unreadable."""
    n, n_stored = len(sha), len(stored.nbytes)
    is_valid = np.zeros(n_stored, bool)
    is_valid[: len(valid)] = valid[:n_stored]
    unreadable = np.fromiter(map(bool, err), bool, n)
    skipped, prev = np.zeros(n, bool), np.zeros(n, bool)
    step = 1 << 16  # a block of the listing at a time: memory stays a few bytes a row
    for s in range(0, n if n_stored else 0, step):  # (an empty store has nothing to skip)
        r = row[s : s + step]
        at = np.maximum(r, 0)
        same = (r >= 0) & ~unreadable[s : s + step]
        same &= (stored.sha256[at] == sha_raw(sha[s : s + step])).all(axis=1)
        skipped[s : s + step] = same & is_valid[at]
        prev[s : s + step] = same & ~is_valid[at] & stored.failed[at] & (not retry_failed)
    rest = np.flatnonzero(~unreadable & ~skipped & ~prev)
    # an identical file (same bytes) already embedded elsewhere: copy its row (the last one wins)
    vrows = np.flatnonzero(is_valid)[::-1]
    twin = (
        match_hashes(stored.sha256, vrows, sha_raw([sha[i] for i in rest])) if len(rest) else rest
    )
    copy = twin >= 0
    return _Plan(
        todo=rest[~copy].tolist(),
        reuse=list(zip(rest[copy].tolist(), twin[copy].tolist(), strict=True)),
        skipped=int(skipped.sum()),
        previously_failed=int(prev.sum()),
        unreadable=np.flatnonzero(unreadable).tolist(),
    )


def match_hashes(digests: np.ndarray, rows: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """For each query digest, the first of ``rows`` whose entry in ``digests`` (n, 32) equals it,
    -1 where none does: sorted 8-byte prefixes and a binary search, every hit confirmed on all 32
    bytes (a prefix shared by two digests is looked up exactly)."""
    out = np.full(len(queries), -1, np.int64)
    if not len(rows) or not len(queries):
        return out
    k = np.ascontiguousarray(digests[:, :8]).view(np.uint64).ravel()[rows]
    q = np.ascontiguousarray(queries[:, :8]).view(np.uint64).ravel()
    order = np.argsort(k, kind="stable")
    pos = np.minimum(np.searchsorted(k[order], q), len(k) - 1)
    cand = order[pos]
    same_prefix = k[cand] == q
    exact = same_prefix & (digests[rows[cand]] == queries).all(axis=1)
    out[exact] = rows[cand[exact]]
    for i in np.flatnonzero(same_prefix & ~exact).tolist():  # another digest, same prefix
        hit = np.flatnonzero((digests[rows] == queries[i]).all(axis=1))
        out[i] = rows[hit[0]] if len(hit) else -1
    return out


def extract(
    store_path: str | os.PathLike[str], listing: Listing, opts: ExtractOptions = ExtractOptions()
) -> ExtractSummary:  # noqa: B008
    """Embed every listed image that the store lacks for this backbone; see ExtractOptions."""
    for key in ("batch_size", "commit_every", "max_pixels", "partition_size"):
        if int(getattr(opts, key)) < 1:
            raise OptionError(f"{key} must be at least 1, got {getattr(opts, key)!r}")
    t0 = time.perf_counter()
    with ClusterStart(opts.cluster) if opts.cluster else nullcontext() as cluster:
        s = _extract(store_path, listing, opts, cluster)
    s.seconds = time.perf_counter() - t0
    return s


def _extract(store_path, listing: Listing, opts: ExtractOptions, cluster) -> ExtractSummary:
    opts, resize_why = resolve_resize(opts, listing)
    backbone, embedder, name, fingerprint = build_embedder(opts, listing, store_path)
    opts = replace(opts, int8_digest=embedder.int8.get("calibration_sha256", ""))
    s = ExtractSummary(
        Path(store_path), name, str(embedder.device), embedder.precision, listed=len(listing)
    )
    s.resize, s.engine, s.engine_note = resize_why, embedder.engine, embedder.engine_note
    s.cache_notes = cache_notes()
    s.ignored = listing.ignored
    if opts.cluster and list_parts(store_path):  # a killed driver's parts: publish, then plan
        merge(store_path)
    writer: StoreWriter | PartWriter = StoreWriter(store_path)
    if opts.shard is not None:
        i, n = opts.shard
        listing = listing.shard(i, n)
        writer = PartWriter(store_path, f"shard-{i}-of-{n}")
        s.listed = len(listing)
    with writer as w:
        row, stored = w.store.find(listing.paths), w.store.table_view()
        sha, err, nbytes, mtime = hash_listing(listing, row, stored, progress=opts.progress)
        w.upsert_images(
            listing.paths, [str(listing.root)] * len(listing), sha, nbytes, mtime, listing.labels
        )
        w.register_backbone(name, fingerprint, dtype=opts.dtype)
        valid = w.store.valid(name) if name in w.store.backbones() else np.zeros(0, bool)
        p = plan(sha, err, row, stored, valid, retry_failed=opts.retry_failed)
        s.skipped, s.previously_failed = p.skipped, p.previously_failed
        if p.unreadable:
            w.record_failures(
                [listing.paths[i] for i in p.unreadable],
                [""] * len(p.unreadable),
                [err[i] for i in p.unreadable],
            )
            s.failed += [(listing.paths[i], err[i]) for i in p.unreadable]
        if p.reuse:
            x = w.store.embeddings(name, [r for _, r in p.reuse])
            w.append(name, [listing.paths[i] for i, _ in p.reuse], [sha[i] for i, _ in p.reuse], x)
            s.reused = len(p.reuse)
        if isinstance(w, PartWriter):  # a shard run again after a kill: resume its part
            p.todo = w.not_done(name, listing.paths, sha, p.todo)
        if p.todo and opts.cluster:
            from penult.extract.cluster import run_on_cluster

            run_on_cluster(cluster.client(), w, listing, sha, p.todo, opts, s)
        elif p.todo:
            _run(w, name, listing, sha, p.todo, embedder, backbone.preprocess, opts, s)
    return s


def resolve_resize(opts: ExtractOptions, listing: Listing) -> tuple[ExtractOptions, str]:
    """``--resize auto`` made concrete once, from the whole listing, before any shard is taken:
    every shard and cluster worker then writes the same entry. Also the reason, for the summary."""
    if opts.resize != "auto":
        return opts, ""
    if opts.crop_pct is not None:
        return replace(opts, resize="crop"), "crop (auto: --crop-pct given)"
    grey, note = mostly_greyscale([listing.absolute(i) for i in spread(len(listing))])
    mode = auto_resize(grey, opts.crop_pct)
    return replace(opts, resize=mode), f"{mode} (auto: {note})"


def build_embedder(opts: ExtractOptions, listing: Listing | None = None, store_path=None):
    """(backbone, embedder, store entry name, fingerprint) for the options. An int8 entry
    already in the store keeps its calibration; a new one calibrates on images of ``listing``."""
    backbone = build_backbone(
        opts.backbone,
        weights=opts.weights,
        trust_checkpoint=opts.trust_checkpoint,
        crop_pct=opts.crop_pct,
        resize=opts.resize,
        tta=opts.tta,
    )
    name = opts.name or backbone.name + ("@int8" if opts.precision == "int8" else "")
    digest, calibration = opts.int8_digest, []
    if opts.precision == "int8" and not digest:
        digest = _stored_calibration(store_path, name)
        if not digest and listing is not None:
            calibration = [listing.absolute(i) for i in spread(len(listing), CALIBRATION_IMAGES)]
    embedder = Embedder(
        backbone, device=opts.device, precision=opts.precision, batch_size=opts.batch_size,
        engine=opts.engine, calibration=calibration, int8_digest=digest, progress=opts.progress,
    )  # fmt: skip
    fingerprint = {**backbone.fingerprint, "precision": embedder.tag}
    if embedder.int8:
        fingerprint["quantization"] = {
            k: embedder.int8[k] for k in ("method", "calibration_sha256")
        }  # (how many images is not part of the identity)
    return backbone, embedder, name, fingerprint


def _stored_calibration(store_path, name: str) -> str:
    """The calibration digest of int8 entry ``name`` when the store has it, else ""."""
    from penult.features import FeatureStore

    if store_path is None or not Path(store_path).exists():
        return ""
    entry = FeatureStore(store_path).backbones().get(name)
    q = entry.fingerprint.get("quantization") if entry else None
    return q.get("calibration_sha256", "") if isinstance(q, dict) else ""


class _Pending:
    """Rows embedded or failed since the last commit; ``flush`` hands them to the writer at once."""

    def __init__(self, w: StoreWriter | PartWriter, name: str):
        self.w, self.name = w, name
        self.rows: dict[str, list] = {"path": [], "sha": [], "x": [], "w": [], "h": []}
        self.fails: dict[str, list] = {"path": [], "sha": [], "why": []}

    def __len__(self) -> int:
        return len(self.rows["path"]) + len(self.fails["path"])

    def fail(self, path: str, sha: str, why: str) -> None:
        for k, v in (("path", path), ("sha", sha), ("why", why)):
            self.fails[k].append(v)

    def add(self, path: str, sha: str, x: np.ndarray, width: int, height: int) -> None:
        for k, v in (("path", path), ("sha", sha), ("x", x), ("w", width), ("h", height)):
            self.rows[k].append(v)

    def flush(self) -> None:
        r = self.rows
        if r["path"]:
            x = np.concatenate(r["x"])
            h, wd = np.array(r["h"]), np.array(r["w"])
            self.w.append(self.name, r["path"], r["sha"], x, width=wd, height=h)
        self.w.record_failures(self.fails["path"], self.fails["sha"], self.fails["why"])
        for d in (self.rows, self.fails):
            for v in d.values():
                v.clear()


def _take(batch, todo, listing, sha, embedder, pending: _Pending, s: ExtractSummary, t0) -> None:
    """Embed one loader batch into ``pending``; failures and files changed since hashing are
    recorded, not embedded."""
    for it in batch.failed:
        i = todo[it.index]
        pending.fail(listing.paths[i], it.sha256, it.error)
        s.failed.append((listing.paths[i], it.error))
    if not len(batch.indices):
        return
    x = embedder(batch.images)
    if not s.warmup_images:
        s.warmup_seconds, s.warmup_images = time.perf_counter() - t0, len(batch.indices)
    for k, j in enumerate(batch.indices):
        i = todo[j]
        if batch.sha256[k] != sha[i]:
            s.failed.append((listing.paths[i], "file changed while extracting; run again"))
            continue
        pending.add(listing.paths[i], sha[i], x[k : k + 1], batch.width[k], batch.height[k])
        s.extracted += 1


def _run(
    w: StoreWriter | PartWriter,
    name: str,
    listing: Listing,
    sha: list[str],
    todo: list[int],
    embedder: Embedder,
    pre,
    opts: ExtractOptions,
    s: ExtractSummary,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Embed ``todo`` into ``w``; ``on_batch(n)`` is told of every ``n`` images done."""
    workers = default_workers(embedder.device) if opts.workers is None else opts.workers
    optimize = pick_optimize(opts.optimize, embedder.device, len(todo))
    if embedder.engine == "torch" and optimize == "inductor":  # (a runtime has its own graph)
        t = time.perf_counter()
        embedder.compile()
        embedder.warmup(pre.crop)
        s.compile_seconds = time.perf_counter() - t
    loader = make_loader(
        [listing.absolute(i) for i in todo],
        pre,
        batch_size=opts.batch_size,
        workers=workers,
        pin_memory=embedder.device.type == "cuda",
        max_pixels=opts.max_pixels,
    )
    pending = _Pending(w, name)
    bar = tqdm(
        total=len(todo),
        desc=f"extract {name}",
        unit="img",
        disable=not opts.progress,
        smoothing=0.1,
    )
    t_loop = time.perf_counter()
    try:
        for batch in to_device(iter(loader), embedder.device):
            _take(batch, todo, listing, sha, embedder, pending, s, t_loop)
            n = len(batch.indices) + len(batch.failed)
            bar.update(n)
            bar.set_postfix(failed=len(s.failed), refresh=False)
            if on_batch is not None:
                on_batch(n)
            if len(pending) >= opts.commit_every:
                pending.flush()
    except KeyboardInterrupt:
        s.interrupted = True
    else:
        s.optimize = embedder.optimize
    finally:
        s.loop_seconds = time.perf_counter() - t_loop
        bar.close()
        pending.flush()
