"""What a review of the store found: large provenance, partial cell tables, failing closes, strict JSON,
coordinates, error classes, long names, tiles with other channels."""
import json
import math
import os

import anndata
import numpy as np
import pandas as pd
import pytest
from datafiles import SVS

from histoflow.core.slide import SlideData
from histoflow.errors import H5PathError, H5PathOutputError, H5PathParameterError, UnsupportedFormatError
from histoflow.store import H5PathWriter, read_h5path


def _writer(path, **kw):
    w = H5PathWriter(path, **kw)
    w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    return w


def test_a_run_with_many_failed_tiles_reads_back(tmp_path):
    """20,000 failed tiles (~2 MB of provenance) used to make a file its own reader refused."""
    failed = [{"tile": i, "coords": [i, i], "step": "StainNormalizationHE", "error": "no tissue pixels " * 3}
              for i in range(20_000)]
    with _writer(tmp_path / "a.h5path") as w:
        w.add_provenance({"kind": "pipeline run", "failed_tiles": failed, "score": math.nan})
    with read_h5path(tmp_path / "a.h5path") as h:
        rec = h.provenance[-1]
        assert len(rec["failed_tiles"]) == 20_000 and rec["score"] is None  # NaN is not JSON: null
        raw = h5_text(tmp_path / "a.h5path")
    assert "NaN" not in raw


def h5_text(path):
    import h5py

    with h5py.File(path) as f:
        return f["provenance"].asstr()[-1]


def test_oversized_slide_labels_are_refused_when_written(tmp_path):
    with pytest.raises(H5PathError, match="slide label 'ids' takes .* more than a label may"):
        with _writer(tmp_path / "b.h5path", slide={"labels": {"ids": list(range(200_000))}}):
            pass
    assert not os.path.exists(tmp_path / "b.h5path")


def test_a_failed_cell_table_keeps_the_previous_one(tmp_path):
    w = _writer(tmp_path / "c.h5path")
    w.set_cells(anndata.AnnData(X=np.ones((2, 2)), obs=pd.DataFrame(index=["a", "b"])))
    bad = anndata.AnnData(X=np.ones((3, 2)), obs=pd.DataFrame({"m": [1, "a", None]}, index=list("abc")))
    with pytest.raises(H5PathError, match=r"c.h5path: the cell table cannot be stored .*keeps its previous one"):
        w.set_cells(bad)
    w.close()
    with read_h5path(tmp_path / "c.h5path") as h:
        assert isinstance(h.cells, anndata.AnnData) and h.cells.n_obs == 2


def test_a_failing_close_names_the_file_and_the_cause(tmp_path, monkeypatch):
    w = _writer(tmp_path / "d.h5path")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(H5PathOutputError, match=r"d.h5path: cannot finish writing .*No space left on device"):
        w.close()
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # the temporary file is gone, nothing under the name


def test_coordinates_and_errors_are_strict(tmp_path):
    w = _writer(tmp_path / "e.h5path")
    with pytest.raises(ValueError, match=r"coords must be whole numbers, got \(10.7, 3.2\)"):
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (10.7, 3.2))
    with pytest.raises(ValueError, match="level"):
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (8, 0), level=1.9)
    for level in (-1, 40000):  # -1 was stored as a level no slide has
        with pytest.raises(H5PathParameterError, match=rf"e.h5path: tile 1 at \(x=8, y=0\): level must be a pyramid "
                                                       rf"level, a whole number from 0 .* not {level}"):
            w.add_tile(np.zeros((4, 4, 3), np.uint8), (8, 0), level=level)
    w.add_tile(np.zeros((4, 4, 3), np.uint8), (8.0, 0))  # a whole float is fine
    w.close()
    with read_h5path(tmp_path / "e.h5path") as h:
        assert h.tile((8, 0)).coords == (8, 0)
        with pytest.raises(KeyError, match="whole numbers"):
            h.tile((8.9, 0))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_h5path(tmp_path / "missing.h5path")
    with pytest.raises(ValueError, match="compression must be"):
        H5PathWriter(tmp_path / "f.h5path", compression="zstd")


def test_long_names_and_tiles_with_other_channels(tmp_path):
    name = "x" * 240 + ".h5path"  # the file name fits; the temporary one must too
    with _writer(tmp_path / name):
        pass
    assert os.listdir(tmp_path) == [name]
    import cv2

    with SlideData(SVS) as s:
        grey = []
        for t in s.generate_tiles(1024):
            t.image = cv2.cvtColor(t.image, cv2.COLOR_RGB2GRAY)[:, :, None]
            grey.append(t)
        out = s.write(tmp_path / "grey.h5path", tiles=iter(grey))
    with read_h5path(out) as h:
        assert len(h) == 9 and h.tile(0).image.shape == (1024, 1024, 1) and h.slide["channel_names"] is None
    with pytest.raises(UnsupportedFormatError, match=r"an HDF5 file \(an h5path store\?\), not a slide"):
        SlideData(out)


