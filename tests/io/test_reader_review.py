"""Reader defects found in a review (overflowing offsets, Z-stacks read as channels, OME names of other
images, ImageJ units, palettes, grey + alpha PNGs, ASCII XMP, damaged associated images, bad mpp overrides,
planar RGBA): each ends in the right pixels and metadata, or in a project error that names the file."""
import os
import shutil

import imagecodecs
import numpy as np
import pytest
import tifffile
from datafiles import SVS, data_path
from PIL import Image

import histoflow
from histoflow.errors import ParameterError, SlideReadError, TileDecodeError, UnsupportedFormatError
from histoflow import open_slide
from histoflow.io import detect_format


def _patch(path, offset, raw: bytes):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(raw)


# ---------------------------------------------------------------- 1. BigTIFF offsets of 2**63 and more
def test_a_bigtiff_tile_offset_past_2_63_is_refused_naming_the_file(tmp_path):
    src = data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jp2.tiff")
    with tifffile.TiffFile(src) as tf:
        assert tf.is_bigtiff
        where = tf.pages[0].tags[324].valueoffset  # TileOffsets, LONG8
    huge = tmp_path / "huge.tiff"
    shutil.copy(src, huge)
    _patch(huge, where, b"\xff" * 8)  # 2**64 - 1: numpy's int64 overflows
    with pytest.raises(SlideReadError, match=r"huge.tiff: page 0: damaged: tile/strip offsets or byte counts out of "
                                             r"range"):
        histoflow.open_slide(huge)
    # 2**63 - 1 fits in int64, but offset + byte count wrapped around and passed the truncation check
    wrap = tmp_path / "wrap.tiff"
    shutil.copy(src, wrap)
    _patch(wrap, where, (2**63 - 1).to_bytes(8, "little"))
    with pytest.raises(SlideReadError, match=r"wrap.tiff: file is truncated: level 0 \(page 0\) needs data up to"):
        histoflow.open_slide(wrap)


# ---------------------------------------------------------------- 2. Z-stacks and time series are not channels
@pytest.mark.parametrize("kind", ["ome_z", "ome_t", "imagej_z", "imagej_t"])
def test_a_single_channel_z_stack_or_time_series_reads_as_one_channel_its_first_plane(tmp_path, kind):
    z = np.random.default_rng(0).integers(0, 1000, (4, 64, 80), dtype=np.uint16)
    axes = "ZYX" if kind.endswith("_z") else "TYX"
    if kind.startswith("ome"):
        path = tmp_path / f"{kind}.ome.tif"
        tifffile.imwrite(path, z, metadata={"axes": axes, "Channel": {"Name": ["DAPI"]}})
        names = ["DAPI"]
    else:
        path = tmp_path / f"{kind}.tif"
        tifffile.imwrite(path, z, imagej=True, metadata={"axes": axes})
        names = ["intensity"]
    with tifffile.TiffFile(path) as tf:
        assert tf.series[0].axes == axes  # the axis tifffile reports for ImageJ hyperstacks too
    s = histoflow.open_slide(path)
    assert s.channels == 1 and s.channel_names == names
    np.testing.assert_array_equal(s.read_level(0), z[0][:, :, None])


