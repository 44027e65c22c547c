"""Reader behaviour on real pixels: pyramids against OpenSlide, padding, dtypes, pickling, thumbnails."""
import pickle

import numpy as np
import openslide
import pytest
import tifffile
from datafiles import SVS, data_path, mosaic

from histoflow import SlideReadError, open_slide
from histoflow.errors import ChannelError, RegionError, RegionTooLargeError, UnsupportedFormatError
from histoflow.io import detect_format

MIBI = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
QPTIFF = data_path("wsi", "qptiff", "small_vectra.qptiff")
JPEG_TIFF = data_path("wsi", "tiled_tiff", "CMU-1-Small-Region.jpeg.tiff")


def aligned_locations(ds, n=4, lo=1, hi=1000):
    """Level-0 coordinates that fall (almost) on a pixel of the level: OpenSlide interpolates at fractional
    level coordinates (histoflow never does), so only there are the two comparable pixel for pixel."""
    out = []
    for k in range(lo, hi):
        x = k * ds
        if abs(x - round(x)) / ds < 0.003:
            out.append(int(round(x)))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("backend", ["tiff", "openslide"])
def test_mosaic_pyramid_matches_openslide(mosaic8, backend):
    ref = openslide.OpenSlide(mosaic8)
    with open_slide(mosaic8, backend=backend) as s:
        assert s.backend == backend
        assert [(lv.width, lv.height) for lv in s.levels] == list(ref.level_dimensions)
        assert [lv.downsample for lv in s.levels] == pytest.approx(list(ref.level_downsamples))
        assert s.mpp == pytest.approx((0.499, 0.499))
        for level in range(3):
            ds = ref.level_downsamples[level]
            lw, lh = ref.level_dimensions[level]
            xs = aligned_locations(ds, lo=1, hi=min(lw, lh) - 300)
            assert len(xs) >= 2
            for x, y in zip(xs, reversed(xs)):
                got = s.read_region((x, y), level, (300, 200))
                want = np.asarray(ref.read_region((x, y), level, (300, 200)).convert("RGB"))
                assert got.shape == (200, 300, 3) and got.dtype == np.uint8
                diff = np.abs(got.astype(int) - want)
                assert diff.max() <= 2 and diff.mean() < 0.1, (level, x, y, diff.max(), diff.mean())


def test_mosaic_default_backend_is_fast_tiff_path(mosaic8):
    assert detect_format(mosaic8).backend == "tiff"
    with open_slide(mosaic8) as s:
        assert s.format == "pyramidal tiled TIFF" and len(s.levels) == 3


def test_regions_across_tile_boundaries_equal_tifffile():
    full = tifffile.imread(SVS, key=0)
    with open_slide(SVS) as s:
        for (x, y, w, h) in [(0, 0, 2220, 2967), (239, 239, 3, 3), (1000, 123, 517, 301), (2000, 2900, 220, 67)]:
            np.testing.assert_array_equal(s.read_region((x, y), 0, (w, h)), full[y:y + h, x:x + w])


def test_padding_white_for_brightfield_black_for_fluorescence():
    with open_slide(SVS) as s:
        r = s.read_region((2200, 2950), 0, (40, 30))
        assert (r[17:, :] == 255).all() and (r[:, 20:] == 255).all()
        assert (r[:17, :20] != 255).any()
        assert (s.read_region((-100, -100), 0, (50, 50)) == 255).all()
    with open_slide(MIBI) as s:
        r = s.read_region((1000, 1000), 0, (48, 48))
        assert r.dtype == np.uint16 and r.shape == (48, 48, 22)
        assert (r[24:, :] == 0).all() and (r[:, 24:] == 0).all()


def test_mibi_uint16_channels_equal_pages():
    pages = tifffile.imread(MIBI)  # (22, 1024, 1024)
    with open_slide(MIBI) as s:
        assert s.format == "MIBItiff" and not s.brightfield
        r = s.read_region((100, 200), 0, (300, 100))
        np.testing.assert_array_equal(r, np.moveaxis(pages[:, 200:300, 100:400], 0, -1))
        assert s.channel_names[13] == "HH3 (89)"


