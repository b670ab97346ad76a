"""A folder tree listed in pieces (``extract.walk.FolderStream``): the pieces, one after another,
are the whole listing (same order, labels, notes) on real trees, and extracting them piece by
piece gives the store one whole listing gives; bad trees fail before any piece is extracted."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from penult.cli import main
from penult.extract import ExtractOptions, FolderStream, extract, list_images, open_source
from penult.extract.listing import SourceError
from penult.features import FeatureStore

FAST = ExtractOptions(progress=False, workers=1, batch_size=8, precision="fp32")


def _joined(stream: FolderStream) -> tuple[list[str], dict[str, list[str]], int]:
    paths: list[str] = []
    labels: dict[str, list[str]] = {}
    pieces = 0
    for piece in stream.chunks():
        assert piece.paths == sorted(piece.paths) and piece.origin == stream.origin
        paths += piece.paths
        for k, v in piece.labels.items():
            labels.setdefault(k, []).extend(v)
        pieces += 1
    return paths, labels, pieces


@pytest.mark.parametrize(
    ("name", "chunk", "kw"),
    [
        ("cub100", 997, {}),  # taxonomy.csv and split.csv picked up, one piece per ~10 classes
        ("ndsb_plankton", 1000, {}),  # 121 classes, more images than the survey's sample keeps
        ("hymenoptera", 50, {}),  # odd files ignored, taxonomy.csv picked up
        ("ifcb", 7, {}),  # bins read a few at a time, bad ones one row each
    ],
)
def test_the_pieces_are_the_whole_listing(data_dir: Path, name: str, chunk: int, kw) -> None:
    whole = list_images(data_dir / name, **kw)
    stream = open_source(data_dir / name, chunk=chunk, **kw)
    assert isinstance(stream, FolderStream)
    paths, labels, pieces = _joined(stream)
    assert paths == whole.paths
    assert labels == whole.labels and labels  # every column, every value
    assert pieces == -(-len(paths) // chunk) or name == "ifcb"  # (a bin is never split)
    assert pieces > 1
    assert stream.notes == whole.notes
    assert (stream.ignored, stream.ignored_count) == (whole.ignored, len(whole.ignored))
    assert stream.origin == whole.origin
    if name == "ifcb":  # a bin's ROIs are known once it is read: sampled from the first piece
        first = next(open_source(data_dir / name, chunk=chunk, **kw).chunks())
        assert stream.sample_files(48) == first.sample_files(48) != []
    elif len(whole) <= 8192:  # all kept by the survey: the same sample as the whole listing's
        assert stream.sample_files(48) == whole.sample_files(48)
    else:  # every other image kept: still spread over the whole tree
        picked = {Path(f).parent.name for f in stream.sample_files(256)}
        assert len(picked) > 100


def test_joins_over_pieces_count_like_one_listing(small_folder: Path, tmp_path: Path) -> None:
    src = small_folder  # folders as samples
    (tmp_path / "samples.csv").write_text("sample,volume_ml\nants,5\n")
    kw = {"sample_level": 1, "samples": tmp_path / "samples.csv"}
    whole = list_images(src, **kw)
    stream = open_source(src, chunk=5, **kw)
    _, labels, _ = _joined(stream)
    assert labels["volume_ml"] == whole.labels["volume_ml"]
    assert stream.notes == whole.notes
    assert "1 sample(s) have no row, e.g. 'bees'" in stream.notes[-1]


def test_a_bad_tree_fails_before_any_piece(data_dir: Path, tmp_path: Path) -> None:
    tree = tmp_path / "mixed"
    (tree / "a").mkdir(parents=True)
    shutil.copy(next((data_dir / "hymenoptera" / "ants").glob("*.jpg")), tree / "a" / "x.jpg")
    shutil.copytree(data_dir / "ifcb" / "white", tree / "bins")
    with pytest.raises(SourceError, match="both image files"):
        open_source(tree, chunk=1)
    shutil.rmtree(tree / "bins")
    (tree / "taxonomy.csv").write_text("class,genus\nb,G\n")  # lacks class "a"
    with pytest.raises(Exception, match="'a'"):
        open_source(tree, chunk=1)
    with pytest.raises(SourceError, match="folder\\(s\\) above it"):
        open_source(tree, sample_level=2, chunk=1)


def _store(path: Path) -> tuple[list[str], dict[str, list[str]], np.ndarray]:
    fs = FeatureStore(path)
    t = fs.images()
    return t.path, t.labels, fs.embeddings(next(iter(fs.backbones())))


@pytest.mark.parametrize("pieces", ["hymenoptera", "ifcb"])
def test_extract_in_pieces_gives_the_store_of_one_listing(
    data_dir: Path, tmp_path: Path, small_folder: Path, pieces: str
) -> None:
    src = small_folder if pieces == "hymenoptera" else data_dir / "ifcb"
    one = extract(tmp_path / "one.h5", list_images(src), FAST)
    many = extract(tmp_path / "many.h5", open_source(src, chunk=5), FAST)
    for k in ("listed", "extracted", "skipped", "failed", "reused"):
        assert getattr(many, k) == getattr(one, k), k
    (p1, l1, x1), (p2, l2, x2) = _store(tmp_path / "one.h5"), _store(tmp_path / "many.h5")
    assert p1 == p2 and l1 == l2
    np.testing.assert_allclose(x1, x2, rtol=1e-5, atol=1e-5)
    again = extract(tmp_path / "many.h5", open_source(src, chunk=5), FAST)
    assert (again.extracted, again.skipped) == (0, one.extracted)


def test_cli_lists_a_folder_in_pieces(small_folder: Path, tmp_path: Path, capsys) -> None:
    (small_folder / "README.txt").write_text("not an image")
    store = str(tmp_path / "s.h5")
    args = ["extract", store, str(small_folder), "--list-chunk", "4", "--workers", "1",
            "--precision", "fp32", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "listed 12: extracted 12" in out and "ignored 1 non-image files, e.g. README.txt" in out
    assert FeatureStore(store).images().path == list_images(small_folder).paths


def test_a_listing_in_pieces_compiles_the_network_once(
    small_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """torch.compile is asked for once for the whole run, not again for every piece (each
    compile took the run 2.7 s more on 500,000 files in pieces of 100,000)."""
    from penult.extract.embedder import Embedder

    calls: list[str] = []

    def compile_(self) -> None:  # what compile() does to the embedder, without compiling
        calls.append("compile")
        self.optimize = "inductor"

    monkeypatch.setattr(Embedder, "compile", compile_)
    monkeypatch.setattr(Embedder, "warmup", lambda self, size: calls.append("warmup"))
    opts = ExtractOptions(**{**FAST.__dict__, "optimize": "inductor", "engine": "torch"})
    s = extract(tmp_path / "s.h5", open_source(small_folder, chunk=5), opts)
    assert s.extracted == 12 and calls == ["compile", "warmup"]
    assert s.report().count("inductor") == 1


def test_a_summary_names_the_first_failures_and_counts_them_all(
    small_folder: Path, tmp_path: Path, monkeypatch
) -> None:
    """A run's summary keeps the first FAILED_KEPT failures (a run of 100 M images must not
    hold every one) and counts all of them, in pieces too; the store records each."""
    import penult.extract.summary as summary

    monkeypatch.setattr(summary, "FAILED_KEPT", 2)
    for i in range(5):
        (small_folder / "ants" / f"empty{i}.jpg").write_bytes(b"")
    (small_folder / "bees" / "torn.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    s = extract(tmp_path / "s.h5", open_source(small_folder, chunk=4), FAST)
    assert (s.extracted, s.failed_count, len(s.failed)) == (12, 6, 2)
    assert s.failed[0][0] == "ants/empty0.jpg" and "empty" in s.failed[0][1]
    assert "failed 6" in s.report() and "... and 4 more" in s.report(max_failed=2)
    assert len(FeatureStore(tmp_path / "s.h5").images().error) == 18
    assert sum(map(bool, FeatureStore(tmp_path / "s.h5").images().error)) == 6
