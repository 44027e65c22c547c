"""The histoflow command as a user meets it: pixel sizes said and named alike, outputs of the right kind, a
reader that stops early, one-line warnings, unwritable folders, option names in messages, help texts, the
scale of the label image, what an interrupt leaves to resume."""
import os
import subprocess
import sys

import numpy as np
import pytest
from datafiles import SVS, data_path

from histoflow.cli import main

EXE = os.path.join(os.path.dirname(sys.executable), "histoflow")
HE = data_path("he_patches", "stardist_histo.jpg")           # 500 x 300 px, no pixel size
FLUO = data_path("fluorescence", "instanseg_Fluorescence_example.tif")  # 450 x 450 px, 2 channels, no pixel size
OME = data_path("wsi", "ome_tiff", "instanseg_HE_example.ome.tif")  # states 0.5001 µm/px


def cells_file(path, n=60):
    """A small cell table with positions and one marker, as `histoflow quantify` writes one."""
    import anndata
    import pandas as pd

    rng = np.random.default_rng(0)
    x = np.r_[rng.normal(1, 0.1, n // 2), rng.normal(20, 1, n - n // 2)].clip(0).astype(np.float32)[:, None]
    a = anndata.AnnData(X=x, obs=pd.DataFrame(index=[str(i) for i in range(n)]), var=pd.DataFrame(index=["CD3"]))
    a.obsm["spatial"] = rng.uniform(0, 200, (n, 2))
    a.write_h5ad(path)
    return str(path)


def test_quantify_says_it_assumes_a_pixel_size_and_records_it(tmp_path, capsys):
    import anndata

    out = tmp_path / "q.h5ad"
    assert main(["quantify", FLUO, "-o", str(out), "--nuclear-channel", "0", "--png", "none", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert f"{FLUO} does not say its µm/px; taking 0.5 µm/px" in err and "pass --slide-mpp to set it" in err, err
    assert anndata.read_h5ad(out).uns["histoflow"]["mpp"] == pytest.approx(0.5)  # not 0.0: the size used


def test_slide_mpp_names_the_inputs_pixel_size_everywhere(tmp_path, monkeypatch, capsys):
    """segment-nuclei and quantify called the input's pixel size --mpp, which is the target resolution in
    tile/run (where the input's is --slide-mpp, as the advice of `info` says); --mpp still works there. A
    --slide-mpp that replaces the pixel size the file states is said (0.25 on a 0.5001 µm/px file halved the
    nuclei found, silently)."""
    from histoflow.core.slide import SlideData

    seen = []

    def stop(self, *a, **k):  # the run itself is not what is tested
        seen.append(self.mpp)
        raise KeyboardInterrupt

    monkeypatch.setattr(SlideData, "run", stop)
    for verb, out in (("segment-nuclei", "n.tif"), ("quantify", "q.h5ad")):
        for option in ("--slide-mpp", "--mpp"):
            assert main([verb, OME, "-o", str(tmp_path / out), option, "0.25", "--no-progress"]) == 130
            err = capsys.readouterr().err
            assert f"note: {OME} states 0.5001 µm/px; --slide-mpp 0.25 replaces it" in err, (verb, option, err)
            assert seen.pop() == (0.25, 0.25)
            # said: --mpp is a target resolution in tile / run (it was taken silently as the input's own)
            assert ("note: --mpp here is the input's own µm/px (now --slide-mpp)" in err) == (option == "--mpp")
        assert main([verb, OME, "-o", str(tmp_path / out), "--no-progress"]) == 130
        assert "note" not in capsys.readouterr().err and seen.pop() == pytest.approx((0.5001, 0.5001), rel=1e-3)
    with pytest.raises(SystemExit):
        main(["segment-nuclei", "--help"])
    out = capsys.readouterr().out
    assert "--slide-mpp MPP" in out and "--runtime {torch,onnx}" in out and "--backend" not in out
    # segment-nuclei's model runtime is --runtime: --backend is the slide reader in info / thumbnail / tile
    for option in ("--runtime", "--backend"):
        assert main(["segment-nuclei", OME, "-o", str(tmp_path / "n.tif"), option, "onnx", "--no-progress"]) == 130
        err = capsys.readouterr().err
        assert ("note: --backend here is the model's runtime (now --runtime)" in err) == (option == "--backend")
    with pytest.raises(SystemExit):
        main(["quantify", HE, "-o", str(tmp_path / "q.h5ad"), "--slide-mpp", "-1"])
    assert "argument --slide-mpp: is µm per pixel, a positive number; got -1" in capsys.readouterr().err


def test_segment_nuclei_writes_tiff_alone(tmp_path, capsys):
    assert main(["segment-nuclei", HE, "-o", str(tmp_path / "x.png"), "--slide-mpp", "0.25", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"histoflow: error: {tmp_path / 'x.png'}: the label image is written as TIFF: give -o a " \
                          ".tif path", err
    assert os.listdir(tmp_path) == []


def _reader_gone(*args):
    """Run the command with its stdout a pipe whose reader has already gone (`| head` once it has its lines)."""
    p = subprocess.Popen([EXE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p.stdout.close()
    err = p.stderr.read()
    return p.wait(timeout=120), err


def test_a_reader_that_goes_away_leaves_the_work_done_and_exit_status_0(tmp_path):
    rc, err = _reader_gone("transforms")
    assert (rc, err) == (0, "")
    rc, err = _reader_gone("info", SVS)
    assert (rc, err) == (0, "")
    cells = cells_file(tmp_path / "c.h5ad")
    (tmp_path / "r.yaml").write_text("steps:\n  - {assign: T, when: CD3}\n")
    rc, err = _reader_gone("phenotype", cells, "--rules", str(tmp_path / "r.yaml"), "-o", str(tmp_path / "p.h5ad"))
    assert (rc, err) == (0, "")
    assert (tmp_path / "p.h5ad").exists() and (tmp_path / "p.png").exists()  # the picture after the table
    r = subprocess.run(["bash", "-c", f"'{EXE}' transforms | head -2; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                       text=True)
    assert r.returncode == 0 and r.stdout.count("\n") == 2 and r.stderr == ""


def test_warnings_print_as_one_line_of_the_command(tmp_path):
    (tmp_path / "p.yaml").write_text("steps:\n  - NucleusDetectionHE: {}\n")
    r = subprocess.run([EXE, "run", str(tmp_path / "p.yaml"), HE, "-o", str(tmp_path / "o"), "--executor",
                        "inprocess", "--slide-mpp", "0.5", "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines and all(line.startswith("histoflow: warning: ") for line in lines), r.stderr
    assert any("NucleusDetectionHE finds objects that need 30 px of tile overlap" in line and
               line.endswith("Run with --overlap 30") for line in lines), r.stderr  # the option, not overlap=30
    assert "UserWarning" not in r.stderr and ".py:" not in r.stderr


def test_unwritable_output_folders_are_refused_before_anything_is_made(tmp_path, monkeypatch, capsys):
    import yaml

    real_access = os.access
    ro = tmp_path / "ro"
    ro.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(ro)) else real_access(p, mode))
    assert main(["demo", "-o", str(ro / "demo")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"histoflow: error: {ro / 'demo'}: cannot write the demo's results there: no permission " \
                          f"to write in {ro}", err
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "tile_classification", "data": {}, "output": str(tmp_path / "run")}))
    for option in ("--output", "-o"):  # -o as every other command names its output (train refused it)
        assert main(["train", str(cfg), option, str(ro / "x" / "y")]) == 1
        err = capsys.readouterr().err
        assert f"{ro / 'x' / 'y'}: cannot write the training run there: no permission to write in {ro}" in err, err
    (tmp_path / "p.yaml").write_text("steps:\n  - BoxBlur: {kernel_size: 3}\n")
    assert main(["run", str(tmp_path / "p.yaml"), HE, "-o", str(ro / "out"), "--executor", "inprocess"]) == 1
    assert f"{ro / 'out'}: cannot write the h5path files there: no permission to write in {ro}" in \
        capsys.readouterr().err
    assert os.listdir(ro) == []
    (tmp_path / "file").write_text("")
    assert main(["demo", "-o", str(tmp_path / "file")]) == 1
    assert "file: is a file; give -o a folder for the demo's results" in capsys.readouterr().err


def test_a_default_overlap_too_large_for_the_tile_is_said_as_such(tmp_path, capsys):
    assert main(["segment-nuclei", HE, "-o", str(tmp_path / "n.tif"), "--tile", "64"]) == 2  # a usage error
    err = capsys.readouterr().err
    assert "--tile 64: the default --overlap (128 px) is too large for it" in err and "--overlap 32" in err, err
    assert main(["segment-nuclei", HE, "-o", str(tmp_path / "n.tif"), "--tile", "64", "--overlap", "64"]) == 2
    assert "--overlap 64 must be less than --tile 64" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def _help(*argv, capsys):
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_texts_say_defaults_units_and_what_each_argument_is(capsys):
    tile = _help("tile", capsys=capsys)
    assert "gzip (default; any HDF5 reader)" in tile and "the tiles: an .h5path file" in tile
    run = _help("run", capsys=capsys)
    assert "htj2k (default;" in run and "`import hdf5plugin`" in run and "the default of `histoflow tile`" in run
    assert "a slide or image" in _help("info", capsys=capsys)
    thumb = _help("thumbnail", capsys=capsys)
    assert "the thumbnail: a .png file" in thumb and "false colour" in thumb
    convert = _help("annotations", "convert", capsys=capsys)
    assert "input annotations to read" in convert and "output file to write; its extension picks the format" in convert
    seg = _help("segment-nuclei", capsys=capsys)
    assert "tile overlap in level-0 pixels" in seg and "a uint32 .tif" in seg


def test_an_unknown_rule_table_lists_the_presets(tmp_path, capsys):
    cells = cells_file(tmp_path / "c.h5ad")
    assert main(["phenotype", cells, "--rules", "nosuch_preset", "-o", str(tmp_path / "p.h5ad")]) == 1
    err = capsys.readouterr().err
    assert "nosuch_preset: no such rule table file, nor a built-in preset of that name; presets: " in err
    assert "mibi_panel" in err and "nucleus_subtype" in err
    assert sorted(os.listdir(tmp_path)) == ["c.h5ad"]


def test_the_label_image_keeps_the_pixel_size(tmp_path):
    """Fiji and QuPath read the scale from XResolution/ResolutionUnit: the label image carried (1, 1) and no
    unit."""
    import tifffile

    from histoflow import open_slide

    out = tmp_path / "n.tif"
    r = subprocess.run([EXE, "segment-nuclei", HE, "-o", str(out), "--slide-mpp", "0.25", "--png", "none",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(out) as tf:
        tags = tf.pages[0].tags
        assert tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        x, y = tags["XResolution"].value, tags["YResolution"].value
        assert x[0] / x[1] == pytest.approx(40000) and y[0] / y[1] == pytest.approx(40000)  # px per cm
    with open_slide(out) as s:
        assert s.mpp == pytest.approx((0.25, 0.25))


def test_an_interrupt_says_whether_anything_was_saved_to_resume_from(tmp_path, monkeypatch, capsys):
    import yaml

    from histoflow.core.slide import SlideData

    store = tmp_path / "n.h5path"

    def interrupted(batches):
        def run(self, pipeline, out, **k):
            if batches:  # the journal of a run that finished a batch
                os.makedirs(f"{out}.partial")
                open(f"{out}.partial/batch-0000000-abc.hfb", "wb").close()
            raise KeyboardInterrupt
        return run

    argv = ["segment-nuclei", HE, "-o", str(tmp_path / "n.tif"), "--h5path", str(store), "--slide-mpp", "0.25"]
    monkeypatch.setattr(SlideData, "run", interrupted(False))
    assert main(argv) == 130
    assert capsys.readouterr().err.strip().endswith("histoflow: interrupted; nothing was saved yet")
    monkeypatch.setattr(SlideData, "run", interrupted(True))
    assert main(argv) == 130
    assert "histoflow: interrupted; the same command with --resume continues" in capsys.readouterr().err

    import histoflow.ml.recipes as recipes

    def train(cfg, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(recipes, "train_from_config", train)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"task": "tile_classification", "data": {}, "output": str(tmp_path / "run")}))
    assert main(["train", str(cfg)]) == 130
    assert capsys.readouterr().err.strip() == "histoflow: interrupted; nothing was saved yet"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_bytes(b"epoch 1")
    assert main(["train", str(cfg), "--resume"]) == 130
    assert "histoflow: interrupted; the same command with --resume continues" in capsys.readouterr().err


def test_info_describes_an_h5path_file(tmp_path, capsys):
    """`info` on the files histoflow writes (and PathML's) describes them instead of refusing them as slides."""
    import json

    out = tmp_path / "t.h5path"
    assert main(["tile", SVS, "-o", str(out), "--size", "512", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "h5path     version 2" in text and "tiles      30 of 512x512x3 uint8, gzip" in text
    assert "CMU-1-Small-Region (Aperio SVS), 2220 x 2967 px, 0.499 µm/px" in text
    pathml = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")
    assert main(["info", pathml, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format_version"], info["tiles"], info["tile_labels"]) == (1, 12, ["grade", "site"])


def test_annotations_convert_keeps_negatives_on_request(tmp_path, capsys):
    """MoNuSeg's TCGA-XS-A8TJ flags 20 nuclei as exclusions: convert says so, and --keep-negatives keeps them."""
    import json

    xml = data_path("monuseg_train", "TCGA-XS-A8TJ-01Z-00-DX1.xml")
    with pytest.warns(UserWarning, match="20 region"):
        assert main(["annotations", "convert", xml, str(tmp_path / "a.geojson")]) == 0
    assert len(json.load(open(tmp_path / "a.geojson"))["features"]) == 1289
    assert main(["annotations", "convert", xml, str(tmp_path / "b.geojson"), "--keep-negatives"]) == 0
    assert len(json.load(open(tmp_path / "b.geojson"))["features"]) == 1309
    capsys.readouterr()
    assert main(["annotations", "convert", str(tmp_path / "b.geojson"), str(tmp_path / "c.xml"),
                 "--keep-negatives"]) == 1
    assert "applies to Aperio XML files" in capsys.readouterr().err and not (tmp_path / "c.xml").exists()


def test_size_names_the_tile_size_in_every_verb(capsys):
    """`tile` and `run` call the tile size --size; segment-nuclei and quantify accept it too (their --tile)."""
    assert main(["segment-nuclei", SVS, "-o", "/nonexistent/x.tif", "--size", "64"]) == 2
    assert "--tile 64: the default --overlap" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantify", SVS, "-o", "x.h5ad", "--size", "0"])
    assert "argument --tile/--size: must be 1 or more, got 0" in capsys.readouterr().err


def test_segment_nuclei_keeps_each_finished_tile_for_resume(tmp_path, monkeypatch, capsys):
    """The model takes seconds a tile on a CPU: every finished tile is journalled (batches of one), so an
    interrupted run resumes from the last tile, not from the last four (a minute of work lost on the sample)."""
    from histoflow.ml.transforms import NucleusSegmentation

    real, calls = NucleusSegmentation.apply, []

    def interrupted_on_the_third_tile(self, tile):
        calls.append(tile.coords)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, tile)

    monkeypatch.setattr(NucleusSegmentation, "apply", interrupted_on_the_third_tile)
    store = tmp_path / "n.h5path"
    args = ["segment-nuclei", SVS, "-o", str(tmp_path / "n.tif"), "--h5path", str(store), "--no-progress"]
    assert main(args) == 130
    assert "--resume continues from what was written" in capsys.readouterr().err
    journal = [n for n in os.listdir(str(store) + ".partial") if n.endswith(".hfb")]
    assert len(journal) >= 1, journal  # the first tile at least (the second may still be being stored)


def _stamp(path):
    return open(path, "rb").read(), os.stat(path).st_mtime_ns


def test_outputs_that_exist_are_replaced_only_with_overwrite(tmp_path, capsys):
    """A second command with the same output used to replace the first one's results silently (hours of
    segment-nuclei on a slide); every verb that writes files now refuses them, naming each, unless --overwrite
    (or --resume, which continues the run that wrote them). The files refused are left as they were."""
    pipe = tmp_path / "p.yaml"
    pipe.write_text("steps:\n- BoxBlur: {kernel_size: 5}\n")
    xml = data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.xml")
    thumb, tiles, conv, outdir = (str(tmp_path / n) for n in ("t.png", "t.h5path", "a.geojson", "runs"))
    runout = os.path.join(outdir, "CMU-1-Small-Region.h5path")
    verbs = {"thumbnail": (["thumbnail", SVS, "-o", thumb, "--size", "64"], [thumb]),
             "tile": (["tile", HE, "-o", tiles, "--size", "128", "--no-progress"], [tiles]),
             "convert": (["annotations", "convert", xml, conv], [conv]),
             "run": (["run", str(pipe), SVS, "-o", outdir, "--executor", "inprocess", "--no-progress"], [runout])}
    for name, (args, outs) in verbs.items():
        assert main(args) == 0, name
        before = {p: _stamp(p) for p in outs}
        capsys.readouterr()
        assert main(args) == 1, name
        err = capsys.readouterr().err
        assert f"{outs[0]}" in err and "already" in err and "--overwrite" in err, (name, err)
        assert {p: _stamp(p) for p in outs} == before, name   # untouched
        assert main(args + ["--overwrite"]) == 0, name
        assert all(_stamp(p)[1] != before[p][1] for p in outs), name  # written again
    # run: --resume keeps the finished slide as it is (and says it is done)
    before = _stamp(runout)
    assert main(verbs["run"][0] + ["--resume"]) == 0 and _stamp(runout) == before
    assert "--resume keeps finished slides" in _run_refusal(verbs["run"][0], capsys)


def _run_refusal(args, capsys):
    capsys.readouterr()
    assert main(args) == 1
    return capsys.readouterr().err


def test_segment_nuclei_and_phenotype_refuse_existing_outputs_but_resume_and_update_in_place(tmp_path, capsys):
    """segment-nuclei refuses each existing output (label image, picture) unless --overwrite or --resume;
    phenotype may update its own input table in place (-o the input) without --overwrite, not another file."""
    out, store = str(tmp_path / "n.tif"), str(tmp_path / "n.h5path")
    args = ["segment-nuclei", HE, "--slide-mpp", "0.25", "-o", out, "--h5path", store, "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{out} (the label image)" in err and "(the picture)" in err and "(the h5path)" in err, err
    assert "--resume continues an interrupted run" in err
    labels = _stamp(out)
    assert main(args + ["--resume"]) == 0 and _stamp(out)[0] == labels[0]  # the same nuclei, from the store
    assert main(args + ["--overwrite"]) == 0
    # --resume with no run to continue (a new --h5path): the outputs of the first run replaced without a word
    capsys.readouterr()
    fresh = args[:-2] + [str(tmp_path / "new.h5path"), "--no-progress", "--resume"]
    assert main(fresh) == 1 and _stamp(out)[0] == labels[0]
    err = capsys.readouterr().err
    assert "nothing to resume" in err and f"{out} (the label image)" in err and "exist already" in err
    cells = cells_file(tmp_path / "c.h5ad")
    rules = tmp_path / "r.yaml"
    rules.write_text("steps:\n  - {assign: T, when: CD3}\n")
    ph = ["phenotype", cells, "--rules", str(rules), "--png", "none"]
    assert main(ph + ["-o", cells]) == 0 and main(ph + ["-o", cells]) == 0   # in place, twice
    other = str(tmp_path / "o.h5ad")
    assert main(ph + ["-o", other]) == 0
    capsys.readouterr()
    assert main(ph + ["-o", other]) == 1 and "already" in capsys.readouterr().err
    assert main(ph + ["-o", other, "--overwrite"]) == 0


def test_an_interrupted_runs_journal_and_the_inputs_are_not_replaced_by_mistake(tmp_path, monkeypatch, capsys):
    """A run started again over an interrupted one threw its finished batches away with a warning; now the
    command refuses (naming the journal) unless --resume or --overwrite. A run's picture, OUTDIR/<slide>.png,
    replaced an input image of that name (-o the images' own folder); it goes beside it now. phenotype in
    place updates its default picture too, every time."""
    from histoflow.transforms import BlurQC

    pipe = tmp_path / "p.yaml"
    pipe.write_text("steps:\n- BlurQC: {}\n")
    real, calls = BlurQC.apply, []

    def interrupted(self, tile):
        calls.append(1)
        if len(calls) == 70:
            raise KeyboardInterrupt
        return real(self, tile)

    monkeypatch.setattr(BlurQC, "apply", interrupted)
    args = ["run", str(pipe), SVS, "-o", str(tmp_path / "out"), "--executor", "inprocess", "--batch-size", "8",
            "--no-progress"]
    assert main(args) == 130
    journal = tmp_path / "out" / "CMU-1-Small-Region.h5path.partial"
    kept = sorted(os.listdir(journal))
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{journal}: exists already" in err and "--resume" in err and "--overwrite" in err, err
    assert sorted(os.listdir(journal)) == kept
    monkeypatch.setattr(BlurQC, "apply", real)
    assert main(args + ["--resume"]) == 0 and not journal.exists()
    # the picture beside an input of its name
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    from PIL import Image

    Image.open(HE).save(imgs / "he.png")
    before = _stamp(imgs / "he.png")
    assert main(["run", str(pipe), str(imgs / "he.png"), "-o", str(imgs), "--executor", "inprocess",
                 "--no-progress", "--slide-mpp", "0.25"]) == 0
    assert _stamp(imgs / "he.png") == before and (imgs / "he_picture.png").exists()
    # phenotype in place, twice, with its default picture
    cells = cells_file(tmp_path / "c.h5ad")
    rules = tmp_path / "r.yaml"
    rules.write_text("steps:\n  - {assign: T, when: CD3}\n")
    ph = ["phenotype", cells, "--rules", str(rules), "-o", cells]
    assert main(ph) == 0 and main(ph) == 0


def test_errors_give_the_commands_options_not_python_parameters(tmp_path, capsys):
    """segment-nuclei told the user to pass `histoflow run --on-error skip` (it has no such option), and a
    pipeline that needs the tissue mask said "add it with slide.add_mask(...), or pass tissue_filter=..."."""
    import tifffile
    from PIL import Image

    from histoflow.transforms import BoxBlur, NucleusDetectionHE, Pipeline

    rgb = np.asarray(Image.open(data_path("he_patches", "stardist_histo.jpg")).convert("RGB"))[:256, :256]
    bad = tmp_path / "damaged.tif"
    with tifffile.TiffWriter(bad) as w:  # level 0, and a level 1 that thumbnails are read from
        kw = dict(compression="jpeg", photometric="rgb", resolutionunit="CENTIMETER")
        w.write(np.tile(rgb, (2, 2, 1)), tile=(256, 256), subifds=1, resolution=(4e4, 4e4), **kw)
        w.write(np.ascontiguousarray(rgb[::2, ::2].repeat(2, 0)[:256].repeat(2, 1)[:, :256]), tile=(128, 128),
                subfiletype=1, resolution=(2e4, 2e4), **kw)
    with tifffile.TiffFile(bad) as t:
        offset = t.pages[0].dataoffsets[0]
        count = t.pages[0].databytecounts[0]
    with open(bad, "r+b") as f:  # the first tile's JPEG bytes zeroed: it cannot be decoded
        f.seek(offset)
        f.write(b"\0" * count)
    assert main(["segment-nuclei", str(bad), "-o", str(tmp_path / "n.tif"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "cannot be decoded" in err and "on-error" not in err and "on_error" not in err
    pipe = tmp_path / "p.yaml"
    Pipeline([BoxBlur(3)]).save(pipe)
    assert main(["run", str(pipe), str(bad), "-o", str(tmp_path / "o"), "--executor", "inprocess",
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "or pass --on-error skip" in err and "on_error=" not in err

    from histoflow.cli import demo_pipeline

    demo_pipeline().save(pipe)  # it reads the slide's tissue mask, which --tissue-filter makes
    assert main(["run", str(pipe), SVS, "-o", str(tmp_path / "o2"), "--executor", "inprocess", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "--tissue-filter FRACTION makes 'tissue'" in err and "tissue_filter=" not in err
    Pipeline([NucleusDetectionHE()]).save(pipe)
    assert main(["run", str(pipe), SVS, "-o", str(tmp_path / "o3"), "--executor", "inprocess", "--slide-type", "IF",
                 "--tissue-filter", "0.5", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "run without --tissue-filter" in err and "instead" not in err


def test_picture_and_geojson_options_refuse_other_extensions(tmp_path):
    """--png pic.jpg wrote a PNG named .jpg, --geojson nuc.xml GeoJSON named as Aperio XML (which
    `annotations convert` would take it for); thumbnail already refused a non-.png name."""
    import subprocess
    import sys

    from datafiles import data_path

    he = data_path("he_patches", "stardist_histo.jpg")
    for extra, said in ((["--png", tmp_path / "pic.jpg"], "--png writes a PNG picture; give it a .png path"),
                        (["--geojson", tmp_path / "nuc.xml"], "--geojson writes QuPath GeoJSON")):
        r = subprocess.run([sys.executable, "-m", "histoflow.cli", "segment-nuclei", str(he), "-o",
                            str(tmp_path / "n.tif"), *map(str, extra), "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 1 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not any(tmp_path.iterdir())


def test_options_that_do_not_go_together_exit_2_as_usage_errors(tmp_path, capsys):
    """Found after parsing, they exited 1, as a failed run does (argparse's usage errors exit 2); tile's overlap
    was refused in the library's words (overlap must be in [0, tile_size)); a misspelt reader a ParameterError."""
    pipe = tmp_path / "p.yaml"
    pipe.write_text("steps:\n  - BoxBlur: {kernel_size: 3}\n")
    for argv, said in (
            (["run", str(pipe), SVS, "-o", str(tmp_path / "o"), "--executor", "inprocess", "--workers", "2"],
             "--executor inprocess runs in this process alone: leave out --workers"),
            (["run", str(pipe), SVS, "-o", str(tmp_path / "o"), "--size", "64", "--overlap", "64"],
             "--overlap 64 must be less than --size 64"),
            (["quantify", SVS, "-o", str(tmp_path / "q.h5ad"), "--tile", "128", "--overlap", "128"],
             "--overlap 128 must be less than --tile 128"),
            (["tile", SVS, "-o", str(tmp_path / "t.h5path"), "--overlap", "256"],
             "--overlap 256 must be less than --size 256 (pixels shared by neighbouring tiles)"),
            (["thumbnail", SVS, "-o", str(tmp_path / "t.png"), "--label", "x"],
             "--label draws over the tiles of an h5path file")):
        assert main(argv) == 2, argv
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["info", SVS, "--backend", "openslid"])
    assert e.value.code == 2 and "invalid choice: 'openslid'" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["p.yaml"]


def test_run_pictures_never_replace_an_input(tmp_path, monkeypatch):
    """x.png's picture fell back to x_picture.png, another input slide: replaced by it under --overwrite."""
    import hashlib

    from PIL import Image

    from histoflow.cli import main

    monkeypatch.chdir(tmp_path)
    Image.open(data_path("he_patches", "stardist_histo.jpg")).save("x.png")
    Image.open(data_path("he_patches", "tiatoolbox_stain_target.png")).save("x_picture.png")
    (tmp_path / "p.yaml").write_text("histoflow_pipeline: 1\nsteps:\n- BoxBlur: {kernel_size: 3}\n")
    before = {p: hashlib.md5(open(p, "rb").read()).hexdigest() for p in ("x.png", "x_picture.png")}
    for extra in ([], ["--overwrite"]):
        assert main(["run", "p.yaml", "x.png", "x_picture.png", "-o", ".", "--executor", "inprocess",
                     "--no-progress", "--slide-mpp", "0.5"] + extra) == 0
    assert {p: hashlib.md5(open(p, "rb").read()).hexdigest() for p in before} == before
    assert os.path.isfile("x_picture2.png") and os.path.isfile("x_picture_picture.png")
