"""Publishing a part without copying it: the part is *sealed* into segments where it was written,
and the store takes those segment files by a hard link.

Sealing (on the worker that wrote the part, when its part is done) replays the part's journal
shards with the store's own commit code into a small store of the part's rows inside the part
folder (``sealed.h5`` and its segments), made with the store's key seed, block size, name lists
and backbones as they are at that moment. Its segment files are therefore what publishing the
part by replay would write, with rows numbered from 0.

Taking (by the store's single writer, under its lock) checks only metadata: the same store, the
same backbones, name lists that agree, and not one of the part's paths stored already (its path
keys, 16 bytes a row, against the store's index). It then links the segment files into the
store's segments folder and lays their pieces over rows ``n..n+k`` of every column; only the path
index (24 bytes a row) and a label column whose names disagree are written again. The new
top-level file is the commit point: a writer killed before it leaves unreferenced links (the next
writer collects them) and the part as it was; killed after it, the part's seal id is in the store
(``sealed_taken``), so the part is removed and never published twice. A file system without hard
links (or a part on another one) gets a copy of the files instead.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import shutil
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np
from penult.core.errors import PenultError, StoreError
from penult.core.files import atomic_path, fsync_dir
from penult.features import journal
from penult.features.format2.commit import Commit, add_precision, backbone_meta
from penult.features.format2.files import (
    KeyRun,
    Piece,
    Reader,
    cut,
    find_keys,
    path_keys,
    read_run,
    store_id,
    write_segment,
)
from penult.features.format2.state import (
    ERROR,
    SIZE,
    TABLE,
    TABLE_COLUMNS,
    State,
    backbone_family,
    load,
    new_state,
    save,
    segment_dir,
)
from penult.features.types import Fingerprint, sha_raw

log = logging.getLogger(__name__)

__all__ = ["PUBLISHED", "SEALED", "Refused", "is_sealed", "seal", "take_sealed", "unseal"]

SEALED = "sealed.h5"
SEAL_KINDS = ("images", "backbone", "embeddings", "failures")  # what a seal replays
SEAL_BYTES = 256 << 20  # shard bytes replayed per commit of a seal (its memory)
TAKEN_KEPT = 1024  # seal ids of taken parts the store remembers
PUBLISHED = "published"  # taken by an earlier writer that was killed before it removed the part


def seal(store: Path, part: Path) -> bool:
    """Seal ``part`` (a part folder of ``store``): see the module docstring. Returns whether it
    is sealed; a part holding anything but images, embeddings and failures (labels set apart,
    reviews) is not, and is published by replay. A seal already made of the same shards is kept."""
    shards = journal.shards_in(part)
    top = part / SEALED
    if not shards:
        return False
    if _sealed_from(top) == _shards_id(shards):
        return True
    unseal(part)
    kinds = {journal.kind_of(s) for s in shards}
    if not kinds <= set(SEAL_KINDS):
        return False
    with h5py.File(store, "r") as f:
        base = load(f)
    if not _registered_as_stored(shards, base):
        return False  # the merge's checks set the part aside, saying why
    if "images" not in kinds:  # a cluster partition: embeddings of rows the store holds
        return _seal_over(store, part, shards, base)
    mini = new_state(base.block)
    mini.attrs["key_seed"] = base.attrs["key_seed"]
    mini.attrs["seal_id"] = secrets.token_hex(8)
    mini.attrs["sealed_from"] = _shards_id(shards)
    mini.names |= {k: list(v) for k, v in base.names.items() if _kind_seeded(k)}
    mini.backbones = json.loads(json.dumps(base.backbones))  # registered: embeddings replay
    batch: list[Path] = []
    size = 0
    for i, shard in enumerate(shards):
        batch.append(shard)
        size += shard.stat().st_size
        if i + 1 == len(shards) or size >= SEAL_BYTES:
            c = Commit(top, mini)
            for b in batch:
                c.apply(*journal.read_shard(b))
            c.finish(journal.seq_of(batch[-1]))
            with h5py.File(top, "r") as f:
                mini = load(f)
            batch, size = [], 0
    return True


def _registered_as_stored(shards: list[Path], base: State) -> bool:
    """Whether every backbone the part registers is the store's, where the store has it: the
    same fingerprint and the same dtype (a seal would otherwise convert what a replay refuses)."""
    for shard in shards:
        if journal.kind_of(shard) != "backbone":
            continue
        meta, _ = journal.read_shard(shard)
        name = meta.get("name")
        have = base.backbones.get(name)
        if have is not None and _differs(name, have, meta.get("fingerprint"), meta.get("dtype")):
            return False
    return True


def _differs(
    name: str, have: dict, fp: dict | str | None, dtype: object, dim: object = None
) -> str:
    """Why backbone ``name`` registered with fingerprint ``fp`` (a dict, or its JSON),
    ``dtype`` and ``dim`` is not the store's entry ``have`` ("" when it is)."""
    fp = json.loads(fp) if isinstance(fp, str) else fp
    if not isinstance(fp, dict) or not Fingerprint(json.loads(have["fingerprint"])).same_as(fp):
        return f"it holds backbone {name!r} with another fingerprint than the store"
    if np.dtype(str(dtype)) != np.dtype(have["dtype"]) or (
        dim is not None and int(dim) != int(have["dim"])
    ):
        return f"it stores backbone {name!r} as {dtype}, the store as {have['dtype']}"
    return ""


