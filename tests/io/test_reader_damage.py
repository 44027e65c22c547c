"""Damaged and unusual files, and reader edge cases, found in a review of the readers: every one ends in a
project error that names the file, or in the right pixels."""
import math
import os

import numpy as np
import pytest
import tifffile
from datafiles import SVS, data_path, mosaic

import histoflow
from histoflow.errors import (ParameterError, RegionError, SlideNotFoundError, SlideReadError, TileDecodeError,
                              UnsupportedFormatError)

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")


def _cut(src, n, dst):
    with open(src, "rb") as f:
        dst.write_bytes(f.read(n))
    return dst


def test_a_multipage_tiff_cut_between_pages_is_refused(tmp_path):
    with tifffile.TiffFile(MIBI) as tf:
        off = tf.pages[13].offset
    path = _cut(MIBI, off, tmp_path / "mibi13.tiff")
    with pytest.raises(SlideReadError, match=r"mibi13.tiff: file is truncated or damaged: only 13 image directories"):
        histoflow.open_slide(path)
    assert histoflow.open_slide(MIBI).channels == 22


def test_damaged_tile_tables_are_refused_at_open(tmp_path):
    head = _cut(data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jpeg.tiff"), 600, tmp_path / "head.tiff")
    with pytest.raises(SlideReadError, match=r"head.tiff: page 0: truncated or damaged: 0 tile/strip offsets"):
        histoflow.open_slide(head)
    # a tiled TIFF whose TileLength tag says 0
    path = tmp_path / "tile0.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint8), tile=(16, 16))
    with tifffile.TiffFile(path) as tf:
        tag = tf.pages[0].tags[323]
        where, dtype = tag.valueoffset, tag.dtype
    raw = bytearray(path.read_bytes())
    raw[where:where + (4 if dtype == 4 else 2)] = b"\0" * (4 if dtype == 4 else 2)
    path.write_bytes(bytes(raw))
    with pytest.raises(SlideReadError, match=r"tile0.tif: page 0: damaged: image 64 x 64 px in tiles or strips of 16 x 0"):
        histoflow.open_slide(path)


def _box_average(a, tw, th):
    """Exact area average: output pixel (i, j) is the mean of rows [floor(i fy), floor((i+1) fy)) and the
    same for columns."""
    h, w = a.shape[:2]
    ys = np.append(np.floor(np.arange(th) * h / th).astype(int), h)
    xs = np.append(np.floor(np.arange(tw) * w / tw).astype(int), w)
    c = np.pad(a.astype(np.float64), ((1, 0), (1, 0), (0, 0))).cumsum(0).cumsum(1)
    s = c[ys[1:]][:, xs[1:]] - c[ys[:-1]][:, xs[1:]] - c[ys[1:]][:, xs[:-1]] + c[ys[:-1]][:, xs[:-1]]
    return s / (np.diff(ys)[:, None, None] * np.diff(xs)[None, :, None])


@pytest.mark.parametrize("path,size", [(SVS, 512), (MIBI, 300)])
def test_thumbnail_is_the_exact_area_average_on_every_row(path, size):
    """Thumbnails are read in strips; no row may average pixels of the next strip's first row."""
    r = histoflow.open_slide(path)
    t = r.thumbnail(size)
    ref = _box_average(r.read_level(0), t.shape[1], t.shape[0])
    assert np.abs(t.astype(np.float64) - ref).max() <= 0.5 + 1e-6


def test_associated_images_after_close_and_damaged(tmp_path):
    for backend in ("tiff", "openslide"):
        r = histoflow.open_slide(SVS, backend=backend)
        label = r.associated_images["label"]
        label[0, 0] = 0  # the caller's own array
        r.close()
        with pytest.raises(SlideReadError, match="has been closed"):
            r.associated_images["label"]
    # the macro image's JPEG data zeroed in a copy
    with tifffile.TiffFile(SVS) as tf:
        page = next(p for p in tf.pages if "macro" in (p.description or ""))
        off, n = page.dataoffsets[0], page.databytecounts[0]
    raw = bytearray(open(SVS, "rb").read())
    raw[off:off + n] = b"\0" * n
    path = tmp_path / "badmacro.svs"
    path.write_bytes(bytes(raw))
    r = histoflow.open_slide(path, backend="tiff")
    with pytest.raises(TileDecodeError, match=r"badmacro.svs: the macro image cannot be decoded"):
        r.associated_images["macro"]


def test_ome_objective_power_with_the_pixel_size(tmp_path):
    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Instrument ID="Instrument:0"><Objective ID="Objective:0" NominalMagnification="40.0"/></Instrument>'
           '<Image ID="Image:0"><InstrumentRef ID="Instrument:0"/><ObjectiveSettings ID="Objective:0"/>'
           '<Pixels DimensionOrder="XYCZT" ID="Pixels:0" Interleaved="true" PhysicalSizeX="0.25" '
           'PhysicalSizeXUnit="µm" PhysicalSizeY="0.25" PhysicalSizeYUnit="µm" SizeC="3" SizeT="1" SizeX="64" '
           'SizeY="48" SizeZ="1" Type="uint8"><Channel ID="Channel:0" SamplesPerPixel="3"/>'
           '<TiffData FirstC="0" FirstT="0" FirstZ="0" IFD="0" PlaneCount="1"/></Pixels></Image></OME>')
    path = tmp_path / "mag.ome.tif"
    tifffile.imwrite(path, np.zeros((48, 64, 3), np.uint8), photometric="rgb", description=xml.encode(), metadata=None)
    r = histoflow.open_slide(path)
    assert r.mpp == (0.25, 0.25) and r.objective_power == 40.0