def test_a_multichannel_z_stack_keeps_its_channels_of_the_first_plane(tmp_path):
    d = np.random.default_rng(1).integers(0, 255, (3, 2, 40, 50), dtype=np.uint8)  # Z C Y X
    path = tmp_path / "zc.ome.tif"
    tifffile.imwrite(path, d, metadata={"axes": "ZCYX", "Channel": {"Name": ["DAPI", "CD3"]}})
    s = histoflow.open_slide(path)
    assert s.channel_names == ["DAPI", "CD3"]
    np.testing.assert_array_equal(s.read_level(0), np.moveaxis(d[0], 0, -1))
    # a plain multi-page stack (axis I) stays one channel per page
    mibi = histoflow.open_slide(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff"))
    assert mibi.channels == 22


# ---------------------------------------------------------------- 3. OME names of the first image only
def test_ome_channel_names_come_from_the_first_image_only(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "two.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rng.integers(0, 255, (3, 64, 64), dtype=np.uint8),
                 metadata={"axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "CD8"]}})
        tw.write(rng.integers(0, 255, (2, 32, 32), dtype=np.uint8),
                 metadata={"axes": "CYX", "Channel": {"Name": ["maskA", "maskB"]}})
    assert histoflow.open_slide(path).channel_names == ["DAPI", "CD3", "CD8"]
    # the first image's channels are unnamed: the second image's names are not borrowed
    path = tmp_path / "unnamed.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(rng.integers(0, 255, (2, 64, 64), dtype=np.uint8), metadata={"axes": "CYX"})
        tw.write(rng.integers(0, 255, (2, 32, 32), dtype=np.uint8),
                 metadata={"axes": "CYX", "Channel": {"Name": ["maskA", "maskB"]}})
    assert histoflow.open_slide(path).channel_names == ["channel 0", "channel 1"]


# ---------------------------------------------------------------- 4. ImageJ units
@pytest.mark.parametrize("unit, per_unit", [("\\u00B5m", 2.0), ("micron", 2.0), ("um", 2.0), ("nm", 1 / 500),
                                            ("mm", 2000.0)])
def test_imagej_units_give_the_pixel_size(tmp_path, unit, per_unit):
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, np.zeros((2, 64, 64), np.uint8), imagej=True, resolution=(per_unit, per_unit),
                     metadata={"axes": "CYX", "unit": unit})
    assert histoflow.open_slide(path).mpp == pytest.approx((0.5, 0.5))


# ---------------------------------------------------------------- 5. palette TIFFs
@pytest.mark.parametrize("tile", [None, (16, 16)])
def test_a_palette_tiff_reads_as_rgb_brightfield(tmp_path, tile):
    rng = np.random.default_rng(2)
    index = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    lut = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    path = tmp_path / "palette.tif"
    tifffile.imwrite(path, index, photometric="palette", colormap=lut.T.astype(np.uint16) * 257, tile=tile)
    s = histoflow.open_slide(path)
    assert (s.channels, s.channel_names, s.dtype, s.brightfield) == (3, ["R", "G", "B"], np.uint8, True)
    np.testing.assert_array_equal(s.read_level(0), lut[index])
    a = s.read_region((30, 20), 0, (30, 30))  # partly outside: padded white
    np.testing.assert_array_equal(a[:20, :20], lut[index[20:, 30:]])
    assert (a[20:] == 255).all() and (a[:, 20:] == 255).all()
    # as Pillow reads the same image saved as PNG
    im = Image.fromarray(index, "P")
    im.putpalette(lut.ravel().tolist())
    im.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(histoflow.open_slide(tmp_path / "palette.png").read_level(0), s.read_level(0))


def test_imagej_lut_pages_keep_their_raw_values():
    path = data_path("fluorescence", "instanseg_Fluorescence_example.tif")
    with tifffile.TiffFile(path) as tf:
        assert tf.is_imagej and int(tf.pages[0].photometric) == 3  # a palette (ImageJ's LUT)
        raw = np.moveaxis(tf.series[0].asarray(), 0, -1)
    s = histoflow.open_slide(path)
    assert s.channels == 2 and not s.brightfield
    np.testing.assert_array_equal(s.read_level(0), raw)


# ---------------------------------------------------------------- 6. grey + alpha PNGs
def test_a_16bit_grey_alpha_png_is_one_grey_channel_composited_on_white(tmp_path):
    grey = np.full((50, 60), 1000, np.uint16)
    alpha = np.full((50, 60), 65535, np.uint16)
    alpha[:, :20] = 0
    alpha[:, 20:40] = 32768
    path = tmp_path / "la16.png"
    path.write_bytes(imagecodecs.png_encode(np.dstack([grey, alpha])))
    s = histoflow.open_slide(path)
    assert (s.channels, s.channel_names, s.dtype, s.brightfield) == (1, ["intensity"], np.uint16, False)
    a = s.read_level(0)
    assert a.shape == (50, 60, 1)
    assert (a[:, :20] == 65535).all() and (a[:, 40:] == 1000).all()
    assert (a[:, 20:40] == (1000 * 32768 + 65535 * 32767 + 32767) // 65535).all()
    assert s.read_region((45, 35), 0, (30, 30)).shape == (30, 30, 1)  # partly outside
    assert s.thumbnail(16).shape[-1] == 1


def test_an_8bit_grey_alpha_png_is_composited_on_white_too(tmp_path):
    la = np.zeros((20, 30, 2), np.uint8)
    la[..., 0] = 40
    la[:, 10:, 1] = 255
    la[:, 20:, 1] = 128
    path = tmp_path / "la8.png"
    Image.fromarray(la, "LA").save(path)
    s = histoflow.open_slide(path)
    assert (s.channels, s.channel_names) == (1, ["intensity"])
    a = s.read_level(0)[..., 0]
    assert (a[:, :10] == 255).all() and (a[:, 10:20] == 40).all()
    assert (a[:, 20:] == (40 * 128 + 255 * 127 + 127) // 255).all()


# ---------------------------------------------------------------- 7. ASCII-typed XMP
def test_a_tiff_with_ascii_xmp_opens(tmp_path):
    path = tmp_path / "xmp.tif"
    tifffile.imwrite(path, np.zeros((64, 64, 3), np.uint8), photometric="rgb",
                     extratags=[(700, "s", 0, '<x:xmpmeta xmlns:x="adobe:ns:meta/"/>', True)])
    with tifffile.TiffFile(path) as tf:
        assert isinstance(tf.pages[0].tags[700].value, str)
    assert detect_format(path).backend == "tiff"
    assert histoflow.open_slide(path).dimensions == (64, 64)


# ---------------------------------------------------------------- 8. damaged associated images
@pytest.mark.parametrize("code, value, why", [(256, 0, "its tags give an empty image"),
                                              (258, 7, r"it decoded to shape \(0, 463, 387, 3\)")])
def test_a_damaged_associated_image_raises_tile_decode_error(tmp_path, code, value, why):
    path = tmp_path / f"label_{code}.svs"
    shutil.copy(SVS, path)
    with tifffile.TiffFile(SVS) as tf:
        tag = next(s for s in tf.series if s.name == "Label").pages[0].tags[code]  # ImageWidth, BitsPerSample
        _patch(path, tag.valueoffset, value.to_bytes(2, "little"))
    s = histoflow.open_slide(path)
    with pytest.raises(TileDecodeError,
                       match=rf"label_{code}.svs: the label image \(page 2\) cannot be decoded: {why}"):
        s.associated_images["label"]
    assert s.associated_images["macro"].shape == (431, 1280, 3)  # the rest of the file is fine
    assert s.read_region((0, 0), 0, (4, 4)).shape == (4, 4, 3)


# ---------------------------------------------------------------- 9. mpp overrides
@pytest.mark.parametrize("mpp", ["abc", "0.5", (0.5,), [0.5, None], {"x": 1}, [0.5, 0.5, 0.5], 0, -0.5,
                                 float("nan"), True, np.array([[0.5, 0.5]])])
def test_a_bad_mpp_override_is_a_parameter_error_naming_the_file(mpp):
    with pytest.raises(ParameterError, match=r"CMU-1-Small-Region.svs: mpp must be one positive number of µm per "
                                             r"pixel or a pair \(x, y\)"):
        histoflow.open_slide(SVS, mpp=mpp)
    s = histoflow.open_slide(SVS)
    with pytest.raises(ParameterError, match=r"CMU-1-Small-Region.svs: mpp must be"):
        s.mpp = mpp
    assert s.mpp == pytest.approx((0.499, 0.499))


@pytest.mark.parametrize("mpp, want", [(0.25, (0.25, 0.25)), ((0.5, 0.25), (0.5, 0.25)), ([1, 2], (1.0, 2.0)),
                                       (np.array([0.5, 0.5]), (0.5, 0.5)), (np.float32(0.5), (0.5, 0.5))])
def test_good_mpp_overrides_are_taken(mpp, want):
    assert histoflow.open_slide(SVS, mpp=mpp).mpp == pytest.approx(want)


# ---------------------------------------------------------------- 10. planar-separate RGBA
@pytest.mark.parametrize("extrasample", [1, 2])  # associated (premultiplied), unassociated alpha
def test_planar_separate_rgba_is_composited_on_white_like_contiguous(tmp_path, extrasample):
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (100, 90, 4), dtype=np.uint8)
    rgba[:40, :, 3] = 0  # fully transparent: white
    rgba[40:60, :, 3] = 255  # opaque: the colour
    if extrasample == 1:  # premultiplied colour never exceeds alpha
        rgba[..., :3] = np.minimum(rgba[..., :3], rgba[..., 3:])
    contig, sep = tmp_path / "contig.tif", tmp_path / "sep.tif"
    tifffile.imwrite(contig, rgba, photometric="rgb", extrasamples=[extrasample], tile=(32, 32))
    tifffile.imwrite(sep, np.moveaxis(rgba, -1, 0), photometric="rgb", planarconfig="separate",
                     extrasamples=[extrasample], tile=(32, 32))
    s = histoflow.open_slide(sep)
    a = s.read_level(0)
    assert a.shape == (100, 90, 3) and s.channel_names == ["R", "G", "B"]
    assert (a[:40] == 255).all()
    np.testing.assert_array_equal(a[40:60], rgba[40:60, :, :3])
    np.testing.assert_array_equal(a, histoflow.open_slide(contig).read_level(0))
    np.testing.assert_array_equal(s.read_region((70, 10), 0, (40, 40))[:30, :20], a[10:40, 70:90])


def test_a_reader_opened_by_a_relative_path_reopens_from_another_folder(tmp_path, monkeypatch):
    """Readers pickled the path as given: a dask worker whose working directory differs (a remote cluster)
    could not open a slide named relatively."""
    import pickle

    from datafiles import SVS

    monkeypatch.chdir(os.path.dirname(SVS))
    r = histoflow.open_slide(os.path.basename(SVS))
    data = pickle.dumps(r)
    monkeypatch.chdir(tmp_path)
    again = pickle.loads(data)
    np.testing.assert_array_equal(again.read_region((100, 100), 0, (64, 64)), r.read_region((100, 100), 0, (64, 64)))


def test_a_slide_opened_relatively_keeps_its_file_after_the_process_changes_folder(tmp_path, monkeypatch):
    """The absolute path was made when pickling (and when writing the store's source_path), from the working
    folder of that moment: after a chdir the reader pickled a path to nothing and the store named a file that
    is not the slide."""
    import pickle

    from datafiles import SVS

    from histoflow.core.slide import SlideData

    monkeypatch.chdir(os.path.dirname(SVS))
    sd = SlideData(os.path.basename(SVS))
    monkeypatch.chdir(tmp_path)
    # (real paths: the working folder is one, when the data folder is reached through a link)
    assert os.path.realpath(sd.metadata()["source_path"]) == os.path.realpath(SVS)
    again = pickle.loads(pickle.dumps(sd))
    np.testing.assert_array_equal(again.reader.read_region((100, 100), 0, (32, 32)),
                                  sd.reader.read_region((100, 100), 0, (32, 32)))


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".tif"])
def test_a_print_resolution_is_not_a_pixel_size(tmp_path, suffix):
    """An H&E crop saved at 300 dpi (photo and figure tools' default) was read as 84.7 µm/px, and a grid at
    0.5 µm/px cut its 500 x 300 px into 65,869 tiles, 169x enlarged. Now such a tag leaves mpp unknown, with a
    warning that says how to set it."""
    from datafiles import data_path
    from PIL import Image

    a = np.asarray(Image.open(data_path("he_patches", "stardist_histo.jpg")).convert("RGB"))
    for dpi in (300, 600):
        path = tmp_path / f"he{dpi}{suffix}"
        Image.fromarray(a).save(path, dpi=(dpi, dpi))
        s = histoflow.open_slide(path)
        assert s.mpp is None, (dpi, s.mpp)
        assert any("implausible pixel size" in w and "pass mpp=" in w for w in s.warnings)
    path = tmp_path / f"he_scan{suffix}"  # a real low-power resolution is kept: 2 µm/px is 12,700 dpi
    Image.fromarray(a).save(path, dpi=(12700, 12700))
    assert histoflow.open_slide(path).mpp == pytest.approx((2.0, 2.0), rel=1e-3)


def test_tiff_photometrics_read_as_pillow_and_openslide_read_them(tmp_path):
    """MinIsWhite pages came back uninverted (the image backend and OpenSlide invert them: the same file read
    differently by backend); 1-bit pages came back as bool, which the store refused; a grey + alpha page gave
    its alpha as a second data channel where the same pixels as an LA PNG are one channel on white."""
    import openslide

    from histoflow.core.slide import SlideData

    ramp = np.tile(np.arange(256, dtype=np.uint8), (64, 1))
    tifffile.imwrite(tmp_path / "mw.tif", ramp, photometric="miniswhite", tile=(32, 32))
    s = histoflow.open_slide(tmp_path / "mw.tif")
    assert s.backend == "tiff"
    np.testing.assert_array_equal(s.read_region((0, 0), 0, (256, 64))[..., 0], 255 - ramp)
    np.testing.assert_array_equal(histoflow.open_slide(tmp_path / "mw.tif", backend="image")
                                  .read_region((0, 0), 0, (256, 64))[..., 0], 255 - ramp)
    with openslide.OpenSlide(str(tmp_path / "mw.tif")) as o:
        np.testing.assert_array_equal(np.asarray(o.read_region((0, 0), 0, (256, 64)))[..., 0], 255 - ramp)
    tifffile.imwrite(tmp_path / "mw16.tif", ramp.astype(np.uint16) * 200, photometric="miniswhite")
    assert histoflow.open_slide(tmp_path / "mw16.tif").read_region((10, 0), 0, (1, 1)).ravel().tolist() == [63535]

    bits = np.random.default_rng(0).integers(0, 2, (50, 64)).astype(bool)
    tifffile.imwrite(tmp_path / "bits.tif", bits)
    s = histoflow.open_slide(tmp_path / "bits.tif")
    got = s.read_region((0, 0), 0, (64, 50))
    assert s.dtype == np.uint8 and got.dtype == np.uint8
    np.testing.assert_array_equal(got[..., 0], np.asarray(Image.open(tmp_path / "bits.tif").convert("L")))
    sd = SlideData(tmp_path / "bits.tif")
    sd.write(tmp_path / "bits.h5path", tiles=sd.generate_tiles(32))
    assert (tmp_path / "bits.h5path").stat().st_size > 0

    grey = np.full((40, 40), 100, np.uint8)
    alpha = np.zeros_like(grey)
    alpha[:, 20:] = 255
    alpha[0, 0] = 128
    Image.fromarray(np.stack([grey, alpha], -1), "LA").save(tmp_path / "la.png")
    want = histoflow.open_slide(tmp_path / "la.png").read_region((0, 0), 0, (40, 40))
    assert want[0, [0, 1, 25], 0].tolist() == [177, 255, 100]
    for name, kw in (("ga.tif", {}), ("ga_tiled.tif", {"tile": (16, 16)})):
        tifffile.imwrite(tmp_path / name, np.stack([grey, alpha], -1), photometric="minisblack", extrasamples=[2],
                         **kw)
        s = histoflow.open_slide(tmp_path / name)
        assert s.channel_names == ["intensity"]
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (40, 40)), want)
    tifffile.imwrite(tmp_path / "ga_planar.tif", np.stack([grey, alpha]), photometric="minisblack", extrasamples=[2],
                     planarconfig="separate", tile=(16, 16))
    np.testing.assert_array_equal(histoflow.open_slide(tmp_path / "ga_planar.tif").read_region((0, 0), 0, (40, 40)),
                                  want)