MAX_RUNS = 64  # runs of consecutive store rows a part laid over stored rows may cover


def _seal_over(store: Path, part: Path, shards: list[Path], base: State) -> bool:
    """Seal a part of embeddings (and failures) for images the store holds already (a cluster
    partition: the driver stored the images before the tasks ran). Its segments hold the
    part's rows in store-row order, mapped over the store's rows in at most MAX_RUNS runs; a
    check file keeps each row's number, path key and hash, which the store must still have
    when the part is taken. False (the part is replayed) where that does not fit: an image
    the store lacks or holds with another hash, rows in too many runs, several backbones,
    an image both embedded and failed, sizes for some images only."""
    reg: dict[str, dict] = {}
    got: dict[str, tuple] = {}  # path: (sha, embedding | None, width, height, reason)
    for shard in shards:
        meta, a = journal.read_shard(shard)
        if meta["kind"] == "backbone":
            reg[meta["name"]] = meta
        elif meta["kind"] == "embeddings":
            reg.setdefault(meta["name"], {})
            w, h = a.get("width"), a.get("height")
            for i, (p, sha) in enumerate(
                zip(a["path"].tolist(), a["sha256"].tolist(), strict=True)
            ):
                size = (int(w[i]), int(h[i])) if w is not None else (None, None)
                got[p] = (sha, a["embeddings"][i], *size, "")
        else:
            for p, sha, why in zip(
                *(a[k].tolist() for k in ("path", "sha256", "reason")), strict=True
            ):
                if p in got and got[p][1] is not None:
                    return False
                got[p] = (sha, None, 0, 0, why)
    if len(reg) != 1 or not got:
        return False
    name = next(iter(reg))
    meta = base.backbones.get(name)  # (a registration unlike it: refused by seal already)
    if meta is None:
        fp = reg[name].get("fingerprint")
        if not isinstance(fp, dict):
            return False
        meta = backbone_meta(fp, reg[name]["dim"], reg[name]["dtype"])
    paths = list(got)
    seed = int(base.attrs["key_seed"])
    key = path_keys(paths, seed)
    with Reader(segment_dir(store), base) as r:
        runs = [read_run(r, n) for n, _ in base.index]
        rows = find_keys(runs, key)
        if (rows < 0).any():
            return False
        order = np.argsort(rows)
        rows, key = rows[order], key[order]
        paths = [paths[i] for i in order]
        if len(np.unique(rows)) != len(rows):
            return False
        sha = sha_raw([got[p][0] for p in paths])
        if (r.rows(base.maps.get(TABLE, []), TABLE_COLUMNS["sha256"], "sha256", rows) != sha).any():
            return False
    spans = np.flatnonzero(np.diff(rows) != 1) + 1
    if len(spans) >= MAX_RUNS:
        return False
    dim, dtype = int(meta["dim"]), np.dtype(meta["dtype"])
    k = len(rows)
    x = np.full((k, dim), np.nan, dtype)
    valid = np.zeros(k, bool)
    width, height = np.zeros(k, np.int32), np.zeros(k, np.int32)
    errors = list(base.names.get("error", [""]))
    codes = np.zeros(k, np.int32)
    sized = set()
    for i, p in enumerate(paths):
        _, e, w, h, why = got[p]
        if e is not None and (e.shape != (dim,) or not np.isfinite(e).all()):
            return False  # replayed: the replay stores it as failed, with the reason
        if e is not None:
            x[i], valid[i] = e, True
            sized.add(w is not None)
            width[i], height[i] = (w, h) if w is not None else (0, 0)
        else:
            if why not in errors:
                errors.append(why)
            codes[i] = errors.index(why)
    if len(sized) > 1:
        return False
    top = part / SEALED
    folder = segment_dir(top)
    sid = str(base.attrs["key_seed"])
    files = {backbone_family(name): write_segment(
        folder, backbone_family(name), {"embeddings": x, "valid": valid}, store=sid)}  # fmt: skip
    files[ERROR] = write_segment(folder, ERROR, {"error": codes}, store=sid)
    if sized == {True}:
        files[SIZE] = write_segment(folder, SIZE, {"width": width, "height": height}, store=sid)
    check = write_segment(folder, "over", {"row": rows, "key": key, "sha256": sha}, store=sid)
    mini = new_state(base.block)
    starts = np.concatenate([[0], spans])
    ends = np.concatenate([spans, [k]])
    pieces = [
        Piece(int(rows[a]), int(rows[b - 1]) + 1, "", int(a))
        for a, b in zip(starts, ends, strict=True)
    ]
    mini.maps = {fam: [Piece(q.lo, q.hi, f, q.offset) for q in pieces] for fam, f in files.items()}
    mini.attrs |= {"key_seed": base.attrs["key_seed"], "seal_id": secrets.token_hex(8),
                   "sealed_from": _shards_id(shards), "rows": int(rows[-1]) + 1,
                   "over": check, "over_rows": k, "journal_seq": journal.seq_of(shards[-1])}  # fmt: skip
    mini.names["error"] = errors
    mini.backbones = {name: meta}
    save(top, mini)
    return True


