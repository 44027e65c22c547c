"""Review of the single-cell layer: manual thresholds named loosely, the tile overlap `histoflow quantify`
can give, channels named by wavelength, NaN medians, label images of the wrong kind, and membrane cell
borders that do not depend on the tiling."""
import os
import subprocess
import sys
import warnings

import anndata
import numpy as np
import pandas as pd
import pytest
import tifffile
from datafiles import data_path

from histoflow.cli import main
from histoflow.errors import ParameterError

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


def _ome(path, channels, names, mpp=0.5):
    tifffile.imwrite(path, channels, ome=True, photometric="minisblack",
                     metadata={"axes": "CYX", "Channel": {"Name": names}, "PhysicalSizeX": mpp, "PhysicalSizeY": mpp})
    return str(path)


def _nuclei_image(size=300):
    """(3, size, size) uint16: round nuclei (r = 6 px) every 40 px in channel 1, a ring of stain around each
    in channels 0 and 2; and the number of nuclei."""
    a = np.zeros((3, size, size), np.uint16)
    yy, xx = np.mgrid[:size, :size]
    n = 0
    for cy in range(20, size, 40):
        for cx in range(20, size, 40):
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            a[1][d2 <= 36] = 1000
            a[0][(d2 <= 100) & (d2 > 36)] = 500
            a[2][d2 <= 100] = 100
            n += 1
    return a, n


# ------------------------------------------------------------------ 1. phenotype --thresholds, loose names
def test_manual_thresholds_take_loose_channel_names(tmp_path, capsys):
    """A threshold for "Ki67" is the channel "Ki67 (151)", also when no rule uses it: it was refused as
    "not among the gated channels" (the gated list held the exact names)."""
    rng = np.random.default_rng(0)
    var = ["HH3 (89)", "CD3 (159)", "Ki67 (151)"]
    X = rng.gamma(2.0, 2.0, (200, 3)).astype(np.float32)
    obs = pd.DataFrame({"slide": pd.Categorical(["s1"] * 200)}, index=[f"c{i}" for i in range(200)])
    anndata.AnnData(X=X, obs=obs, var=pd.DataFrame(index=var)).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "rules.yaml").write_text("steps:\n  - {assign: T, when: CD3}\n")
    gated = {}
    for key, text in (("loose", "Ki67: 3\n"), ("exact", "Ki67 (151): 3\n"), ("slide", "s1: {ki-67: 3}\n")):
        (tmp_path / f"{key}.yaml").write_text(text)
        out = tmp_path / f"{key}.h5ad"
        assert main(["phenotype", str(tmp_path / "cells.h5ad"), "--rules", str(tmp_path / "rules.yaml"),
                     "--thresholds", str(tmp_path / f"{key}.yaml"), "-o", str(out), "--png", "none"]) == 0, \
            capsys.readouterr().err
        a = anndata.read_h5ad(out)
        g = a.uns["gating"]
        j = list(g["channels"]).index("Ki67 (151)")
        assert g["thresholds"][0, j] == 3.0 and g["sources"][0, j] == "manual"
        np.testing.assert_array_equal(a.layers["positive"][:, 2], X[:, 2] > 3)
        gated[key] = list(g["channels"])
    assert gated["loose"] == gated["exact"] == gated["slide"] == ["CD3 (159)", "Ki67 (151)"]
    # a name that is no channel is still refused, naming the thresholds file
    (tmp_path / "bad.yaml").write_text("Ki76: 3\n")
    assert main(["phenotype", str(tmp_path / "cells.h5ad"), "--rules", str(tmp_path / "rules.yaml"),
                 "--thresholds", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "b.h5ad"), "--png", "none"]) == 1
    err = capsys.readouterr().err
    assert "bad.yaml: " in err and "'Ki76'" in err


