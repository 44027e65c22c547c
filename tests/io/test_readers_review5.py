"""Channel stacks the readers took apart, channel names of written stores, and quantify's slide type (session 28
review)."""
import numpy as np
import pytest
import tifffile
from datafiles import data_path

from histoflow import open_slide
from histoflow.core.slide import SlideData
from histoflow.errors import ParameterError
from histoflow.store import read_h5path

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
NAMES = ["HH3", "CD3", "CD8", "CD45"]


@pytest.fixture(scope="module")
def planes():
    return tifffile.imread(MIBI)[[13, 4, 7, 6], :200, :200]


def test_channels_written_page_by_page_are_said_to_be_left_out(tmp_path, planes):
    """A stack written one page a channel (tifffile lists each page as a series), or an OME-TIFF of one Image a
    channel, was read as its first channel alone, without a word (quantify wrote a 1-channel table)."""
    pages = tmp_path / "pages.tif"
    with tifffile.TiffWriter(pages) as tw:
        for name, p in zip(NAMES, planes):
            tw.write(p, photometric="minisblack", extratags=[(285, "s", 0, name, False)])
    ome = tmp_path / "multi.ome.tif"
    with tifffile.TiffWriter(ome, ome=True) as tw:
        for name, p in zip(NAMES, planes):
            tw.write(p, photometric="minisblack", metadata={"axes": "YX", "Name": name})
    for path in (pages, ome):
        with pytest.warns(UserWarning, match=r"3 more image\(s\) of the slide's size .*'CD3', 'CD8', 'CD45'"):
            r = open_slide(path)
        with r:
            assert r.channels == 1 and any("not read" in w for w in r.warnings)
    stack = tmp_path / "stack.tif"  # the way the warning advises: one image of four channels, nothing left out
    tifffile.imwrite(stack, planes, photometric="minisblack", metadata={"axes": "CYX"})
    with open_slide(stack) as r:
        assert r.channels == 4 and not any("not read" in w for w in r.warnings)


def test_imagej_hyperstack_channel_names_beside_z(tmp_path, planes):
    """ImageJ keeps one label a plane (C fastest): with Z = 2 the 6 labels did not match 3 channels and the names
    became 'channel 0' ..."""
    zc = np.stack([planes[:3], planes[:3]])
    path = tmp_path / "zc.tif"
    tifffile.imwrite(path, zc, imagej=True, metadata={"axes": "ZCYX", "Labels": NAMES[:3] * 2})
    with open_slide(path) as r:
        assert r.channel_names == NAMES[:3]


def test_written_stores_name_collapsed_fluorescence_channels_honestly(tmp_path, planes):
    """SlideData.write called 3 fluorescence channels R, G, B (and the slide run named them DAPI, CD3, CD8)."""
    from histoflow.transforms import CollapseRunsVectra, Pipeline

    src = tmp_path / "if.ome.tif"
    tifffile.imwrite(src, np.concatenate([planes, planes[:1]]), metadata={
        "axes": "CYX", "Channel": {"Name": ["DAPI", "CD3", "CD8", "CD20", "AF"]},
        "PhysicalSizeX": 0.39, "PhysicalSizeY": 0.39})
    pipe = Pipeline([CollapseRunsVectra(3)])
    with SlideData(src) as s:
        assert s.slide_type.name == "IF"
        s.write(tmp_path / "a.h5path", (pipe(t) for t in s.generate_tiles(128)))
        s.write(tmp_path / "b.h5path", (pipe(t) for t in s.generate_tiles(128)), channel_names=["DAPI", "CD3", "CD8"])
        with pytest.raises(ParameterError, match="2 channel_names for tiles of 3"):
            s.write(tmp_path / "c.h5path", (pipe(t) for t in s.generate_tiles(128)), channel_names=["a", "b"])
        run = s.run(pipe, str(tmp_path / "r.h5path"), tile_size=128, executor="inprocess", progress=False)
    with read_h5path(tmp_path / "a.h5path") as h:
        assert h.slide.get("channel_names") is None
    with read_h5path(tmp_path / "b.h5path") as h:
        assert list(h.slide["channel_names"]) == ["DAPI", "CD3", "CD8"]
    with read_h5path(run) as h:
        assert list(h.slide["channel_names"]) == ["DAPI", "CD3", "CD8"]
    assert not (tmp_path / "c.h5path").exists()