def unseal(part: Path) -> None:
    """Remove a part's seal (or a killed seal's leftovers)."""
    (part / SEALED).unlink(missing_ok=True)
    shutil.rmtree(segment_dir(part / SEALED), ignore_errors=True)


def is_sealed(part: Path) -> bool:
    """Whether ``part`` holds a seal of all its shards as they are now."""
    shards = journal.shards_in(part)
    return bool(shards) and _sealed_from(part / SEALED) == _shards_id(shards)


def _shards_id(shards: list[Path]) -> str:
    """The shards a seal was made of: names, sizes and times (a shard rewritten or added
    since makes the seal stale)."""
    seen = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in shards]
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()


def _sealed_from(top: Path) -> str:
    if not top.is_file():
        return ""
    try:
        with h5py.File(top, "r") as f:
            return str(f.attrs.get("sealed_from", ""))
    except OSError:
        return ""


class Refused(PenultError):
    """A sealed part cannot be taken as it is (it is published by replay instead)."""


def take_sealed(path: Path, parts: Sequence[Path]) -> list[str]:
    """Publish sealed ``parts`` (folders) into the store at ``path`` in one commit. Returns per
    part how: ``linked``, ``copied`` (no hard link possible), :data:`PUBLISHED`, or why it was
    refused (the caller replays its shards). The caller holds the writer's lock and has
    published the journal."""
    with h5py.File(path, "r") as f:
        state = load(f)
    c = Commit(path, state)
    taken = json.loads(str(state.attrs.get("sealed_taken", "[]")))
    out: list[str] = []
    added: list[KeyRun | None] = []  # each part's new rows, by path key
    for part in parts:
        before = len(c.new_keys)
        try:
            out.append(_take(c, part / SEALED, taken))
        except Refused as e:
            out.append(str(e))
        added.append(c.new_keys[-1] if len(c.new_keys) > before else None)
    twice = _shared(parts, added)
    if twice:  # parts sharing images: taken again without the later ones (they are replayed)
        c.reader.close()
        keep = [p for p in parts if p not in twice]
        again = dict(zip(keep, take_sealed(path, keep), strict=True))
        return [again.get(p) or twice[p] for p in parts]
    if any(o in ("linked", "copied") for o in out):
        c.s.attrs["sealed_taken"] = json.dumps(taken[-TAKEN_KEPT:])
        fsync_dir(c.reader.folder)
        c.finish(int(state.attrs.get("journal_seq", 0)))
    else:
        c.reader.close()
    return out