def test_regions_are_writable_on_every_backend():
    for path, backend in ((SVS, "openslide"), (SVS, "tiff"), (data_path("he_patches", "napari_skin_HE.tif"), "auto")):
        a = histoflow.open_slide(path, backend=backend).read_region((0, 0), 0, (16, 16))
        a[0, 0] = 0
        assert a.flags.writeable and a[0, 0].max() == 0


def test_backend_and_level_errors_say_what_is_wrong(tmp_path):
    with pytest.raises(SlideNotFoundError, match="nope.svs: no such file"):
        histoflow.open_slide(tmp_path / "nope.svs", backend="openslide")
    (tmp_path / "folder").mkdir()
    with pytest.raises(UnsupportedFormatError, match="folder: is a folder"):
        histoflow.open_slide(tmp_path / "folder", backend="tiff")
    with pytest.raises(ParameterError, match=r"CMU-1-Small-Region.svs: unknown backend 'foo'"):
        histoflow.open_slide(SVS, backend="foo")
    r = histoflow.open_slide(mosaic(2))
    n = len(r.levels)
    with pytest.raises(RegionError, match=f"level -{n + 1} does not exist"):
        r.read_region((0, 0), -(n + 1), (4, 4))
    with pytest.raises(RegionError, match="level 5 does not exist"):
        r.level_mpp(5)
    assert r.level_mpp(-1) == r.level_mpp(n - 1)


def test_damaged_dicom_headers_and_truncated_png(tmp_path):
    import pydicom

    src = data_path("wsi", "dicom_pathml", "small_dicom.dcm")
    for name, change in (("cols0.dcm", lambda ds: setattr(ds, "Columns", 0)),
                         ("bits2.dcm", lambda ds: setattr(ds, "BitsAllocated", [8, 8]))):
        ds = pydicom.dcmread(src)
        change(ds)
        ds.save_as(tmp_path / name)
        with pytest.raises(SlideReadError, match=rf"{name}: damaged header: (Columns|BitsAllocated) is"):
            histoflow.open_slide(tmp_path / name)
    png = data_path("he_patches", "skimage_ihc.png")
    cut = _cut(png, os.path.getsize(png) // 2, tmp_path / "half.png")
    with pytest.raises(SlideReadError, match="half.png: damaged or truncated image") as e:
        histoflow.open_slide(cut)
    assert not isinstance(e.value, UnsupportedFormatError)
    assert math.isfinite(histoflow.open_slide(png).dimensions[0])


def test_rgba_tiff_composited_on_white_like_a_png(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (64, 64, 4), dtype=np.uint8)
    rgba[:8, :8, 3] = 0  # transparent: white
    rgba[8:16, :8, 3] = 255  # opaque: the colour
    tifffile.imwrite(tmp_path / "a.tif", rgba, photometric="rgb", extrasamples=[2], tile=(32, 32))
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    t = histoflow.open_slide(tmp_path / "a.tif").read_region((0, 0), 0, (64, 64))
    p = histoflow.open_slide(tmp_path / "a.png").read_region((0, 0), 0, (64, 64))
    np.testing.assert_array_equal(t, p)
    assert (t[:8, :8] == 255).all() and np.array_equal(t[8:16, :8], rgba[8:16, :8, :3])
