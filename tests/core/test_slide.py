"""SlideData on real slides: types, lazy tiling, masks, target mpp, writing h5path."""
import pickle
import tracemalloc

import numpy as np
import pytest
from datafiles import SVS, data_path

from histoflow import RegionError, SlideData, SlideType, read_h5path


@pytest.mark.parametrize("rel,kind", [
    ("wsi/aperio_svs/CMU-1-Small-Region.svs", "HE"),
    ("multiplex/ark_fov8_mibitiff_22ch.tiff", "MIBI"),
    ("wsi/qptiff/small_vectra.qptiff", "Vectra"),
    ("fluorescence/pathml_smalltif.tif", "IF"),
])
def test_slide_type_inferred(rel, kind):
    with SlideData(data_path(rel)) as s:
        assert s.slide_type.name == kind


def test_declared_slide_type_sets_background():
    with SlideData(data_path("wsi", "qptiff", "small_vectra.qptiff"), slide_type="IF") as s:
        assert s.slide_type is SlideType.IF and s.slide_type.background == "black"
        assert (s.read_region((1900, 1400), 0, (64, 64))[40:, 40:] == 0).all()
    # a declared type decides the padding, also after pickling (as on a worker)
    with SlideData(data_path("fluorescence", "instanseg_Fluorescence_example.tif"), slide_type="HE") as s:
        clone = pickle.loads(pickle.dumps(s))
        for obj in (s, clone):
            assert (obj.read_region((440, 440), 0, (20, 20))[15:, 15:] == 255).all()
        clone.close()
    with SlideData(SVS, slide_type="ihc", name="cmu", labels={"grade": 2}) as s:
        assert s.slide_type is SlideType.IHC and s.name == "cmu" and s.labels == {"grade": 2}
    with pytest.raises(ValueError, match="unknown slide type"):
        SlideData(SVS, slide_type="xray")


def test_generate_tiles_is_lazy_and_exact():
    with SlideData(SVS) as s:
        gen = s.generate_tiles(256, overlap=16)
        assert iter(gen) is gen  # a generator, nothing read yet
        tiles = list(gen)
        assert len(tiles) == len(s.grid(256, overlap=16))
        t = tiles[13]
        np.testing.assert_array_equal(t.image, s.read_region(t.coords, 0, (256, 256)))
        assert t.name == f"CMU-1-Small-Region_x{t.coords[0]}_y{t.coords[1]}" and t.slide_type == "HE"
        assert t.mpp == pytest.approx((0.499, 0.499))
        edge = tiles[-1]
        assert edge.image.shape == (256, 256, 3) and (edge.image[-1, -1] == 255).all()


