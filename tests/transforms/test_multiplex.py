"""Multiplex segmentation and single-cell quantification on the real MIBI image (22 channels, uint16)."""
import warnings

import anndata
import numpy as np
import pytest
from datafiles import SVS, data_path

from histoflow.core.slide import SlideData
from histoflow.store import read_h5path
from histoflow.transforms import NucleusDetectionHE, Pipeline
from histoflow.transforms.multiplex import CollapseRunsCODEX, CollapseRunsVectra, SegmentCells, SegmentNuclei
from histoflow.transforms.objects import find_channel
from histoflow.transforms.quantify import QuantifyCells, quantify_cells

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


@pytest.fixture(scope="module")
def mibi():
    with SlideData(MIBI) as s:
        seg = SegmentCells(membrane_channels=["Membrane"])
        seg.fit_slide(s)
        image = s.reader.read_region((0, 0), 0, s.dimensions)
        return s.mpp[0], list(s.reader.channel_names), image, seg


def test_find_channel():
    names = ["Background (128)", "HH3 (89)", "CD3 (159)"]
    assert find_channel(names, "HH3") == 1 and find_channel(names, "cd3") == 2 and find_channel(names, -1) == 2
    with pytest.raises(KeyError, match="no channel 'DAPI'"):
        find_channel(names, "DAPI")
    # as rule tables match: punctuation and spaces aside; several matches say so
    assert find_channel(["Membrane", "NaK ATPase (23)"], "NaKATPase") == 1
    assert find_channel(["Pan Keratin"], "Pan-Keratin") == 0
    with pytest.raises(KeyError, match=r"'CD3' matches several channels: \['CD3 \(159\)', 'CD3 \(160\)'\]"):
        find_channel(["CD3 (159)", "CD3 (160)", "HH3"], "CD3")


def test_nuclear_channel_found_by_its_usual_names():
    from histoflow.transforms.multiplex import nuclear_channel_index

    for names, want in ((["CD3", "DNA1"], 1), (["CD3", "dsDNA (89)"], 1), (["x", "DAPI1"], 1),
                        (["Hoechst33342"], 0), (["CD45 (89)", "Ir191 (DNA1)"], 1), (["HH3 (89)", "CD3"], 0)):
        assert nuclear_channel_index(names) == want, names
    with pytest.raises(KeyError, match="no channel looks like a nuclear stain"):
        nuclear_channel_index(["CD3", "H3K27me3"])
    # DNA-PK is a DNA-repair kinase, not a DNA stain; numbered DNA channels and tagged DAPI still are
    with pytest.raises(KeyError, match="no channel looks like a nuclear stain"):
        nuclear_channel_index(["DNA-PK", "CD3", "Ki67"])
    for names, want in ((["DNA-PK", "DNA-1"], 1), (["CD3", "DAPI-final"], 1), (["DNA_cycle2", "CD3"], 0),
                        (["DNA-PKcs", "HH3"], 1), (["CD3", "DNA-PKcs_S2056", "DNA1", "DNA2"], 2),
                        (["CD3", "DNA-PK2", "DNA1"], 2), (["CD3", "DNA_damage_53BP1", "DNA1"], 2),
                        (["CD3", "DNA intercalator"], 1), (["CD3", "DNA round 2"], 1)):
        assert nuclear_channel_index(names) == want, names


def test_quantify_cells_parameters_are_checked():
    from histoflow.errors import ParameterError
    from histoflow.transforms.quantify import _unique

    for kw in ({"brightfield": "false"}, {"brightfield": "no"}, {"stats": "median"}, {"stats": ["mean", 3]}):
        with pytest.raises(ParameterError, match="QuantifyCells"):
            QuantifyCells(**kw)
    assert QuantifyCells(brightfield=False).brightfield is False
    assert _unique(["CD3", "CD3", "CD3-1"]) == ["CD3", "CD3-2", "CD3-1"]


