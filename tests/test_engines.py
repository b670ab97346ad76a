"""CPU engines (ONNX Runtime, OpenVINO): the same embeddings as torch on real images, an `auto`
that picks what it measured and remembers it, stores that mix engines only where they agree,
int8 as an entry of its own, and clear refusals."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from penult.core import OptionError
from penult.extract import ExtractOptions, Featuriser, build_backbone, extract, list_images
from penult.extract import engines as eng
from penult.features import FeatureStore, FingerprintMismatchError

from conftest import cub_manifest, real_batch


@pytest.fixture(autouse=True)
def engine_cache(tmp_path_factory, monkeypatch) -> Path:
    """One export cache for the session's tests (exports are the slow part), apart from the user's."""
    d = tmp_path_factory.getbasetemp() / "engine-cache"
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(d))
    return d


@pytest.mark.skipif(not eng.installed("openvino"), reason="penult[openvino] not installed")
@pytest.mark.parametrize("name", ["efficientnet_lite0", "resnet50"])
def test_openvino_agrees_with_torch_on_real_images(name, data_dir) -> None:
    from penult.extract.embed import make_embedder

    weights = "pretrained" if name.startswith("efficientnet_lite") else "random"
    bb = build_backbone(name, weights=weights)
    x = real_batch(data_dir, bb.preprocess)
    ref = make_embedder(bb, engine="torch", precision="fp32")(x)
    e = make_embedder(bb, engine="openvino", precision="fp32")
    assert e.tag == "fp32/openvino" and eng.lowest_cosine(ref, e(x)) >= 0.999


@pytest.mark.skipif(not eng.installed("openvino"), reason="penult[openvino] not installed")
@pytest.mark.skipif(not eng.cpu_has_bf16(), reason="CPU has no native bf16")
def test_openvino_bf16_where_the_cpu_has_it_agrees_like_torch_bf16(data_dir) -> None:
    """On a CPU with native bf16, precision auto runs OpenVINO in bf16 (as torch): close to fp32
    as torch's bf16 is (the bar of tests/test_precision.py), not equal to it."""
    from penult.extract.embed import make_embedder

    bb = build_backbone("efficientnet_lite0")
    x = real_batch(data_dir, bb.preprocess)
    ref = make_embedder(bb, engine="torch", precision="fp32")(x)
    e = make_embedder(bb, engine="openvino")
    assert e.tag == "bf16/openvino"
    assert 0.99 <= eng.lowest_cosine(ref, e(x)) < 0.99999  # bf16 indeed, and close
    tb = make_embedder(bb, engine="torch")(x)
    assert abs(eng.lowest_cosine(ref, e(x)) - eng.lowest_cosine(ref, tb)) < 0.005