def test_target_mpp_tiles_are_resampled_in_native_dtype():
    with SlideData(SVS) as s:
        tiles = list(s.generate_tiles(128, mpp=1.0, edge="drop"))
        assert len(tiles) == len(s.grid(128, mpp=1.0, edge="drop")) == 8 * 11
        t = tiles[5]
        assert t.image.shape == (128, 128, 3) and t.downsample == pytest.approx(1.0 / 0.499)
        assert t.mpp == pytest.approx((1.0, 1.0))
        # the resampled tile is the area-average of the level-0 pixels it covers
        big = s.read_region(t.coords, 0, (256, 256)).astype(float)
        assert np.abs(t.image.astype(float).mean((0, 1)) - big.mean((0, 1))).max() < 2.0
    with SlideData(data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")) as s:
        tiles = list(s.generate_tiles(256, mpp=0.78125))  # twice the 0.390625 pixel size
        assert len(tiles) == 4 and tiles[0].image.dtype == np.uint16 and tiles[0].image.shape == (256, 256, 22)


def test_slide_masks_cropped_to_tiles_and_filtering():
    with SlideData(SVS) as s:
        mask = np.zeros((2967 // 8 + 1, 2220 // 8 + 1), np.uint8)
        mask[:, : 1000 // 8] = 1  # left part of the slide
        s.add_mask("tissue", mask, downsample=8)
        tiles = list(s.generate_tiles(256, mask="tissue", min_coverage=0.5))
        assert tiles and all(t.coords[0] < 1000 for t in tiles)
        assert len(tiles) == 4 * 12  # columns 0-3 (x < 1000 covers >= half of column 3: 768..1000)
        t = tiles[0]
        assert t.masks["tissue"].shape == (256, 256) and t.masks["tissue"].all()
        with pytest.raises(RegionError, match="no slide mask named 'tumour'"):
            s.grid(256, mask="tumour")


def test_slide_masks_that_do_not_cover_the_slide_are_refused():
    """A transposed mask, a wrong or non-positive downsample, an empty mask: refused by add_mask, naming the slide,
    instead of silently keeping the wrong tiles (a transposed all-tissue mask dropped 45 of 108) or failing later."""
    with SlideData(SVS) as s:  # 2220 x 2967 (w x h)
        s.add_mask("ok", np.ones((297, 222), bool))              # downsample 10, as the slide's shape
        s.add_mask("ok_ds", np.ones((371, 278), bool), downsample=8)  # ceil(2967/8) x ceil(2220/8)
        assert len(s.grid(256, mask="ok", min_coverage=1.0)) == len(s.grid(256, mask="ok_ds", min_coverage=1.0))
        for arr, ds, match in [(np.ones((222, 297), bool), None, r"expected shape about \(397, 297\).*transposed"),
                               (np.ones((10, 10), bool), -2, "downsample must be a positive number"),
                               (np.ones((10, 10), bool), "x", "downsample must be a positive number"),
                               (np.ones((10, 10), bool), float("nan"), "downsample must be a positive number"),
                               (np.ones((371, 278), bool), 4, "covers 1112 x 1484 px of level 0"),
                               (np.zeros((0, 100), bool), None, "is empty"),
                               (np.zeros((10, 0), bool), None, "is empty"),
                               (np.array([["a"]]), None, "dtype <U1")]:
            with pytest.raises(RegionError, match=match) as e:
                s.add_mask("bad", arr, ds)
            assert "CMU-1-Small-Region.svs" in str(e.value)
        assert "bad" not in s.masks
        with pytest.raises(RegionError, match=r"at that downsample$"):  # not transposed: no such hint
            s.add_mask("bad", np.ones((371, 278), bool), 4)


def test_masks_from_thumbnails_of_long_narrow_slides_are_accepted(tmp_path):
    """A thumbnail of a 400 x 5000 slide is 20 px wide: its width is rounded by 2.4 %, and a mask made from it
    must still be accepted (as the tissue pre-pass makes them)."""
    import tifffile

    with SlideData(SVS) as s:
        strip = s.read_region((900, 0), 0, (400, 2500))
    path = tmp_path / "narrow.tif"
    tifffile.imwrite(path, np.concatenate([strip, strip[::-1]]), tile=(256, 256), photometric="rgb")
    with SlideData(path) as s:
        assert s.dimensions == (400, 5000)
        for size in (64, 256, 1024, 2048):
            th = s.thumbnail(size)
            s.add_mask(f"tissue{size}", th.mean(axis=2) < 220)  # darker than glass
            assert s.masks[f"tissue{size}"].downsample == pytest.approx(400 / th.shape[1])
        assert 0 < len(s.grid(256, mask="tissue256")) <= 40


def test_tiling_memory_does_not_grow_with_the_slide(mosaic2):
    """Iterating the 432 tiles of a 4440 x 5934 level keeps only a tile or two alive at a time."""
    with SlideData(mosaic2) as s:
        tracemalloc.start()
        n = 0
        for tile in s.generate_tiles(256):
            n += 1
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert n == 18 * 24
    level_bytes = 4440 * 5934 * 3
    assert peak < 8 * 256 * 256 * 3 and peak < level_bytes / 40, peak


def test_write_and_read_back(tmp_path):
    out = tmp_path / "cmu.h5path"
    with SlideData(SVS, labels={"grade": 2, "site": "lung"}) as s:
        s.add_mask("left", np.ones((100, 75), np.uint8))
        s.write(out, tiles=s.generate_tiles(512, edge="drop"))
        want = s.read_region((1024, 512), 0, (512, 512))
    with read_h5path(out) as h5:
        assert len(h5) == 4 * 5
        assert h5.slide["mpp"] == pytest.approx((0.499, 0.499)) and h5.slide["slide_type"] == "HE"
        assert h5.labels == {"grade": 2, "site": "lung"}
        t = h5.tile((1024, 512))
        np.testing.assert_array_equal(t.image, want)
        assert t.masks["left"].shape == (512, 512)
        assert h5.masks["left"].shape == (100, 75) and h5.mask_downsample("left") == pytest.approx(2220 / 75)


def test_slide_data_pickles():
    with SlideData(SVS) as s:
        clone = pickle.loads(pickle.dumps(s))
        np.testing.assert_array_equal(clone.read_region((5, 5), 0, (9, 9)), s.read_region((5, 5), 0, (9, 9)))
        clone.close()


def test_outline_instances_draws_rims_of_each_object():
    from histoflow.utils import outline_instances

    lab = np.zeros((8, 10), np.int32)
    lab[1:5, 1:4] = 1
    lab[1:5, 4:7] = 2  # touches object 1
    lab[6:8, 8:10] = 3  # touches the image border
    rgb = np.full((8, 10, 3), 50, np.uint8)
    out = outline_instances(rgb, lab, colour=(255, 0, 0))
    drawn = np.all(out == (255, 0, 0), axis=2)
    expect = np.zeros((8, 10), bool)
    expect[1:5, 1:7] = True
    expect[2:4, 2] = False  # interior of 1
    expect[2:4, 5] = False  # interior of 2
    expect[6, 8:10] = True  # 3 is 2x2: all rim (its border with the image edge does not count, its others do)
    expect[7, 8] = True
    assert np.array_equal(drawn, expect)
    assert np.all(out[~drawn] == 50) and rgb.max() == 50  # input untouched
    # a label image larger than the picture: nearest neighbour, so a 2x picture of a 2x label image is the same
    big = np.kron(lab, np.ones((2, 2), np.int32))
    assert np.array_equal(outline_instances(rgb, big, colour=(255, 0, 0)), out)
    with pytest.raises(ValueError):
        outline_instances(rgb, lab[None])


def test_slide_mask_crop_lines_up_with_the_tile_pixels():
    """Each tile-mask pixel is the mask pixel under the level-0 centre of that tile pixel, for masks at any
    downsample (a thumbnail's 1.45, 3, 16) and tiles at any resolution; zero off the mask."""
    from histoflow.core.slide import SlideMask

    ids = np.arange(300 * 400, dtype=np.int64).reshape(300, 400) + 1  # every mask pixel unique
    for ds in (1.0, 1.45, 3.0, 16.0):
        m = SlideMask(ids, ds)
        for x, y, w0, size in ((37, 11, 256, 256), (500, 260, 512, 256), (90, 45, 384, 256), (-40, -8, 256, 128)):
            got = m.crop(x, y, w0, w0, (size, size))
            centre = x + (np.arange(size) + 0.5) * w0 / size, y + (np.arange(size) + 0.5) * w0 / size
            cx, cy = (np.floor(c / ds).astype(int) for c in centre)
            inside = (cy[:, None] >= 0) & (cy[:, None] < 300) & (cx[None, :] >= 0) & (cx[None, :] < 400)
            want = np.where(inside, ids[np.clip(cy, 0, 299)[:, None], np.clip(cx, 0, 399)[None, :]], 0)
            assert np.array_equal(got, want), (ds, x, y, w0, size)


def test_a_grid_finer_than_level_0_warns_that_it_interpolates():
    """--mpp 0.1 on a 0.499 µm/px slide made 2552 tiles enlarged 5x from level 0, without a word."""
    import warnings

    with SlideData(SVS) as s:
        with pytest.warns(UserWarning, match=r"CMU-1-Small-Region.svs: tiles at 0.1 µm/px are finer than the slide's "
                                             r"finest level \(0.499 µm/px\): level 0 is enlarged 4.99x and its pixels "
                                             r"interpolated, not scanned"):
            g = s.grid(256, mpp=0.1)
        assert g.upsampled and len(g) == 2552
        with pytest.warns(UserWarning, match="finer than the slide's finest level"):
            next(s.generate_tiles(256, mpp=0.49))  # 1.8 % finer: past the 1 % that matches a level
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for kwargs in ({}, {"level": 0}, {"mpp": 0.499}, {"mpp": 0.495}, {"mpp": 0.504}, {"mpp": 2.0}):
                assert not s.grid(256, **kwargs).upsampled


def _origin(grid, spec):
    """A tile's top-left in the grid's output pixels."""
    return spec.col * grid.stride[0], spec.row * grid.stride[1]


def _area_reference(level, i, j, r):
    """Output pixel (i, j) of a level resampled by r > 1, by hand: the mean of the level pixels under its square
    [j r, (j + 1) r) x [i r, (i + 1) r), each weighted by the part it covers (inside the level only)."""
    h, w = level.shape[:2]
    total, acc = 0.0, np.zeros(level.shape[2])
    y0, y1, x0, x1 = i * r, min((i + 1) * r, h), j * r, min((j + 1) * r, w)
    for yy in range(int(y0), int(np.ceil(y1))):
        wy = min(y1, yy + 1) - max(y0, yy)
        for xx in range(int(x0), int(np.ceil(x1))):
            wgt = wy * (min(x1, xx + 1) - max(x0, xx))
            acc += wgt * level[yy, xx]
            total += wgt
    return acc / total


def test_tiles_at_a_target_mpp_are_windows_of_one_resampled_level():
    """A tile at a target µm/px was its rounded level-0 rectangle (256 or 257 level pixels by where it fell)
    resized on its own: shifted by up to half a level pixel and stretched by up to one, so two tilings gave a
    shared pixel other values (a nucleus model's objects then varied with the tiling). Each output pixel is now
    the exact area average of the level pixels under it, by its place in the whole resampled level: tiles of
    any size and overlap agree, pixel for pixel."""
    rng = np.random.default_rng(0)
    with SlideData(SVS) as s:
        level = s.read_region((0, 0), 0, s.dimensions)
        for mpp, (a, oa), (b, ob) in ((1.0, (128, 0), (200, 57)), (0.6, (96, 40), (150, 7)), (2.6, (64, 9), (40, 0))):
            ga, gb = s.grid(a, overlap=oa, mpp=mpp), s.grid(b, overlap=ob, mpp=mpp)
            h, w = int(np.ceil(ga.out_size[1])), int(np.ceil(ga.out_size[0]))
            canvas = np.full((h + a, w + a, 3), -1, np.int16)
            for spec in ga:
                x, y = _origin(ga, spec)
                canvas[y:y + a, x:x + a] = s.read_tile(spec).image
            for spec in list(gb)[::3]:
                (x, y), img = _origin(gb, spec), s.read_tile(spec).image
                assert np.array_equal(canvas[y:y + b, x:x + b][:h - y, :w - x], img[:h - y, :w - x]), (mpp, spec)
            r = ga.downsample
            if r > 1:  # against the definition, pixel by pixel (level 0 of this slide)
                for i, j in zip(rng.integers(0, h, 12), rng.integers(0, w, 12)):
                    assert np.abs(canvas[i, j] - _area_reference(level, i, j, r)).max() <= 0.5 + 1e-6, (mpp, i, j)
        # the last column and row: partly over the edge, they average the slide's pixels only; wholly over it: fill
        g = s.grid(256, mpp=1.3, edge="pad")
        spec = g[len(g) - 1]
        (x, y), tile, r = _origin(g, spec), s.read_tile(spec).image, g.downsample
        i, j = int(np.ceil(s.dimensions[1] / r)) - 1 - y, int(np.ceil(s.dimensions[0] / r)) - 1 - x
        assert np.abs(tile[i, j] - _area_reference(level, y + i, x + j, r)).max() <= 0.5 + 1e-6
        assert (tile[i + 1:] == 255).all() and (tile[:, j + 1:] == 255).all()


@pytest.mark.filterwarnings("ignore:.*finer than the slide's finest level")
def test_tiles_finer_than_level_0_are_windows_of_one_enlarged_level(tmp_path):
    """A tile finer than level 0 was its rounded level-0 rectangle enlarged on its own: shifted by up to half a
    level-0 pixel (several output pixels) and stretched, so on a fine-textured slide a tile differed from the
    whole level enlarged by up to 246 grey levels, and two tilings from each other. Each output pixel is now the
    bilinear interpolation at its place in the whole enlarged level: tiles equal OpenCV's and Pillow's bilinear
    resize of the whole image (within 1 for their fixed-point rounding) and agree with each other exactly."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (130, 150, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "r.png")
    with SlideData(str(tmp_path / "r.png"), mpp=0.5) as s:
        for f, (a, oa), (b, ob) in ((2, (48, 11), (64, 0)), (2.5, (33, 7), (40, 3)), (4, (64, 0), (29, 9))):
            w, h = int(150 * f), int(130 * f)
            whole = cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR).astype(int)
            pil = np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR)).astype(int)
            ga, gb = s.grid(a, overlap=oa, mpp=0.5 / f), s.grid(b, overlap=ob, mpp=0.5 / f)
            assert ga.upsampled and ga.downsample == pytest.approx(1 / f)
            canvas = np.full((h + a, w + a, 3), -1, np.int16)
            for spec in ga:
                (x, y), tile = _origin(ga, spec), s.read_tile(spec)
                canvas[y:y + a, x:x + a] = tile.image
                assert np.abs(canvas[y:y + a, x:x + a][:h - y, :w - x] - whole[y:y + a, x:x + a]).max() <= 1, (f, spec)
                assert np.abs(canvas[y:y + a, x:x + a][:h - y, :w - x] - pil[y:y + a, x:x + a]).max() <= 1, (f, spec)
                if tile.extent is not None:  # the edge tiles: the slide's pixels, then the fill
                    ew, eh = tile.extent
                    assert (ew, eh) == (min(a, w - x), min(a, h - y))
                    assert (tile.image[eh:] == 255).all() and (tile.image[:, ew:] == 255).all()
            for spec in gb:
                (x, y), img_b = _origin(gb, spec), s.read_tile(spec).image
                assert np.array_equal(canvas[y:y + b, x:x + b][:h - y, :w - x], img_b[:h - y, :w - x]), (f, spec)


def test_tiles_at_a_whole_multiple_of_a_level_are_its_block_means(tmp_path):
    """At twice a level's pixel size every tile pixel is the mean of a 2 x 2 block (as OpenCV's area resize of
    the whole level gives it), wherever the tile lies."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "r.png")
    whole = cv2.resize(img, (130, 150), interpolation=cv2.INTER_AREA)
    with SlideData(str(tmp_path / "r.png"), mpp=0.25) as s:
        grid = s.grid(48, overlap=11, mpp=0.5)
        for spec in grid:
            x, y = _origin(grid, spec)
            tile = s.read_tile(spec).image[:150 - y, :130 - x]
            assert np.abs(tile.astype(int) - whole[y:y + 48, x:x + 48]).max() <= 1


def test_a_nan_pixel_of_a_float_slide_stays_in_the_pixels_that_cover_it(tmp_path):
    """Output pixels were sums over a fixed number of level pixels, those they do not cover weighted 0: a NaN
    beside them (0 x NaN is NaN) made them NaN too."""
    import tifffile

    a = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    a[10, 12] = np.nan
    tifffile.imwrite(tmp_path / "f.tif", a)
    with SlideData(str(tmp_path / "f.tif"), mpp=0.5) as s:
        for mpp, want in ((1.0, [[5, 6]]), (1.25, [[4, 4], [4, 5]])):  # level pixel 12 spans [10, 12.5) and on
            g = s.grid(16, mpp=mpp)
            assert np.argwhere(np.isnan(s.read_tile(g[0]).image[:, :, 0])).tolist() == want, mpp


def test_work_arrays_kept_per_thread_stay_within_their_budget(tmp_path):
    """The 16 MB bound on the work arrays a thread keeps was per array: six of them, in two float types, held
    ~130 MB for the life of the thread (every DataLoader worker, every dask worker thread)."""
    from histoflow.core import resample

    with SlideData(SVS) as s:
        for size in (256, 1024):
            for spec in list(s.grid(size, mpp=0.65))[:2]:
                s.read_tile(spec)
    kept = sum(b.nbytes for b in resample._WORK.arrays.values())
    assert 0 < kept <= resample._KEEP_BYTES


def test_the_extent_of_an_edge_tile_at_a_target_mpp_is_its_pixels_that_touch_the_slide():
    """An edge tile's extent came from its rounded level-0 corner while its pixels come from its exact place in
    the resampled level: at 0.73 µm/px the last row of slide pixels was declared outside (236 for 237 rows),
    and steps that run on the part inside (the nucleus model) cut it off."""
    with SlideData(SVS) as s:
        for mpp in (0.73, 0.61, 1.3):
            g = s.grid(256, mpp=mpp)
            for spec in (g[len(g) - 1], next(t for t in g if t.row == g.rows - 1)):
                t = s.read_tile(spec)
                ew, eh = t.extent or spec.size
                data = ~np.all(t.image == 255, axis=2)  # fill is white; this slide's glass is not
                assert data[:, :ew].any(axis=0).all() and not data[:, ew:].any(), (mpp, spec)
                assert data[:eh].any(axis=1).all() and not data[eh:].any(), (mpp, spec)


def test_a_mask_grid_keeps_only_tiles_the_mask_touches():
    """Coverage comes from an integral image: a tile with no mask pixel under it came out as ~1e-15 instead of 0
    and was kept at min_coverage=0 (1 of 61 tissue tiles of CMU-1, 12 % on a mosaic), against the docs' "kept
    when the mask touches it at all"."""
    from histoflow.engine import tissue_prepass

    with SlideData(SVS) as s:
        mask, ds = tissue_prepass(s)
        for kw in ({}, {"overlap": 64}, {"mpp": 1.0}):
            grid = s.grid(256, mask="tissue", **kw)
            assert len(grid) > 10
            for spec in grid:
                x0, y0 = int(spec.x // ds), int(spec.y // ds)
                x1, y1 = int(np.ceil((spec.x + spec.width0) / ds)), int(np.ceil((spec.y + spec.height0) / ds))
                assert mask[y0:y1, x0:x1].any(), (kw, spec.row, spec.col)


def test_masks_given_to_grid_and_to_the_constructor_are_checked_as_add_mask_checks(tmp_path):
    """grid(mask=array) took a transposed mask (24 of the 54 tiles, the wrong ones) and a text array (numpy's
    error); SlideData(masks=..., labels=...) raised numpy's and dict's errors for a list instead of a tuple or a
    dict, without the slide's name, and left the reader open; SlideDataset wrote slides named '../x' outside its
    folder."""
    from histoflow import ParameterError, SlideDataset

    with SlideData(SVS) as s:
        w, h = s.dimensions
        m = np.ones((round(h / 10), round(w / 10)), bool)
        assert len(s.grid(256, mask=m)) == len(s.grid(256))
        with pytest.raises(RegionError, match=r"CMU-1-Small-Region.svs: slide mask .* \(is the mask transposed\?\)"):
            s.grid(256, mask=m.T)
        with pytest.raises(RegionError, match=r"CMU-1-Small-Region.svs: slide mask .* has dtype <U1"):
            s.grid(256, mask=np.full(m.shape, "x"))
    for kw, match in (({"masks": {"t": [m, 10.0]}}, r"slide mask 't' is not an array .* as a tuple"),
                      ({"masks": {"t": (m, 10.0, "x")}}, r"slide mask 't': give an array or \(array, downsample\)"),
                      ({"masks": [m]}, r"masks must be a dict"),
                      ({"labels": ["grade", 2]}, r"labels must be a dict \{name: value\}, got list")):
        with pytest.raises((RegionError, ParameterError), match=r"CMU-1-Small-Region.svs: " + match):
            SlideData(SVS, **kw)
    assert SlideData(SVS, masks={"t": (m, 10.0)}, labels={"grade": 2}).masks["t"].downsample == 10.0
    for name in ("../esc", "sub/a", ".."):
        with pytest.raises(ParameterError, match=r"the slide's name .* cannot hold a folder separator"):
            SlideDataset([SlideData(SVS, name=name)]).run(None, tmp_path / "out", executor="inprocess")
    assert list(tmp_path.iterdir()) == []


def test_thumbnails_larger_than_the_image_take_the_row_under_each_pixel():
    """Enlarging (a 2048 px view of a 1024 px image), the last row of each strip repeated the row before instead of
    taking its own source row: 8-11 wrong rows on the 22-channel MIBI image, whose strips are short."""
    from histoflow.errors import PipelineError
    from histoflow.engine import tissue_prepass

    mibi = data_path("multiplex", "ark_fov8_mibitiff_22ch.tiff")
    with SlideData(mibi) as s:
        full = s.read_region((0, 0), 0, s.dimensions)
        for n in (2048, 1500):
            t = s.thumbnail(n)
            rows = np.minimum((np.arange(t.shape[0]) * (full.shape[0] / t.shape[0])).astype(int), full.shape[0] - 1)
            cols = np.minimum((np.arange(t.shape[1]) * (full.shape[1] / t.shape[1])).astype(int), full.shape[1] - 1)
            assert np.array_equal(t, full[rows][:, cols])
    # the tissue pre-pass refuses a multiplex slide before making that view (176 MiB for this one): its own
    # reason, not a RegionTooLargeError about a thumbnail nobody asked for
    with SlideData(mibi, max_region_bytes=100 * 2**20) as s, \
            pytest.raises(PipelineError, match=r"the tissue pre-pass detects H&E-like tissue; for a MIBI slide"):
        tissue_prepass(s)


def test_a_grid_resampled_from_a_short_level_ends_with_its_data(mosaic8):
    """Level 2 of the 8x mosaic covers 1,112 px x 15.96 = 17,749 of level 0's 17,760: a grid at 17.34 level-0 px
    per output pixel counted its columns from level 0 (1,024.2 px: five of 256) and its last column began past
    the level's data, a tile of fill only that said one column of it was slide."""
    with SlideData(mosaic8) as s:
        r = 17.34
        g = s.grid(256, mpp=float(s.mpp[0]) * r)
        assert g.level == 2 and g.cols == 4 and g.out_size[0] == pytest.approx(1112 * 15.9614 / r, rel=1e-4)
        for row in (0, g.rows - 1):
            tile = s.read_tile(g.spec(row, g.cols - 1))
            ew = tile.extent[0] if tile.extent else 256
            assert ew >= 255 and (tile.image[:, :ew] != 255).any()


def test_a_tile_of_another_slides_grid_is_refused(mosaic2):
    """A grid made on one slide and read on another: a level the slide lacks was a bare IndexError, a tile wholly
    outside it a tile of fill that said one pixel of it was slide."""
    with SlideData(mosaic2) as big, SlideData(SVS) as small:
        for kwargs, said in (({"level": 1}, r"the tile is at level 1, which it does not have \(1 level\)"),
                             ({"mpp": 3.0}, r"the tile is at level 1, which it does not have \(1 level\)"),
                             ({"level": 0}, r"the tile is at \(4352, 5888\) \+ 256 x 256, outside its 2220 x 2967 px")):
            g = big.grid(256, **kwargs)
            with pytest.raises(RegionError, match=rf"CMU-1-Small-Region.svs: {said}: a TileSpec of another slide's"):
                small.read_tile(g[len(g) - 1])
        assert small.read_tile(big.grid(256)[0]).image.shape == (256, 256, 3)  # a tile it holds reads as ever