def test_nuclei_look_like_nuclei(mibi):
    mpp, names, image, seg = mibi
    cells, nuc = seg.F(image, mpp)
    n = int(nuc.max())
    assert 200 < n < 600
    area = np.bincount(nuc.ravel())[1:] * mpp ** 2
    assert 25 < np.median(area) < 120          # µm²: nuclei of about 6-12 µm across
    # cells grow from their nuclei and keep their ids; nuclear stain is brighter inside nuclei
    assert set(np.unique(cells)) == set(np.unique(nuc))
    assert np.all(np.bincount(cells.ravel(), minlength=n + 1)[1:] >= np.bincount(nuc.ravel(), minlength=n + 1)[1:])
    hh3 = image[..., names.index("HH3 (89)")].astype(float)
    assert hh3[nuc > 0].mean() > 4 * hh3[cells == 0].mean()


def test_cells_grown_along_a_membrane_stay_within_their_own_reach(mibi):
    """expand_um bounds each cell from its own nucleus: the membrane watershed alone let cells flood their
    neighbours' reach (on this image 197 of 339 cells did, up to 31 px where 7.7 px was allowed)."""
    from scipy import ndimage as ndi

    mpp, names, image, seg = mibi
    cells, nuc = seg.F(image, mpp)
    reach = seg.expand_um / mpp
    for value, sl in enumerate(ndi.find_objects(cells), start=1):
        if sl is None:
            continue
        pad = int(reach) + 2
        y0, x0 = max(sl[0].start - pad, 0), max(sl[1].start - pad, 0)
        y1, x1 = sl[0].stop + pad, sl[1].stop + pad
        d = ndi.distance_transform_edt(nuc[y0:y1, x0:x1] != value)
        assert d[cells[y0:y1, x0:x1] == value].max() <= reach, value
    # the border between two touching cells still follows the membrane
    from histoflow.transforms.multiplex import grow_cells

    two = np.zeros((5, 30), np.int32)
    two[:, 0:3], two[:, 18:21] = 1, 2
    membrane = np.zeros((5, 30), np.float32)
    membrane[:, 16] = 10
    row = grow_cells(two, 8, membrane=membrane)[2]
    assert list(row[:11]) == [1] * 11 and not row[11:16].any() and list(row[16:29]) == [2] * 13


def test_cell_borders_do_not_depend_on_the_tiling_with_several_membrane_channels(tmp_path):
    """Each membrane channel is scaled once per slide (fit_slide), not per tile: the same cells, the same
    areas, whole or tiled."""
    pipe = Pipeline([SegmentCells(membrane_channels=["Membrane", "NaK ATPase", "ECadherin"]),
                     QuantifyCells(nucleus_mask="nuclei")])
    tables = []
    for tile in (1024, 256):
        with SlideData(MIBI) as s:
            out = s.run(pipe, str(tmp_path / f"m{tile}.h5path"), tile_size=tile, overlap=pipe.min_overlap(s.mpp[0]),
                        executor="inprocess", progress=False)
        with read_h5path(out) as h:
            c = h.cells
        tables.append(dict(zip(map(tuple, np.round(c.obsm["spatial"]).astype(int)), np.asarray(c.obs["area"]))))
    whole, tiled = tables
    common = set(whole) & set(tiled)
    assert len(whole) == len(tiled) and len(common) >= len(whole) - 2
    assert all(whole[k] == pytest.approx(tiled[k]) for k in common)
    bad = SegmentCells(membrane_channels=["Membran"])
    with SlideData(MIBI) as s, pytest.raises(KeyError, match="no channel 'Membran'"):
        bad.fit_slide(s)  # a misspelt channel fails before any tile


