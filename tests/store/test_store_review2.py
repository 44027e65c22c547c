"""Defects found by a review of the core and the store (session 17): damaged files gave raw h5py errors,
boolean slide masks came back as uint8, a grid one tile wide at a target µm/px had no tiles."""
import os
import random

import numpy as np
from datafiles import SVS

from histoflow.core.grid import TileGrid
from histoflow.core.slide import SlideData
from histoflow.errors import HistoflowError
from histoflow.store import H5PathWriter, read_h5path


def test_damaged_files_raise_the_stores_own_error(tmp_path):
    """Bytes overwritten or cut off anywhere in a file: reading it either works or raises an H5PathError naming
    it (damaged object headers raised KeyError / OSError from h5py, without the file's name)."""
    rng = np.random.default_rng(0)
    good = tmp_path / "good.h5path"
    with H5PathWriter(good, slide={"name": "s", "mpp": 0.5, "labels": {"g": 2}}) as w:
        for i in range(30):
            w.add_tile(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), (i * 32, 0),
                       masks={"m": rng.random((32, 32)) > 0.5}, labels={"k": i, "s": f"n{i}"}, name=f"t{i}")
        w.add_slide_mask("tissue", rng.random((100, 100)) > 0.5, 4)
        w.add_provenance({"run": 1})
    data = good.read_bytes()
    bad = tmp_path / "bad.h5path"
    random.seed(1)
    raw = []
    for trial in range(150):
        d = bytearray(data)
        if trial % 3 == 0:
            d = d[:random.randrange(len(d))]
        else:
            off, n = random.randrange(len(d)), random.randint(1, 64)
            for k in range(off, min(len(d), off + n)):
                d[k] = random.randrange(256)
        bad.write_bytes(bytes(d))
        try:
            with read_h5path(bad) as h:
                h.coords, h.slide, h.labels
                for _ in h:
                    pass
                dict(h.masks), h.provenance, h.cells
        except HistoflowError as e:
            assert "bad.h5path" in str(e), e
        except Exception as e:  # noqa: BLE001 - what the test is about
            raw.append((trial, type(e).__name__, str(e)[:120]))
    assert raw == []


def test_a_boolean_slide_mask_stays_boolean(tmp_path):
    mask = np.zeros((30, 22), bool)
    mask[5:20, 3:15] = True
    s = SlideData(SVS, masks={"tissue": mask})
    tiles = list(s.generate_tiles(512, mpp=2.0))[:2]
    assert tiles[0].masks["tissue"].dtype == bool and tiles[0].masks["tissue"].any()
    s.write(tmp_path / "a.h5path", tiles=tiles)
    with read_h5path(tmp_path / "a.h5path") as h:
        assert h.masks["tissue"].dtype == bool and np.array_equal(h.masks["tissue"], mask)
        assert h.tile(0).masks["tissue"].dtype == bool


def test_a_slide_one_tile_wide_at_a_target_pixel_size_keeps_its_tile():
    """2220 px at 0.499 µm is 740 px at 1.497 µm, computed as 739.9999999999999: edge='drop' dropped it."""
    s = SlideData(SVS)
    assert s.grid(740, mpp=1.497, edge="drop").shape[0] == 1
    assert len(TileGrid((450, 450), 300, mpp=0.7485, slide_mpp=0.499, edge="drop")) == 1
    assert len(TileGrid((450, 450), 301, mpp=0.7485, slide_mpp=0.499, edge="drop")) == 0