def test_qptiff_channels_and_associated_pages():
    with open_slide(QPTIFF) as s:
        assert s.channel_names == ["DAPI", "FITC", "Cy3"] and not s.brightfield
        assert sorted(s.associated_images) == ["label", "macro", "thumbnail"]  # overview: "macro" as elsewhere
        assert s.associated_images["label"].shape == (120, 199, 3)
        assert len(s.levels) == 1  # thumbnail, overview, label are not levels
        np.testing.assert_array_equal(s.read_region((0, 0), 0, (1920, 1440))[:, :, 1],
                                      tifffile.imread(QPTIFF, key=1))


def test_svs_associated_images_and_metadata():
    with open_slide(SVS) as s:
        assert s.objective_power == 20
        label = s.associated_images["label"]
        assert label.shape == (463, 387, 3) and label.dtype == np.uint8
        assert s.associated_images["thumbnail"].shape == (768, 574, 3)


def test_subifd_pyramid_and_planar_separate_uint16(tmp_path):
    """A pyramid stored in SubIFDs, planar-separate uint16 channels: levels found, pixels exact."""
    rgb = tifffile.imread(SVS, key=0)[:1024, :1536]
    base = (rgb.astype(np.uint16) * 257).transpose(2, 0, 1)  # (3, 1024, 1536) uint16
    path = tmp_path / "subifd.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(256, 256), photometric="minisblack", planarconfig="separate", subifds=2,
                 compression="zlib", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
        for f in (2, 4):
            tw.write(base[:, ::f, ::f], tile=(256, 256), photometric="minisblack", planarconfig="separate",
                     subfiletype=1, compression="zlib")
    with open_slide(path) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == [(1536, 1024), (768, 512), (384, 256)]
        assert s.dtype == np.uint16 and s.channels == 3 and not s.brightfield
        assert s.mpp == pytest.approx((0.25, 0.25))
        np.testing.assert_array_equal(s.read_region((300, 200), 0, (700, 500)),
                                      base[:, 200:700, 300:1000].transpose(1, 2, 0))
        np.testing.assert_array_equal(s.read_region((600, 400), 1, (300, 100)),
                                      base[:, ::2, ::2][:, 200:300, 300:600].transpose(1, 2, 0))


def test_reader_pickles_and_reopens():
    with open_slide(JPEG_TIFF, mpp=0.499) as s:
        want = s.read_region((500, 700), 0, (128, 128))
        clone = pickle.loads(pickle.dumps(s))
    assert clone.mpp == (0.499, 0.499)
    np.testing.assert_array_equal(clone.read_region((500, 700), 0, (128, 128)), want)
    clone.close()


def test_mpp_override_keeps_the_warning():
    with open_slide(JPEG_TIFF, mpp=0.499) as s:
        assert s.mpp == (0.499, 0.499)
        assert any("implausible" in w for w in s.warnings)
        s.mpp = None
        assert s.mpp is None


def test_thumbnail_bounded_and_faithful(mosaic8):
    with open_slide(mosaic8) as s:
        th = s.thumbnail(512)
        assert th.shape == (512, 383, 3) and th.dtype == np.uint8
        # agrees with an area-average of the smallest level (which is what it is made from)
        lvl = s.read_level(2).astype(float)
        assert abs(th.mean() - lvl.mean()) < 1.0
    with open_slide(MIBI) as s:
        th = s.thumbnail(256)
        assert th.shape == (256, 256, 22) and th.dtype == np.uint16
        # a channel subset is the same pixels as those channels of the full thumbnail
        sub = s.thumbnail(256, channels=[5, 0])
        assert sub.shape == (256, 256, 2)
        np.testing.assert_array_equal(sub, th[..., [5, 0]])
        with pytest.raises(RegionError, match=r"thumbnail channels \[22\] out of range.*22 channel"):
            s.thumbnail(256, channels=[22])
        # channels by name; a name the slide lacks, sizes that are no size, or far too large: errors naming the slide
        np.testing.assert_array_equal(s.thumbnail(256, channels=[s.channel_names[5]]), th[..., [5]])
        np.testing.assert_array_equal(s.thumbnail(256, channels=[0, s.channel_names[5]]), th[..., [0, 5]])  # mixed
        with pytest.raises(ChannelError, match=r"ark_fov8.*no channel named 'CD99'"):
            s.thumbnail(64, channels=["CD99"])
        for size in (float("nan"), 64.5, True, "64", 0):
            with pytest.raises(RegionError, match=r"ark_fov8.*thumbnail size must be a positive whole number"):
                s.thumbnail(size)
        with pytest.raises(RegionTooLargeError, match=r"ark_fov8.*1000000 x 1000000 thumbnail"):
            s.thumbnail(10**6)
    # the bound counts the channels asked for: a one-channel 2048 px thumbnail (8 MiB) of the 22-channel FOV is
    # made under a 16 MiB bound (as SegmentNuclei's slide-wide fit asks), all 22 channels (176 MiB) are not
    with open_slide(MIBI, max_region_bytes=16 * 2**20) as s:
        assert s.thumbnail(2048, channels=[0]).shape == (2048, 2048, 1)
        with pytest.raises(RegionTooLargeError, match=r"2048 x 2048 thumbnail: it would take 176"):
            s.thumbnail(2048)


