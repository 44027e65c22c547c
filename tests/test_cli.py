"""The histoflow command: info, thumbnail, tile, demo; light import."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from datafiles import SVS, data_path
from PIL import Image

from histoflow import read_h5path
from histoflow.cli import main


def run(*args):
    """Run the installed console script as a user would."""
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")
    return subprocess.run([exe, *args], capture_output=True, text=True)


def test_info_json_console_script():
    r = run("info", SVS, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["backend"] == "tiff" and info["format"] == "Aperio SVS"
    assert info["levels"] == [{"width": 2220, "height": 2967, "downsample": 1.0}]


def test_info_text(capsys):
    assert main(["info", data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.webp.tiff")]) == 0
    out = capsys.readouterr().out
    assert "2220 x 2967 px" in out and "mpp        unknown" in out and "warning    implausible" in out


def test_thumbnail_png(tmp_path):
    out = tmp_path / "t.png"
    assert main(["thumbnail", SVS, "-o", str(out), "--size", "300"]) == 0
    im = np.asarray(Image.open(out))
    assert im.shape == (300, 224, 3)
    assert 100 < im.mean() < 250  # tissue on glass, not black or blank


def test_thumbnail_of_fluorescence_is_coloured(tmp_path):
    out = tmp_path / "mibi.png"
    assert main(["thumbnail", data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff"), "-o", str(out), "--size", "256"]) == 0
    im = np.asarray(Image.open(out))
    assert im.shape == (256, 256, 3) and im.std() > 10


def test_tile_command_writes_h5path(tmp_path):
    out = tmp_path / "cmu.h5path"
    r = run("tile", SVS, "-o", str(out), "--size", "256", "--mpp", "2.0", "--overlap", "32")
    assert r.returncode == 0, r.stderr
    assert "tiles of 256x256" in r.stdout
    with read_h5path(out) as h5:
        # 2220 x 2967 px at 0.499 -> 554 x 740 px at 2 µm/px; stride 224 -> 3 x 4 tiles
        assert len(h5) == 12
        t = h5.tile(0)
        assert t.image.shape == (256, 256, 3) and t.mpp == pytest.approx((2.0, 2.0), rel=1e-3)


def test_tile_command_bad_slide_one_line(tmp_path):
    bad = tmp_path / "x.svs"
    bad.write_bytes(b"\0" * 1000)
    r = run("tile", str(bad), "-o", str(tmp_path / "o.h5path"))
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "x.svs" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o.h5path")


def test_demo(tmp_path):
    r = run("demo", "-o", str(tmp_path))
    assert r.returncode == 0, r.stderr
    # tiles overlap by a large nucleus (15 µm = 31 px at 0.499 µm/px) so each nucleus is whole in one tile
    assert "tiles of 256x256 (overlap 31) with >= 25% tissue (of 140 in the full grid)" in r.stdout
    assert "overlap" not in r.stderr   # no warning that the overlap is too small for nucleus detection
    # what a user wants to know, not Python's reprs (SlideData(...), Pipeline([...]))
    assert "SlideData(" not in r.stdout and "Pipeline(" not in r.stdout
    assert "slide          CMU-1-Small-Region (Aperio SVS, 2220 x 2967 px, 0.499 µm/px)" in r.stdout
    assert "then on each tile: StainNormalizationHE, NucleusDetectionHE" in r.stdout
    with read_h5path(tmp_path / "CMU-1-Small-Region.h5path") as h5:
        assert 30 <= len(h5) <= 70
        assert set(h5.tile_mask_names) >= {"tissue", "nuclei"}
        assert h5.masks["tissue"].mean() > 0.2
        assert sum(len(np.unique(t.masks["nuclei"])) - 1 for t in h5) > 1000
    overlay = np.asarray(Image.open(tmp_path / "CMU-1-Small-Region_overlay.png"))
    assert overlay.shape[0] == 1024
    assert ((overlay == (0, 220, 0)).all(-1)).sum() > 500      # the tissue outline is drawn
    assert ((overlay == (0, 200, 255)).all(-1)).sum() > 1000   # and the nuclei


def test_run_command_and_transforms_listing(tmp_path):
    from histoflow.transforms import BoxBlur, Pipeline, TissueDetectionHE

    pipe = tmp_path / "p.yaml"
    Pipeline([BoxBlur(15), TissueDetectionHE()]).save(pipe)
    r = run("run", str(pipe), SVS, "-o", str(tmp_path / "out"), "--executor", "threads", "--workers", "2",
            "--slide-mpp", "0.5", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "CMU-1-Small-Region.h5path: 108 tiles" in r.stdout and "'tissue'" in r.stdout
    with read_h5path(tmp_path / "out" / "CMU-1-Small-Region.h5path") as h5:
        assert h5.slide["mpp"] == pytest.approx((0.5, 0.5))  # --slide-mpp overrides the file's 0.499
    r = run("run", str(pipe), SVS, "-o", str(tmp_path / "o3"), "--executor", "threads", "--scheduler", "tcp://x:1")
    assert r.returncode == 2 and "--scheduler runs on dask: leave out --executor threads" in r.stderr  # usage
    import h5py
    import hdf5plugin

    with h5py.File(tmp_path / "out" / "CMU-1-Small-Region.h5path", "r") as f:  # runs default to HTJ2K tiles
        assert f["tiles"].attrs["compression"] == "htj2k"
        assert f["tiles/images"].id.get_create_plist().get_filter(0)[0] == hdf5plugin.Htj2k.filter_id  # 32033
    r = run("transforms")
    assert r.returncode == 0
    for name in ("BoxBlur(kernel_size=5", "StainNormalizationHE(", "TissueDetectionHE(", "NucleusDetectionHE("):
        assert name in r.stdout
    # each description is a whole first sentence, wrapped (not the docstring's first line cut mid-sentence)
    assert "RGB on its HSV value, other channel counts channel by channel." in " ".join(r.stdout.split())
    assert all(len(line) <= 120 for line in r.stdout.splitlines() if line.startswith("    "))
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - NoSuchTransform: {}\n")
    r = run("run", str(bad), SVS, "-o", str(tmp_path / "o2"))
    assert r.returncode == 1 and "unknown transform 'NoSuchTransform'" in r.stderr


def test_import_is_light():
    code = ("import sys, histoflow; heavy = [m for m in ('torch', 'dask', 'distributed', 'h5py', 'anndata', "
            "'openslide', 'wsidicom') if m in sys.modules]; print(heavy)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_display_channels_put_the_nuclear_stain_first():
    from histoflow import open_slide
    from histoflow.utils import display_channels

    with open_slide(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")) as s:
        order = display_channels(s.channel_names)
    assert order[0] == 13 and 0 not in order  # HH3 (89) first, "Background (128)" left out
    assert display_channels(["DAPI", "FITC", "Cy3"]) == [0, 1, 2]
    assert display_channels(["CD3", "CD8", "Hoechst 33342"])[0] == 2


def test_a_terminated_command_leaves_no_temporary_file(tmp_path):
    """A TERM (a cluster scheduler ending a job) unwinds like Ctrl-C: the half-written store is removed."""
    import signal
    import time

    p = subprocess.Popen([sys.executable, "-m", "histoflow.cli", "tile", SVS, "-o", str(tmp_path / "out.h5path"),
                          "--size", "16", "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not any(".tmp-" in n for n in os.listdir(tmp_path)):
        time.sleep(0.05)
    assert any(".tmp-" in n for n in os.listdir(tmp_path)), "the store was never being written"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "interrupted" in err, (p.returncode, err)
    assert os.listdir(tmp_path) == []


def _run_info_verb_replaced_by(tmp_path, module, work):
    """``python -m module``: the command line with ``info``'s verb replaced by ``work`` (source lines defining
    ``work(args)``), as the histoflow command runs (signal handlers installed); the finished process."""
    (tmp_path / f"{module}.py").write_text(
        "import os, signal, sys\n"
        "import histoflow.cli as cli\n" + work +
        "cli.cmd_info = work  # the parser binds the verb when main() builds it\n"
        "sys.argv = ['histoflow', 'info', 'x.svs']\n"
        "sys.exit(cli.main())\n")
    return subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, timeout=120, cwd=tmp_path)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_an_interrupt_inside_code_made_from_a_string_still_exits_130(signame, tmp_path):
    """The signal lands while an import makes a dataclass (code run from a string): Python then took the
    KeyboardInterrupt for unhandled and, run as ``python -m``, killed the command by SIGINT after it had printed
    its message (CI saw returncode -2 once). Here the signal is sent from inside such code, so the race is
    certain."""
    p = _run_info_verb_replaced_by(tmp_path, "interrupted_command", (
        "def work(args):\n"
        f"    eval('os.kill(os.getpid(), signal.{signame}) or sum(range(10**7))')\n"
        "    return 0\n"))
    assert p.returncode == 130 and p.stderr.strip() == "histoflow: interrupted", (p.returncode, p.stderr)


def test_an_interrupt_where_python_can_only_print_it_still_stops_the_command(tmp_path):
    """The signal handler runs inside a __del__ (or a weakref callback, an import lock's callback), where Python
    prints what it raises and goes on: the command used to run to its end as if never interrupted (3 % of TERMs
    during `tile`). The interrupt is delivered again where it can unwind."""
    p = _run_info_verb_replaced_by(tmp_path, "interrupted_in_del", (
        "class Dropped:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        for _ in range(1000):\n"
        "            pass\n"
        "def work(args):\n"
        "    Dropped()\n"
        "    for _ in range(10**8):\n"
        "        pass\n"
        "    print('finished')\n"
        "    return 0\n"))
    assert (p.returncode, p.stdout, p.stderr.strip()) == (130, "", "histoflow: interrupted"), (p.returncode, p.stderr)


def test_command_mistakes_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    """Outputs that cannot be written, outputs of the wrong kind, a finished training run about to be
    replaced, a config that is not text, 0 workers: one-line errors before any work."""
    import yaml

    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(ro)) else real_access(p, mode))
    assert main(["segment-nuclei", data_path("he_patches", "stardist_histo.jpg"), "-o", str(ro / "n.tif"),
                 "--slide-mpp", "0.25"]) == 1
    assert "no permission to write in" in capsys.readouterr().err and os.listdir(ro) == []
    monkeypatch.undo()
    assert main(["thumbnail", SVS, "-o", str(tmp_path / "t.jpg")]) == 1
    assert "give -o a .png path" in capsys.readouterr().err
    assert main(["thumbnail", SVS, "-o", str(tmp_path / "t.png"), "--size", "100000"]) == 0
    out = capsys.readouterr()
    assert "larger than the slide" in out.err and "2220 x 2967 px" in out.out
    assert main(["tile", SVS, "-o", str(tmp_path / "precious.png")]) == 1
    assert "give -o a .h5path path" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "last.ckpt").write_bytes(b"a finished run")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "tile_classification", "data": {}, "output": str(run_dir)}))
    assert main(["train", str(cfg)]) == 1
    assert "holds a run already (last.ckpt); continue it with --resume" in capsys.readouterr().err
    assert (run_dir / "last.ckpt").read_bytes() == b"a finished run"
    assert main(["train", data_path("he_patches", "skimage_ihc.png")]) == 1
    assert "not a text file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["segment-nuclei", SVS, "-o", str(tmp_path / "x.tif"), "--workers", "0"])
    assert "must be 1 or more" in capsys.readouterr().err


def test_zip_entries_are_unique_and_outlines_have_no_repeated_vertices(tmp_path):
    import zipfile

    from histoflow.annotations import Polygon, polygonize, read_imagej_rois, write_imagej_rois

    sq = [[0, 0], [10, 0], [10, 10], [0, 10]]
    write_imagej_rois([Polygon(sq, name="Tumor region"), Polygon(np.add(sq, 20), name="Tumor region")],
                      tmp_path / "r.zip")
    names = zipfile.ZipFile(tmp_path / "r.zip").namelist()
    assert len(set(names)) == 2 and len(read_imagej_rois(tmp_path / "r.zip")) == 2
    lab = np.zeros((40, 40), np.int32)
    lab[5:20, 5:12] = 1
    lab[25:35, 10:30] = 2
    for p in polygonize(lab):
        assert not np.any(np.all(p.exterior == np.roll(p.exterior, 1, axis=0), axis=1))


CUSTOM = '''
import numpy as np
from histoflow.transforms import Transform


class DarkFraction(Transform):
    """Fraction of dark pixels, as a tile label."""

    labels_out = ("dark_fraction",)

    def __init__(self, threshold=120):
        self.threshold = threshold

    def apply(self, tile):
        tile.labels["dark_fraction"] = float((tile.image[..., :3].mean(-1) < self.threshold).mean())
'''


def test_run_imports_the_module_of_a_custom_transform(tmp_path):
    """`histoflow run` had no way to import a user's module: a pipeline with a custom transform could not be
    loaded from the shell, and the error's advice (import the module) could not be followed there."""
    (tmp_path / "my_transforms.py").write_text(CUSTOM)
    (tmp_path / "own.yaml").write_text("steps:\n  - DarkFraction: {threshold: 150}\n")
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")

    def cli(*args):
        return subprocess.run([exe, *args], capture_output=True, text=True, cwd=tmp_path)

    r = cli("run", "own.yaml", SVS, "-o", "out", "--executor", "threads", "--no-progress")
    assert r.returncode == 1 and "unknown transform 'DarkFraction'" in r.stderr and "--import MODULE" in r.stderr
    r = cli("transforms", "--import", "my_transforms")
    assert r.returncode == 0 and "DarkFraction(threshold=120)" in r.stdout
    for executor in ("threads", "dask"):   # dask: the local cluster's worker process imports it too
        r = cli("run", "own.yaml", SVS, "-o", executor, "--executor", executor, "--workers", "1", "--no-progress",
                "--import", "my_transforms")
        assert r.returncode == 0, r.stderr
        with read_h5path(tmp_path / executor / "CMU-1-Small-Region.h5path") as h5:
            fractions = [t.labels["dark_fraction"] for t in h5]
        assert len(fractions) == 108 and 0 < max(fractions) <= 1
    r = cli("run", "own.yaml", SVS, "-o", "x", "--import", "no_such_module_here")
    assert r.returncode == 1 and "--import no_such_module_here: cannot import it" in r.stderr
    # the module's file by an absolute path, or one through "..": made into the module name ".tmp.x.my_transforms"
    # ("the 'package' argument is required to perform a relative import")
    (tmp_path / "sub").mkdir()
    for where, path in ((tmp_path, str(tmp_path / "my_transforms.py")), (tmp_path / "sub", "../my_transforms.py")):
        r = subprocess.run([exe, "transforms", "--import", path], capture_output=True, text=True, cwd=where)
        assert r.returncode == 0 and "DarkFraction(threshold=120)" in r.stdout, r.stderr
    r = subprocess.run([exe, "run", "../own.yaml", SVS, "-o", "abs", "--executor", "dask", "--workers", "1",
                        "--no-progress", "--import", str(tmp_path / "my_transforms.py")], capture_output=True,
                       text=True, cwd=tmp_path / "sub")
    assert r.returncode == 0, r.stderr  # the worker process finds it too


def test_output_piped_into_a_reader_that_stops_early_is_no_error():
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")
    r = subprocess.run(f"'{exe}' transforms | head -1", shell=True, capture_output=True, text=True)
    assert r.stdout.count("\n") == 1 and r.stderr == ""


def test_pixel_size_advice_names_the_command_line_option(tmp_path):
    r = run("tile", data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.webp.tiff"), "-o", str(tmp_path / "t.h5path"),
            "--mpp", "0.5")
    assert r.returncode == 1 and "(`--slide-mpp` on the command line)" in r.stderr
    r = run("tile", data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.webp.tiff"), "-o", str(tmp_path / "t.h5path"),
            "--mpp", "0.5", "--slide-mpp", "0.499", "--no-progress")
    assert r.returncode == 0, r.stderr


def test_option_values_are_refused_under_the_options_name(tmp_path, capsys):
    """--size 0, --overlap -1, --tissue-filter 1.5, --epochs 0 and --tile 0 were refused deep in the library,
    under its parameter names and blamed on the slide or the config file (quantify --tile 0 also warned about
    the overlap first)."""
    he = data_path("he_patches", "stardist_histo.jpg")
    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {ksize: 3}\n")
    cases = [(["tile", SVS, "-o", str(tmp_path / "t.h5path"), "--size", "0"], "argument --size/--tile: must be 1 or more"),
             (["tile", SVS, "-o", str(tmp_path / "t.h5path"), "--overlap", "-1"], "argument --overlap: must be 0 or more"),
             (["thumbnail", SVS, "-o", str(tmp_path / "t.png"), "--size", "0"], "argument --size: must be 1 or more"),
             (["run", str(tmp_path / "p.yaml"), SVS, "-o", str(tmp_path / "r"), "--tissue-filter", "1.5"],
              "argument --tissue-filter: is a fraction of the tile, 0 to 1; got 1.5"),
             (["segment-nuclei", he, "-o", str(tmp_path / "n.tif"), "--tile", "0"],
              "argument --tile/--size: must be 1 or more"),
             (["quantify", he, "-o", str(tmp_path / "q.h5ad"), "--tile", "0"],
              "argument --tile/--size: must be 1 or more"),
             (["train", str(tmp_path / "p.yaml"), "--epochs", "0"], "argument --epochs: must be 1 or more")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and msg in err and "warning" not in err, (argv, err)
    assert not (tmp_path / "r").exists()


def test_quantify_wants_an_h5ad_and_phenotype_names_a_missing_thresholds_file(tmp_path, capsys):
    he = data_path("he_patches", "stardist_histo.jpg")
    assert main(["quantify", he, "-o", str(tmp_path / "x.csv")]) == 1
    assert "x.csv: the cell table is an AnnData .h5ad file" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    import anndata
    import pandas as pd

    anndata.AnnData(X=np.ones((4, 1), np.float32), obs=pd.DataFrame(index=list("abcd")),
                    var=pd.DataFrame(index=["CD3"])).write_h5ad(tmp_path / "c.h5ad")
    (tmp_path / "r.yaml").write_text("steps:\n  - {assign: T, when: CD3}\n")
    assert main(["phenotype", str(tmp_path / "c.h5ad"), "--rules", str(tmp_path / "r.yaml"), "-o",
                 str(tmp_path / "p.h5ad"), "--thresholds", str(tmp_path / "missing.yaml")]) == 1
    err = capsys.readouterr().err
    assert "missing.yaml: cannot read the thresholds (--thresholds): No such file or directory" in err, err


def test_mistakes_in_modules_addresses_and_yaml_are_one_line(tmp_path, capsys):
    """A module given to --import that fails as it runs (SyntaxError, its own exception), a --scheduler that is no
    address, and a YAML syntax error printed tracebacks or several lines; each is one line naming the input now."""
    (tmp_path / "badsyntax.py").write_text("def broken(:\n")
    (tmp_path / "boom.py").write_text("x = 1\nraise RuntimeError('boom at import')\n")
    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {kernel_size: 5}\n")
    (tmp_path / "broken.yaml").write_text("steps: [\n  bad")
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")

    def cli(*args):
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=tmp_path)

    for args, message in (
            (("transforms", "--import", "badsyntax"), "--import badsyntax: cannot import it: invalid syntax at "),
            (("transforms", "--import", "boom"), "--import boom: importing it raised RuntimeError: boom at import (at "),
            (("run", "p.yaml", SVS, "-o", "o1", "--scheduler", "notanaddress"),
             "'notanaddress' is not a dask scheduler address (e.g. tcp://host:8786)"),
            (("run", "p.yaml", SVS, "-o", "o2", "--scheduler", "tcp://127.0.0.1:abc"), "is not a dask scheduler address"),
            (("run", "broken.yaml", SVS, "-o", "o3"), "broken.yaml: not valid YAML: while parsing a flow sequence")):
        r = cli(*args)
        assert r.returncode == 1 and message in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, (args, r.stderr)
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))