def test_imagej_planes_without_pages_and_single_strip_planes(tmp_path):
    """ImageJ writes a stack over 4 GB with one page, the other planes' pixels following the first's: the reader
    saw one plane and returned channel 0 alone, without a word. ImageJ also writes each plane as one strip,
    which was decoded whole for every region (a 16 px region of a 30k x 30k uint16 image: 1.8 GB a channel)."""
    import tracemalloc

    rng = np.random.default_rng(0)
    stack = rng.integers(0, 4000, (2, 3, 60, 50), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "trunc.tif", stack, imagej=True, truncate=True, metadata={"axes": "ZCYX"})
    with tifffile.TiffFile(tmp_path / "trunc.tif") as t:
        assert len(t.pages) == 1  # truly one page for 6 planes
    s = histoflow.open_slide(tmp_path / "trunc.tif")
    assert s.channels == 3  # the channels of the first z plane, as for a stack with its pages
    np.testing.assert_array_equal(s.read_region((0, 0), 0, (50, 60)), np.moveaxis(stack[0], 0, -1))
    np.testing.assert_array_equal(s.read_region((7, 9), 0, (20, 30)), np.moveaxis(stack[0, :, 9:39, 7:27], 0, -1))
    with tifffile.TiffFile(tmp_path / "trunc.tif") as t:
        start = t.series[0].dataoffset
    with open(tmp_path / "trunc.tif", "r+b") as f:  # a stack cut short in its third channel is said to be so
        f.truncate(start + int(2.5 * 60 * 50 * 2))
    with pytest.raises(SlideReadError, match="file is truncated"):
        histoflow.open_slide(tmp_path / "trunc.tif")

    big = rng.integers(0, 60000, (2, 2000, 2000), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", big, imagej=True, metadata={"axes": "CYX"})
    with tifffile.TiffFile(tmp_path / "big.tif") as t:
        assert t.pages[0].rowsperstrip == 2000  # one strip per plane
    s = histoflow.open_slide(tmp_path / "big.tif")
    tracemalloc.start()
    try:
        got = s.read_region((1000, 1990), 0, (16, 10))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(got, np.moveaxis(big[:, 1990:2000, 1000:1016], 0, -1))
    assert peak < 3 * 2**20  # a few rows of each channel, not the 8 MB planes
    got[:] = 0  # a region is the caller's to change
    tifffile.imwrite(tmp_path / "be.tif", big[0], byteorder=">", rowsperstrip=700)
    np.testing.assert_array_equal(histoflow.open_slide(tmp_path / "be.tif").read_region((0, 0), 0, (2000, 2000))[..., 0],
                                  big[0])


def test_ycbcr_without_jpeg_is_converted_to_rgb(tmp_path):
    """Only the JPEG codec converts YCbCr: zlib or uncompressed YCbCr came back as Y, Cb, Cr named R, G, B
    (a mean error of 34 grey levels against Pillow and OpenSlide)."""
    rgb = np.asarray(Image.open(data_path("he_patches", "stardist_histo.jpg")).convert("RGB"))[:128, :128].copy()
    ycc = np.asarray(Image.fromarray(rgb).convert("YCbCr"))
    for comp in ("zlib", None):
        path = tmp_path / f"ycc_{comp}.tif"
        tifffile.imwrite(path, ycc, photometric="ycbcr", subsampling=(1, 1), compression=comp, tile=(64, 64))
        s = histoflow.open_slide(path)
        got = s.read_region((0, 0), 0, (128, 128)).astype(int)
        assert s.brightfield and s.channel_names == ["R", "G", "B"]
        assert np.abs(got - np.asarray(Image.open(path).convert("RGB"))).max() <= 1
        assert np.abs(got - rgb).mean() < 1.5


# ------------------------------------------------------------------ session 22 review: multi-file OME, labels, units
def _ome_xml(uuid, planes, size=16, channels=("DAPI", "CD3"), z=1, unit=None):
    """OME-XML whose TiffData entries place each (z, c) plane in a named file and IFD."""
    u = f' PhysicalSizeXUnit="{unit}" PhysicalSizeYUnit="{unit}"' if unit else ""
    ch = "".join(f'<Channel ID="Channel:0:{i}" SamplesPerPixel="1" Name="{n}"/>' for i, n in enumerate(channels))
    td = "".join(f'<TiffData FirstZ="{zz}" FirstC="{c}" IFD="{ifd}" PlaneCount="1"><UUID FileName="{fn}">'
                 f'urn:uuid:{fn}</UUID></TiffData>' for (zz, c), (fn, ifd) in planes.items())
    return ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
            f'UUID="urn:uuid:{uuid}"><Image ID="Image:0" Name="x"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" '
            f'Type="uint16" SizeX="{size}" SizeY="{size}" SizeC="{len(channels)}" SizeZ="{z}" SizeT="1" '
            f'PhysicalSizeX="0.5" PhysicalSizeY="0.5"{u}>{ch}{td}</Pixels></Image></OME>')