def _shared(parts: Sequence[Path], added: list[KeyRun | None]) -> dict[Path, str]:
    """Parts of new rows taken in this commit that hold an image an earlier one holds (each
    part was checked against the store alone: one sort here, not a search per pair)."""
    new = [(i, run) for i, run in enumerate(added) if run is not None]
    if len(new) < 2:
        return {}
    key0 = np.concatenate([np.asarray(r.key0) for _, r in new])
    key1 = np.concatenate([np.asarray(r.key1) for _, r in new])
    owner = np.concatenate([np.full(len(r.row), i) for i, r in new])
    order = np.lexsort((owner, key1, key0))
    k0, k1, ow = key0[order], key1[order], owner[order]
    dup = np.flatnonzero((k0[1:] == k0[:-1]) & (k1[1:] == k1[:-1])) + 1
    names = {i: parts[i].name for i, _ in new}
    firsts = dict(zip(ow[dup].tolist(), ow[dup - 1].tolist(), strict=True))
    return {parts[i]: f"it holds images part {names[j]} holds too" for i, j in firsts.items()}


def _take(c: Commit, top: Path, taken: list[str]) -> str:
    s = c.s
    try:
        with h5py.File(top, "r") as f:
            part = load(f)
    except OSError as e:
        raise Refused(f"its seal does not read ({e})") from None
    if str(part.attrs.get("seal_id")) in taken:
        return PUBLISHED
    if store_id(part.attrs) != c.store:
        raise Refused("it was sealed for another store")
    if "over" in part.attrs:
        how = _take_over(c, part, top)
        taken.append(str(part.attrs["seal_id"]))
        return how
    other = [f for f in part.maps if _codes(f) is None]
    if other or part.history:
        raise Refused(f"it holds {', '.join(other) or 'a label history'}")
    _check_backbones(s, part)
    translate = _check_names(s, part)
    folder = segment_dir(top)
    k = part.rows
    redo: dict[str, dict[str, np.ndarray]] = {}  # families whose codes mean other names here
    with Reader(folder, part) as r:
        _whole(r, part)
        runs = [read_run(r, n) for n, _ in part.index]
        run = KeyRun.merge(runs) if len(runs) != 1 else runs[0]
        key = np.stack([np.asarray(run.key0), np.asarray(run.key1)], 1)
        row = np.asarray(run.row)
        if len(row) != k or (len(row) and (row.min() < 0 or row.max() >= k)):
            raise Refused("its path index does not match its rows")
        stored = int((find_keys(c.runs(), key) >= 0).sum())  # other parts: _shared
        if stored:
            raise Refused(f"{stored} of its {k} images are stored already")
        for fam, ps in part.maps.items():
            code = _codes(fam) or {}
            if ps and any(kind in translate for kind in code.values()):
                cols = part.columns(fam)
                redo[fam] = {col: r.span(ps, cols[col], col, 0, k) for col in cols}
                for col, kind in code.items():
                    if kind in translate:
                        redo[fam][col] = translate[kind][redo[fam][col]]
    n0, how = c.n, "linked"
    for fam, ps in part.maps.items():
        if fam in redo:  # a small column (labels, reviews, failures): written again
            c.put(fam, np.arange(n0, n0 + k), redo[fam])
            s.maps.setdefault(fam, [])
            continue
        how = _bring(ps, folder, c.reader.folder, how)
        s.maps.setdefault(fam, []).extend(_split(ps, n0, s.block))
    _merge_names(s, part, translate)
    _register(s, part)
    if k:
        c.add_keys(KeyRun(np.asarray(run.key0), np.asarray(run.key1), row + n0))
    c.n += k
    taken.append(str(part.attrs["seal_id"]))
    return how