def test_cell_count_does_not_depend_on_tile_size(tmp_path, mibi):
    mpp, names, image, seg = mibi
    whole = int(seg.F(image, mpp)[1].max())
    pipe = Pipeline([SegmentCells(membrane_channels=["Membrane"]), QuantifyCells(nucleus_mask="nuclei")])
    counts = {}
    for tile in (256, 512):
        with SlideData(MIBI) as s:
            out = s.run(pipe, str(tmp_path / f"t{tile}.h5path"), tile_size=tile, overlap=pipe.min_overlap(s.mpp[0]),
                        executor="inprocess", progress=False)
        with read_h5path(out) as h:
            counts[tile] = h.cells.n_obs
            if tile == 256:
                cells = h.cells
    # tiles that overhang the image's edge are segmented on the image part only: the same cells as at once
    assert all(c == whole for c in counts.values()), (counts, whole)
    # the table: native intensities per channel, morphology in µm, level-0 centroids, slide and tile ids
    assert list(cells.var_names) == names and cells.X.dtype == np.float32
    assert {"median", "max"} <= set(cells.layers)
    xy = cells.obsm["spatial"]
    assert xy.min() >= 0 and xy[:, 0].max() < 1024 and xy[:, 1].max() < 1024
    assert len(np.unique(np.round(xy).astype(int), axis=0)) == cells.n_obs  # no cell twice
    assert (cells.obs["slide"] == "ark_fov8_mibitiff_22ch").all() and cells.obs["tile"].nunique() > 4
    assert 30 < cells.obs["area"].median() < 300 and (cells.obs["nucleus_area"] <= cells.obs["area"] + 1e-3).all()
    assert cells.uns["histoflow"]["units"] == "um"
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    back = anndata.read_h5ad(path)
    np.testing.assert_array_equal(back.X, cells.X)
    assert list(back.obs.columns) == list(cells.obs.columns)


