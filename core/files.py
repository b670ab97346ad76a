"""Atomic file writes and file hashing: the one way penult does each, used by the store, models,
indexes and checkpoints alike.

An atomic write goes to a temporary name beside the target, is fsynced, renamed over the target
and the folder fsynced: a reader (or a run after a crash) sees the old file or the new one,
never half of one, and a failed write leaves only the old file.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from penult.core.errors import OptionError

__all__ = [
    "check_out_folder",
    "file_identity",
    "set_aside",
    "TMP_PREFIX",
    "atomic_path",
    "file_sha256",
    "fsync_dir",
    "regular_sha256",
    "fsync_file",
    "temporary_name",
    "write_bytes",
    "write_text",
]


TMP_PREFIX = ".tmp-"  # temporary files start with this (journal folders sweep them up)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike[str]) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def temporary_name(path: str | os.PathLike[str]) -> Path:
    """A name beside ``path`` that no other process or thread writing it uses."""
    p = Path(path)
    return p.with_name(f"{TMP_PREFIX}{p.name}.{os.getpid()}-{threading.get_ident()}")


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, tmp: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; when the block ends without
    an exception it is fsynced and renamed over ``path``, else removed."""
    target = Path(path)
    tmp = tmp or temporary_name(target)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically."""
    write_bytes(path, text.encode("utf-8"))


def set_aside(path: str | os.PathLike[str], label: str) -> Path:
    """Rename a finished file or folder that must not be used, nor lost, out of the way as
    ``.<label>-<name>`` (numbered if taken) beside it; returns the new path."""
    path = Path(path)
    dest = path.with_name(f".{label}-{path.name}")
    n = 1
    while dest.exists():
        n += 1
        dest = path.with_name(f".{label}-{path.name}-{n}")
    os.replace(path, dest)
    fsync_dir(path.parent)
    return dest


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes (hex), read in chunks: memory stays flat for any size."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def file_identity(st: os.stat_result) -> tuple[int, ...]:
    """What any write to a file, or a file put in its place, changes (device, inode, size,
    modification and change time; the change time cannot be set back): while it is the same,
    what was learnt from the file's bytes still holds."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def regular_sha256(path: str | os.PathLike[str]) -> str:
    """A regular file's SHA-256, as the store keys its images; "" for anything else (a FIFO or
    device would block the read) or a file that cannot be read (the loader then says why)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return ""
        return file_sha256(path)
    except OSError:
        return ""


def check_out_folder(path: str | os.PathLike[str]) -> None:
    """Refuse an output whose folder is missing (every command the same way): a typo should not
    create directories, nor fail after the work is done."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OptionError(f"{path}: folder {folder} does not exist (create it first)")