def test_quantify_takes_a_slide_type(tmp_path, capsys):
    """A fluorescence export saved as RGB was measured as H&E, and --nuclear-channel refused, with no way to say
    what it is."""
    from histoflow.cli import main

    m = tifffile.imread(MIBI)[:, :384, :384].astype(float)
    scaled = [np.clip(m[c] / np.percentile(m[c], 99.5) * 255, 0, 255).astype(np.uint8) for c in (4, 19, 13)]
    src = tmp_path / "if_rgb.tif"
    tifffile.imwrite(src, np.dstack(scaled), photometric="rgb", resolution=(1 / 0.39e-4, 1 / 0.39e-4),
                     resolutionunit="CENTIMETER")
    assert main(["quantify", str(src), "-o", str(tmp_path / "c.h5ad"), "--slide-type", "IF", "--nuclear-channel",
                 "B", "--no-progress", "--png", "none"]) == 0
    out = capsys.readouterr().out
    assert "cells x 3 channels (R, G, B)" in out
    import anndata

    a = anndata.read_h5ad(tmp_path / "c.h5ad")
    assert a.n_obs > 20 and list(a.var_names) == ["R", "G", "B"]


def test_unnamed_pages_left_out_are_numbered(tmp_path, planes):
    path = tmp_path / "plain.tif"
    with tifffile.TiffWriter(path) as tw:
        for p in planes:
            tw.write(p, photometric="minisblack")
    with pytest.warns(UserWarning, match=r"\('series 1', 'series 2', 'series 3'\)"):
        open_slide(path).close()


SVS_PATH = data_path("wsi", "aperio_svs", "CMU-1-Small-Region.svs")


@pytest.fixture(scope="module")
def he():
    return tifffile.imread(SVS_PATH, key=0)[600:1300, 400:1300]


def test_an_ome_tiff_whose_first_image_is_the_macro_opens_its_pyramid(tmp_path, he):
    """Bio-Formats puts a converted slide's macro first (a Leica SCN's overview): the 150 px macro was opened as a
    one-level slide at 3 µm/px, and the pyramid ignored."""
    p = tmp_path / "macro_first.ome.tif"
    with tifffile.TiffWriter(p) as tw:
        tw.write(he[::6, ::6].copy(), photometric="rgb", metadata={"Name": "macro", "PhysicalSizeX": 3.0,
                                                                   "PhysicalSizeY": 3.0})
        tw.write(he, photometric="rgb", tile=(256, 256), subifds=1, metadata={
            "Name": "Image0", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
        tw.write(he[::2, ::2], photometric="rgb", tile=(256, 256), subfiletype=1)
    with open_slide(p) as r:
        assert r.dimensions == (900, 700) and len(r.levels) == 2 and r.mpp == (0.5, 0.5)
        assert "macro" in r.associated_images and r.associated_images["macro"].shape[:2] == (117, 150)
        assert any("first image is its 'macro'" in w for w in r.warnings)
        np.testing.assert_array_equal(r.read_region((100, 50), 0, (300, 200)), he[50:250, 100:400])


def test_cmyk_tiffs_read_as_rgb(tmp_path, he):
    """A CMYK TIFF read as four ink channels (fluorescence, 0 fill); Pillow and OpenSlide read it as RGB."""
    from PIL import Image

    cmyk = np.asarray(Image.fromarray(he).convert("CMYK"))
    p = tmp_path / "cmyk.tif"
    tifffile.imwrite(p, cmyk, photometric="separated", tile=(256, 256), compression="zlib")
    with open_slide(p) as r:
        assert r.brightfield and r.channels == 3 and r.channel_names == ["R", "G", "B"]
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (900, 700)), np.asarray(Image.open(p).convert("RGB")))
    tifffile.imwrite(tmp_path / "cmyk16.tif", cmyk.astype(np.uint16), photometric="separated")
    with pytest.raises(Exception, match=r"cmyk16.tif: .*CMYK.*not supported"):
        open_slide(tmp_path / "cmyk16.tif")
    # black ink too: Pillow's (255 - C)(255 - K) / 255, as the image backend reads the same pixels
    inks = np.random.default_rng(0).integers(0, 256, (64, 64, 4), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "inks.tif", inks, photometric="separated")
    Image.fromarray(inks, "CMYK").save(tmp_path / "inks_pil.tif")
    with open_slide(tmp_path / "inks.tif") as r:
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (64, 64)),
                                      np.asarray(Image.fromarray(inks, "CMYK").convert("RGB")))
    # with unassociated alpha: transparent pixels are white, as RGBA's are
    alpha = np.zeros((64, 64, 1), np.uint8)
    alpha[:, :32] = 255
    tifffile.imwrite(tmp_path / "inks_a.tif", np.concatenate([inks, alpha], -1), photometric="separated",
                     extrasamples=[2])
    with open_slide(tmp_path / "inks_a.tif") as r:
        got = r.read_region((0, 0), 0, (64, 64))
    assert (got[:, 32:] == 255).all() and np.array_equal(got[:, :32], np.asarray(
        Image.fromarray(inks, "CMYK").convert("RGB"))[:, :32])
    tifffile.imwrite(tmp_path / "inks2.tif", inks, photometric="separated", extratags=[(332, "H", 1, 2, True)])
    with pytest.raises(Exception, match=r"inks2.tif: .*not supported"):  # InkSet 2: not CMYK
        open_slide(tmp_path / "inks2.tif")