def test_same_thumbnail_again_is_not_read_again(monkeypatch):
    from histoflow.io import base
    calls = []
    real = base._downscale_level
    monkeypatch.setattr(base, "_downscale_level", lambda *a, **k: calls.append(a[1:]) or real(*a, **k))
    with open_slide(MIBI) as s:
        a = s.thumbnail(128)
        a[:] = 0                                  # the caller's copy: scribbling on it changes nothing kept
        b = s.thumbnail(128)
        assert len(calls) == 1 and b.any()
        c = s.thumbnail(128, channels=[3])        # another view is computed, and equals its own channel
        np.testing.assert_array_equal(c[..., 0], b[..., 3])
        assert len(calls) == 2
        np.testing.assert_array_equal(s.thumbnail(128, channels=[3]), c)
        assert len(calls) == 2
    assert s._last_thumbnail is None              # released with the slide
    with open_slide(MIBI) as s2:                  # a fresh reader computes the same thing
        np.testing.assert_array_equal(s2.thumbnail(128), b)


def test_closed_reader_refuses():
    s = open_slide(SVS)
    s.close()
    with pytest.raises(SlideReadError, match="closed"):
        s.read_region((0, 0), 0, (10, 10))


def test_backend_override_image_reads_plain_tiff():
    path = data_path("he_patches", "napari_skin_HE.tif")
    with open_slide(path, backend="image") as a, open_slide(path) as b:
        assert (a.backend, b.backend) == ("image", "tiff")
        np.testing.assert_array_equal(a.read_region((100, 50), 0, (300, 200)), b.read_region((100, 50), 0, (300, 200)))


@pytest.mark.parametrize("rel, what", [
    (("multiplex", "ark_fov8_mibitiff_22ch.tiff"), "a TIFF of 22 pages"),
    (("wsi", "qptiff", "small_vectra.qptiff"), "a TIFF of 6 pages"),
    (("fluorescence", "instanseg_Fluorescence_example.tif"), "a TIFF of 2 pages"),
    (("fluorescence", "pathml_smalltif.tif"), "a TIFF of 2 pages")])
def test_backend_image_refuses_the_tiffs_it_would_read_one_page_of(rel, what):
    """backend='image' kept page 0 of a multi-page TIFF without a word (1 of MIBI's 22 channels, 1 of QPTIFF's
    3 at the TIFF tag's mpp), and made an ImageJ fluorescence channel an RGB 'brightfield' image through its
    display colour table."""
    with pytest.raises(UnsupportedFormatError, match=rf"{rel[-1]}: {what} \(channels, levels or planes\): the "
                                                     r"image backend would read its first page only.*; use "
                                                     r"backend='tiff' \(the default\)"):
        open_slide(data_path(*rel), backend="image")