# ------------------------------------------------------------------ 2. quantify: the overlap a tile leaves room for
def test_quantify_warns_when_the_tile_is_too_small_for_the_overlap_cells_need(tmp_path, capsys):
    """The default overlap (84 px at 0.5 µm/px, --expand 3) is at most half the tile: --tile 128 gives 64 px,
    and cells near tile edges may then differ. That was silent; now it is said, with the --tile that avoids it."""
    a, _ = _nuclei_image()
    slide = _ome(tmp_path / "img.ome.tif", a, ["DAPI", "CD3", "CD45"])
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["quantify", slide, "-o", str(tmp_path / "a.h5ad"), "--nuclear-channel", "CD3", "--tile", "128",
                     "--png", "none", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "histoflow: warning: --tile 128 leaves room for a tile overlap of 64 px, less than the 84 px" in err
    assert "use --tile 168 or more" in err
    assert not [w for w in caught if "tile overlap" in str(w.message)]  # said once, not again by the run
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["quantify", slide, "-o", str(tmp_path / "b.h5ad"), "--nuclear-channel", "CD3", "--tile", "168",
                     "--png", "none", "--no-progress", "--overwrite"]) == 0
    assert "warning" not in capsys.readouterr().err and not caught
    # the user's own --overlap below what cells need is said too, in the command's words
    exe = os.path.join(os.path.dirname(sys.executable), "histoflow")  # the console script, as a user runs it
    r = subprocess.run([exe, "quantify", slide, "-o", str(tmp_path / "c.h5ad"),
                        "--nuclear-channel", "CD3", "--tile", "128", "--overlap", "48", "--png", "none",
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "histoflow: warning:" in r.stderr and "need 84 px of tile overlap" in r.stderr
    assert "Run with --tile 168 or more and --overlap 84" in r.stderr and "overlap=" not in r.stderr


# ------------------------------------------------------------------ 3. --nuclear-channel by wavelength
def test_nuclear_channel_named_by_a_number_is_a_name_first(tmp_path, capsys):
    """Channels named by wavelength: '--nuclear-channel 405' is the channel '405', not index 405 ("out of
    range"); digits that name no channel are still an index."""
    a, n = _nuclei_image()
    slide = _ome(tmp_path / "wl.ome.tif", a, ["488", "405", "647"])
    tables = []
    for i, channel in enumerate(("405", "1")):
        out = tmp_path / f"c{i}.h5ad"
        assert main(["quantify", slide, "-o", str(out), "--nuclear-channel", channel, "--png", "none",
                     "--no-progress"]) == 0, capsys.readouterr().err
        tables.append(anndata.read_h5ad(out))
    assert tables[0].n_obs == tables[1].n_obs == n
    np.testing.assert_array_equal(tables[0].X, tables[1].X)
    # a cell's nuclear channel (405) is bright: the nuclei were found in it
    assert (tables[0].X[:, 1] > 200).all()
    assert main(["quantify", slide, "-o", str(tmp_path / "x.h5ad"), "--nuclear-channel", "7", "--png", "none",
                 "--no-progress"]) == 1
    assert "channel 7 out of range: the image has 3 channels ['488', '405', '647']" in capsys.readouterr().err


def test_missing_nuclear_channel_names_the_option(tmp_path, capsys):
    a, _ = _nuclei_image(120)
    slide = _ome(tmp_path / "no_dna.ome.tif", a, ["CD8", "CD3", "CD45"])
    assert main(["quantify", slide, "-o", str(tmp_path / "x.h5ad"), "--png", "none", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "no channel looks like a nuclear stain among ['CD8', 'CD3', 'CD45']; name it with --nuclear-channel" in err
    assert "nuclear_channel=" not in err


# ------------------------------------------------------------------ 4. medians with NaN
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
def test_median_is_nan_for_cells_with_nan_pixels_as_numpy(dtype):
    """Mean and max of a cell with a NaN pixel are NaN; its median was taken over the other pixels."""
    from histoflow.transforms.quantify import quantify_cells

    rng = np.random.default_rng(1)
    labels = np.repeat(np.repeat(np.arange(1, 26).reshape(5, 5), 7, 0), 6, 1)  # 25 cells, 42 px each
    labels[:3, :] = 0
    img = rng.normal(10, 3, labels.shape + (2,)).astype(dtype)
    img[10, 10, 0] = img[20, 7, 1] = img[33, 29, 0] = img[0, 0, 1] = np.nan  # (0, 0): background
    t = quantify_cells(img, labels)
    n = int(labels.max())
    medians = np.array([np.median(img[labels == k], 0) for k in range(1, n + 1)]).astype(np.float32)
    assert np.isnan(medians).sum() == 3
    if dtype == "float16":  # numpy's median is float16 there, rounded; ours is float32
        np.testing.assert_allclose(t["median"], medians, rtol=1e-3)  # NaN where numpy's is NaN
    else:
        np.testing.assert_array_equal(t["median"], medians)  # NaN where numpy's is NaN, equal elsewhere
    np.testing.assert_array_equal(np.isnan(t["mean"]), np.isnan(medians))
    np.testing.assert_array_equal(np.isnan(t["max"]), np.isnan(medians))


# ------------------------------------------------------------------ 5. label images of the wrong kind
def test_label_images_of_the_wrong_kind_are_refused_clearly():
    from histoflow.transforms.objects import keep_owned, relabel_sequential
    from histoflow.transforms.quantify import quantify_cells

    img = np.arange(64, dtype=np.uint16).reshape(8, 8)
    lab = np.zeros((8, 8), np.int32)
    lab[:4, :4], lab[5:, 5:] = 3, 7
    want = quantify_cells(img, lab)
    # integers of any kind with no negative value, and floats holding whole numbers, are label images
    for ok in (lab.astype(np.uint8), lab.astype(np.uint64), lab.astype(np.int64), lab.astype(np.float32)):
        got = quantify_cells(img, ok)
        for k in ("mean", "median", "max", "area", "centroid"):
            np.testing.assert_array_equal(got[k], want[k])
    # the rest: a ParameterError naming the argument, the rule and the dtype (was IndexError / ValueError)
    cases = ((lab > 0, "dtype bool: a bool mask has no object ids"),
             (lab - 1, "dtype int32: it has negative values (down to -1)"),
             (lab + 0.5, "dtype float64: it holds values that are not whole numbers"),
             (np.where(lab > 0, np.nan, 0), "dtype float64: it holds values that are not whole numbers"))
    for bad, detail in cases:
        with pytest.raises(ParameterError, match="must hold non-negative integers") as e:
            quantify_cells(img, bad)
        assert str(e.value).startswith("quantify_cells: labels: ") and detail in str(e.value)
        with pytest.raises(ParameterError, match=f"nuclei: .*{detail[:12]}"):
            quantify_cells(img, lab, nuclei=bad)
        with pytest.raises(ParameterError, match="keep_owned: labels: "):
            keep_owned(bad, (0, 0, 4, 4))
        with pytest.raises(ParameterError, match="must hold non-negative integers"):
            relabel_sequential(bad)
        with pytest.raises(ParameterError, match="same_ids"):
            relabel_sequential(lab, bad)


def test_quantify_cells_transform_names_the_mask_of_the_wrong_kind():
    from histoflow.core.tile import Tile
    from histoflow.transforms.quantify import QuantifyCells

    tile = Tile(image=np.ones((8, 8, 2), np.uint16), coords=(0, 0))
    tile.masks["cells"] = np.ones((8, 8), bool)
    with pytest.raises(ParameterError, match="QuantifyCells: mask 'cells': a label image must hold non-negative"):
        QuantifyCells().apply(tile)


# ------------------------------------------------------------------ 6. membrane borders and the tiling
def test_membrane_cell_borders_do_not_depend_on_the_tiling():
    """The same nuclei and membrane signal give the same cells in a tile (with the overlap `histoflow quantify`
    gives: SegmentCells.min_overlap, twice a whole cell) as in the whole image. The watershed broke ties (zero-membrane
    plateaus) in the order its heap held pixels, which depends on the whole image: 10 px of 2 cells changed owner
    at 256 px tiles (9 px of one cell in the tile at x=296, y=592). Now the flood's order is strict and local."""
    from histoflow.core.slide import SlideData
    from histoflow.transforms.multiplex import SegmentCells

    with SlideData(MIBI) as s:
        seg = SegmentCells(membrane_channels=["NaK ATPase", "Membrane"])
        seg.fit_slide(s)
        mpp = float(s.mpp[0])
        image = np.asarray(s.reader.read_region((0, 0), 0, s.dimensions))
        overlap = seg.min_overlap(mpp)  # twice a whole cell, as `histoflow quantify` gives
        grid = list(s.grid(256, overlap=overlap))
    assert overlap == 108
    whole, whole_nuc = seg.cells(image, mpp)
    H, W = whole.shape
    kept, differing, tiles = 0, [], set()
    for spec in grid:
        x0, y0 = spec.x, spec.y
        x1, y1 = min(x0 + 256, W), min(y0 + 256, H)
        cx0, cy0, cx1, cy1 = spec.core
        cells, nuc = seg.F(image[y0:y1, x0:x1], mpp, (cx0, cy0, min(cx1, x1 - x0), min(cy1, y1 - y0)))
        tiles.add((x0, y0))
        for k in range(1, int(nuc.max()) + 1):
            ids = np.unique(whole_nuc[y0:y1, x0:x1][nuc == k])
            assert len(ids) == 1 and ids[0] > 0  # the same nucleus
            j = ids[0]
            ys, xs = np.nonzero(whole == j)
            assert ys.min() >= y0 and ys.max() < y1 and xs.min() >= x0 and xs.max() < x1  # whole in the tile
            n = int(((whole[y0:y1, x0:x1] == j) != (cells == k)).sum())
            kept += 1
            if n:
                differing.append((x0, y0, int(j), n))
    assert (296, 592) in tiles and kept == int(whole_nuc.max()) == 339
    assert differing == []


def test_a_failed_table_write_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    """phenotype wrote <out>.tmp-PID.h5ad and renamed it: a failed write left the temporary file behind and
    raised the bare error."""
    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"slide": pd.Categorical(["s1"] * 50)}, index=[f"c{i}" for i in range(50)])
    anndata.AnnData(X=rng.gamma(2.0, 2.0, (50, 2)).astype(np.float32), obs=obs,
                    var=pd.DataFrame(index=["CD3", "CD8"])).write_h5ad(tmp_path / "cells.h5ad")
    (tmp_path / "rules.yaml").write_text("steps:\n  - {assign: T, when: CD3}\n")
    real = anndata.AnnData.write_h5ad

    def full_disk(self, path, *a, **kw):
        real(self, path, *a, **kw)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(anndata.AnnData, "write_h5ad", full_disk)
    assert main(["phenotype", str(tmp_path / "cells.h5ad"), "--rules", str(tmp_path / "rules.yaml"),
                 "-o", str(tmp_path / "out.h5ad"), "--png", "none"]) == 1
    assert "out.h5ad: cannot write it (No space left on device)" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cells.h5ad", "rules.yaml"]


def test_quantify_cells_names_the_id_of_each_row():
    """Ids with gaps were renumbered silently and the rows came back without their ids: row k is the k-th
    smallest id, now said by the `label` column."""
    from histoflow.transforms.quantify import quantify_cells

    lab = np.zeros((20, 20), np.int32)
    img = np.zeros((20, 20), np.uint8)
    lab[2:6, 2:6], img[2:6, 2:6] = 7, 10
    lab[10:14, 10:18], img[10:14, 10:18] = 3, 2
    t = quantify_cells(img, lab)
    assert t["label"].tolist() == [3, 7] and t["mean"][:, 0].tolist() == [2.0, 10.0]
    assert t["area"].tolist() == [32.0, 16.0]
    assert quantify_cells(img, np.zeros_like(lab))["label"].shape == (0,)


def test_label_ids_far_above_the_object_count_are_measured():
    """A label image with large ids (hashed, or numbered across a whole study) made lookup tables as long as the
    largest id: 10**13 asked numpy for 9 TiB and failed with a MemoryError. The same cells with ids 1..n give
    the same table."""
    from histoflow.transforms.objects import relabel_sequential
    from histoflow.transforms.quantify import quantify_cells

    rng = np.random.default_rng(0)
    img = rng.integers(0, 1000, (40, 40, 2)).astype(np.uint16)
    small = np.zeros((40, 40), np.int64)
    small[2:9, 3:12], small[20:30, 5:9], small[30:38, 25:39] = 1, 2, 3
    big_ids = np.array([0, 10 ** 13, 7, 2 ** 62], np.int64)
    big = big_ids[small]
    nuclei = np.where(np.isin(np.arange(40)[:, None] % 3, [0]), big, 0)
    a, b = quantify_cells(img, small, nuclei=np.where(nuclei > 0, small, 0)), quantify_cells(img, big, nuclei=nuclei)
    assert b["label"].tolist() == [7, 10 ** 13, 2 ** 62]
    order = [1, 0, 2]  # rows follow the ids' order
    for k in ("mean", "median", "area", "centroid", "nucleus_area"):
        np.testing.assert_array_equal(b[k], a[k][order])
    out, other = relabel_sequential(big, np.array([[10 ** 13, 5]]))
    assert out.max() == 3 and (out[small == 2] == 1).all() and other.tolist() == [[2, 0]]
    # 64-bit hashes: uint64 ids at and above 2**63 (wrapped negative as int64) and ids a step apart above 2**53
    # (merged when compared as float64) stay apart
    hashed = np.array([0, 2 ** 63 + 1, 2 ** 63 + 3, 2 ** 60 + 1], np.uint64)[small]
    c = quantify_cells(img, hashed)
    assert c["label"].dtype == np.uint64 and c["label"].tolist() == [2 ** 60 + 1, 2 ** 63 + 1, 2 ** 63 + 3]
    np.testing.assert_array_equal(c["area"], a["area"][[2, 0, 1]])
    near = np.array([0, 2 ** 60 + 1, 2 ** 60 + 2, 2 ** 60 + 3], np.uint64)[small]
    assert np.unique(relabel_sequential(near)).tolist() == [0, 1, 2, 3]