def _take_over(c: Commit, part: State, top: Path) -> str:
    """Lay a part sealed over stored rows (:func:`_seal_over`) on those rows."""
    s, folder = c.s, segment_dir(top)
    if len(part.backbones) != 1:
        raise Refused("its seal names no single backbone")
    name = next(iter(part.backbones))
    fam = backbone_family(name)
    _check_backbones(s, part)
    translate = _check_names(s, part)
    with Reader(folder, part) as r:
        _whole(r, part)
        try:
            chk = r.file(str(part.attrs["over"]))
            rows, key, sha = chk["row"][()], chk["key"][()], chk["sha256"][()]
        except (StoreError, KeyError) as e:
            raise Refused(f"its seal is damaged ({e})") from None
        if len(rows) != int(part.attrs["over_rows"]) or len(key) != len(rows):
            raise Refused("its seal is damaged (its check file is cut short)")
        valid = r.rows(part.maps[fam], part.columns(fam)["valid"], "valid", rows)
        errors = r.rows(part.maps[ERROR], part.columns(ERROR)["error"], "error", rows)
    if not len(rows) or int(rows[-1]) >= c.n:
        raise Refused("its images are not in the store")
    if (c.current(TABLE, "key", rows) != key).any() or (
        c.current(TABLE, "sha256", rows) != sha
    ).any():
        raise Refused("its images changed in the store since it was sealed")
    failed = rows[~valid]
    if name in s.backbones and c.current(fam, "valid", failed).any():
        raise Refused("an image it records as failed has an embedding in the store")
    if SIZE in part.maps and s.maps.get(SIZE) and c.current(SIZE, "width", failed).any():
        raise Refused("an image it records as failed has a size in the store")
    how = "linked"
    for f, ps in part.maps.items():
        if f == ERROR and "error" in translate:  # another part named other failures since
            c.put(ERROR, rows, {"error": translate["error"][errors]})
            continue
        how = _bring(ps, folder, c.reader.folder, how)
        s.maps[f] = cut(s.maps.get(f, []), _split(ps, 0, s.block))
    _merge_names(s, part, translate)
    _register(s, part)
    return how


def _whole(r: Reader, part: State) -> None:
    """Every segment file of the seal there and long enough (metadata: shapes); refused else."""
    for _, why in r.problems(part):
        raise Refused(f"its seal is damaged ({why})")


def _merge_names(s: State, part: State, translate: dict[str, np.ndarray]) -> None:
    """The store's name lists grown by the part's (see :func:`_check_names`)."""
    for kind in _used(part):
        names = part.names.get(kind, [""])
        have = s.names.setdefault(kind, [] if kind == "root" else [""])
        if kind in translate:
            have.extend(v for v in dict.fromkeys(names) if v not in set(have))
        else:
            have.extend(names[len(have) :])


