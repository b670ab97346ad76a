"""Shared fixtures: real images from ../shared/data (never copied into the repo)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
import torch
from store_rows import FP  # noqa: F401 -- tests import it from here

DATA = Path(os.environ.get("PENULT_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def pytest_configure(config):
    """Under ``pytest -n N`` (pytest-xdist: ``make test`` runs one worker per core) the workers
    share the cores: torch in each takes its share instead of every core, so N workers do not
    fight over the same cores (in-process threads; a subprocess a test starts sets its own)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


# The longest test files, longest first (seconds in one process on the slow AVX2 machine:
# registry 145, cluster 90, finetune 66, engines 60, neighbors 54, crash 40, ...). They run
# first, so under xdist no worker is left with one of them while the other has finished.
LONGEST_FIRST = (
    "test_registry.py", "test_cluster.py", "test_finetune.py", "test_engines.py",
    "test_neighbors.py", "test_crash.py", "test_speed_paths.py", "test_weights.py",
    "test_segments.py", "test_modern_backbones.py", "test_classify.py", "test_count.py",
    "test_novelty.py", "test_thresholds.py", "test_review.py", "test_clusters.py",
)  # fmt: skip


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: the rest as collected
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "cub100").is_dir():
        pytest.fail(f"real test images not found at {DATA}; set PENULT_DATA")
    return DATA


def cub_manifest(data_dir: Path, out: Path, *, classes: int, per_class: int | None = None) -> Path:
    """A CSV manifest over the first ``classes`` cub100 species (paths point into shared data)."""
    root = data_dir / "cub100"
    split = {r["path"]: r["split"] for r in csv.DictReader(open(root / "split.csv"))}
    rows = []
    for cls in sorted(p.name for p in root.iterdir() if p.is_dir())[:classes]:
        files = sorted((root / cls).iterdir())[:per_class]
        rows += [(f"{cls}/{f.name}", cls, split[f"{cls}/{f.name}"]) for f in files]
    with open(out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "split"])
        w.writerows(rows)
    return out


def copy_hymenoptera(data_dir: Path, root: Path, per_class: int = 6) -> Path:
    """A writable ImageFolder copy at ``root``: the first ``per_class`` ants and bees."""
    for cls in ("ants", "bees"):
        (root / cls).mkdir(parents=True)
        for f in sorted((data_dir / "hymenoptera" / cls).glob("*.jpg"))[:per_class]:
            shutil.copy(f, root / cls / f.name)
    return root


@pytest.fixture
def small_folder(data_dir: Path, tmp_path: Path) -> Path:
    """A writable ImageFolder copy: 6 ants + 6 bees (real photos, odd sizes)."""
    return copy_hymenoptera(data_dir, tmp_path / "imgs")


def real_batch(data_dir: Path, pre) -> torch.Tensor:
    """Five real images of three kinds: bird photos, a greyscale plankton image, an ant photo."""
    files = sorted((data_dir / "cub100").glob("*/*.jpg"))[::1500][:3]
    files += sorted((data_dir / "ndsb_plankton").glob("*/*.jpg"))[:1]
    files += sorted((data_dir / "hymenoptera" / "ants").glob("*.jpg"))[:1]
    from penult.extract.loader import make_loader

    return next(iter(make_loader([str(f) for f in files], pre, batch_size=8, workers=0))).images


def copy_store(src: Path, dst: Path) -> Path:
    """Copy a store: its top-level file and its segments folder (a store is both)."""
    shutil.copy(src, dst)
    seg = Path(f"{src}.segments")
    if seg.is_dir():
        shutil.copytree(seg, f"{dst}.segments")
    return dst


@pytest.fixture
def hidden(cub_store: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the cub20 store with every label level emptied, and path -> the hidden species."""
    from penult.features import FeatureStore, StoreWriter

    p = copy_store(cub_store, tmp_path / "cub.h5")
    t = FeatureStore(p).images()
    with StoreWriter(p) as w:
        for col in t.labels:
            w.set_labels(col, t.path, [""] * len(t.path))
    return p, dict(zip(t.path, t.labels["label"], strict=True))


def _shared(tmp_path_factory, name: str, build) -> Path:
    """A session fixture's folder, built once for the whole run: under pytest-xdist every worker
    asks for it, the first builds it (under a file lock, as xdist's docs advise) and the others
    wait for it instead of building their own copy on the same cores."""
    from filelock import FileLock

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # shared by the workers of one run
    out, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def cub_store(data_dir: Path, tmp_path_factory) -> Path:
    """EfficientNet-Lite0 features of 20 cub100 species (1,155 images), with taxonomy and split.
    fp32 on every CPU: the thresholds of the tests were set on fp32 features, and on an AMX
    machine `auto`'s bf16 moved one of them (a cluster's nearest ten: 5 of the species, not 6).

    Read-only for tests: copy it (``copy_store``) before anything that writes.
    """
    from penult.extract import ExtractOptions, extract, list_images

    def build(out: Path) -> None:
        manifest = cub_manifest(data_dir, out / "cub20.csv", classes=20)
        listing = list_images(
            manifest, root=data_dir / "cub100", taxonomy=data_dir / "cub100" / "taxonomy.csv"
        )
        extract(out / "cub20.h5", listing, ExtractOptions(progress=False, precision="fp32"))

    return _shared(tmp_path_factory, "cub_store", build) / "cub20.h5"


@pytest.fixture(scope="session")
def hym_store(data_dir: Path, tmp_path_factory) -> Path:
    """EfficientNet-Lite0 features of hymenoptera (train/val split.csv, one GIF placeholder)."""
    from penult.extract import ExtractOptions, extract, list_images

    def build(out: Path) -> None:
        extract(
            out / "hym.h5", list_images(data_dir / "hymenoptera"), ExtractOptions(progress=False)
        )

    return _shared(tmp_path_factory, "hym_store", build) / "hym.h5"
