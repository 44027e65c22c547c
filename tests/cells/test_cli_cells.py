"""The cell commands end to end on the real MIBI image: quantify -> phenotype; annotation conversion."""
import os
import subprocess
import sys

import anndata
import numpy as np
from datafiles import data_path
from PIL import Image

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "histoflow.cli", *map(str, args)], capture_output=True, text=True)


def test_quantify_then_phenotype(tmp_path):
    cells = tmp_path / "cells.h5ad"
    r = _cli("quantify", MIBI, "-o", cells, "--membrane", "Membrane", "--no-progress")
    assert r.returncode == 0, r.stderr
    a = anndata.read_h5ad(cells)
    assert 250 < a.n_obs < 500 and a.n_vars == 22 and "HH3 (89)" in a.var_names
    assert f"{a.n_obs} cells x 22 channels" in r.stdout
    # the picture: the slide in false colour with the cell outlines (yellow) of the cells in the table
    pic = np.asarray(Image.open(tmp_path / "cells.png"))
    assert pic.shape == (1024, 1024, 3) and "picture" in r.stdout
    yellow = np.all(pic == (255, 255, 0), axis=2)
    # the false colours are dimmed under the outlines: no marker signal is drawn in the outlines' yellow (7,047 of
    # 40,601 yellow pixels were CD4's yellow or red + green)
    assert pic[~yellow].max() <= 0.7 * 255 + 1
    from skimage.measure import label

    centroids = np.round(a.obsm["spatial"]).astype(int)
    rims = label(~yellow, connectivity=1)  # each outlined cell is a region enclosed by yellow
    inside = rims[np.clip(centroids[:, 1], 0, 1023), np.clip(centroids[:, 0], 0, 1023)]
    assert np.mean(inside != rims[0, 0]) > 0.8  # most cell centres lie in a closed outline, not the background
    out = tmp_path / "pheno.h5ad"
    gj = tmp_path / "cells.geojson"
    r = _cli("phenotype", cells, "--rules", "mibi_panel", "-o", out, "--geojson", gj)
    assert r.returncode == 0, r.stderr
    b = anndata.read_h5ad(out)
    counts = b.obs["phenotype"].value_counts()
    assert counts.sum() == a.n_obs and counts.get("epithelial", 0) > 30
    assert "positive" in b.layers and "gating" in b.uns
    # the summary table lists each class with its count
    assert any(line.startswith("epithelial") and str(counts["epithelial"]) in line for line in r.stdout.splitlines())
    # QuPath GeoJSON: one outline per cell, its phenotype as class, measurements incl. channel means;
    # each outline contains its cell's centroid
    from histoflow.annotations import rasterize, read_geojson

    polys = read_geojson(gj)
    assert len({p.name for p in polys}) == a.n_obs
    by_name = {}
    for p in polys:
        by_name.setdefault(p.name, p)
    pheno = b.obs["phenotype"].astype(str)
    for name in list(b.obs_names[:: max(1, a.n_obs // 20)]):
        p = by_name[name]
        assert p.classification == pheno[name] and "HH3 (89): mean" in p.measurements
        x, y = b.obsm["spatial"][b.obs_names.get_loc(name)]
        m = rasterize([p], (3, 3), origin=(round(x) - 1, round(y) - 1))
        assert m.any()
    # each cell carries its nucleus (QuPath's nucleusGeometry), inside its outline and smaller
    from shapely.geometry import Polygon as Shape

    with_nucleus = [p for p in polys if p.nucleus is not None]
    assert len(with_nucleus) >= 0.95 * a.n_obs
    for p in with_nucleus[::10]:
        cell, nucleus = Shape(p.exterior, p.holes).buffer(0), Shape(p.nucleus).buffer(0)
        assert nucleus.area < cell.area and cell.buffer(1).contains(nucleus)
    import json

    raw = json.loads(gj.read_text())["features"]
    assert sum("nucleusGeometry" in f for f in raw) == len(with_nucleus)
    png = np.asarray(Image.open(tmp_path / "pheno.png"))
    assert png.shape[2] == 3 and png.std() > 5
    # the GeoJSON's class colours are the picture's: one per class of the table, in its order (they followed
    # which cell came first: epithelial green in the picture, yellow in QuPath, and another colour on the next
    # slide); the legend's swatches at (12, 12 + 14 i) show them
    from histoflow.cells.rules import phenotype_colours

    colours = phenotype_colours(b.obs["phenotype"].cat.categories)
    seen = {f["properties"]["classification"]["name"]: tuple(f["properties"]["classification"]["color"])
            for f in raw}
    assert seen == {c: colours[c] for c in seen}
    assert seen.get("excluded", (70, 70, 70)) == (70, 70, 70)
    assert seen.get("unassigned", (140, 140, 140)) == (140, 140, 140)
    for i, c in enumerate(b.obs["phenotype"].cat.categories):
        assert tuple(png[13 + 14 * i, 13]) == colours[c], c
    # a table in another order (sorted, rebuilt) is matched to the store's cells by name: each outline carries
    # its own cell's name and values (by position, every outline carried another cell's)
    import shutil

    a[::-1].copy().write_h5ad(tmp_path / "reversed.h5ad")
    shutil.copy(tmp_path / "cells.h5path", tmp_path / "reversed.h5path")  # the store beside the table
    r = _cli("phenotype", tmp_path / "reversed.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "rev.h5ad",
             "--geojson", tmp_path / "rev.geojson")
    assert r.returncode == 0, r.stderr
    rev = {p.name: p for p in read_geojson(tmp_path / "rev.geojson")}
    assert set(rev) == set(by_name)
    for name in list(b.obs_names[:: max(1, a.n_obs // 20)]):
        assert np.array_equal(rev[name].exterior, by_name[name].exterior)
        assert rev[name].measurements == by_name[name].measurements
    a[1:].copy().write_h5ad(tmp_path / "fewer.h5ad")  # not the store's cells
    shutil.copy(tmp_path / "cells.h5path", tmp_path / "fewer.h5path")
    r = _cli("phenotype", tmp_path / "fewer.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "f.h5ad",
             "--geojson", tmp_path / "f.geojson")
    assert r.returncode == 1 and "fewer.h5path: the cell table does not hold the store's cells (e.g. " in r.stderr
    assert not os.path.exists(tmp_path / "f.h5ad") and not os.path.exists(tmp_path / "f.geojson")
    # scanpy reads the table and runs its basics on it
    import scanpy as sc

    ad = sc.read_h5ad(out)
    sc.pp.log1p(ad)
    sc.tl.pca(ad, n_comps=5)
    sc.pp.neighbors(ad, n_neighbors=10, use_rep="X_pca")
    assert ad.obsm["X_pca"].shape == (a.n_obs, 5) and ad.obsp["connectivities"].shape == (a.n_obs, a.n_obs)
    bad = _cli("phenotype", tmp_path / "none.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "x.h5ad")
    assert bad.returncode == 1 and "none.h5ad: no such file" in bad.stderr


def test_annotations_convert_cli(tmp_path):
    src = data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.xml")
    r = _cli("annotations", "convert", src, tmp_path / "n.geojson")
    assert r.returncode == 0, r.stderr
    assert "398 polygons" in r.stdout
    r = _cli("annotations", "convert", tmp_path / "n.geojson", tmp_path / "RoiSet.zip")
    assert r.returncode == 0 and "398 polygons" in r.stdout
    r = _cli("annotations", "convert", tmp_path / "n.geojson", tmp_path / "n.txt")
    assert r.returncode == 1 and "cannot write .txt" in r.stderr


def test_cli_input_errors_are_one_line(tmp_path):
    r = _cli("quantify", MIBI, "--nuclear-channel", "bogus", "-o", tmp_path / "c.h5ad", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "ark_fov8_mibitiff_22ch.tiff: SegmentCells could not be fitted to the slide: no channel 'bogus'" in r.stderr
    r = _cli("quantify", data_path("fluorescence", "pathml_smalltif.tif"), "-o", tmp_path / "c.h5ad", "--no-progress")
    assert r.returncode == 1 and "no channel looks like a nuclear stain among ['intensity']" in r.stderr
    (tmp_path / "p.yaml").write_text("steps: []\n")
    r = _cli("run", tmp_path / "p.yaml", MIBI, "-o", tmp_path / "out", "--slide-type", "bogus")
    assert r.returncode == 1 and r.stderr.strip() == ("histoflow: error: unknown slide type 'bogus'; choose one of "
                                                      "['HE', 'IHC', 'IF', 'CODEX', 'Vectra', 'MIBI']")
    assert sorted(os.listdir(tmp_path)) == ["p.yaml"]  # nothing half-made


def test_quantify_and_phenotype_bad_inputs_write_nothing(tmp_path):
    r = _cli("quantify", MIBI, "-o", tmp_path / "c.h5path", "--no-progress")
    assert r.returncode == 1 and "give -o a name ending in .h5ad" in r.stderr and not os.listdir(tmp_path)
    cells = tmp_path / "c.h5ad"
    r = _cli("quantify", MIBI, "-o", cells, "--nuclear-channel", "13", "--membrane", "Membrane", "--no-progress")
    assert r.returncode == 0, r.stderr  # an index, as the help says: 13 is HH3
    assert anndata.read_h5ad(cells).n_obs == 339
    os.remove(tmp_path / "c.h5path")  # as if only the table had been copied elsewhere
    before = sorted(os.listdir(tmp_path))
    r = _cli("phenotype", cells, "--rules", "mibi_panel", "-o", tmp_path / "p.h5ad", "--geojson", tmp_path / "p.geojson")
    assert r.returncode == 1 and "c.h5path: not found; --geojson needs" in r.stderr
    (tmp_path / "rules.yaml").write_bytes(b"steps:\n  - group: \xff\xfe\n")
    r = _cli("phenotype", cells, "--rules", tmp_path / "rules.yaml", "-o", tmp_path / "p.h5ad")
    assert r.returncode == 1 and "rules.yaml: not a text (UTF-8) file" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "t.yaml").write_text("CD3: [1, \n")
    r = _cli("phenotype", cells, "--rules", "mibi_panel", "-o", tmp_path / "p.h5ad", "--thresholds", tmp_path / "t.yaml")
    assert r.returncode == 1 and "t.yaml: not a YAML/JSON file of thresholds" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # HDF5 files that are not AnnData (a plain .h5; a store under another name) gave a 30-line TypeError traceback
    import h5py

    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f["x"] = np.arange(10)
    from histoflow.store import H5PathWriter

    with H5PathWriter(tmp_path / "store.h5ad", slide={"name": "s"}) as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    for name, extra in (("plain.h5", ""), ("store.h5ad", "; an h5path store is given by its .h5path name")):
        r = _cli("phenotype", tmp_path / name, "--rules", "mibi_panel", "-o", tmp_path / "p.h5ad")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"{name}: not an AnnData .h5ad file (TypeError: " in r.stderr and r.stderr.rstrip().endswith(
            extra or ")"), r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(before + ["rules.yaml", "t.yaml", "plain.h5", "store.h5ad"])


def test_quantify_cells_do_not_depend_on_the_tiling_at_the_default_overlap(tmp_path):
    """The default overlap comes from µm (2 x (15 µm + 2 x expand)): a tile then holds whole every
    neighbour of the cells it keeps. At a fixed 64 px, a neighbour cut by the tile's edge was dropped as too
    small and a kept cell grew into its place (229.5 -> 268.2 µm² for one MIBI cell at 384 px tiles)."""
    from scipy.spatial import cKDTree

    tables = []
    for tile in (1024, 384):
        out = tmp_path / f"c{tile}.h5ad"
        r = _cli("quantify", MIBI, "-o", out, "--membrane", "Membrane", "--tile", tile, "--png", "none",
                 "--no-progress")
        assert r.returncode == 0, r.stderr
        tables.append(anndata.read_h5ad(out))
    whole, tiled = tables
    assert whole.n_obs == tiled.n_obs == 339
    d, i = cKDTree(whole.obsm["spatial"]).query(tiled.obsm["spatial"])
    assert d.max() < 1.0
    area = np.abs(tiled.obs["area"].to_numpy() - whole.obs["area"].to_numpy()[i])
    assert area.max() == 0, area.max()  # µm²: the membrane watershed's ties no longer depend on the seams


def test_phenotype_never_replaces_the_store(tmp_path):
    cells = tmp_path / "cells.h5ad"
    assert _cli("quantify", MIBI, "-o", cells, "--png", "none", "--no-progress").returncode == 0
    store = tmp_path / "cells.h5path"
    size = os.path.getsize(store)
    for args, msg in ((("-o", store), "give -o a .h5ad path"),
                      (("-o", tmp_path / "t.h5ad", "--geojson", store), "would replace the input"),
                      (("-o", tmp_path / "t.h5ad", "--png", store), "would replace the input"),
                      (("-o", tmp_path / "t.h5ad", "--geojson", cells), "would replace the input")):
        r = _cli("phenotype", cells, "--rules", "mibi_panel", *args)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    assert os.path.getsize(store) == size and not (tmp_path / "t.h5ad").exists()
    assert anndata.read_h5ad(cells).n_obs == 339
    (tmp_path / "thr.yaml").write_text("CD45 (169): abc\n")
    r = _cli("phenotype", cells, "--rules", "mibi_panel", "-o", tmp_path / "t.h5ad", "--thresholds",
             tmp_path / "thr.yaml")
    assert r.returncode == 1 and "thr.yaml: " in r.stderr and "not a number" in r.stderr, r.stderr


def test_commands_never_write_over_their_input(tmp_path):
    """thumbnail, tile and annotations convert refuse an output that is their input (a JPEG became a PNG,
    a MoNuSeg XML lost its measurements), and outputs that are folders, before any work."""
    import shutil

    img = tmp_path / "in.jpg"
    shutil.copy(data_path("he_patches", "stardist_histo.jpg"), img)
    xml = tmp_path / "in.xml"
    shutil.copy(data_path("monuseg_train", "TCGA-21-5784-01Z-00-DX1.xml"), xml)
    before = {p: open(p, "rb").read() for p in (img, xml)}
    for args in (("thumbnail", img, "-o", img), ("tile", img, "-o", img), ("annotations", "convert", xml, xml)):
        r = _cli(*args)
        assert r.returncode == 1 and "would replace the input" in r.stderr, (args, r.stderr)
    (tmp_path / "folder").mkdir()
    r = _cli("thumbnail", img, "-o", tmp_path / "folder")
    assert r.returncode == 1 and "is a folder" in r.stderr
    assert {p: open(p, "rb").read() for p in (img, xml)} == before


def test_phenotype_gates_the_channels_the_rules_use(tmp_path):
    """A background-subtracted table (negative values) in a channel no rule uses does not stop phenotyping;
    in a channel the rules use, the error names the cells file and the option to pass (--no-log)."""
    cells = tmp_path / "cells.h5ad"
    r = _cli("quantify", MIBI, "-o", cells, "--membrane", "Membrane", "--no-progress", "--png", "none")
    assert r.returncode == 0, r.stderr
    a = anndata.read_h5ad(cells)
    bg = list(a.var_names).index("Background (128)")
    a.X = np.asarray(a.X, np.float32).copy()
    a.X[:, bg] -= 0.5
    a.write_h5ad(tmp_path / "neg.h5ad")
    r = _cli("phenotype", tmp_path / "neg.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "p.h5ad", "--png", "none")
    assert r.returncode == 0, r.stderr
    b = anndata.read_h5ad(tmp_path / "p.h5ad")
    assert "Background (128)" in b.uns["gating"]["ungated"]
    a.X = a.X - 0.5  # every channel
    a.write_h5ad(tmp_path / "neg2.h5ad")
    r = _cli("phenotype", tmp_path / "neg2.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "q.h5ad", "--png", "none")
    assert r.returncode == 1 and "neg2.h5ad: channel" in r.stderr and "--no-log" in r.stderr, r.stderr
    assert not (tmp_path / "q.h5ad").exists()
    r = _cli("phenotype", tmp_path / "neg2.h5ad", "--rules", "mibi_panel", "-o", tmp_path / "q.h5ad", "--png", "none",
             "--no-log")
    assert r.returncode == 0, r.stderr



def test_quantify_interrupted_then_resumed(tmp_path):
    """A quantify run stopped mid-way (TERM, as a cluster scheduler ends a job) keeps its finished batches;
    the same command with --resume continues from them and writes the table an uninterrupted run writes."""
    import signal
    import time

    args = ("--membrane", "Membrane", "--tile", "128", "--png", "none", "--no-progress")
    r = _cli("quantify", MIBI, "-o", tmp_path / "whole.h5ad", *args)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "cut.h5ad"
    journal = tmp_path / "cut.h5path.partial"
    p = subprocess.Popen([sys.executable, "-m", "histoflow.cli", "quantify", str(MIBI), "-o", str(out), *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and len([n for n in (os.listdir(journal) if journal.is_dir() else [])
                                          if n.startswith("batch-") and n.endswith(".hfb")]) < 1:
        # (a whole batch file: a temporary one, still being written, is not one the resume can keep)
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130 and "--resume continues from what was written" in err, (p.returncode, err)
    assert not out.exists() and journal.is_dir()
    r = _cli("quantify", MIBI, "-o", out, *args, "--resume")
    assert r.returncode == 0, r.stderr
    from histoflow.store import read_h5path

    with read_h5path(tmp_path / "cut.h5path") as h:
        assert h.provenance[-1]["resumed_batches"] >= 1  # the batches written before the TERM were kept
    whole, resumed = anndata.read_h5ad(tmp_path / "whole.h5ad"), anndata.read_h5ad(out)
    assert list(resumed.obs_names) == list(whole.obs_names) and np.array_equal(resumed.X, whole.X)
    assert not journal.exists()


def test_segment_nuclei_resume_needs_the_h5path(tmp_path):
    """Without --h5path the per-tile results live in a temporary folder: nothing to resume from, said at once."""
    r = _cli("segment-nuclei", data_path("wsi", "aperio_svs", "CMU-1-Small-Region.svs"), "-o", tmp_path / "n.tif",
             "--resume")
    assert r.returncode == 2 and "--resume" in r.stderr and "--h5path" in r.stderr and not os.listdir(tmp_path)


def test_phenotype_geojson_of_another_store_writes_nothing(tmp_path):
    """With --geojson and a store beside the table that does not hold the table's cells, the table and the picture
    were written before the GeoJSON failed, and the same command then refused to run again (outputs exist)."""
    import shutil

    cells = tmp_path / "cells.h5ad"
    assert _cli("quantify", MIBI, "-o", cells, "--png", "none", "--no-progress").returncode == 0
    lone = tmp_path / "lone"
    lone.mkdir()
    a = anndata.read_h5ad(cells)
    a[:100].copy().write_h5ad(lone / "cells.h5ad")               # a table of 100 of the store's cells
    shutil.copy(tmp_path / "cells.h5path", lone / "cells.h5path")
    r = _cli("phenotype", lone / "cells.h5ad", "--rules", "mibi_panel", "-o", lone / "out.h5ad",
             "--geojson", lone / "out.geojson")
    assert r.returncode == 1 and "cells.h5path: the cell table does not hold the store's cells (e.g. " in r.stderr, \
        r.stderr
    assert sorted(os.listdir(lone)) == ["cells.h5ad", "cells.h5path"]


def test_quantify_membrane_by_index_and_an_absolute_source(tmp_path):
    """--membrane took names only (`--membrane 1`: "no channel '1'") while --nuclear-channel took indices; and the
    table recorded the slide's path as given, so `phenotype` run from another folder lost the picture's slide."""
    import shutil

    shutil.copy(data_path("fluorescence", "instanseg_Fluorescence_example.tif"), tmp_path / "fl.tif")
    r = subprocess.run([sys.executable, "-m", "histoflow.cli", "quantify", "fl.tif", "-o", "q.h5ad",
                        "--nuclear-channel", "0", "--membrane", "1", "--no-progress"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    a = anndata.read_h5ad(tmp_path / "q.h5ad")
    assert a.n_obs > 10 and os.path.isabs(a.uns["histoflow"]["source"]) and \
        os.path.samefile(a.uns["histoflow"]["source"], tmp_path / "fl.tif")


def test_pictures_of_three_channel_fluorescence_are_false_colour():
    """The Vectra QPTIFF (DAPI, FITC, Cy3; uint8) was drawn under quantify's and phenotype's cells as raw RGB:
    DAPI in red, unstretched, nearly black. It is fluorescence: DAPI in blue, stretched, as `histoflow
    thumbnail` shows it; channels named for a picture are shown even when three uint8 channels look like RGB."""
    from histoflow import open_slide
    from histoflow.cli import _picture_of
    from histoflow.utils import to_rgb

    path = data_path("wsi", "qptiff", "small_vectra.qptiff")
    pic, _ = _picture_of(path)
    with open_slide(path) as r:
        assert not r.brightfield and list(r.channel_names) == ["DAPI", "FITC", "Cy3"]
        dapi = np.asarray(r.thumbnail(max(pic.shape[:2])))[..., 0].astype(float)
        th = np.asarray(r.thumbnail(512))
    corr = [np.corrcoef(dapi.ravel(), pic[..., k].astype(float).ravel())[0, 1] for k in range(3)]
    assert corr[2] > 0.99 and corr[0] < 0.9, corr  # DAPI in blue (was red)
    assert pic.mean() > 1.5 * np.asarray(dapi).mean() / 3  # stretched, not the raw dark values
    only = to_rgb(th, channels=[0], channel_names=["DAPI", "FITC", "Cy3"])
    assert not np.array_equal(only, th) and np.array_equal(only[..., 0], only[..., 1])  # DAPI alone, in blue


def test_pictures_put_the_channel_the_segmentation_takes_for_nuclei_first():
    from histoflow.transforms.multiplex import nuclear_channel_index
    from histoflow.utils import display_channels

    for names in (["CD3", "CD8", "DNA1", "DNA2"], ["CD45", "Hoechst33342", "CD3"], ["CD4", "DAPI-1", "CD8"],
                  ["Ki67", "dsDNA", "CD3"], ["Background", "HH3", "CD3"]):
        assert display_channels(names)[0] == nuclear_channel_index(names), names
    assert display_channels(["CD3", "CD8"]) == [0, 1]


def test_quantify_on_he_refuses_the_fluorescence_options(tmp_path):
    """On an H&E image the cells are NucleusDetectionHE's nuclei: --nuclear-channel, --membrane and --expand
    were ignored without a word (cells "grown by 10 µm" were the nuclei as they are)."""
    he = data_path("he_patches", "stardist_histo.jpg")
    for extra, named in ((["--expand", "10"], "--expand applies"),
                         (["--nuclear-channel", "DAPI", "--membrane", "CD45"], "--nuclear-channel, --membrane apply")):
        r = _cli("quantify", he, "--slide-mpp", "0.5", "-o", tmp_path / "c.h5ad", *extra, "--no-progress")
        assert r.returncode == 1 and named in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert not os.listdir(tmp_path)
    r = _cli("quantify", he, "--slide-mpp", "0.5", "-o", tmp_path / "c.h5ad", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert anndata.read_h5ad(tmp_path / "c.h5ad").n_obs > 100


def test_quantify_names_the_option_of_an_expansion_that_is_not_a_length():
    """--expand nan / inf / -1 were refused by SegmentCells ("expand_um must be a finite number"), a name the user
    never typed; the command line names its own option now, before anything is read."""
    for v in ("nan", "inf", "-1", "x"):
        r = _cli("quantify", MIBI, "-o", "unused.h5ad", f"--expand={v}")
        assert r.returncode == 2 and "argument --expand: " in r.stderr and "SegmentCells" not in r.stderr, r.stderr
