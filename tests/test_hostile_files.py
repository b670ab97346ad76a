"""Files and stores that are not what they claim: odd names, FIFOs, devices, damaged journals,
symlinked and malformed stores, a full disk. None may stop a run, jam the store or lose work."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from penult import cli
from penult.features import FeatureStore, StoreLockedError, StoreWriter, check, journal

from conftest import FP

NON_UTF8 = b"caf\xe9 photo.jpg"  # Latin-1 bytes: not valid UTF-8


@pytest.fixture
def odd_folder(small_folder: Path) -> Path:
    """Six ants and six bees, plus a non-UTF-8 name, a FIFO and a link to /dev/zero, all *.jpg."""
    src = sorted((small_folder / "ants").iterdir())[0]
    shutil.copy(src, os.path.join(os.fsencode(small_folder / "ants"), NON_UTF8))
    os.mkfifo(small_folder / "ants" / "fifo.jpg")
    os.symlink("/dev/zero", small_folder / "bees" / "zero.jpg")
    return small_folder


def _limit_memory() -> None:  # a run that reads /dev/zero must fail, not take the machine down
    resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, 6 << 30))


def _penult(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sys, cli; sys.exit(cli.main(sys.argv[1:]))", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limit_memory,
        cwd=Path(__file__).resolve().parents[1],
    )


@pytest.mark.slow
def test_odd_names_fifos_and_devices_are_recorded_not_fatal(odd_folder, tmp_path):
    store = tmp_path / "s.h5"
    args = ("extract", str(store), str(odd_folder), "--weights", "random", "-q", "--workers", "1")
    r = _penult(*args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    t = FeatureStore(store).images()
    name = "ants/" + os.fsdecode(NON_UTF8)
    failed = dict((p, e) for p, e in zip(t.path, t.error, strict=True) if e)
    assert set(failed) == {"ants/fifo.jpg", "bees/zero.jpg"}
    assert "FIFO" in failed["ants/fifo.jpg"] and "device" in failed["bees/zero.jpg"]
    row = t.path.index(name)  # the odd name round-trips losslessly, with its embedding
    assert FeatureStore(store).valid("efficientnet_lite0@random")[row]
    with h5py.File(store) as f:  # stored as the file's own bytes
        assert f["images/path"][row] == b"ants/" + NON_UTF8
    assert check(store) == []
    again = _penult(*args)  # resume: nothing left to do, the store is not jammed
    assert again.returncode == 0 and "extracted 0, already stored 13" in again.stdout


def _unmerged_writer(store: Path, n: int = 30) -> None:
    """Journal three kinds of shards and stop as a killed writer would (nothing merged)."""
    w = StoreWriter(store).__enter__()
    paths = [f"c{i % 3}/{i:03d}.jpg" for i in range(n)]
    sha = [f"{i + 1:064x}" for i in range(n)]
    w.upsert_images(
        paths, ["/d"] * n, sha, np.ones(n), np.ones(n), {"label": [p[:2] for p in paths]}
    )
    w.register_backbone("net", FP)
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    for s in range(0, n, 10):
        w.append("net", paths[s : s + 10], sha[s : s + 10], x[s : s + 10])
    w._release_lock()


def test_damaged_shard_is_set_aside_and_the_rest_merged(tmp_path):
    store = tmp_path / "s.h5"
    with StoreWriter(store):
        pass
    _unmerged_writer(store)
    shards = journal.list_shards(store)
    assert len(shards) == 5
    bad = shards[3]  # the second block of embeddings, truncated as by a crash
    bad.write_bytes(bad.read_bytes()[:100])
    problems = check(store, repair=True)
    assert len(problems) == 1 and "damaged journal shard set aside" in problems[0]
    assert journal.list_shards(store) == [] and journal.list_damaged(store)[0].name.startswith(
        bad.name
    )
    fs = FeatureStore(store)
    assert len(fs.images()) == 30 and fs.valid("net").sum() == 20  # only that block is missing
    assert "damaged shard" in cli_output(["info", str(store)])
    with StoreWriter(store):  # a later writer opens normally
        pass


def cli_output(argv: list[str]) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(argv) == 0
    return out.getvalue()


def test_symlinked_store_is_written_through_its_link_with_one_lock(tmp_path):
    real = tmp_path / "real.h5"
    link = tmp_path / "link.h5"
    with StoreWriter(real):
        pass
    link.symlink_to(real)
    _unmerged_writer(link)  # journal beside the real file
    assert journal.list_shards(real)
    with StoreWriter(link) as w:
        assert w.path == real
        with pytest.raises(StoreLockedError):
            StoreWriter(real).__enter__()
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert len(FeatureStore(real).images()) == 30 and check(link) == []


def _malformed(path: Path, kind: str) -> None:
    with StoreWriter(path) as w:
        n = 6
        paths = [f"{i}.jpg" for i in range(n)]
        w.upsert_images(
            paths,
            ["/d"] * n,
            [f"{i + 1:064x}" for i in range(n)],
            np.ones(n),
            np.ones(n),
            {"label": list("aabbcc")},
        )
        w.register_backbone("net", FP)
        w.append("net", paths, [f"{i + 1:064x}" for i in range(n)], np.ones((n, 8), np.float32))
    with h5py.File(path, "a") as f:
        if kind == "no_datasets":
            del f["images"]
        elif kind == "label_beyond_table":
            hi = f["segments/label:label/hi"]
            hi[...] = hi[()] + 4
        elif kind == "fingerprint":
            f["backbones/net"].attrs["fingerprint"] = "{not json"


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("no_datasets", "no /images group"),
        ("label_beyond_table", "label:label: piece 0..10 lies outside the table's 6 rows"),
        ("fingerprint", "malformed"),
    ],
)
def test_malformed_store_is_found_by_check_and_named_by_every_command(kind, says, tmp_path, capsys):
    store = tmp_path / "bad.h5"
    _malformed(store, kind)
    problems = check(store)
    assert problems and says in problems[0]
    for argv, rc in (
        (["check", str(store)], 1),
        (["info", str(store)], 2),
        (["train", str(store), "--out", str(tmp_path / "m.skops")], 2),
        (["index", str(store)], 2),
    ):
        capsys.readouterr()
        assert cli.main(argv) == rc, argv
        err = capsys.readouterr()
        text = err.err if rc == 2 else err.out
        assert str(store) in text and says in text, (argv, text)


def test_disk_full_keeps_the_journal_and_says_how_to_finish(
    small_folder, tmp_path, monkeypatch, capsys
):
    store = tmp_path / "s.h5"
    real_write = journal.write_shard
    calls = {"n": 0}

    def write_until_full(*a, **k):
        calls["n"] += 1
        if (
            calls["n"] > 4
        ):  # images, backbone and two blocks of embeddings fit; then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(a[0]) + ".journal")
        return real_write(*a, **k)

    from penult.features.format2.commit import Commit

    real_finish = Commit.finish

    def merge_fails_when_full(self, *a, **k):
        if calls["n"] > 4:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        return real_finish(self, *a, **k)

    monkeypatch.setattr(journal, "write_shard", write_until_full)
    monkeypatch.setattr(Commit, "finish", merge_fails_when_full)
    argv = ["extract", str(store), str(small_folder), "--weights", "random", "-q"]
    rc = cli.main([*argv, "--commit-every", "4", "--batch-size", "4", "--workers", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("penult:")]
    assert len(lines) == 1 and "no space left on device" in lines[0]
    assert f"penult check --repair {store}" in lines[0] and "Traceback" not in err
    monkeypatch.undo()  # space is free again
    assert check(store, repair=True) == []
    assert (
        FeatureStore(store).valid("efficientnet_lite0@random").sum() == 8
    )  # journaled work was kept


def test_broken_pipe_exits_quietly(hym_store):
    p = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, cli; sys.exit(cli.main(sys.argv[1:]))",
            "info",
            str(hym_store),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=Path(__file__).resolve().parents[1],
    )
    p.stdout.close()  # the reader is gone before penult prints (as `| head` after its lines)
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err


def test_stores_with_fingerprint_json_object_only(tmp_path):
    """A fingerprint that parses but is not an object is malformed too."""
    store = tmp_path / "s.h5"
    _malformed(store, "none")
    with h5py.File(store, "a") as f:
        f["backbones/net"].attrs["fingerprint"] = json.dumps([1, 2])
    assert "not a JSON object" in check(store)[0]


def test_fifo_given_as_manifest_or_list_is_refused_not_waited_on(tmp_path, capsys):
    for name in ("list.csv", "files.txt"):
        os.mkfifo(tmp_path / name)
        assert cli.main(["extract", str(tmp_path / "s.h5"), str(tmp_path / name)]) == 2
        assert "not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()


def test_fifo_given_as_an_ecotaxa_export_is_refused_not_waited_on(tmp_path, capsys):
    for name in ("export.tsv", "export.zip"):
        os.mkfifo(tmp_path / name)
        assert cli.main(["extract", str(tmp_path / "s.h5"), str(tmp_path / name)]) == 2
        assert "not a regular file" in capsys.readouterr().err
    assert not (tmp_path / "s.h5").exists()