def test_backend_image_refuses_a_one_page_imagej_tiff(tmp_path):
    import tifffile

    tifffile.imwrite(tmp_path / "ij.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64), imagej=True)
    with pytest.raises(UnsupportedFormatError, match=r"ij.tif: an ImageJ TIFF: the image backend would read its first "
                                                     r"page only through its display colour table; use backend='tiff'"):
        open_slide(tmp_path / "ij.tif", backend="image")
    with open_slide(tmp_path / "ij.tif") as r:
        assert r.channel_names == ["intensity"] and r.read_region((1, 1), 0, (1, 1)).item() == 65


def test_svs_and_its_tiled_tiff_copy_agree():
    """The same CMU-1 region stored as SVS and re-encoded as a JPEG tiled TIFF: same place, same colours."""
    with open_slide(SVS) as a, open_slide(JPEG_TIFF) as b:
        ra, rb = a.read_region((600, 800), 0, (512, 512)), b.read_region((600, 800), 0, (512, 512))
    assert np.abs(ra.astype(int) - rb).mean() < 6  # a second JPEG encoding, pixel-aligned
    np.testing.assert_allclose(ra.reshape(-1, 3).mean(0), rb.reshape(-1, 3).mean(0), atol=1.5)


@pytest.mark.parametrize("n", [2, 3])
def test_every_pyramid_level_as_openslide_lists_them(n):
    """tifffile lists some levels of these pyramids as series of their own (3: levels 0-1 in one, 2 apart)."""
    path = mosaic(n)
    ref = openslide.OpenSlide(path)
    with open_slide(path) as s:
        assert [(lv.width, lv.height) for lv in s.levels] == list(ref.level_dimensions)
        last = len(s.levels) - 1
        w, h = s.levels[last].width, s.levels[last].height
        got = s.read_region((0, 0), last, (w, h))
        want = np.asarray(ref.read_region((0, 0), last, (w, h)).convert("RGB"))
        assert np.abs(got.astype(int) - want).max() <= 2


def test_planar_separate_rgba_tiff(tmp_path):
    """A tiled TIFF with one plane per sample and an alpha plane (a valid layout): the colour planes are
    read, the alpha plane dropped. The samples-per-plane count was 3 // 4 = 0, so regions that were not
    one whole tile came back as uninitialised memory."""
    src = tifffile.imread(SVS, key=0)[:700, :900]
    rgba = np.dstack([src, np.full(src.shape[:2], 255, np.uint8)])
    p = tmp_path / "planar_rgba.tif"
    tifffile.imwrite(p, np.moveaxis(rgba, -1, 0), tile=(256, 256), photometric="rgb", planarconfig="separate",
                     extrasamples=["unassalpha"], compression="zlib")
    with open_slide(str(p)) as r:
        assert r.channel_names == ["R", "G", "B"]
        for x, y, w, h in ((0, 0, 100, 100), (200, 200, 300, 300), (0, 0, 900, 700), (850, 650, 100, 100)):
            got = r.read_region((x, y), 0, (w, h))
            want = np.full((h, w, 3), 255, np.uint8)  # white past the image
            part = src[y:y + h, x:x + w]
            want[:part.shape[0], :part.shape[1]] = part
            np.testing.assert_array_equal(got, want)


def test_png_16_bit_rgb_and_writable_regions(tmp_path):
    """48-bit PNGs keep their 16 bits (Pillow reads them as 8); regions of plain images can be changed in
    place like those of every other backend (they were read-only views of the kept image)."""
    import cv2

    grey = tifffile.imread(data_path("fluorescence", "pathml_smalltif.tif"), key=0)
    assert grey.dtype == np.uint16
    rgb = np.dstack([grey, grey[::-1], 65535 - grey])
    p = str(tmp_path / "rgb16.png")
    cv2.imwrite(p, rgb[..., ::-1])  # OpenCV writes BGR
    with open_slide(p) as r:
        assert r.dtype == np.uint16 and r.channel_names == ["R", "G", "B"]
        region = r.read_region((0, 0), 0, (r.dimensions[0], r.dimensions[1]))
        np.testing.assert_array_equal(region, rgb)
        region[:5] = 0  # writable, and the next read is unchanged
        np.testing.assert_array_equal(r.read_region((0, 0), 0, (40, 40)), rgb[:40, :40])
    with open_slide(data_path("he_patches", "tiatoolbox_stain_target.png")) as r:
        a = r.read_region((10, 10), 0, (32, 32))
        a[:] = 0
        assert r.read_region((10, 10), 0, (32, 32)).max() > 0
