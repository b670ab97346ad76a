"""Arguments that would do damage are refused at parse time; outputs are safe to open; failed runs
leave nothing behind."""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from penult import cli
from penult.classify import DataError, TrainOptions, train
from penult.classify.csvout import safe_cell
from penult.classify.lookup import Hit, Result, write_table
from penult.classify.ovr import ThresholdedOneVsRest
from penult.core import LabelError, make_split
from penult.features import FeatureStore, StoreWriter

from conftest import copy_store


@pytest.mark.parametrize(
    "argv",
    [
        ["extract", "s.h5", "imgs", "--max-pixels", "-1"],
        ["extract", "s.h5", "imgs", "--batch-size", "0"],
        ["extract", "s.h5", "imgs", "--commit-every", "0"],
        ["extract", "s.h5", "imgs", "--crop-pct", "1.5"],
        ["train", "s.h5", "--out", "m.skops", "--ovr", "--threshold", "2"],
        ["train", "s.h5", "--out", "m.skops", "--ovr", "--threshold", "-0.5"],
        ["train", "s.h5", "--out", "m.skops", "--ovr", "--threshold", "nan"],
        ["train", "s.h5", "--out", "m.skops", "--test-size", "1.5"],
        ["train", "s.h5", "--out", "m.skops", "--test-size", "0"],
        ["train", "s.h5", "--out", "m.skops", "--cv", "1"],
        ["train", "s.h5", "--out", "m.skops", "--search-cv", "1"],
        ["train", "s.h5", "--out", "m.skops", "--pca", "-3"],
        ["train", "s.h5", "--out", "m.skops", "--pca", "1.5"],
        ["compare", "s.h5", "--test-size", "inf"],
        ["duplicates", "s.h5", "--threshold", "-5"],
        ["neighbors", "s.h5", "q.jpg", "-k", "-3"],
        ["neighbors", "s.h5", "q.jpg", "-k", "0"],
        ["predict", "m.skops", "x.jpg", "--out", "p.csv", "--top-k", "0"],
        ["index", "s.h5", "--nlist", "0"],
        ["finetune", "s.h5", "--out", "f.safetensors", "--epochs", "0"],
        ["finetune", "s.h5", "--out", "f.safetensors", "--lr-head", "-1"],
        ["finetune", "s.h5", "--out", "f.safetensors", "--hard-mining", "2"],
    ],
)
def test_damaging_numbers_are_refused_at_parse_time(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.build_parser().parse_args(argv)
    assert e.value.code == 2
    assert "must be" in capsys.readouterr().err


def test_sensible_numbers_still_parse():
    a = cli.build_parser().parse_args(
        ["train", "s.h5", "--out", "m", "--ovr", "--threshold", "0.4", "--pca", "0.95"]
    )
    assert a.threshold == 0.4 and a.pca == 0.95
    assert cli.build_parser().parse_args(["train", "s.h5", "--out", "m", "--pca", "64"]).pca == 64
    assert cli.build_parser().parse_args(["duplicates", "s.h5", "--threshold", "1"]).threshold == 1


def _option_commands():
    from penult.classify import PredictOptions
    from penult.classify.outofcore import StreamOptions
    from penult.extract import ExtractOptions, Featuriser
    from penult.extract.finetune import FinetuneOptions

    return [
        (["extract", "s.h5", "imgs"], ExtractOptions, {}),
        (["train", "s.h5", "--out", "m"], TrainOptions, {}),
        (["train", "s.h5", "--out", "m"], StreamOptions, {}),
        (["compare", "s.h5"], TrainOptions, {}),
        (["predict", "m", "x.jpg", "--out", "p.csv"], PredictOptions, {}),
        (["predict", "m", "x.jpg", "--out", "p.csv"], Featuriser, {"weights": {}}),
        (["finetune", "s.h5", "--out", "f"], FinetuneOptions, {}),
    ]


def test_options_are_declared_once_the_cli_builds_them_from_the_dataclasses():
    """Each command's arguments, defaults and the options object come from the dataclass
    fields: with no flags the options equal the dataclass defaults; a flag sets its field."""
    import dataclasses

    from penult.core.options import cli_fields

    parser = cli.build_parser()
    for argv, cls, given in _option_commands():
        assert cli._options(parser.parse_args(argv), cls, **given) == cls(**given), cls
        help_text = parser._subparsers._group_actions[0].choices[argv[0]].format_help()
        for f, flag in cli_fields(cls):
            if argv[0] == "compare" and f.name in (
                "head",
                "refit_all",
                "quantifier_folds",
                "unknown_score",
                "keep",
            ):
                continue  # compare takes several heads and saves no model
            if argv[0] == "train" and f.name == "refit_all":
                continue  # train refits by default: its switch is --no-refit (tested elsewhere)
            names = flag.flags or (f"--{f.name.replace('_', '-')}",)
            assert names[-1] in help_text, (argv[0], f.name)
            if isinstance(f.default, bool):  # a switch turns its field over, and only it
                opts = cli._options(parser.parse_args([*argv, names[-1]]), cls, **given)
                changed = [g.name for g in dataclasses.fields(cls)
                           if getattr(opts, g.name) != getattr(cls(**given), g.name)]  # fmt: skip
                assert changed == [f.name], (argv[0], f.name, changed)
    a = parser.parse_args(["train", "s.h5", "--out", "m", "--backbone", "a", "--backbone", "b",
                           "--param", "C=0.5", "--jobs", "2", "--split-column", "fold"])  # fmt: skip
    t = cli._options(a, TrainOptions)
    assert t.backbones == ("a", "b") and t.params == (("C", 0.5),) and t.n_jobs == 2
    assert t.split == "fold"


def test_one_command_parser_is_the_full_parsers_and_extract_starts_without_sklearn():
    """`penult CMD` builds only CMD's arguments: each command's help and parse equal the full
    parser's, and `penult extract` never imports scikit-learn (1.5 s of every start)."""

    full = cli.build_parser()
    for argv, *_ in _option_commands():
        assert cli._command(["-v", *argv]) == argv[0]
        one = cli.build_parser(argv[0])
        sub = {
            p: x._subparsers._group_actions[0].choices[argv[0]]
            for p, x in (("f", full), ("o", one))
        }
        assert sub["o"].format_help() == sub["f"].format_help(), argv[0]
        assert vars(one.parse_args(argv)) == vars(full.parse_args(argv)), argv[0]
    assert cli._command(["info", "s.h5"]) == "info" and cli._command(["--help"]) is None
    assert cli._command(["extrac", "s.h5"]) is None  # a typo: the full parser lists every command


def test_every_commands_help_and_argument_errors_import_neither_torch_nor_sklearn():
    """`penult CMD --help`, an unknown flag and a forgotten required argument answer from the
    options' declarations alone: no torch, scikit-learn or faiss imported (they took 4-9 s of
    each such answer; benchmarks/startup_bench.py times them)."""
    import subprocess
    import sys

    code = (
        "import contextlib, io, sys\n"
        "from penult import cli\n"
        "commands = sorted(cli.build_parser()._subparsers._group_actions[0].choices)\n"
        "for c in commands:\n"
        "    for argv, want in (([c, '--help'], 0), ([c, '--no-such-flag'], 2), ([c], None)):\n"
        "        out = io.StringIO()\n"
        "        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
        "            try:\n"
        "                cli.build_parser(cli._command(argv), outline=True).parse_args(argv)\n"
        "                code = None\n"
        "            except SystemExit as e:\n"
        "                code = e.code\n"
        "        assert want is None or code == want, (argv, code, out.getvalue())\n"
        "heavy = ('torch', 'sklearn', 'faiss', 'scipy', 'torchvision', 'timm', 'onnxruntime')\n"
        "print(len(commands), sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    n, loaded = out.stdout.strip().split(" ", 1)
    assert int(n) >= 20 and loaded == "[]", out.stdout


def test_penult_help_lists_every_command_without_importing_torch_or_sklearn(capsys):
    """`penult --help` and a mistyped command show the outline: the same text and choices as the
    full parser, built without the commands' arguments, so neither torch nor sklearn is imported
    (2.7 s before)."""
    import subprocess
    import sys

    full, outline = cli.build_parser(), cli.build_parser(outline=True)
    assert outline.format_help() == full.format_help()
    assert set(outline._subparsers._group_actions[0].choices) == set(
        full._subparsers._group_actions[0].choices
    )
    for argv in (["extrac", "s.h5"], []):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert (
            ("invalid choice: 'extrac'" in err and "'predict'" in err) if argv else "COMMAND" in err
        )
    code = (
        "import sys, cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'sklearn' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stderr.strip().splitlines()[-1] == "False False", out.stderr
    assert "finetune" in out.stdout and "fine-tune a backbone" in out.stdout


def test_library_refuses_the_same_values():
    X = np.random.default_rng(0).normal(size=(40, 4))
    y = np.array(["a", "b"] * 20)
    for t in (2.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            ThresholdedOneVsRest(thresholds=t).fit(X, y)
    with pytest.raises(LabelError, match="strictly between 0 and 1"):
        make_split(y, test_size=1.5)


def _labelled_store(path: Path, labels: list[str]) -> None:
    n = len(labels)
    paths = [f"{i:03d}.jpg" for i in range(n)]
    sha = [f"{i:064x}" for i in range(n)]
    fp = {"architecture": "t", "weights_sha256": "0" * 64, "preprocessing": {}, "layer": "x", "dim": 4, "precision": "fp32"}  # fmt: skip
    with StoreWriter(path) as w:
        w.upsert_images(paths, ["/d"] * n, sha, np.ones(n), np.ones(n), {"label": labels})
        w.register_backbone("net", fp)
        w.append("net", paths, sha, np.random.default_rng(0).normal(size=(n, 4)).astype(np.float32))


def test_one_class_store_is_refused_before_anything_is_written(tmp_path):
    store = tmp_path / "one.h5"
    _labelled_store(store, ["only"] * 12)
    before = store.read_bytes()
    with pytest.raises(DataError, match="2 or more classes"):
        train(store, TrainOptions())
    assert "split" not in FeatureStore(store).images().labels
    assert store.read_bytes() == before
    # a bad --ovr threshold from the library API is refused before the split is written, too
    _labelled_store(tmp_path / "two.h5", ["a", "b"] * 10)
    with pytest.raises(DataError, match="threshold"):
        train(tmp_path / "two.h5", TrainOptions(ovr=True, threshold=2.0))
    assert "split" not in FeatureStore(tmp_path / "two.h5").images().labels


def test_outputs_in_a_missing_folder_are_refused_not_created(tmp_path, capsys):
    store = tmp_path / "two.h5"
    _labelled_store(store, ["a", "b"] * 10)
    for argv in (
        ["train", str(store), "--out", str(tmp_path / "typo" / "m.skops")],
        ["duplicates", str(store), "--out", str(tmp_path / "typo" / "d.csv")],
        ["predict", "m.skops", "x.jpg", "--out", str(tmp_path / "typo" / "p.csv")],
    ):
        assert cli.main(argv) == 2, argv
        assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
    assert "split" not in FeatureStore(store).images().labels


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    assert safe_cell('=HYPERLINK("http://x")') == '\'=HYPERLINK("http://x")'
    for bad in ("+1+cmd", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert safe_cell(bad).startswith("'")
    assert safe_cell("-0.25") == "-0.25" and safe_cell("ants/a.jpg") == "ants/a.jpg"
    hit = Hit(0, "=cmd|' /C calc'!A0.jpg", "", "@evil", -0.25)
    out = write_table([Result("+q.jpg", "", "-x", [hit])], tmp_path / "n.csv")
    row = next(csv.DictReader(open(out, newline="")))
    assert row["query"] == "'+q.jpg" and row["query_label"] == "'-x"
    assert row["neighbor"].startswith("'=") and row["label"] == "'@evil" and row["score"] == "-0.25"


@pytest.mark.slow
def test_predict_reports_skipped_files_escapes_cells_and_cleans_up(hym_store, data_dir, tmp_path, monkeypatch, capsys):  # fmt: skip
    store = tmp_path / "hym.h5"
    copy_store(hym_store, store)
    model = tmp_path / "m.skops"
    assert cli.main(["train", str(store), "--out", str(model)]) == 0
    folder = tmp_path / "=HYPERLINK(1)"  # relative input: the path column starts with '='
    folder.mkdir()
    for f in sorted((data_dir / "hymenoptera" / "bees").glob("*.jpg"))[:3]:
        shutil.copy(f, folder / f.name)
    (folder / "notes.txt").write_text("not an image")
    os.mkfifo(folder / "pipe.jpg")
    odd = os.path.join(os.fsencode(folder), b"caf\xe9.jpg")  # a name that is not UTF-8
    shutil.copy(sorted(folder.glob("*.jpg"))[0], odd)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "p.csv"
    capsys.readouterr()
    assert cli.main(["predict", folder.name, str(model), "--out", str(out)]) == 2  # swapped
    err = capsys.readouterr().err
    assert f"{model} is a model and {folder.name} is not: the model comes first" in err, err
    assert cli.main(["predict", str(model), folder.name, "--out", str(out), "--store", str(store), "-q"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8", errors="surrogateescape")))
    assert len(rows) == 6 and all(r["path"].startswith("'=HYPERLINK(1)/") for r in rows)
    odd_row = [r for r in rows if os.fsencode(r["path"][1:]) == b"=HYPERLINK(1)/caf\xe9.jpg"]
    assert len(odd_row) == 1  # written as its own bytes, and scored
    assert odd_row[0]["prediction"] in ("ants", "bees") and not odd_row[0]["error"]
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert "unsupported file type '.txt'" in errors["notes.txt"] and "FIFO" in errors["pipe.jpg"]
    assert "notes.txt: unsupported file type" in printed
    # a run that fails or is interrupted leaves neither the CSV nor OUT.partial
    import penult.classify.predict as cp
    from penult.features import StoreError

    for exc in (StoreError("boom"), RuntimeError("a bug"), KeyboardInterrupt()):

        def fail(*a, exc=exc, **k):
            Path(f"{tmp_path / 'q.csv'}.partial").write_text("path\n")
            raise exc

        monkeypatch.setattr(cp, "_write", fail)
        argv = ["predict", str(model), folder.name, "--out", str(tmp_path / "q.csv"), "-q"]
        if isinstance(exc, RuntimeError):  # not penult's own: it shows its traceback
            with pytest.raises(RuntimeError, match="a bug"):
                cli.main([*argv, "--store", str(store)])
            rc = 1
        else:
            rc = cli.main([*argv, "--store", str(store)])
        err = capsys.readouterr().err
        assert rc == {StoreError: 2, RuntimeError: 1, KeyboardInterrupt: 130}[type(exc)]
        assert (
            not (tmp_path / "q.csv").exists() and not Path(f"{tmp_path / 'q.csv'}.partial").exists()
        )
    assert "no CSV was written (predict does not resume" in err


def test_only_penult_errors_become_one_line_and_v_shows_tracebacks(tmp_path, capsys, monkeypatch):
    """Every exception class penult defines derives from PenultError; the CLI turns those into one
    line (exit 2), shows the traceback too with -v, and lets any other exception (a bug, CUDA out
    of memory) through with its traceback."""
    import inspect

    from penult import classify, core, extract, features
    from penult.core import PenultError

    mods = [m for pkg in (classify, core, extract, features) for m in _submodules(pkg)]
    defined = {
        c for m in mods for _, c in inspect.getmembers(m, inspect.isclass)
        if issubclass(c, Exception) and c.__module__ == m.__name__
    }  # fmt: skip
    assert len(defined) >= 15
    assert [c.__name__ for c in defined if not issubclass(c, PenultError)] == []
    missing = tmp_path / "nope.h5"
    assert cli.main(["info", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(missing) in err
    assert cli.main(["-v", "info", str(missing)]) == 2
    assert "Traceback" in capsys.readouterr().err

    def oom(args):
        raise RuntimeError("CUDA out of memory")

    for param, message in (("C=-1", "'C' parameter"), ("C=abc", "'C' parameter"), ("foo=1", "foo")):
        from penult.classify import HeadError, make_head
        from penult.classify.options import parse_param

        with pytest.raises(HeadError, match=message):
            make_head("svm", **dict([parse_param(param)]))
    monkeypatch.setitem(cli._HANDLERS, "info", oom)
    with pytest.raises(RuntimeError, match="out of memory"):
        cli.main(["info", str(missing)])


def _submodules(pkg):
    import importlib
    import pkgutil

    return [
        importlib.import_module(f"{pkg.__name__}.{m.name}")
        for m in pkgutil.iter_modules(pkg.__path__)
    ]


def test_the_cpu_stage_does_not_import_torch_or_extract():
    """classify/ gets its image side (listing, embedding) handed in: importing it, and every one
    of its modules, loads neither torch nor extract/."""
    import subprocess
    import sys

    code = (
        "import importlib, pkgutil, sys, classify\n"
        "for m in pkgutil.iter_modules(classify.__path__): importlib.import_module('classify.' + m.name)\n"
        "bad = sorted(n for n in sys.modules if n.split('.')[0] in ('torch', 'torchvision', 'extract'))\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    root = Path(__file__).resolve().parents[1]
    hidden = [p.name for p in (root / "classify").rglob("*.py") if "from extract" in p.read_text() or "import extract" in p.read_text()]  # fmt: skip
    assert hidden == []


def test_everything_installs_inside_penult_not_as_top_level_modules(tmp_path):
    """The wheel holds one top-level package, penult: the folders core/, features/, extract/,
    classify/ and cli.py/demo.py install as penult.core, ..., penult.cli (top-level `extract`,
    `features`, `classify` or `cli` would collide with other projects), and `penult` runs
    penult.cli:main. Installed that way (outside this checkout) the API imports."""
    import shutil
    import subprocess
    import sys
    import zipfile

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "__init__.py", "api.py", "cli.py", "demo.py"):
        shutil.copy(root / name, src / name)
    for pkg in ("core", "extract", "features", "classify"):
        shutil.copytree(root / pkg, src / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(src)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("penult-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        entry = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
        z.extractall(tmp_path / "site", [n for n in names if n.startswith("penult/")])
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"penult"}
    assert {"penult/__init__.py", "penult/api.py", "penult/cli.py", "penult/demo.py"} <= set(names)
    # subpackages and the web app's files travel too
    assert {"penult/core/errors.py", "penult/extract/finetune/loop.py", "penult/classify/web/app.py",
            "penult/classify/web/templates/browse.html", "penult/classify/web/static/penult.js",
            "penult/features/store.py"} <= set(names)  # fmt: skip
    assert "penult = penult.cli:main" in entry
    code = (
        "import penult, penult.features, penult.classify\n"
        "print(penult.open_store.__module__, penult.classify.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True,
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")},
    )  # fmt: skip
    module, where = out.stdout.split()
    assert module == "penult.api" and where.startswith(str(tmp_path / "site" / "penult"))


def test_nothing_private_crosses_a_package_boundary():
    """Every name that cli.py, demo.py, api.py, a benchmark or one of the four packages imports
    from another of core/, extract/, classify/ or features/ is listed in that module's
    ``__all__``."""
    import ast
    import importlib

    root = Path(__file__).resolve().parents[1]
    packages = ("core", "extract", "classify", "features")
    files = ["cli.py", "demo.py", "api.py"]
    files += [str(p.relative_to(root)) for p in root.glob("benchmarks/*.py")]
    files += [str(p.relative_to(root)) for pkg in packages for p in (root / pkg).rglob("*.py")]
    used = []
    for f in files:
        home = f.split("/")[0]
        for node in ast.walk(ast.parse((root / f).read_text())):
            module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
            top = module.split(".")[1] if module.startswith("penult.") else ""
            if top in packages and top != home:
                used += [(f, node.module, a.name) for a in node.names]
    assert len(used) > 100
    for f, module, name in used:
        exported = getattr(importlib.import_module(module), "__all__", [])
        assert name in exported and not name.startswith("_"), f"{f}: {module}.{name}"


def test_no_import_circles_between_modules():
    """No module of core/, features/, extract/ or classify/ imports (at the top or inside a
    function) a module that imports it back, directly or around a loop: each job has one home,
    and the layers only look down (extract.run <-> extract.cluster was such a circle)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    mods = {}
    for pkg in ("core", "features", "extract", "classify"):
        for p in (root / pkg).rglob("*.py"):
            if p.name != "__init__.py":
                mods["penult." + ".".join(p.relative_to(root).with_suffix("").parts)] = p
    edges: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("penult."):
                edges[m] |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                edges[m] |= {a.name for a in node.names}
        edges[m] &= set(mods)
    assert sum(map(len, edges.values())) > 150
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            assert state.get(t) != 1, " -> ".join([*path[path.index(t) :], t])
            if t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(mods):
        if m not in state:
            visit(m, [m])


def test_runtime_options_are_declared_once():
    """device, precision, engine, batch size, workers and max pixels are fields of one type,
    RuntimeOptions; every command that runs a network takes them from it (no class declares its
    own), narrowing only what differs (fine-tuning and scoring have no int8 precision)."""
    from penult.core import OptionError
    from penult.extract import ExtractOptions, Featuriser
    from penult.extract.finetune import FinetuneOptions
    from penult.extract.options import RuntimeOptions

    runtime = {f.name for f in dataclasses.fields(RuntimeOptions)}
    assert runtime == {"device", "precision", "engine", "batch_size", "workers", "max_pixels"}
    for cls in (ExtractOptions, FinetuneOptions, Featuriser):
        assert issubclass(cls, RuntimeOptions)
        assert not runtime & set(vars(cls).get("__annotations__", {})), cls
    assert ExtractOptions(precision="int8").precision == "int8"
    for cls in (FinetuneOptions, Featuriser):
        with pytest.raises(OptionError, match="precision 'int8' is not one of"):
            cls(precision="int8")


def test_only_the_store_backends_know_which_format_a_store_has():
    """No module outside features/backends.py, format1.py and format2/ compares a format version
    or reads ``schema_version``; every registered backend has every member of the protocol."""
    import ast
    import inspect

    from penult.features.backends import BACKENDS, StoreBackend

    root = Path(__file__).resolve().parents[1]
    files = [root / f for f in ("cli.py", "api.py", "demo.py")]
    files += [
        p for pkg in ("core", "features", "extract", "classify") for p in (root / pkg).rglob("*.py")
    ]
    backends = {root / "features/backends.py", root / "features/format1.py"}
    backends.add(root / "classify/model.py")  # model files have a format version of their own
    asked = []
    for p in files:
        if p in backends or p.parent.name == "format2":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in ast.walk(node) if isinstance(n, ast.Attribute)]
                if any(n.attr in ("version", "schema_version") for n in names):
                    asked.append(f"{p.relative_to(root)}:{node.lineno}")
            if isinstance(node, ast.Constant) and node.value == "schema_version":
                asked.append(f"{p.relative_to(root)}:{node.lineno}")
    assert asked == []
    members = {n for n in vars(StoreBackend) if not n.startswith("_")}
    members |= set(StoreBackend.__annotations__) - {"path"}
    assert {"read_only", "layout_problems", "damaged", "embeddings"} <= members
    for version, cls in BACKENDS.items():
        assert cls.version == version
        missing = [m for m in members if not hasattr(cls, m)]
        assert missing == [], (cls.__name__, missing)
        for m in members:
            proto, impl = getattr(StoreBackend, m, None), getattr(cls, m)
            if callable(proto):
                assert list(inspect.signature(proto).parameters) == list(
                    inspect.signature(impl).parameters
                ), (cls.__name__, m)


def test_model_manifests_are_read_by_field_not_by_key():
    """Outside the loader's check of the raw JSON, no module reads ``manifest["..."]``: the
    manifest is a typed object (``classify.manifest.Manifest``)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    files = [root / f for f in ("cli.py", "api.py", "demo.py")]
    files += [p for pkg in ("extract", "classify") for p in (root / pkg).rglob("*.py")]
    files += list((root / "benchmarks").glob("*.py"))
    keyed = []
    for p in files:
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant):
                base = node.value
                name = base.attr if isinstance(base, ast.Attribute) else getattr(base, "id", "")
                if name == "manifest":
                    keyed.append(f"{p.relative_to(root)}:{node.lineno}")
    assert keyed == []


def test_only_the_adapters_ask_which_library_a_backbone_comes_from():
    """``spec.source`` is compared nowhere but in extract/adapters.py: each library's build,
    cut, preprocessing, weights and names are its adapter's, reached through ``spec.adapter``."""
    import ast

    from penult.extract.adapters import ADAPTERS
    from penult.extract.registry import REGISTRY

    root = Path(__file__).resolve().parents[1]
    files = [root / f for f in ("cli.py", "api.py", "demo.py")]
    files += [
        p for pkg in ("core", "features", "extract", "classify") for p in (root / pkg).rglob("*.py")
    ]
    asked = []
    for p in files:
        if p == root / "extract/adapters.py":
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                names = [n for n in ast.walk(node) if isinstance(n, ast.Attribute)]
                if any(n.attr == "source" for n in names):
                    asked.append(f"{p.relative_to(root)}:{node.lineno}")
    assert asked == []
    assert {s.source for s in REGISTRY.values()} <= set(ADAPTERS)
    assert all(s.adapter is ADAPTERS[s.source] for s in REGISTRY.values())


def test_library_warnings_are_summed_up_once_and_shown_with_v(capsys):
    """Ten ConvergenceWarnings mid-output become one line at the end with the count and one
    example; -v lets each through."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    lib = os.path.join("env", "site-packages", "sklearn", "linear_model", "_logistic.py")
    with cli._warnings_summed_up(False):
        for _ in range(10):
            warnings.warn_explicit("lbfgs failed to converge\nmore", ConvergenceWarning, lib, 1)
        warnings.warn_explicit("few members", UserWarning, lib, 2)
        print("the command's own output")
    out = capsys.readouterr()
    assert out.out == "the command's own output\n"
    assert out.err.strip().splitlines() == [
        'note: 11 warnings from sklearn (ConvergenceWarning x10, UserWarning x1), e.g. "lbfgs '
        'failed to converge" (-v shows each)'
    ]
    with pytest.warns(ConvergenceWarning), cli._warnings_summed_up(True):
        warnings.warn_explicit("lbfgs failed to converge", ConvergenceWarning, lib, 1)
    assert "note:" not in capsys.readouterr().err