def test_resume_never_replaces_a_store_no_pipeline_run_wrote(tmp_path, capsys):
    """`--resume` over an .h5path that no pipeline run wrote (here `histoflow tile`'s) replaced it without
    --overwrite; it is refused now, in the command's words, and the file is kept."""
    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {kernel_size: 5}\n")
    out = tmp_path / "out"
    out.mkdir()
    store = out / "CMU-1-Small-Region.h5path"
    assert main(["tile", SVS, "-o", str(store), "--size", "256", "--no-progress"]) == 0
    before = store.read_bytes()
    capsys.readouterr()
    assert main(["run", str(tmp_path / "p.yaml"), SVS, "-o", str(out), "--executor", "inprocess", "--resume",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "exists and is not the finished result of a pipeline run" in err and "add --overwrite to replace it" in err
    assert "resume=True" not in err and store.read_bytes() == before


def test_tile_says_when_no_tile_fits(tmp_path, capsys):
    img = data_path("he_patches", "stardist_histo.jpg")
    with pytest.warns(UserWarning, match=r"no tiles of 1024 px .*--edge pad keeps the partial ones"):
        assert main(["tile", img, "-o", str(tmp_path / "e.h5path"), "--size", "1024", "--edge", "drop",
                     "--no-progress"]) == 0
    with read_h5path(tmp_path / "e.h5path") as h5:
        assert len(h5) == 0


def test_a_run_whose_every_tile_failed_is_not_a_success(tmp_path):
    """With --on-error skip, a slide of which no tile could be processed printed "0 tiles, 6 failed" and exited 0,
    so a batch script went on as if it had results. It exits 1 now, naming the first failure; the file with the
    failures recorded stays."""
    (tmp_path / "broken.py").write_text(
        "from histoflow.transforms import Transform\n\n\n"
        "class AlwaysFails(Transform):\n    def apply(self, tile):\n        raise ValueError('no luck')\n")
    (tmp_path / "p.yaml").write_text("steps:\n  - AlwaysFails: {}\n")
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")
    r = subprocess.run([exe, "run", "p.yaml", SVS, "-o", "out", "--executor", "inprocess", "--size", "1024",
                        "--no-progress", "--on-error", "skip", "--import", "broken", "--png", "none"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "CMU-1-Small-Region.h5path: every tile failed (9), e.g. AlwaysFails: " in r.stderr and "no luck" in r.stderr
    with read_h5path(tmp_path / "out" / "CMU-1-Small-Region.h5path") as h5:
        assert len(h5) == 0 and len(h5.provenance[-1]["failed_tiles"]) == 9