def test_auto_times_each_engine_in_the_precision_it_runs_on_this_cpu(monkeypatch) -> None:
    """Where the CPU has native bf16, auto times torch and OpenVINO in bf16 and ONNX Runtime in
    fp32 (it has no CPU bf16); elsewhere all in fp32. ``--precision bf16`` times only bf16 ones;
    fp32 keeps every engine fp32. The picked precision is the one recorded."""
    from penult.extract import embed, embedder, model

    seen = {}

    def fake(key, candidates, x, recheck=True):
        seen[key["precision"]] = sorted(candidates)
        return "onnxruntime fp32", {"onnxruntime fp32": 1.0}, True, True

    monkeypatch.setattr(embedder, "calibrate", fake)
    monkeypatch.setattr(embedder, "installed", lambda e: True)
    bb = build_backbone("resnet18", weights="random", seed=5)
    for native in (True, False):
        monkeypatch.setattr(eng, "cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(model, "cpu_has_bf16", lambda native=native: native)
        seen.clear()
        tags = {p: embed.make_embedder(bb, engine="auto", precision=p, batch_size=2).tag
                for p in ("auto", "bf16", "fp32")}  # fmt: skip
        half = "bf16" if native else "fp32"
        assert seen["auto"] == ["onnxruntime fp32", f"openvino {half}", f"torch {half}"]
        assert seen["fp32"] == ["onnxruntime fp32", "openvino fp32", "torch fp32"]
        if native:
            assert seen["bf16"] == ["openvino bf16", "torch bf16"]
            assert set(tags.values()) == {"fp32/onnxruntime"}  # what the calibration picked
        else:  # --precision bf16 is torch's emulated autocast, as before the engines
            assert "bf16" not in seen and tags["bf16"] == "bf16"
    # without OpenVINO, the summary says what it would take
    monkeypatch.setattr(embedder, "installed", lambda e: e != "openvino")
    note = embed.make_embedder(bb, engine="auto", batch_size=2).engine_note
    assert seen["auto"] == ["onnxruntime fp32", "torch fp32"]
    assert note.endswith("is not installed: pip install 'penult[openvino]'"), note


@pytest.mark.skipif(not eng.installed("openvino"), reason="penult[openvino] not installed")
def test_openvino_model_cache_survives_a_torn_blob(engine_cache, data_dir) -> None:
    """OpenVINO keeps its compiled model beside the export (cheaper start); a blob cut short
    (a kill while it was written) is compiled again, with the same embeddings."""
    bb = build_backbone("efficientnet_lite0")
    x = real_batch(data_dir, bb.preprocess).numpy()
    path = eng.onnx_file(bb)
    want = eng.make_runner("openvino", path, 2)(x)
    blobs = list((engine_cache / "openvino").glob("*.blob"))
    assert blobs
    for b in blobs:
        b.write_bytes(b.read_bytes()[: b.stat().st_size // 2])
    got = eng.make_runner("openvino", path, 2)(x)
    assert eng.lowest_cosine(want, got) >= 0.99999


@pytest.mark.skipif(not eng.installed("openvino"), reason="penult[openvino] not installed")
def test_openvino_runners_freed_in_any_order_leave_signals_safe(engine_cache) -> None:
    """The crash that kept OpenVINO out of auto: each OpenVINO Core's CPU plugin installed a
    signal stack and, freed, put back the one it had found, so runners freed in creation order
    left the thread on a freed stack and the next handled signal (torch's DataLoader handles
    SIGCHLD) killed the process with SIGSEGV. One Core per process (engines._openvino_core)."""
    code = f"""
import ctypes, faulthandler, gc, signal, subprocess, sys
sys.path.insert(0, {str(Path(__file__).parents[1])!r})
from penult.extract import build_backbone
from penult.extract.engines import make_runner, onnx_file
class Stack(ctypes.Structure):
    _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]
def stack():
    s = Stack(); ctypes.CDLL(None).sigaltstack(None, ctypes.byref(s)); return s.sp
faulthandler.enable()
signal.signal(signal.SIGCHLD, lambda *a: None)
path = onnx_file(build_backbone("resnet18", weights="random"))
a = make_runner("openvino", path, 1)
first = stack()
b = make_runner("openvino", path, 1)
del a; gc.collect(); del b; gc.collect()
assert stack() == first, "the signal stack moved to one freed with a runner"
junk = [bytearray(1 << 16) for _ in range(2000)]  # what a freed stack's memory becomes
for _ in range(20):
    subprocess.run(["true"])  # SIGCHLD, handled on the signal stack
print("alive")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "alive", (
        out.returncode,
        out.stderr[-2000:],
    )


def test_auto_picks_the_fastest_it_measured_and_remembers(engine_cache) -> None:
    built = []

    def runner(name: str, seconds: float):
        def build():
            built.append(name)
            return lambda x: time.sleep(seconds) or x

        return build

    def broken():
        raise eng.EngineError("does not export")

    x = np.zeros((2, 3, 4, 4), np.uint8)
    key = {"model": "m", "threads": 2}
    cands = {"slow": runner("slow", 0.03), "fast": runner("fast", 0.001), "broken": broken}
    best, rates, cached, kept = eng.calibrate(key, cands, x)
    assert (best, cached, kept) == ("fast", False, True) and set(rates) == {"slow", "fast"}
    assert rates["fast"] > rates["slow"]
    built.clear()
    assert eng.calibrate(key, cands, x)[::2] == ("fast", True) and built == []  # from the cache
    stored = json.loads((engine_cache / "calibration.json").read_text())
    assert any(eng.cpu_model() in k for k in stored)  # kept per CPU model
    assert eng.calibrate({**key, "threads": 1}, cands, x)[2] is False  # other settings: measured
    # a candidate whose warm-up batch is already under half the best rate is not timed further
    calls: list[int] = []
    after = {"fast": runner("fast", 0.0), "slow": lambda: lambda a: calls.append(1) or sleep(a)}
    sleep = lambda a: time.sleep(0.02) or a  # noqa: E731
    assert eng.calibrate({"m": "order"}, after, x)[0] == "fast" and calls == [1]


def _sleeper(seconds: float, spikes: tuple[int, ...] = ()):
    """A candidate whose batches take ``seconds``, and 0.06 s more at the batches numbered in
    ``spikes`` (0 is the warm-up): another program taking the cores for a moment."""

    def build():
        n = itertools.count()
        return lambda a: time.sleep(seconds + (0.06 if next(n) in spikes else 0.0)) or a

    return build


def test_auto_keeps_only_a_clear_calibration_for_good(engine_cache) -> None:
    """Engines are timed in turns, each keeping its best batch, so a spike of load on the
    fastest one's batch does not make it lose (timed one after the other, it did). A clear,
    steady win is kept at once; a close race, or most batches slowed (a busy machine), is
    measured again by the next runs, each engine keeping its best figure, until the same
    engine wins twice (or three measurements were made). An entry an older penult wrote is
    measured again."""
    x = np.zeros((2, 3, 4, 4), np.uint8)
    clear = {"a": _sleeper(0.02), "b": _sleeper(0.05)}
    assert eng.calibrate({"m": "clear"}, clear, x)[::2] == ("a", False)
    assert eng.calibrate({"m": "clear"}, clear, x)[::2] == ("a", True)
    # a spike of load on a's first timed batch: a still wins (its best batch), kept at once
    spike = {"a": _sleeper(0.02, spikes=(1,)), "b": _sleeper(0.05)}
    assert eng.calibrate({"m": "spike"}, spike, x)[::2] == ("a", False)
    assert eng.calibrate({"m": "spike"}, spike, x)[::2] == ("a", True)
    # a busy spell (two of a's three timed batches slowed): a wins, but it is checked again
    busy = {"a": _sleeper(0.02, spikes=(1, 2)), "b": _sleeper(0.05)}
    first = eng.calibrate({"m": "busy"}, busy, x)
    assert first[0] == "a" and first[2:] == (False, False)
    second = eng.calibrate({"m": "busy"}, busy, x)  # measured again: a won twice, now kept
    assert second[0] == "a" and second[2:] == (False, True)
    assert all(second[1][n] >= first[1][n] * 0.999 for n in first[1])  # best figure of both
    assert eng.calibrate({"m": "busy"}, busy, x)[2] is True
    # a dead heat: never kept on one measurement, kept after at most three
    close = {"a": _sleeper(0.02), "b": _sleeper(0.02)}
    got = [eng.calibrate({"m": "close"}, close, x) for _ in range(4)]
    assert got[0][2:] == (False, False) and got[1][2] is False and got[3][2] is True
    # ... but a run too short to pay for measuring again takes the untrusted answer as it is
    assert eng.calibrate({"m": "short"}, close, x)[2:] == (False, False)
    assert eng.calibrate({"m": "short"}, close, x, recheck=False)[2:] == (True, False)
    # a calibration kept as {engine: rate} by an older penult is measured again
    path = engine_cache / "calibration.json"
    known = json.loads(path.read_text())
    known = {k: ({n: 1.0 for n in v["rates"]} if '"clear"' in k else v) for k, v in known.items()}
    path.write_text(json.dumps(known))
    assert eng.calibrate({"m": "clear"}, clear, x)[::2] == ("a", False)


def test_a_cache_that_cannot_be_written_only_costs_a_new_calibration(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path / "file" / "cache"))
    x = np.zeros((1, 3, 4, 4), np.uint8)
    for _ in range(2):
        assert eng.calibrate({"m": 1}, {"only": lambda: lambda a: a}, x)[::2] == ("only", False)


def test_extract_mixes_engines_in_one_entry_only_where_they_agree(data_dir, tmp_path) -> None:
    root = data_dir / "cub100"
    listing = list_images(
        cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=6), root=root
    )
    first = list_images(
        cub_manifest(data_dir, tmp_path / "f.csv", classes=1, per_class=6), root=root
    )
    store = tmp_path / "s.h5"
    a = extract(store, first, ExtractOptions(engine="onnxruntime", workers=2, progress=False))
    assert (a.engine, a.extracted) == ("onnxruntime", 6) and "onnxruntime" in a.report()
    b = extract(store, listing, ExtractOptions(engine="torch", precision="fp32", workers=0,
                                               progress=False))  # fmt: skip
    assert (b.engine, b.extracted, b.skipped) == ("torch", 6, 6)
    fs = FeatureStore(store)
    entry = fs.backbone("efficientnet_lite0")
    assert entry.fingerprint["precision"] == "fp32/onnxruntime"
    assert fs.backbones()["efficientnet_lite0"].count == 12
    # every row, whichever engine wrote it, matches torch fp32 on the same image
    ref = tmp_path / "ref.h5"
    extract(ref, listing, ExtractOptions(engine="torch", precision="fp32", progress=False))
    x, y = fs.embeddings("efficientnet_lite0"), FeatureStore(ref).embeddings("efficientnet_lite0")
    assert eng.lowest_cosine(x, y) >= 0.999
    # the predict path embeds new files with the engine asked for, to the same numbers
    files = [str(listing.absolute(i)) for i in range(len(listing))]
    f = Featuriser(engine="onnxruntime", workers=0)
    (idx, got, failed), *_ = list(f.embed("efficientnet_lite0", entry.fingerprint, files))
    assert failed == [] and eng.lowest_cosine(got, y[idx]) >= 0.999
    assert f.engines() == ["efficientnet_lite0: fp32/onnxruntime"]


@pytest.mark.skipif(not eng.installed("openvino"), reason="penult[openvino] not installed")
def test_int8_is_an_entry_of_its_own_calibrated_on_the_users_images(
    data_dir, tmp_path, monkeypatch, engine_cache, capfd
) -> None:
    listing = list_images(
        cub_manifest(data_dir, tmp_path / "m.csv", classes=2, per_class=5), root=data_dir / "cub100"
    )
    store = tmp_path / "s.h5"
    before = set(engine_cache.glob("*-int8-*.xml"))
    s = extract(store, listing, ExtractOptions(precision="int8", workers=0, progress=False))
    assert len(set(engine_cache.glob("*-int8-*.xml")) - before) == 1  # quantized just now ...
    out = capfd.readouterr()
    assert "Statistics collection" not in out.out + out.err  # ... without NNCF's bars
    assert (s.backbone, s.engine, s.precision) == ("efficientnet_lite0@int8", "openvino", "int8")
    fp = FeatureStore(store).backbone("efficientnet_lite0@int8").fingerprint
    assert fp["precision"] == "int8/openvino"
    assert len(fp["quantization"]["calibration_sha256"]) == 64
    # close to fp32, not equal to it: the same images through fp32 ONNX Runtime
    y = FeatureStore(store).embeddings("efficientnet_lite0@int8")
    ref = Featuriser(engine="onnxruntime", workers=0)
    f32 = build_backbone("efficientnet_lite0").fingerprint
    (idx, x32, _), *_ = list(
        ref.embed(
            "efficientnet_lite0", f32, [str(listing.absolute(i)) for i in range(len(listing))]
        )
    )
    cos = (x32 * y[idx]).sum(1) / np.linalg.norm(x32, axis=1) / np.linalg.norm(y[idx], axis=1)
    assert 0.9 < cos.min() and np.median(cos) > 0.97 and cos.max() < 0.99999, cos
    # a float run cannot write into the int8 entry: they do not agree
    with pytest.raises(FingerprintMismatchError, match="quantization"):
        extract(store, listing, ExtractOptions(name="efficientnet_lite0@int8", progress=False))
    # the predict path runs the entry's own quantized model, whatever engine is asked for
    files = [str(listing.absolute(i)) for i in range(3)]
    f = Featuriser(engine="torch", workers=0)
    (idx, got, _), *_ = list(f.embed("efficientnet_lite0@int8", fp, files))
    stored = FeatureStore(store).embeddings("efficientnet_lite0@int8")
    assert np.allclose(got, stored[idx], atol=1e-5)
    # a resumed run needs the very model the entry was made with; a cleared cache says so
    monkeypatch.setenv("PENULT_ENGINE_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(eng.EngineError, match="calibrated on other images"):
        extract(store, listing, ExtractOptions(precision="int8", progress=False))


def test_one_calibration_serves_every_checkpoint_of_an_architecture(engine_cache) -> None:
    """Speed depends on the network's shape and input, not its weights: a second checkpoint (or
    a fine-tuned one) reuses the calibration instead of timing every engine again."""
    from penult.extract.embed import make_embedder

    def bb(seed: int):
        return build_backbone("resnet18", weights="random", seed=seed)

    notes = [make_embedder(bb(s), engine="auto", batch_size=2).engine_note for s in (11, 12)]
    assert "calibrated now" in notes[0], notes
    if "measured again" in notes[0]:  # a close race here: checked by later runs, then kept
        notes += [make_embedder(bb(s), engine="auto", batch_size=2).engine_note for s in (13, 14)]
    assert "calibration cached" in notes[-1], notes


def test_auto_builds_each_runtime_once_and_keeps_only_the_one_it_runs(monkeypatch) -> None:
    """The calibration's session of the winner is the run's (not built again), and a torch
    network moved for the calibration is not held by an embedder that runs a runtime."""
    import gc
    import weakref

    from penult.extract import embed, embedder

    built, alive = [], []

    def make_runner(e, *a):
        built.append(e)
        runner = real(e, *a)
        alive.append(weakref.ref(runner))
        return runner

    real = embedder.make_runner
    monkeypatch.setattr(embedder, "make_runner", make_runner)

    def calibrate(key, candidates, x, recheck=True):  # builds each candidate, torch last, as real
        for build in candidates.values():
            build()
        return next(iter(candidates)), {n: 1.0 for n in candidates}, False, True

    monkeypatch.setattr(embedder, "calibrate", calibrate)
    bb = build_backbone("resnet18", weights="random", seed=9)
    e = embed.make_embedder(bb, engine="auto", batch_size=2)
    runtimes = [r for r in eng.auto_runtimes() if eng.installed(r)]
    assert sorted(built) == sorted(runtimes) and e.engine == runtimes[0]
    assert e._module is None
    gc.collect()  # the losers' sessions are gone; the winner's is the one the embedder runs
    assert [r() for r in alive if r() is not None] == [e._runner]


def test_an_int8_entry_of_an_earlier_method_is_refused_by_name() -> None:
    """int8 entries made by the ONNX Runtime trial (never offered) cannot be scored silently."""
    fp = {
        **build_backbone("resnet18", weights="random").fingerprint,
        "precision": "int8/onnxruntime",
        "quantization": {"method": "onnxruntime static int8 (QDQ)", "calibration_sha256": "ab"},
    }
    with pytest.raises(OptionError, match=r"r18@int8 was quantized by .*extract it again"):
        list(Featuriser(workers=0).embed("r18@int8", fp, []))


def test_auto_runtimes_can_be_chosen_by_the_environment(monkeypatch) -> None:
    monkeypatch.delenv("PENULT_AUTO_ENGINES", raising=False)
    assert eng.auto_runtimes() == eng.RUNTIMES == ("onnxruntime", "openvino")
    monkeypatch.setenv("PENULT_AUTO_ENGINES", " onnxruntime")  # e.g. to keep OpenVINO out
    assert eng.auto_runtimes() == ("onnxruntime",)
    monkeypatch.setenv("PENULT_AUTO_ENGINES", "tensorrt")
    with pytest.raises(OptionError, match="tensorrt not among"):
        eng.auto_runtimes()


def test_refusals_are_clear(monkeypatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(OptionError, match="runs on the CPU"):
        eng.check_engine("onnxruntime", cuda, "auto")
    with pytest.raises(OptionError, match="bf16 is torch's"):
        eng.check_engine("onnxruntime", cpu, "bf16")
    with pytest.raises(OptionError, match="fp16 is torch's"):
        eng.check_engine("openvino", cpu, "fp16")
    monkeypatch.setattr(eng, "cpu_has_bf16", lambda: False)
    with pytest.raises(OptionError, match="only on CPUs with native bf16"):
        eng.check_engine("openvino", cpu, "bf16")
    with pytest.raises(OptionError, match="int8 runs on --engine openvino"):
        eng.check_engine("torch", cpu, "int8")
    with pytest.raises(OptionError, match="int8 is OpenVINO NNCF quantization"):
        eng.check_engine("onnxruntime", cpu, "int8")
    with pytest.raises(OptionError, match="not one of"):
        eng.check_engine("tensorrt", cpu, "auto")


def test_missing_runtime_names_the_install(monkeypatch) -> None:
    monkeypatch.setattr(eng, "installed", lambda e: e == "torch")
    with pytest.raises(eng.EngineError, match=r"pip install 'penult\[openvino\]'"):
        eng.check_engine("openvino", torch.device("cpu"), "auto")


def test_a_failed_export_leaves_nothing_under_the_cached_name(monkeypatch, engine_cache) -> None:
    bb = build_backbone("resnet18", weights="random", seed=7)

    def fail(*a, **k):
        Path(a[2]).write_bytes(b"half a model")  # what a kill mid-write would leave
        raise RuntimeError("unsupported operator aten::frobnicate")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(eng.EngineError, match="resnet18 does not export.*frobnicate"):
        eng.onnx_file(bb)
    assert not list(engine_cache.glob(f"resnet18-{eng.model_key(bb.fingerprint)}*"))


def test_the_engine_is_chosen_once_and_the_embedder_only_runs_the_choice(monkeypatch) -> None:
    """choose_engine() is the decision (and the heavy work: timing, export); an Embedder built
    from that decision times, exports and calibrates nothing, and embeds as the choice says."""
    from penult.extract import embedder
    from penult.extract.embedder import Embedder, EngineChoice, choose_engine

    bb = build_backbone("resnet18", weights="random", seed=3)
    size = bb.preprocess.crop
    x = np.random.default_rng(0).integers(0, 256, (2, 3, size, size), np.uint8)
    choice = choose_engine(bb, engine="onnxruntime", precision="fp32", batch_size=2)
    assert isinstance(choice, EngineChoice) and choice.runner is not None
    assert (choice.engine, choice.precision, choice.tag) == (
        "onnxruntime",
        "fp32",
        "fp32/onnxruntime",
    )

    def refuse(*a, **k):
        raise AssertionError("the embedder did heavy work of its own")

    for name in ("calibrate", "make_runner", "onnx_file"):
        monkeypatch.setattr(embedder, name, refuse)
    e = Embedder(bb, choice, batch_size=2)
    assert e.engine == "onnxruntime" and e._module is None
    ref = Embedder(bb, EngineChoice(choice.device, "torch", "fp32"), batch_size=2)
    np.testing.assert_allclose(e(torch.from_numpy(x)), ref(torch.from_numpy(x)), atol=1e-3)