def test_lookups_by_coords_scan_the_table_once(tmp_path):
    """Each h.tile((x, y)) compared the whole coords table (7.8 ms a lookup at 100k tiles: matching every tile of
    two stores by coords took minutes). The first tile at a corner, as before; a missing corner a KeyError."""
    w = _writer(tmp_path / "c.h5path")
    for i in range(40):
        w.add_tile(np.full((4, 4, 3), i, np.uint8), (8 * (i % 10), 8 * (i // 10)))
    w.add_tile(np.full((4, 4, 3), 99, np.uint8), (8, 0))  # a second tile at a corner: the first is found
    w.close()
    with read_h5path(tmp_path / "c.h5path") as h:
        src = h._s()
        scans = []
        real = src.coords
        src.coords = lambda: scans.append(1) or real()
        for i in range(40):  # (0, 0): _writer's first tile, zeros, as tile 0 here
            assert int(h.tile((8 * (i % 10), 8 * (i // 10))).image[0, 0, 0]) == i
        with pytest.raises(KeyError, match=r"no tile at \(x=4, y=0\)"):
            h.tile((4, 0))
        assert len(scans) == 1


def test_write_records_the_kind_of_image_the_tiles_became(tmp_path):
    """Virtual H&E tiles of a Vectra slide written by SlideData.write were stored as Vectra with the slide's
    DAPI/FITC/Cy3 names (three channels in, three out) and read back as Vectra tiles, which overview drew as
    fluorescence; a slide run stored them as HE. Now both record HE, uint8, R, G, B."""
    from datafiles import data_path

    from histoflow.transforms import VirtualHE

    s = SlideData(data_path("wsi", "qptiff", "small_vectra.qptiff"))
    v = VirtualHE(nuclear_channel="auto")
    v.fit_slide(s)
    tiles = []
    for t in s.generate_tiles(512):
        v.apply(t)
        tiles.append(t)
    with read_h5path(s.write(tmp_path / "v.h5path", tiles)) as h:
        assert (h.slide["slide_type"], h.slide["dtype"], h.slide["channel_names"]) == ("HE", "uint8", ["R", "G", "B"])
        assert h.tile(0).slide_type == "HE"
    plain = list(s.generate_tiles(512))[:2]  # tiles as read: the slide's own kind and names
    with read_h5path(s.write(tmp_path / "p.h5path", plain)) as h:
        assert (h.slide["slide_type"], h.slide["channel_names"]) == ("Vectra", ["DAPI", "FITC", "Cy3"])


def test_strangers_fixed_length_strings_bytes_paths_and_mask_membership(tmp_path):
    """Fixed-length string arrays (h5py's way to store numpy text) read as "b'DAPI'" names, and a fixed-length
    json_labels made the slide unreadable; H5PathWriter refused a bytes path that read_h5path takes with a bare
    AttributeError; `name in h.masks` decompressed the whole mask."""
    import h5py

    path = tmp_path / "s.h5path"
    with H5PathWriter(path, slide={"channel_names": ["DAPI", "CD3"], "labels": {"panel": ["DAPI", "CD3"]}}) as w:
        w.add_tile(np.zeros((4, 4, 2), np.uint16), (0, 0))
        w.add_slide_mask("prob", np.ones((64, 64), np.float32), 1.0)
    with h5py.File(path, "r+") as f:
        f["slide"].attrs["channel_names"] = np.array(["DAPI", "CD3"], dtype="S")
        f["slide"].attrs["json_labels"] = np.array(["panel"], dtype="S")
    with read_h5path(path) as h:
        assert h.slide["channel_names"] == ["DAPI", "CD3"] and h.labels == {"panel": ["DAPI", "CD3"]}
        src = h._s()
        reads = []
        real = src.read_mask
        src.read_mask = lambda name: reads.append(name) or real(name)
        assert "prob" in h.masks and "tissue" not in h.masks and reads == []
        assert h.masks["prob"].shape == (64, 64) and reads == ["prob"]
    raw = os.fsencode(str(tmp_path)) + b"/bad\xff.h5path"
    with H5PathWriter(raw, slide={"name": "x"}) as w:
        w.add_tile(np.zeros((4, 4, 3), np.uint8), (0, 0))
    with read_h5path(raw) as h:
        assert len(h) == 1
    with pytest.raises(H5PathParameterError, match="H5PathWriter: path must be a file name, got NoneType"):
        H5PathWriter(None)


def test_an_output_that_is_a_symbolic_link_is_written_through_it(tmp_path):
    """The finished file was renamed over the link: the link became a file and its target kept the earlier
    result (h5py.File(link, "w"), which the docs compare the writer with, writes through it)."""
    from histoflow.transforms import BoxBlur, Pipeline

    (tmp_path / "real").mkdir()
    target, link = tmp_path / "real" / "r.h5path", tmp_path / "link.h5path"
    for k, blur in enumerate((3, 9)):
        if k:
            os.symlink(target, link)
        SlideData(SVS).run(Pipeline([BoxBlur(blur)]), link if k else target, executor="inprocess",
                           progress=False, compression="gzip")
    assert os.path.islink(link) and sorted(os.listdir(tmp_path / "real")) == ["r.h5path"]
    with read_h5path(target) as h:
        assert h.provenance[-1]["pipeline"]["steps"][0]["BoxBlur"]["kernel_size"] == 9