def test_multi_file_ome_tiff_is_refused_not_read_from_the_wrong_file(tmp_path):
    """Planes stored in companion files were read at their offsets from the file opened: every channel showed the
    first file's pixels under the right names. Refused now, naming the other files."""
    import tifffile

    planes = {(0, c): (f"c{c}.ome.tif", 0) for c in range(2)}
    for c in range(2):
        tifffile.imwrite(tmp_path / f"c{c}.ome.tif", np.full((16, 16), 1000 * (c + 1), np.uint16),
                         description=_ome_xml(f"c{c}.ome.tif", planes), metadata=None, photometric="minisblack")
    assert tifffile.imread(tmp_path / "c0.ome.tif").shape == (2, 16, 16)   # tifffile reads both files
    with pytest.raises(UnsupportedFormatError, match=r"c0.ome.tif: a multi-file OME-TIFF: planes .* in c1.ome.tif"):
        open_slide(tmp_path / "c0.ome.tif")


def test_missing_ome_plane_is_an_error_not_a_shifted_channel(tmp_path):
    """A plane whose file is missing was dropped before the Z/C index arithmetic: Z=1's DAPI was read as CD3."""
    import tifffile

    planes = {(0, 0): ("zc.ome.tif", 0), (0, 1): ("gone.ome.tif", 0), (1, 0): ("zc.ome.tif", 1),
              (1, 1): ("zc.ome.tif", 2)}
    with tifffile.TiffWriter(tmp_path / "zc.ome.tif") as tw:
        for i, v in enumerate((100, 300, 400)):
            tw.write(np.full((16, 16), v, np.uint16), description=_ome_xml("zc.ome.tif", planes, z=2) if i == 0
                     else None, metadata=None, photometric="minisblack")
    with pytest.raises(SlideReadError, match=r"zc.ome.tif: 1 of the image's 2 channel planes are missing \(channel "
                                             r"index 1\)"):
        open_slide(tmp_path / "zc.ome.tif")