def test_a_one_strip_compressed_image_is_decoded_once(tmp_path, he, monkeypatch):
    """Every read decoded the whole strip again: a 256 px thumbnail of a 4000 x 4000 one decoded it 12 times."""
    import histoflow.io.tiff as T

    p = tmp_path / "onestrip.tif"
    big = np.tile(he, (3, 3, 1))[:2000, :2000]
    tifffile.imwrite(p, big, photometric="rgb", compression="zlib", rowsperstrip=2000)
    calls = []
    original = T.TiffReader._decode_one
    monkeypatch.setattr(T.TiffReader, "_decode_one", lambda self, *a: calls.append(a[2]) or original(self, *a))
    with open_slide(p) as r:
        thumb = r.thumbnail(256)
        a = r.read_region((10, 10), 0, (16, 16))
        a[:] = 0  # the region handed out is the caller's: the kept strip is not changed
        np.testing.assert_array_equal(r.read_region((10, 10), 0, (16, 16)), big[10:26, 10:26])
    assert len(calls) == 1 and thumb.shape[:2] == (256, 256)
    r = open_slide(p)
    r.read_region((0, 0), 0, (8, 8))
    assert "_strip_kept" in r.__dict__
    r.rest()  # a rested reader holds no strip (a cohort's rested readers held theirs: 537 MiB for 20)
    assert "_strip_kept" not in r.__dict__
    np.testing.assert_array_equal(r.read_region((10, 10), 0, (16, 16)), big[10:26, 10:26])
    r.close()
    assert "_strip_kept" not in r.__dict__


def test_thumbnails_stay_within_the_readers_region_bound():
    """A 64 px thumbnail with max_region_bytes=2 MiB was refused: its 4 MiB strips were over the bound."""
    from histoflow.errors import RegionTooLargeError

    with open_slide(SVS_PATH, max_region_bytes=2 * 1024**2) as r:
        assert r.thumbnail(64).shape[:2] == (64, 48)
    with open_slide(SVS_PATH, max_region_bytes=100_000) as r:  # a band of whole rows is over it: said so
        with pytest.raises(RegionTooLargeError, match=r"a 64 x 86 px picture of level 0 .* raise the bound"):
            r.thumbnail(86)


def test_a_damaged_tag_value_is_named(monkeypatch):
    import histoflow.io.tiff as T
    from histoflow.errors import SlideReadError

    def broken(*a, **k):
        raise TypeError("int() argument must be a string, a bytes-like object or a real number, not 'tuple'")

    monkeypatch.setattr(T._Plane, "from_page", broken)
    with pytest.raises(SlideReadError, match=r"pathml_smalltif.tif: damaged TIFF tags on level 0 \(TypeError"):
        open_slide(data_path("fluorescence", "pathml_smalltif.tif"))


def test_pyramid_levels_stored_out_of_order_are_sorted(tmp_path, he):
    """Levels stored 1x, 4x, 2x lost the 2x one; OME SubIFDs so stored kept their order (levels are largest first)."""
    import openslide

    small = {f: he.reshape(700 // f, f, 900 // f, f, 3).mean((1, 3)).astype(np.uint8) for f in (2, 4)}
    generic = tmp_path / "ord.tif"
    with tifffile.TiffWriter(generic) as tw:
        for a, sft in ((he, 0), (small[4], 1), (small[2], 1)):
            tw.write(a, tile=(128, 128), photometric="rgb", subfiletype=sft)
    ome = tmp_path / "ord.ome.tif"
    with tifffile.TiffWriter(ome) as tw:
        tw.write(he, subifds=2, tile=(128, 128), photometric="rgb", metadata={"PhysicalSizeX": 0.25,
                                                                             "PhysicalSizeY": 0.25})
        tw.write(small[4], subfiletype=1, tile=(128, 128), photometric="rgb")
        tw.write(small[2], subfiletype=1, tile=(128, 128), photometric="rgb")
    assert openslide.OpenSlide(str(generic)).level_dimensions == ((900, 700), (450, 350), (225, 175))
    for p in (generic, ome):
        with open_slide(p) as r:
            assert [(lv.width, lv.height) for lv in r.levels] == [(900, 700), (450, 350), (225, 175)]
            assert r.best_level_for_downsample(4) == 2
            np.testing.assert_array_equal(r.read_region((0, 0), 1, (450, 350)), small[2])