def test_info_describes_what_a_file_holds_without_reading_tiles(tmp_path):
    """``H5Path.info()``: the slide, the tiles, masks, cells and the runs that wrote the file, as plain values;
    for a histoflow run file and for PathML's own file."""
    import json

    from datafiles import SVS, data_path

    from histoflow import SlideData, read_h5path
    from histoflow.transforms import NucleusDetectionHE, Pipeline, QuantifyCells

    with SlideData(SVS) as s:
        out = s.run(Pipeline([NucleusDetectionHE(mask_name="cells"), QuantifyCells(mask_name="cells")]),
                    str(tmp_path / "c.h5path"), executor="inprocess", progress=False, tissue_filter=0.5, overlap=32)
    with read_h5path(out) as h:
        info = h.info()
        json.dumps(info)  # plain values
        assert info["tiles"] == len(h) > 0 and info["tile_shape"] == (256, 256, 3) and info["dtype"] == "uint8"
        assert info["compression"] == "htj2k" and info["tile_masks"] == ["cells", "tissue"]
        assert info["masks"] == {"tissue": {"shape": h.masks["tissue"].shape,
                                            "downsample": h.mask_downsample("tissue")}}
        assert info["cells"] == {"cells": h.cells.n_obs, "features": h.cells.n_vars} and info["cells"]["cells"] > 1000
        (run,) = info["runs"]
        assert run["steps"] == ["NucleusDetectionHE", "QuantifyCells"] and run["tiles_written"] == len(h)
        assert run["failed_tiles"] == 0 and run["executor"] == "inprocess" and info["slide"]["mpp"] == (0.499, 0.499)
    with read_h5path(data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")) as h:
        info = h.info()
        assert (info["format_version"], info["tiles"], info["tile_shape"], info["runs"]) == (1, 12, (128, 128, 3), [])
        assert info["tile_labels"] == ["grade", "site"] and info["cells"] is None


def test_a_tile_too_large_for_a_store_is_refused_before_it_is_written(tmp_path):
    """Tiles over MAX_TILE_BYTES (22 uint16 channels of 5000 px) were written, compressed, and the store then
    refused to open: `histoflow tile --size 5000` on a MIBI file, or a run, did all the work for a file nothing
    could read. Now the first such tile is refused, whichever way it is stored."""
    import pytest
    import tifffile

    from histoflow.core.tile import Tile
    from histoflow.errors import H5PathError
    from histoflow.store import encode_tile
    from histoflow.store.h5path import MAX_TILE_BYTES

    big = np.broadcast_to(np.zeros(1, np.uint16), (5000, 5000, 22))  # 1,049 MiB, not allocated
    assert big.nbytes > MAX_TILE_BYTES
    with pytest.raises(H5PathError, match=r"tile at \(0, 0\): a tile of 5000 x 5000 px x 22 channels of uint16 is "
                                          r"1,049 MiB, more than an h5path store holds per tile \(1024 MiB\)"):
        encode_tile(Tile(big, (0, 0)), "htj2k")
    with H5PathWriter(tmp_path / "w.h5path") as w:
        with pytest.raises(H5PathError, match="1,049 MiB"):
            w.add_tile(big, (0, 0))
        w.add_tile(np.zeros((8, 8, 22), np.uint16), (0, 0))  # the writer stays usable
    assert len(read_h5path(tmp_path / "w.h5path")) == 1
    # SlideData.write names the store and the slide in what encode_tile refuses
    tifffile.imwrite(tmp_path / "half.tif", np.zeros((16, 16), np.float16))
    sd = SlideData(tmp_path / "half.tif")
    with pytest.raises(H5PathError, match=r"h\.h5path \(slide .*half\.tif\): encode_tile: .* float16"):
        sd.write(tmp_path / "h.h5path", tiles=sd.generate_tiles(8))
    assert not (tmp_path / "h.h5path").exists()


def test_writer_round_trips_and_refuses_what_readers_would(tmp_path, monkeypatch):
    """(Review of the writer.) A 2-D float array in slide labels or provenance came back flattened; a slide mask
    over 1 GiB, or more tiles than readers take, was written whole and refused only when read; a failed-tile
    count above the 100,000 listed was under-reported by info(); a target name of 4-byte characters made a
    temporary name too long for the file system; a numpy str_ label, an over-long slide label name and
    downsample=None raised bare TypeError / OSError naming no file."""
    import pytest

    import histoflow.store.h5path as hp
    from histoflow.errors import H5PathError

    sm = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    p = tmp_path / "a.h5path"
    with H5PathWriter(p, slide={"labels": {"stain_matrix": sm, "counts": np.array([[1, 2], [3, 4]]),
                                           "site": np.str_("colon")}}) as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
        w.add_provenance({"stain_matrix": sm, "kind": "pipeline run",
                          "failed_tiles": [{"tile": i} for i in range(hp.MAX_FAILED_LISTED + 5)]})
    with read_h5path(p) as h:
        assert h.labels["stain_matrix"] == sm.tolist() and h.labels["counts"] == [[1, 2], [3, 4]]
        assert h.labels["site"] == "colon"
        assert h.provenance[0]["stain_matrix"] == sm.tolist()
        assert h.info()["runs"][0]["failed_tiles"] == hp.MAX_FAILED_LISTED + 5

    big = np.broadcast_to(np.zeros(1, np.uint8), (33000, 33000))  # 1.01 GiB, not allocated
    with H5PathWriter(tmp_path / "m.h5path") as w:
        with pytest.raises(H5PathError, match=r"m\.h5path: slide mask 'tissue' of shape \(33000, 33000\) would take "
                                              r"1\.0 GiB, more than histoflow loads"):
            w.add_slide_mask("tissue", big)
        for bad in (None, "x"):
            with pytest.raises(H5PathError, match=r"m\.h5path: slide mask 'small': downsample must be a positive"):
                w.add_slide_mask("small", np.zeros((4, 4), bool), downsample=bad)
        w.add_slide_mask("small", np.zeros((4, 4), bool), downsample=8)
    monkeypatch.setattr(hp, "MAX_TILES", 3)
    with H5PathWriter(tmp_path / "n.h5path") as w:
        for k in range(3):
            w.add_tile(np.zeros((4, 4, 3), np.uint8), (4 * k, 0))
        with pytest.raises(H5PathError, match=r"n\.h5path: more than 3 tiles"):
            w.add_tile(np.zeros((4, 4, 3), np.uint8), (12, 0))
    with read_h5path(tmp_path / "n.h5path") as h:
        assert len(h) == 3

    long_name = tmp_path / ("\U0001F600" * 60 + ".h5path")  # 247 bytes: a legal name
    with H5PathWriter(long_name) as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    assert long_name.exists()
    with pytest.raises(H5PathError, match=r"x\.h5path: slide label name of 70,000 characters"):
        H5PathWriter(tmp_path / "x.h5path", slide={"labels": {"m" * 70000: 1}})
    assert not any(".tmp-" in f for f in os.listdir(tmp_path))


def test_the_stored_compression_is_the_images_own(tmp_path):
    """A 22-channel run asked for HTJ2K (the default) stored its images with gzip, HTJ2K not applying to them,
    but the file (and `histoflow info`) said htj2k: a reader would think it needs the plugin."""
    import h5py

    for channels, want in ((3, "htj2k"), (22, "gzip")):
        p = tmp_path / f"c{channels}.h5path"
        with H5PathWriter(p, compression="htj2k") as w:
            w.add_tile(np.zeros((8, 8, channels), np.uint16), (0, 0))
        with read_h5path(p) as h:
            assert h.info()["compression"] == want
        with h5py.File(p) as f:
            assert ("gzip" == f["tiles/images"].compression) == (want == "gzip")


def test_damaged_b_trees_and_pathml_files_raise_the_stores_own_error(tmp_path):
    """Damage that h5py reports as RuntimeError ("incorrect B-tree node type", "Link visitation failed"),
    SystemError, or a ValueError from a damaged datatype reached the caller as such, without the file's name,
    from the group checks, the tiles' slide record, the cell table and PathML files' labels."""
    import re

    good = tmp_path / "good.h5path"
    with H5PathWriter(good) as w:
        for k in range(3):
            w.add_tile(np.zeros((8, 8, 3), np.uint8), (8 * k, 0), masks={"m": np.ones((8, 8), bool)}, labels={"a": k})
    from datafiles import data_path

    pathml = data_path("pathml_h5path", "cmu_crop_written_by_pathml_3.0.8.h5path")
    sources = [good.read_bytes(), open(pathml, "rb").read()]
    bad = tmp_path / "bad.h5path"
    raw, damaged = [], 0
    for data in sources:
        trees = [m.start() for m in re.finditer(b"TREE", data)][:40]
        for at in trees:  # each group B-tree node's type byte
            d = bytearray(data)
            d[at + 4] = 0x79
            bad.write_bytes(bytes(d))
            try:
                with read_h5path(bad) as h:
                    h.slide, h.labels
                    for _ in h:
                        pass
                    dict(h.masks), h.provenance, h.cells, h.info()
            except HistoflowError as e:
                assert "bad.h5path" in str(e), e
                damaged += 1
            except Exception as e:  # noqa: BLE001 - what the test is about
                raw.append((at, type(e).__name__, str(e)[:120]))
    assert raw == [] and damaged >= 3