def test_a_reduced_label_image_is_not_a_pyramid_level(tmp_path):
    """A reduced-resolution page of another shape (a portrait label after a landscape pyramid) became the last
    level, so thumbnails and coarse tiles showed the label."""
    import tifffile

    base = np.full((1001, 1503, 3), 100, np.uint8)
    with tifffile.TiffWriter(tmp_path / "p.tif") as tw:
        tw.write(base, tile=(256, 256), photometric="rgb", resolution=(20000, 20000), resolutionunit="CENTIMETER")
        tw.write(base[::2, ::2], tile=(256, 256), photometric="rgb", subfiletype=1)
        tw.write(base[::4, ::4], tile=(256, 256), photometric="rgb", subfiletype=1)
        tw.write(np.full((200, 120, 3), 250, np.uint8), photometric="rgb", subfiletype=1)
    with open_slide(tmp_path / "p.tif") as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(1503, 1001), (752, 501), (376, 251)]
        assert s.thumbnail(150).mean() == 100


@pytest.mark.parametrize("unit, value, mpp", [("pm", 250000, 0.25), ("in", 1e-5, 0.254), ("thou", 0.01, 0.254),
                                              ("pixel", 1, None), ("reference frame", 1, None)])
def test_ome_pixel_size_units(tmp_path, unit, value, mpp):
    """OME lengths in units the table lacked were taken as µm (1 pixel -> 1 µm/px, 250000 pm -> implausible)."""
    import tifffile

    tifffile.imwrite(tmp_path / "u.ome.tif", np.zeros((16, 16), np.uint16),
                     metadata={"axes": "YX", "PhysicalSizeX": value, "PhysicalSizeY": value,
                               "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit})
    with open_slide(tmp_path / "u.ome.tif") as s:
        if mpp is None:
            assert s.mpp is None and any(f"pixel size in {unit!r}, not a length" in w for w in s.warnings)
        else:
            assert s.mpp == pytest.approx((mpp, mpp))


@pytest.mark.parametrize("unit, res, mpp", [("MILLIMETER", (4000, 2000), (0.25, 0.5)),
                                            ("MICROMETER", (4, 2), (0.25, 0.5))])
def test_tiff_resolution_in_millimetres_and_micrometres(tmp_path, unit, res, mpp):
    import tifffile

    tifffile.imwrite(tmp_path / "r.tif", np.zeros((16, 16), np.uint16), resolution=res, resolutionunit=unit)
    with open_slide(tmp_path / "r.tif") as s:
        assert s.mpp == pytest.approx(mpp)


def test_z_stack_says_which_plane_it_reads(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "z.ome.tif", np.arange(5 * 16 * 16, dtype=np.uint16).reshape(5, 16, 16),
                     metadata={"axes": "ZYX"})
    with open_slide(tmp_path / "z.ome.tif") as s:
        assert s.read_region((0, 0), 0, (16, 16))[..., 0].max() == 255     # Z = 0
        assert any("axes Z (5) beside the channels: only the first plane" in w for w in s.warnings)


@pytest.mark.parametrize("unit", ["microns", "micrometer", "Micrometre", "UM", "&#181;M", "&#181;m", "&#956;m"])
def test_ome_micrometre_spellings(tmp_path, unit):
    """The unit table's exact symbols only: 'micrometer' and the like lost the pixel size (read as µm before)."""
    import tifffile

    xml = ('<?xml version="1.0" encoding="UTF-8"?><OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06">'
           '<Image ID="Image:0"><Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="uint16" SizeX="16" SizeY="16" '
           f'SizeC="1" SizeZ="1" SizeT="1" PhysicalSizeX="0.5" PhysicalSizeY="0.5" PhysicalSizeXUnit="{unit}" '
           f'PhysicalSizeYUnit="{unit}"><Channel ID="Channel:0:0" SamplesPerPixel="1"/><TiffData/></Pixels></Image></OME>')
    tifffile.imwrite(tmp_path / "u.ome.tif", np.zeros((16, 16), np.uint16), description=xml, metadata=None)
    with open_slide(tmp_path / "u.ome.tif") as s:
        assert s.mpp == pytest.approx((0.5, 0.5)), s.warnings


def test_ome_naming_itself_under_another_uuid_is_one_file(tmp_path):
    """TiffData naming this very file under another UUID: tifffile opens it a second time; that is not a
    multi-file OME-TIFF."""
    import tifffile

    planes = {(0, c): ("a.ome.tif", c) for c in range(2)}
    xml = _ome_xml("AAAA", planes).replace("urn:uuid:a.ome.tif", "urn:uuid:BBBB")
    with tifffile.TiffWriter(tmp_path / "a.ome.tif") as tw:
        for c, v in enumerate((100, 200)):
            tw.write(np.full((16, 16), v, np.uint16), description=xml if c == 0 else None, metadata=None,
                     photometric="minisblack")
    with open_slide(tmp_path / "a.ome.tif") as s:
        assert s.channel_names == ["DAPI", "CD3"]
        assert s.read_region((0, 0), 0, (1, 1))[0, 0].tolist() == [100, 200]


def test_small_levels_of_a_tall_pyramid_are_kept(tmp_path):
    """Levels listed as separate series (not halvings) keep their shape to a pixel's rounding on each side; the
    aspect check dropped the narrow ones of a tall slide."""
    import tifffile

    base = np.full((6000, 1200), 7, np.uint8)
    with tifffile.TiffWriter(tmp_path / "t.tif") as tw:
        tw.write(base, tile=(256, 256))
        for f in (5, 25, 125):
            tw.write(base[::f, ::f][: 6000 // f, : 1200 // f].copy(), tile=(16, 16) if 1200 // f >= 16 else None,
                     subfiletype=1)
    ref = [(p.shape[1], p.shape[0]) for p in tifffile.TiffFile(tmp_path / "t.tif").pages]
    with open_slide(tmp_path / "t.tif") as s:
        assert [(lv.width, lv.height) for lv in s.levels] == ref