def test_quantify_cells_matches_direct_measurement(mibi):
    mpp, names, image, seg = mibi
    _, nuc = seg.F(image[:300, :300], mpp)
    t = quantify_cells(image[:300, :300], nuc)
    for k in (1, nuc.max() // 2, nuc.max()):
        px = image[:300, :300][nuc == k]
        np.testing.assert_allclose(t["mean"][k - 1], px.mean(0), rtol=1e-5)
        np.testing.assert_allclose(t["median"][k - 1], np.median(px, 0))
        np.testing.assert_allclose(t["max"][k - 1], px.max(0))
        ys, xs = np.nonzero(nuc == k)
        np.testing.assert_allclose(t["centroid"][k - 1], [xs.mean(), ys.mean()])
        assert t["area"][k - 1] == len(px)


@pytest.mark.parametrize("dtype", ["uint16", "float32", "int16", "uint8"])
def test_quantify_cells_every_cell_equals_numpy(mibi, dtype):
    """Means, medians (the mean of the middle two for even counts) and maxima of every cell, as numpy gives
    them cell by cell, in the image's own dtype (the grouped sorts must not mix cells or values)."""
    mpp, names, image, seg = mibi
    img = image[:400, :400]
    cells, nuc = seg.F(img, mpp)
    if dtype == "float32":
        img = img.astype(np.float32) / 7
    elif dtype == "int16":
        img = (img.astype(np.int32) - 300).astype(np.int16)   # negative values too
    elif dtype == "uint8":
        img = np.minimum(img, 255).astype(np.uint8)
    t = quantify_cells(img, cells, nuclei=nuc)
    n = int(cells.max())
    assert n > 50 and t["mean"].shape == (n, img.shape[2])
    assert any((cells == k).sum() % 2 == 0 for k in range(1, n + 1))   # even counts are exercised
    for k in range(1, n + 1):
        px = img[cells == k]
        np.testing.assert_array_equal(t["median"][k - 1], np.median(px, 0).astype(np.float32))
        np.testing.assert_array_equal(t["max"][k - 1], px.max(0).astype(np.float32))
        np.testing.assert_allclose(t["mean"][k - 1], px.astype(np.float64).mean(0), rtol=1e-6)
        assert t["nucleus_area"][k - 1] == (nuc == k).sum()


def test_brightfield_quantification_uses_stain_densities(tmp_path):
    pipe = Pipeline([NucleusDetectionHE(), QuantifyCells(mask_name="nuclei")])
    with SlideData(SVS) as s:
        out = s.run(pipe, str(tmp_path / "he.h5path"), tile_size=512, overlap=32, level=0, executor="inprocess",
                    progress=False)
    with read_h5path(out) as h:
        cells = h.cells
    assert list(cells.var_names) == ["hematoxylin_od", "eosin_od"]
    assert cells.n_obs > 500
    # nuclei are stained by hematoxylin: more of it than of eosin in the typical nucleus
    h, e = cells.X[:, 0], cells.X[:, 1]
    assert np.median(h) > np.median(e) and np.median(h) > 0.5


def test_collapse_runs():
    planes = np.arange(2 * 3 * 4, dtype=np.uint16)[None, None, :].repeat(5, 0).repeat(6, 1)  # z=2, cyc=3, ch=4
    out = CollapseRunsCODEX(n_cycles=3, channels_per_cycle=4, n_z=2, z=1).F(planes)
    assert out.shape == (5, 6, 12) and out[0, 0, 0] == 12 and out[0, 0, -1] == 23
    with pytest.raises(ValueError, match="expected 3 cycles x 4 channels x 1 z = 12"):
        CollapseRunsCODEX(n_cycles=3).F(planes)
    assert CollapseRunsVectra(n_channels=2).F(planes).shape == (5, 6, 2)


def test_segment_nuclei_errors():
    with pytest.raises(KeyError, match="no channel looks like a nuclear stain"):
        SegmentNuclei().nuclei(np.zeros((32, 32, 2), np.uint16), 0.5, names=["CD3", "CD8"])
    with pytest.warns(UserWarning, match="flat"):
        lab = SegmentNuclei(nuclear_channel=0).F(np.zeros((32, 32, 1), np.uint16), 0.5)
    assert lab.max() == 0


def test_vectra_qptiff_cells(tmp_path):
    """DAPI + two Opal channels, 8-bit: the same pipeline, names from the file."""
    pipe = Pipeline([SegmentCells(), QuantifyCells(nucleus_mask="nuclei")])
    with SlideData(data_path("wsi", "qptiff", "small_vectra.qptiff")) as s:
        assert s.slide_type.name == "Vectra"
        out = s.run(pipe, str(tmp_path / "v.h5path"), tile_size=512, overlap=pipe.min_overlap(s.mpp[0]),
                    executor="inprocess", progress=False)
    with read_h5path(out) as h:
        cells = h.cells
    assert list(cells.var_names) == ["DAPI", "FITC", "Cy3"] and cells.n_obs > 500
    # DAPI is the nuclear stain: brighter inside the measured nuclei than across the image
    with SlideData(data_path("wsi", "qptiff", "small_vectra.qptiff")) as s:
        dapi = s.reader.read_region((0, 0), 0, s.dimensions)[..., 0]
    assert np.median(cells.X[:, 0]) > 1.5 * dapi.mean()
    assert 30 < cells.obs["area"].median() < 400
    # planes dropped by CollapseRunsVectra: later steps and the store name the channels that are left
    pipe = Pipeline([CollapseRunsVectra(n_channels=2), SegmentCells(nuclear_channel="DAPI"),
                     QuantifyCells(nucleus_mask="nuclei")])
    with SlideData(data_path("wsi", "qptiff", "small_vectra.qptiff")) as s:
        out = s.run(pipe, str(tmp_path / "v2.h5path"), tile_size=1024, overlap=pipe.min_overlap(s.mpp[0]),
                    executor="inprocess", progress=False)
    with read_h5path(out) as h:
        assert list(h.cells.var_names) == ["DAPI", "FITC"] and h.slide["channel_names"] == ["DAPI", "FITC"]
        assert h.tile(0).image.shape[2] == 2


def test_codex_focal_plane_is_chosen_once_per_slide(tmp_path):
    """With z=None every tile of a slide gets the same plane (the sharpest over the slide), recorded per tile;
    each tile used to pick its own, mixing focal planes in one cell table."""
    import tifffile
    from scipy import ndimage as ndi

    with SlideData(MIBI) as s:
        real = s.reader.read_region((0, 0), 0, (1024, 1024))[..., :4].astype(np.float32)
    soft = ndi.gaussian_filter(real, (3, 3, 0))
    z0, z1 = soft.copy(), real.copy()  # z1 in focus ...
    z0[:256, :256], z1[:256, :256] = real[:256, :256], soft[:256, :256]  # ... except in one corner
    stack = np.concatenate([z0, z1], -1).astype(np.uint16)  # z outermost: 2 z x 1 cycle x 4 channels
    path = tmp_path / "codex.tif"
    tifffile.imwrite(path, np.moveaxis(stack, -1, 0), photometric="minisblack", metadata={"axes": "CYX"})
    t = CollapseRunsCODEX(n_cycles=1, channels_per_cycle=4, n_z=2)
    assert np.array_equal(t.F(stack[:256, :256]), stack[:256, :256, :4])  # unfitted: the tile's own sharpest
    with SlideData(path, slide_type="CODEX") as slide:
        out = slide.run(Pipeline([t]), tmp_path / "c.h5path", tile_size=256, executor="inprocess", progress=False)
    with read_h5path(out) as h:
        tiles = list(h)
    assert len(tiles) == 16 and {tile.labels["z_plane"] for tile in tiles} == {1}
    corner = next(tile for tile in tiles if tuple(tile.coords) == (0, 0))
    np.testing.assert_array_equal(corner.image, stack[:256, :256, 4:])


def test_collapsed_codex_planes_keep_their_names():
    names = [f"z{z}_c{c}_{m}" for z in range(2) for c in range(3) for m in ("DAPI", "CD3", "CD8", "CD20")]
    t = CollapseRunsCODEX(n_cycles=3, channels_per_cycle=4, n_z=2, z=1)
    assert t.channel_names_out(names) == names[12:]
    assert Pipeline([t, CollapseRunsVectra(n_channels=5)]).channel_names_out(names) == names[12:17]
    assert CollapseRunsCODEX(n_cycles=3, n_z=2).channel_names_out(names) == names[:12]


def test_quantify_gapped_ids_and_downsampled_tiles(tmp_path, mibi):
    from histoflow.core.tile import Tile
    from histoflow.transforms.quantify import quantify_cells

    lab = np.zeros((20, 20), np.int32)
    lab[2:6, 2:6], lab[10:13, 10:13] = 3, 7  # ids with gaps, nuclei alike
    nuc = np.where(lab > 0, lab, 0)
    nuc[2, 2] = 0
    q = quantify_cells(np.ones((20, 20, 1), np.uint8), lab, nuclei=nuc)
    assert q["nucleus_area"].tolist() == [15, 9] and q["area"].tolist() == [16, 9]
    t = Tile(image=np.ones((20, 20, 1), np.uint8), coords=(100, 40), downsample=2.0, masks={"cells": lab.copy()})
    QuantifyCells().apply(t)
    assert np.array_equal(np.unique(t.masks["cells"]), [0, 1, 2])  # stored ids are the table's rows
    # tile pixel i covers level-0 [100 + 2i, 100 + 2i + 2): the 4 x 4 cell at 2..5 spans 104..111, centre 107.5
    np.testing.assert_allclose(t.cells["centroid"][0], [100 + 7.5, 40 + 7.5])


def test_quantify_cells_checks_shapes_and_keeps_float16_medians():
    """Labels of another size than the image gave silently wrong numbers (flat indices into the wrong
    grid); float16 medians summed the middle two in float16 and overflowed to inf."""
    from histoflow.errors import ParameterError

    image = np.full((10, 10, 1), 40000, np.float16)
    labels = np.zeros((10, 10), np.int32)
    labels[2:6, 2:6] = 1
    t = quantify_cells(image, labels)
    assert t["median"][0, 0] == 40000 and np.isfinite(t["median"]).all()
    with pytest.raises(ParameterError, match=r"labels \(5, 5\) must have the image's height and width \(10, 10\)"):
        quantify_cells(image, labels[:5, :5])
    assert SegmentCells(membrane_channels="Membrane").membrane_channels == ["Membrane"]


def test_slide_runs_warn_when_tiles_overlap_less_than_cells_need(tmp_path):
    """Cells cut by a tile's edge are kept in pieces by both tiles without enough overlap (376 cells instead
    of 339 on this image with 256 px tiles and no overlap): slide runs say so, and how much is needed."""
    import warnings

    pipe = Pipeline([SegmentCells(membrane_channels=["Membrane"]), QuantifyCells(nucleus_mask="nuclei")])
    with SlideData(MIBI) as s:
        need = pipe.min_overlap(s.mpp[0])
        assert need == SegmentCells().min_overlap(s.mpp[0]) > 0
        with pytest.warns(UserWarning, match=rf"SegmentCells finds objects that need {need} px of tile overlap.*"
                                             rf"with 0 px.*Run with overlap={need}"):
            out = s.run(pipe, str(tmp_path / "a.h5path"), tile_size=256, executor="inprocess", progress=False)
        with read_h5path(out) as h:
            pieces = h.cells.n_obs
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # enough overlap: no warning
            out = s.run(pipe, str(tmp_path / "b.h5path"), tile_size=256, overlap=need, executor="inprocess",
                        progress=False)
        with read_h5path(out) as h:
            whole = h.cells.n_obs
    assert pieces > whole


def test_tiles_written_by_hand_keep_their_cells_only_through_set_cells(tmp_path):
    """add_tile stores a tile's pixels, masks and labels, not its cell table (the slide's table needs every
    tile, de-duplicated: QuantifyCells makes it). A writer given tiles with cells and no table warns at
    close; collect + slide_cells + set_cells stores them, as SlideData.run does."""
    import warnings

    from histoflow.store import H5PathWriter

    with SlideData(MIBI) as slide:
        pipe = Pipeline([SegmentCells(membrane_channels=["Membrane"]), QuantifyCells()])
        pipe.fit_slide(slide)
        quant = pipe.steps[-1]
        tiles = [slide.read_tile(spec) for spec in list(slide.grid(512))[:2]]
        for t in tiles:
            pipe.apply(t)
            assert len(t.cells["centroid"]) > 20
    with pytest.warns(UserWarning, match=r"lost\.h5path: 2 tile\(s\) carried a cell table .*set_cells"):
        with H5PathWriter(tmp_path / "lost.h5path") as w:
            w.add_tiles(tiles)
    for t in tiles:
        quant.collect(t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with H5PathWriter(tmp_path / "kept.h5path") as w:
            w.add_tiles(tiles)
            w.set_cells(quant.slide_cells())
    with read_h5path(tmp_path / "kept.h5path") as h:
        assert h.cells.n_obs == sum(len(t.cells["centroid"]) for t in tiles) and len(h) == 2


def test_nuclei_at_their_own_overlap_are_kept_once(tmp_path):
    """SegmentNuclei's min_overlap was a large nucleus alone: a nucleus whose centroid lay on the line between
    two tiles' parts reached a tile's edge, where the smoothing differs, and both tiles kept it (340 nuclei for
    the whole image's 339, two of them sharing 579 pixels). Its overlap now includes the smoothing's reach."""
    from histoflow.store import read_h5path

    counts = []
    with SlideData(MIBI) as s:
        seg = SegmentNuclei("HH3")
        need = seg.min_overlap(s.mpp[0])
        for size, overlap in ((max(s.dimensions), 0), (256, need), (200, need)):
            out = s.run(Pipeline([SegmentNuclei("HH3"), QuantifyCells(mask_name="nuclei")]),
                        tmp_path / f"n{size}.h5path", tile_size=size, overlap=overlap, executor="inprocess",
                        progress=False)
            with read_h5path(out) as h:
                counts.append(h.cells.n_obs)
    assert counts[1] == counts[0] == counts[2], counts


def test_a_name_given_to_two_channels_is_an_error():
    """find_channel returned the first of two channels of the same name without a word; the docs promise an error
    listing them. (`auto` takes the first nuclear stain, as CODEX and CyCIF repeat DAPI in every cycle.)"""
    from histoflow.errors import ChannelError
    from histoflow.transforms.multiplex import nuclear_channel_index

    with pytest.raises(ChannelError, match=r"'DAPI' names several channels \(indices \[0, 2\]"):
        find_channel(["DAPI", "CD3", "DAPI"], "DAPI")
    assert find_channel(["DAPI", "CD3", "DAPI"], 2) == 2
    assert nuclear_channel_index(["DAPI", "CD3", "DAPI"]) == 0    # `auto`: CODEX/CyCIF repeat DAPI every cycle
    assert nuclear_channel_index(["DNA1", "CD3", "DNA2"]) == 0   # two stains of different names: the first


def test_nan_pixels_of_a_float_image_are_background(tmp_path):
    """One NaN pixel in a float nuclear channel stopped segmentation ('autodetected range of [nan, nan]'); the
    cells of the image are found as without it."""
    import tifffile

    img = tifffile.imread(data_path("fluorescence", "instanseg_Fluorescence_example.tif")).astype(np.float32)
    holed = img.copy()
    holed[0, 200:203, 200:203] = np.nan
    holed[0, 10, 400] = np.inf
    counts = []
    for name, a in (("clean", img), ("holed", holed)):
        path = tmp_path / f"{name}.ome.tif"
        tifffile.imwrite(path, a, metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3"]}})
        with SlideData(str(path)) as s:
            seg = SegmentCells(nuclear_channel="DAPI", membrane_channels=None)
            seg.fit_slide(s)
            nuclei, cells = seg.F(s.reader.read_region((0, 0), 0, s.dimensions), s.mpp[0] if s.mpp else None)
        counts.append(int(cells.max()))
    assert counts[0] > 10 and abs(counts[1] - counts[0]) <= 1, counts


def test_a_slide_without_cells_has_the_same_columns(tmp_path):
    """A slide where no cell was found lacked the nucleus_area column that any other table with a nucleus mask has
    (tables of several slides then did not line up)."""
    import tifffile

    tifffile.imwrite(tmp_path / "blank.ome.tif", np.zeros((2, 64, 64), np.uint16),
                     metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3"]}})
    tables = {}
    for nuclei in ("nuclei", None):
        q = QuantifyCells(mask_name="cells", nucleus_mask=nuclei)
        with SlideData(str(tmp_path / "blank.ome.tif")) as s:
            q.fit_slide(s)
        tables[nuclei] = q.slide_cells()
    assert tables["nuclei"].n_obs == 0 and "nucleus_area" in tables["nuclei"].obs.columns
    assert "nucleus_area" not in tables[None].obs.columns


def test_nan_pixels_are_never_inside_a_cell():
    """NaN pixels (a masked-out band of a float image) were set to 0, smoothed, and cells grew over them: 989
    cell pixels of a 256 px crop lay on NaN and 6 of its 28 cells had NaN means in every channel. They are
    background now, for the nuclei and the cells alike."""
    import tifffile

    img = np.moveaxis(tifffile.imread(MIBI), 0, -1).astype(np.float32)[:256, :256]
    with SlideData(MIBI) as s:
        names = list(s.reader.channel_names)
    img[:, 120:140, :] = np.nan
    seg = SegmentCells(nuclear_channel="HH3", membrane_channels=["Membrane"], expand_um=3)
    seg.channel_names_ = names
    cells, nuclei = seg.cells(img, 0.390625)
    band = np.zeros(img.shape[:2], bool)
    band[:, 120:140] = True
    assert cells.max() > 15 and not (cells[band] > 0).any() and not (nuclei[band] > 0).any()
    assert (cells[:, 110:120] > 0).any() and (cells[:, 140:150] > 0).any()  # cells reach the band's edges
    q = quantify_cells(img, cells)
    assert not np.isnan(q["mean"]).any()
    only_nuclear = img.copy()
    only_nuclear[:, :, :] = np.moveaxis(tifffile.imread(MIBI), 0, -1).astype(np.float32)[:256, :256]
    only_nuclear[:, 120:140, names.index("HH3 (89)")] = np.nan  # one channel used by the segmentation
    assert not (SegmentNuclei("HH3", mpp=0.390625).nuclei(only_nuclear, 0.390625, names)[band] > 0).any()


def test_cells_overlap_covers_the_nuclei_smoothing(tmp_path):
    """SegmentCells' min_overlap was its cells' reach alone: with expand_um=0 and sigma_um=2 it asked for 77 px
    where its nuclei need 80 (their smoothing's reach), and a run at that overlap kept 3 cells twice, without a
    warning. It is never less than the nuclei's now. (Clumps of touching nuclei wider than a large nucleus can
    still come out differently in two tiles at that overlap: one cell of 253 here.)"""
    for expand, sigma in ((0, 2), (0, 3), (3, 0.8), (1, 4)):
        for mpp in (0.39, 1.0):
            cells = SegmentCells(nuclear_channel="HH3", expand_um=expand, sigma_um=sigma)
            assert cells.min_overlap(mpp) >= SegmentNuclei("HH3", sigma_um=sigma).min_overlap(mpp)
    with SlideData(MIBI) as s:
        mpp = s.mpp[0]
        assert SegmentCells(nuclear_channel="HH3", expand_um=0, sigma_um=2).min_overlap(mpp) == 80
        counts = []
        for size, overlap in ((max(s.dimensions), 0), (256, 77), (256, 80)):
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                out = s.run(Pipeline([SegmentCells(nuclear_channel="HH3", expand_um=0, sigma_um=2),
                                      QuantifyCells(nucleus_mask="nuclei")]),
                            tmp_path / f"c{overlap}.h5path", tile_size=size, overlap=overlap, executor="inprocess",
                            progress=False)
            # the run at the former overlap is warned of now; at the new one, not
            assert any("overlap" in str(w.message) for w in said) == (overlap == 77)
            with read_h5path(out) as h:
                counts.append(h.cells.n_obs)
    assert counts[0] < counts[2] < counts[1], counts  # cells kept twice: fewer at the new overlap


def test_two_cell_tables_are_refused_before_the_first_tile():
    """A pipeline with two steps that make the slide's cell table ran every tile and only then failed, leaving a
    journal that no run could use. It is refused when made, as other clashes are."""
    from histoflow.errors import PipelineError

    with pytest.raises(PipelineError, match=r"QuantifyCells and QuantifyCells would both make the slide's cell "
                                            r"table \(an h5path holds one\)"):
        Pipeline([SegmentCells(nuclear_channel="HH3"), QuantifyCells(nucleus_mask="nuclei"),
                  QuantifyCells(mask_name="nuclei")])
    with pytest.raises(PipelineError, match="would both make the slide's cell table"):  # nested too
        Pipeline([SegmentCells(nuclear_channel="HH3"),
                  Pipeline([QuantifyCells(nucleus_mask="nuclei")], inputs=["cells", "nuclei"]),
                  QuantifyCells(mask_name="nuclei")])


def test_cell_areas_take_both_sides_of_a_pixel(tmp_path):
    """Areas were pixels x mpp_x squared: on 0.39 x 0.78 µm pixels every cell had half its area. They use both
    sides now, and a slide whose pixels are not square is warned that lengths are approximate."""
    for mpp in ((0.39, 0.78), (0.39, 0.39)):
        with SlideData(MIBI, mpp=mpp) as s, warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            out = s.run(Pipeline([SegmentCells(nuclear_channel="HH3"), QuantifyCells(nucleus_mask="nuclei")]),
                        tmp_path / f"a{mpp[1]}.h5path", tile_size=1024, executor="inprocess", progress=False)
        assert any("not square: cell areas are exact" in str(w.message) for w in said) == (mpp[0] != mpp[1])
        with read_h5path(out) as h:
            cells, lab = h.cells, np.asarray(h.tile(0).masks["cells"])
        pixels = np.bincount(lab.ravel())[1:]
        np.testing.assert_allclose(cells.obs["area"].to_numpy(), pixels[pixels > 0] * mpp[0] * mpp[1], rtol=1e-5)
        assert list(cells.uns["histoflow"]["mpp_xy"]) == list(mpp)  # an array once read back