def _register(s: State, part: State) -> None:
    """The part's backbones in the store (a new one registered, an old one's precisions grown)."""
    for name, meta in part.backbones.items():
        if backbone_family(name) not in part.maps:  # the store's, seeded: nothing of the part
            continue
        if name not in s.backbones:
            s.backbones[name] = dict(meta)
        else:
            add_precision(s.backbones[name], meta.get("precision", ""))
        s.maps.setdefault(backbone_family(name), [])


def _check_backbones(s: State, part: State) -> None:
    for name, meta in part.backbones.items():
        have = s.backbones.get(name)
        if have is None or backbone_family(name) not in part.maps:
            continue
        if why := _differs(name, have, meta["fingerprint"], meta["dtype"], meta["dim"]):
            raise Refused(why)


def _kind_seeded(kind: str) -> bool:
    """Name lists a seal starts from the store's (the codes of a part's rows index them)."""
    return kind in ("root", "error", "who", "source") or kind.startswith("label:")


def _codes(fam: str) -> dict[str, str] | None:
    """The code columns of a family a seal may hold, with the name list each indexes (None:
    a family a seal never holds)."""
    if fam == TABLE:
        return {"root": "root"}
    if fam == ERROR:
        return {"error": "error"}
    if fam == SIZE or fam.startswith("backbone:"):
        return {}
    if fam.startswith("label:"):
        return {"code": fam}
    if fam.startswith("review:"):
        return {"who": "who", "source": "source"}
    return None


def _used(part: State) -> list[str]:
    """The name lists the part's rows index."""
    return sorted({k for f, ps in part.maps.items() if ps for k in (_codes(f) or {}).values()})


def _check_names(s: State, part: State) -> dict[str, np.ndarray]:
    """The name lists whose codes mean other names in the store than in the part (another part
    added names since this one was sealed), with the store's code for each part code; the
    others agree (one list starts the other). The folder names must agree: they sit in the
    image table, which is never written again."""
    out = {}
    for kind in _used(part):
        names = part.names.get(kind, [""])
        have = s.names.get(kind, [])
        m = min(len(have), len(names))
        if have[:m] == names[:m]:
            continue
        if kind == "root":
            raise Refused("its folder names differ from the store's")
        merged = list(have) or [""]
        index = {v: i for i, v in enumerate(merged)}
        for v in names:
            if v not in index:
                index[v] = len(merged)
                merged.append(v)
        out[kind] = np.asarray([index[v] for v in names], np.int32)
    return out


def _split(ps: list[Piece], n0: int, block: int) -> list[Piece]:
    """The part's pieces moved to rows ``n0..``, cut at the store's block boundaries."""
    out = []
    for p in ps:
        lo, hi, off = p.lo + n0, p.hi + n0, p.offset
        while lo < hi:
            end = min(hi, (lo // block + 1) * block)
            out.append(Piece(lo, end, p.file, off))
            off += end - lo
            lo = end
    return out


def _bring(ps: list[Piece], src: Path, dest: Path, how: str) -> str:
    """The pieces' segment files into the store's folder ``dest``: linked while the file
    system allows it (``how`` is still ``linked``), copied from then on; returns how."""
    for p in ps:
        how = _link(src / p.file, dest / p.file) if how == "linked" else _copy(
            src / p.file, dest / p.file)  # fmt: skip
    return how


def _link(src: Path, dest: Path) -> str:
    """Hard-link a segment into the store; ``copied`` where the file system cannot."""
    if dest.exists():
        return "linked"  # the same file, taken by a killed writer and not yet collected
    try:
        os.link(src, dest)
        return "linked"
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    return _copy(src, dest)


def _copy(src: Path, dest: Path) -> str:
    if not dest.exists():
        with atomic_path(dest) as tmp:
            shutil.copyfile(src, tmp)
    return "copied"
